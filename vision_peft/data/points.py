"""Point-cloud datasets for training (torch). Readers and preprocessing live in the torch-free
:mod:`vision_peft.pointio` (re-exported here); see its docstring for formats and the preprocessing order."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vision_peft.data import DATASETS
from vision_peft.data.base import class_folders
from vision_peft.pointio import (  # noqa: F401  (re-exported: the public reader API)
    POINT_EXTS,
    SAMPLING_RULES,
    UP_AXIS_RULES,
    PointAugment,
    PointFileError,
    convert_up_axis,
    eval_rng,
    farthest_point_sample,
    normalize_unit_sphere,
    preprocess_points,
    read_h5,
    read_numpy,
    read_off,
    read_pcd,
    read_ply,
    read_points,
    sample_points,
)

log = logging.getLogger("vision_peft")


# -- datasets -------------------------------------------------------------------------------------------------
@dataclass
class PointSample:
    """One shape: where it comes from and its label."""

    path: str  # file path, or "file.h5[i]" for HDF5 shapes
    label: int
    h5_index: int = -1  # >= 0 for a shape inside an HDF5 file


@dataclass
class PointScan:
    """What a scan of a point-cloud dataset found."""

    root: Path
    classes: list[str]
    splits: dict[str, list[PointSample]]  # "train", "test" …


def scan_point_folder(root: str | Path, classes: list[str] | None = None) -> PointScan:
    """``root/<class>/{train,test}/*.<ext>`` (ModelNet layout) or HDF5 files ``*train*.h5`` / ``*test*.h5`` with
    ``shape_names.txt`` (the ModelNet40 HDF5 layout).

    Raises:
        PointFileError: the folder does not exist, holds neither layout, or a requested class is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise PointFileError(
            f"dataset folder {root} does not exist; set task.data_root to a folder of <class>/train|test/ "
            "point files or HDF5 files (relative paths resolve under $VISION_PEFT_DATA)"
        )
    h5s = sorted(p for p in root.iterdir() if p.suffix.lower() in (".h5", ".hdf5"))
    if h5s:
        names_file = root / "shape_names.txt"
        if not names_file.is_file():
            raise PointFileError(f"{root} holds HDF5 files but no shape_names.txt (one class name per line)")
        try:
            found = [ln.strip() for ln in names_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            raise PointFileError(f"{names_file} is not UTF-8 text ({e}); save it as one class name per line") from None
        if len(found) < 2:
            raise PointFileError(f"{names_file} names {len(found)} class(es); classification needs at least 2")
        splits: dict[str, list[PointSample]] = {"train": [], "test": []}
        for f in h5s:
            split = "train" if "train" in f.name.lower() else "test" if "test" in f.name.lower() else None
            if split is None:
                continue
            _, labels = read_h5(f)
            if labels is None:
                raise PointFileError(f"{f} has no 'label' dataset; a labelled HDF5 split needs one")
            outside = labels[(labels < 0) | (labels >= len(found))]
            if len(outside):
                raise PointFileError(
                    f"{f}: 'label' holds {int(outside[0])}, outside the {len(found)} classes of {names_file} "
                    f"(labels are 0…{len(found) - 1})"
                )
            splits[split] += [PointSample(f"{f}[{i}]", int(y), i) for i, y in enumerate(labels)]
        if classes is not None:
            missing = [c for c in classes if c not in found]
            if missing:
                raise PointFileError(f"class(es) {missing} not in {names_file}; present: {', '.join(found)}")
            remap = {found.index(c): i for i, c in enumerate(classes)}
            splits = {
                k: [PointSample(s.path, remap[s.label], s.h5_index) for s in v if s.label in remap]
                for k, v in splits.items()
            }
            found = list(classes)
        return PointScan(root, found, splits)
    classes = class_folders(root, classes, PointFileError)
    splits = {}
    for label, name in enumerate(classes):
        for sub in sorted(p for p in (root / name).iterdir() if p.is_dir()):
            files = sorted(f for f in sub.iterdir() if f.suffix.lower() in POINT_EXTS)
            splits.setdefault(sub.name, []).extend(PointSample(str(f), label) for f in files)
    if "train" not in splits:
        raise PointFileError(f"{root}/<class>/train/ holds no point files ({', '.join(POINT_EXTS)})")
    return PointScan(root, list(classes), splits)


def load_sample(s: PointSample, extra_columns: str = "take_xyz", off_points: int = 0) -> np.ndarray:
    if s.h5_index >= 0:
        return read_points(s.path.rsplit("[", 1)[0], extra_columns, index=s.h5_index)
    return read_points(s.path, extra_columns, off_points=off_points)


def few_shot_subset(
    samples: list[PointSample], shots: int | None, ratio: float | None, seed: int, num_classes: int
) -> list[PointSample]:
    """K shots per class (``shots``) or a stratified fraction (``ratio``), drawn with ``seed``; None = all."""
    if shots is None and ratio is None:
        return list(samples)
    rng = np.random.default_rng(seed)
    out: list[PointSample] = []
    for c in range(num_classes):
        items = [s for s in samples if s.label == c]
        take = shots if shots is not None else max(1, round(ratio * len(items)))
        if take > len(items):
            raise PointFileError(f"class {c} has {len(items)} training shapes; {take} shots requested")
        out += [items[i] for i in sorted(rng.choice(len(items), size=take, replace=False))]
    return out


class PointCloudDataset(torch.utils.data.Dataset):
    """(points (num_points, 3) float32, label) pairs; raw files are read once and cached in memory.

    Train mode (``augment`` set) re-samples and augments with a generator seeded by (seed, epoch, index), so a
    resumed run sees the same points; eval mode samples with a fixed per-index generator.
    """

    def __init__(
        self,
        samples: list[PointSample],
        num_points: int,
        sampling: str,
        up_axis: str,
        augment: PointAugment | None = None,
        seed: int = 0,
        extra_columns: str = "take_xyz",
        off_points: int = 0,
    ) -> None:
        self.samples, self.num_points, self.sampling, self.up_axis = samples, num_points, sampling, up_axis
        self.augment, self.seed, self.extra_columns, self.off_points = augment, seed, extra_columns, off_points
        self.epoch = 0
        self._cache: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = load_sample(self.samples[i], self.extra_columns, self.off_points)
        return self._cache[i]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        if self.augment is not None:
            rng = np.random.default_rng((self.seed * 7919 + self.epoch) * 1_000_003 + i)
            p = self.augment(
                preprocess_points(self.raw(i), self.num_points, self.sampling, self.up_axis, rng, s.path), rng
            )
        else:
            p = preprocess_points(self.raw(i), self.num_points, self.sampling, self.up_axis, eval_rng(i), s.path)
        return {
            "points": torch.from_numpy(np.ascontiguousarray(p)),
            "label": torch.tensor(s.label),
            "index": torch.tensor(i),
        }


@DATASETS.register(
    "point_folder",
    help="point clouds: root/<class>/{train,test}/*.pcd|off|ply|npy, or HDF5 + shape_names.txt",
    provides=("points", "classes"),
)
def point_folder(root: str | Path, classes: list[str] | None = None) -> PointScan:
    """Point-cloud classification data (folder-per-class with train/test, or HDF5 data/label files)."""
    return scan_point_folder(root, classes)
