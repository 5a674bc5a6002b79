"""Episodic few-shot data: N-way K-shot Q-query episodes from folder-per-class images.

A recipe declares a class split (``base`` / ``val`` / ``novel`` class names); :func:`check_class_split` checks
that the splits are disjoint and that every class exists; :func:`scan_split_roots` reads each split from its own
dataset root (cross-domain). N (various-way) and K (various-shot) can be drawn per episode. :class:`EpisodeSampler` draws episode ``i`` from a
generator seeded by ``(seed, i)`` only, so episode ``i`` is the same whatever order episodes are asked for in
(benchmark rows, resumed runs and workers all see identical episodes). Support and query images of an episode
are disjoint. :class:`EpisodeDataset` turns episodes into tensors, one episode per item, so the training engine
can iterate over them with ``batch_size: 1`` and a collate that unwraps the single item.

Images go through :func:`vision_peft.preprocess.load_image` (grayscale, RGBA, palette … become RGB) and are
resized to the backbone's input size, so folders of mixed image sizes are fine.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vision_peft.data import DATASETS
from vision_peft.data.folder import DatasetError, scan_image_folder

SPLITS = ("base", "val", "novel")


@dataclass
class Episode:
    """One N-way episode: ``classes[j]`` is episode label j; files are (path, episode label) pairs."""

    index: int
    classes: list[str]
    support: list[tuple[str, int]]  # N·K items, grouped by class
    query: list[tuple[str, int]]  # N·Q items, grouped by class


def check_class_split(split: dict[str, list[str]], available: list[str] | None = None) -> None:
    """Check a base/val/novel class split: known keys, disjoint lists, no duplicates, classes present.

    Raises:
        DatasetError: a split key is unknown, a class sits in two splits (names both), a class is listed twice,
            or a class has no folder in the dataset.
    """
    unknown = sorted(set(split) - set(SPLITS))
    if unknown:
        raise DatasetError(f"unknown class split(s) {unknown}; use {', '.join(SPLITS)}")
    seen: dict[str, str] = {}
    for name, classes in split.items():
        for c in classes:
            if c in seen:
                where = f"twice in {name!r}" if seen[c] == name else f"in both {seen[c]!r} and {name!r}"
                raise DatasetError(
                    f"class {c!r} is listed {where}; the base / val / novel class splits must be disjoint "
                    "(few-shot evaluation is only meaningful on classes never seen in meta-training)"
                )
            seen[c] = name
    if available is not None:
        missing = [c for c in seen if c not in available]
        if missing:
            raise DatasetError(
                f"class(es) {', '.join(missing)} of the recipe's split have no folder in the dataset; "
                f"present: {', '.join(available)}"
            )


class EpisodeSampler:
    """Seeded N-way K-shot Q-query episodes over ``{class name: [image paths]}``.

    Args:
        files: image paths per class (the classes of one split).
        n_way: classes per episode, or a (min, max) range drawn uniformly per episode (various-way).
        k_shot: support images per class, or a (min, max) range drawn uniformly per episode (various-shot: one K
            for every class of the episode). A fixed K draws nothing, so fixed-K episodes are the same as before
            ranges existed.
        q_query: query images per class (disjoint from the support).
        seed: episode ``i`` depends only on (seed, i).
    """

    def __init__(
        self,
        files: dict[str, list[str]],
        n_way: int | tuple[int, int],
        k_shot: int | tuple[int, int],
        q_query: int,
        seed: int = 0,
    ) -> None:
        lo, hi = (n_way, n_way) if isinstance(n_way, int) else (int(n_way[0]), int(n_way[1]))
        if lo < 2 or hi < lo:
            raise ValueError(f"n_way must be >= 2 (or a range lo <= hi with lo >= 2), got {n_way}")
        k_lo, k_hi = (k_shot, k_shot) if isinstance(k_shot, int) else (int(k_shot[0]), int(k_shot[1]))
        if k_lo < 1 or k_hi < k_lo or q_query < 1:
            raise ValueError(
                f"k_shot (or a range lo <= hi) and q_query must be positive, got k_shot={k_shot}, q_query={q_query}"
            )
        if hi > len(files):
            raise DatasetError(
                f"{hi}-way episodes need {hi} classes but the split has {len(files)} ({', '.join(files)}); "
                "lower n_way or add classes to the split"
            )
        need = k_hi + q_query
        for c, paths in files.items():
            if len(paths) < need:
                raise DatasetError(
                    f"class {c!r} has {len(paths)} usable images but a {k_hi}-shot {q_query}-query episode needs "
                    f"{need} (K + Q); lower k_shot / q_query or add images to that class"
                )
        self.classes = sorted(files)
        self.files = {c: sorted(files[c]) for c in self.classes}
        self.way, self.shot, self.q_query, self.seed = (lo, hi), (k_lo, k_hi), q_query, seed

    @property
    def k_shot(self) -> int | tuple[int, int]:
        """K, or the (min, max) range K is drawn from per episode."""
        return self.shot[0] if self.shot[0] == self.shot[1] else self.shot

    def episode(self, i: int) -> Episode:
        rng = np.random.default_rng([self.seed, i])
        n = int(rng.integers(self.way[0], self.way[1] + 1))
        classes = [self.classes[j] for j in rng.choice(len(self.classes), n, replace=False)]
        k = self.shot[0] if self.shot[0] == self.shot[1] else int(rng.integers(self.shot[0], self.shot[1] + 1))
        support, query = [], []
        for label, c in enumerate(classes):
            pick = rng.choice(len(self.files[c]), k + self.q_query, replace=False)
            paths = [self.files[c][j] for j in pick]
            support += [(p, label) for p in paths[:k]]
            query += [(p, label) for p in paths[k:]]
        return Episode(i, classes, support, query)


class ImageCache:
    """Decoded, resized network inputs by path (an LRU bounded by ``max_items``); images are read once."""

    def __init__(self, spec: dict, max_items: int = 4096) -> None:
        from vision_peft.preprocess import validate_spec

        self.spec, self.max_items = validate_spec(spec), max_items
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, path: str) -> torch.Tensor:
        from vision_peft.preprocess import load_image, preprocess_image

        x = self._items.get(path)
        if x is None:
            x = preprocess_image(load_image(path), self.spec)  # (3, H, W) float32; any mode/size → RGB at size
            self._items[path] = x
            if len(self._items) > self.max_items:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(path)
        return torch.from_numpy(x)


class EpisodeDataset(torch.utils.data.Dataset):
    """Episodes as tensors, one per item: support (N·K, 3, H, W), support_label (N·K,), query (N·Q, 3, H, W),
    query_label (N·Q,), way (). ``augment`` (a callable on (B, …) tensors with a generator) is applied to
    support and query of training episodes, seeded by (seed, epoch, episode).

    With ``grid_fn`` (the frozen layers before the first prompt: image batch → grids) items hold
    ``grid_support`` / ``grid_query`` instead and ``augment`` acts on grids. Each episode's grids come from the
    installed grid store (:meth:`use_grid_store`: a mapping path → grid, e.g. the run's prefix cache), else from
    grids kept from earlier episodes (``keep_grids``), and the rest are computed in one ``grid_fn`` call; with
    ``keep_grids=False`` and no store every episode recomputes its grids (``train.cache: off``), which gives the
    same tensors as a store."""

    def __init__(
        self,
        sampler: EpisodeSampler,
        num_episodes: int,
        cache: ImageCache,
        split: str,
        augment=None,
        seed: int = 0,
        grid_fn=None,
        keep_grids: bool = True,
        grid_point=None,
    ) -> None:
        self.sampler, self.num_episodes, self.cache, self.split = sampler, num_episodes, cache, split
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.grid_fn = grid_fn  # optional frozen image batch -> grid batch function: items then hold grids
        self.keep_grids = keep_grids  # keep computed grids for later episodes (False: recompute every episode)
        self.grid_point = grid_point  # the backbone split point the grids come from (cache keys), when grid_fn
        self.grid_blocker: str | None = None  # why items hold images instead of grids (set by the task), if so
        self._grids: dict[str, torch.Tensor] = {}
        self._store = None

    def files(self) -> list[str]:
        """Every image an episode of this dataset can draw (the sampler's classes), in class order."""
        return [p for c in self.sampler.classes for p in self.sampler.files[c]]

    def use_grid_store(self, store) -> None:
        """Read grids from ``store`` (a mapping image path -> grid tensor) before computing any."""
        if self.grid_fn is None:
            raise ValueError(f"the {self.split} episodes hold images, not grids ({self.grid_blocker}); no grid store")
        self._store = store

    def grids(self, paths: list[str]) -> torch.Tensor:
        """(len(paths), *grid): from the store, kept grids, and one ``grid_fn`` call for the rest."""
        out: list[torch.Tensor | None] = [None] * len(paths)
        todo = []
        for j, p in enumerate(paths):
            g = self._store[p] if self._store is not None and p in self._store else self._grids.get(p)
            if g is None:
                todo.append(j)
            out[j] = g
        if todo:
            new = self.grid_fn(torch.stack([self.cache(paths[j]) for j in todo]))  # (n, 3, H, W) -> (n, *grid)
            for j, g in zip(todo, new):
                out[j] = g
                if self.keep_grids:
                    self._grids[paths[j]] = g
        return torch.stack(out)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_episodes

    def episode_index(self, i: int) -> int:
        # training draws fresh episodes every epoch; evaluation episodes are fixed
        return i + self.epoch * self.num_episodes if self.split == "train" else i

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ep = self.sampler.episode(self.episode_index(i))
        paths = [p for p, _ in ep.support] + [p for p, _ in ep.query]
        if self.grid_fn is not None:
            x = self.grids(paths)  # (N·K + N·Q, *grid)
        else:
            x = torch.stack([self.cache(p) for p in paths])  # (N·K + N·Q, 3, H, W)
        support, query = x[: len(ep.support)], x[len(ep.support) :]
        if self.augment is not None:
            g = torch.Generator().manual_seed((self.seed * 7919 + self.epoch) * 1_000_003 + i)
            support, query = self.augment(support, g), self.augment(query, g)
        key = "grid_" if self.grid_fn is not None else ""
        return {
            f"{key}support": support,
            "support_label": torch.tensor([lab for _, lab in ep.support], dtype=torch.long),
            f"{key}query": query,
            "query_label": torch.tensor([lab for _, lab in ep.query], dtype=torch.long),
            "way": torch.tensor(len(ep.classes)),
        }


def dihedral_augment(x: torch.Tensor, g: torch.Generator | None, non_identity: bool = False) -> torch.Tensor:
    """Random horizontal flip and 90° rotation per sample of (B, C, H, W) square images or feature maps
    (overhead scenes have no canonical orientation); ``non_identity``: one of the 7 transforms other than the
    identity, so every output is a different view of its input (unless the input is symmetric)."""
    if non_identity:
        t = torch.randint(1, 8, (x.shape[0],), generator=g)  # 0 = identity; bit 2 = flip, low bits = turns
        flip, rot = t >= 4, t % 4
    else:
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        rot = torch.randint(0, 4, (x.shape[0],), generator=g)
    out = []
    for xi, f, r in zip(x, flip.tolist(), rot.tolist()):
        xi = xi.flip(-1) if f else xi
        out.append(torch.rot90(xi, int(r), dims=(-2, -1)))
    return torch.stack(out)


def scan_class_split(
    root: str | Path, split: dict[str, list[str]], bad_files: str = "skip"
) -> dict[str, dict[str, list[str]]]:
    """Scan a folder-per-class dataset for the classes of a split: ``{split: {class: [paths]}}``.

    Raises:
        DatasetError: overlapping or unknown classes (see :func:`check_class_split`), unreadable folders.
    """
    root = Path(root)
    present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else None
    check_class_split(split, present)
    wanted = [c for s in SPLITS for c in split.get(s, [])]
    if len(wanted) < 2:
        raise DatasetError(f"the class split names {len(wanted)} class(es); few-shot episodes need at least 2")
    scan = scan_image_folder(root, wanted, bad_files)
    by_class: dict[str, list[str]] = {c: [] for c in wanted}
    for path, label in scan.samples:
        by_class[scan.classes[label]].append(path)
    return {s: {c: by_class[c] for c in split.get(s, [])} for s in SPLITS if split.get(s)}


def scan_split_roots(
    roots: dict[str, str | Path], split: dict[str, list[str]], bad_files: str = "skip"
) -> dict[str, dict[str, list[str]]]:
    """Like :func:`scan_class_split`, each split from its own dataset root (cross-domain: meta-train on one
    dataset, test on another): ``roots`` maps split name -> root, splits sharing a root are scanned together.

    Raises:
        DatasetError: as :func:`scan_class_split`, for the classes of each root; a split without a root.
    """
    missing = [s for s in split if split[s] and s not in roots]
    if missing:
        raise DatasetError(f"no dataset root for split(s) {missing}")
    by_root: dict[str, list[str]] = {}
    for s in SPLITS:
        if split.get(s):
            by_root.setdefault(str(roots[s]), []).append(s)
    out: dict[str, dict[str, list[str]]] = {}
    for root, names in by_root.items():
        out.update(scan_class_split(root, {s: split[s] for s in names}, bad_files))
    return {s: out[s] for s in SPLITS if s in out}


@DATASETS.register(
    "episodes",
    help="few-shot episodes over folder-per-class images with a base/val/novel split",
    provides=("image", "episodes"),
)
def episodes(
    root: str | Path,
    split: dict[str, list[str]],
    n_way: int | tuple[int, int],
    k_shot: int | tuple[int, int],
    q_query: int,
    seed: int = 0,
) -> dict[str, EpisodeSampler]:
    """Episode samplers per split of a folder-per-class dataset."""
    files = scan_class_split(root, split)
    return {s: EpisodeSampler(f, n_way, k_shot, q_query, seed) for s, f in files.items()}
