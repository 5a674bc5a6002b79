"""Folder-per-class image datasets: ``root/<ClassName>/*.jpg``.

Scanning decodes every image once (at reduced JPEG scale, so 3,000 AID images take about a second) so a
corrupt or non-image file is reported *before* training, by name, and is either skipped with a warning
or fails the run (``bad_files: skip | fail``). Splits are stratified per class, deterministic in the seed,
and written into the run directory.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vision_peft.data import DATASETS
from vision_peft.data.base import class_folders
from vision_peft.preprocess import IMAGE_SUFFIXES, ImageFileError, load_image

log = logging.getLogger("vision_peft")

IMAGE_EXTS = set(IMAGE_SUFFIXES)  # the image file types (vision_peft.preprocess) a class folder may hold
IGNORED = {".ds_store", "thumbs.db", "desktop.ini"}


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file or folder and the fix."""


@dataclass
class FolderScan:
    """What a scan of a folder-per-class dataset found."""

    root: Path
    classes: list[str]  # class names in label order
    samples: list[tuple[str, int]]  # (path, label), sorted by class then file name
    bad: list[tuple[str, str]]  # (path, reason) of files that were skipped


def check_image(path: Path) -> str | None:
    """None when ``path`` decodes as an image (exactly as training will read it, JPEGs at reduced scale), else
    the reason it does not."""
    try:
        load_image(path, draft=(64, 64))
        return None
    except ImageFileError as e:
        return e.reason.splitlines()[0][:200] if e.reason else "unreadable"
    except OSError as e:  # the file vanished or cannot be opened (permissions)
        return f"{type(e).__name__}: {e}"


def scan_image_folder(root: str | Path, classes: list[str] | None = None, bad_files: str = "skip") -> FolderScan:
    """Scan ``root/<class>/*`` and validate every file.

    Args:
        root: dataset folder with one sub-folder per class.
        classes: class names to use, in label order; None = every sub-folder, sorted.
        bad_files: ``skip`` (warn and leave them out) or ``fail`` (raise naming the first one).
    """
    if bad_files not in ("skip", "fail"):
        raise ValueError(f"bad_files must be 'skip' or 'fail', got {bad_files!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist; set task.data_root to a folder of class sub-folders "
            "(relative paths resolve under $VISION_PEFT_DATA)"
        )
    classes = class_folders(root, classes, DatasetError)
    samples: list[tuple[str, int]] = []
    bad: list[tuple[str, str]] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and p.name.lower() not in IGNORED)
        good = 0
        for f in files:
            reason = "not an image file (extension)" if f.suffix.lower() not in IMAGE_EXTS else check_image(f)
            if reason:
                if bad_files == "fail":
                    raise DatasetError(f"{f} is unusable ({reason}); remove or replace it, or set task.bad_files=skip")
                bad.append((str(f), reason))
                continue
            samples.append((str(f), label))
            good += 1
        if good == 0:
            raise DatasetError(
                f"class folder {root / name} holds no readable images; add images or remove the folder "
                f"(or list the classes to use in task.classes)"
            )
    for path, reason in bad:
        log.warning("skipping %s: %s", path, reason)
    return FolderScan(root, list(classes), samples, bad)


def stratified_split(
    samples: list[tuple[str, int]], classes: list[str], counts: dict[str, int], seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Split per class into the given counts (a count of -1 takes the rest), deterministically in ``seed``.

    Raises:
        DatasetError: a class has fewer images than the counts need (names the class and both numbers).
    """
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    out: dict[str, list[tuple[str, int]]] = {k: [] for k in counts}
    fixed = sum(v for v in counts.values() if v > 0)
    for label, items in sorted(by_class.items()):
        items = sorted(items)
        random.Random(seed * 1000003 + label).shuffle(items)
        if len(items) < fixed:
            need = ", ".join(f"{k} {v}" for k, v in counts.items() if v > 0)
            raise DatasetError(
                f"class {classes[label]!r} has {len(items)} usable images but the split needs {fixed} ({need}); "
                "lower the per-class counts in the recipe or add images"
            )
        start = 0
        for split, n in counts.items():
            take = len(items) - start if n < 0 else n
            out[split].extend(items[start : start + take])
            start += take
    return out


@dataclass
class CacheSource:
    """What a frozen-prefix cache (``vision_peft.prefix_cache``) needs to know about a dataset of image files: item
    ``i`` is ``{input_key: network input of files[i], **fields(i)}``."""

    files: list[str]  # the image file of every item, in item order
    input_key: str  # the item key holding the network input (B, 3, H, W after collation)
    spec: dict  # the preprocess spec that turns a file into that input
    load: Callable[[int], torch.Tensor]  # item i's input without augmentation (decodes the file)
    fields: Callable[[int], dict[str, torch.Tensor]]  # item i's other fields (label …), without decoding
    augment: str | None  # the random augmentation applied to the input before the network (None: deterministic)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """(image tensor (3, H, W), label) pairs; train mode augments with a per-sample, per-epoch seed."""

    def __init__(self, samples: list[tuple[str, int]], spec: dict, augment=None, seed: int = 0) -> None:
        self.samples, self.spec, self.augment, self.seed = samples, spec, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def fields(self, i: int) -> dict[str, torch.Tensor]:
        """Item ``i`` without its image: label and index."""
        return {"label": torch.tensor(self.samples[i][1], dtype=torch.long), "index": torch.tensor(i)}

    def load_plain(self, i: int) -> torch.Tensor:
        """Item ``i``'s image preprocessed by the spec alone (no augmentation): (3, H, W) float32."""
        from vision_peft.preprocess import load_image, preprocess_image

        return torch.from_numpy(preprocess_image(load_image(self.samples[i][0]), self.spec))

    def cache_source(self) -> CacheSource:
        """The items as a frozen-prefix cache sees them (``augment`` names the random augmentation, if any)."""
        aug = None if self.augment is None else str(getattr(self.augment, "preset", type(self.augment).__name__))
        files = [p for p, _ in self.samples]
        return CacheSource(files, "image", self.spec, self.load_plain, self.fields, aug)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from vision_peft.augment import normalize
        from vision_peft.preprocess import load_image

        if self.augment is None:
            return {"image": self.load_plain(i), **self.fields(i)}
        img = load_image(self.samples[i][0])
        arr, _ = self.augment(np.asarray(img), seed=(self.seed * 7919 + self.epoch) * 1_000_003 + i)
        x = normalize(arr, self.spec["mean"], self.spec["std"])
        return {"image": torch.from_numpy(x), **self.fields(i)}


@DATASETS.register("image_folder", help="folder-per-class images: root/<Class>/*.jpg", provides=("image", "classes"))
def image_folder(root: str | Path, classes: list[str] | None = None, bad_files: str = "skip") -> FolderScan:
    """Folder-per-class image dataset."""
    return scan_image_folder(root, classes, bad_files)
