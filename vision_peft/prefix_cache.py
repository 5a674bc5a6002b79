"""Frozen-prefix cache (``train.cache: auto | off | memory | disk``): run the frozen front of the backbone once per
image and train from its cached output.

When everything that trains sits after some point of the backbone and nothing random happens to an image before
that point, the layers up to it (the *prefix*) map each image to the same activation in every epoch and every
evaluation. :func:`prepare` finds the deepest such point, computes the prefix once per image (eval mode,
``no_grad``, the run's autocast, in batches, a progress bar on rank 0) and hands the training loop datasets whose
items carry the activation instead of the image (labels and the other fields are kept from the build, so no
image is decoded again); inside :meth:`CachePlan.active` the backbone consumes them
(:meth:`~vision_peft.backbones.base.ImageBackbone.cached_input`).

Where it applies:

- tasks that declare ``prefix_input`` (classification, multilabel: the image reaches the model only through
  ``backbone.forward_features``) and whose datasets describe their items (``cache_source()``). The split points
  come from the backbone (:meth:`~vision_peft.backbones.base.ImageBackbone.split_points`: the pooled features,
  CNN stages from the last, ViT patch tokens); a point is used when its prefix passes
  :func:`~vision_peft.backbones.base.prefix_blockers` (nothing trains, no hooks or parametrizations, nothing
  random in train mode), a probe finds its train-mode output equal to its eval-mode output, the adapter does not
  condition the backbone on the class (KIND), and the train split is not randomly augmented (``task.augment:
  none``). A run whose train split cannot be cached caches nothing: the loop feeds one kind of input.
- few-shot episodes (MVP): the grid each episode is built from (``FewShotTask.grid_plan``) goes into the same store
  and the episode datasets read it from there; with ``train.cache: off`` every episode recomputes its grids (the
  augmentation acts on grids either way, so the runs agree).

``auto`` caches when the run would compute the prefix more often than the cache needs rows, in memory when the
estimated bytes fit ``train.cache_memory_mb``, else on disk. ``memory``/``disk`` force it (where it is possible).

The disk store lives in ``train.cache_dir`` (default ``<output.runs_root>/.prefix_cache``)/``<key>/`` where the key
hashes the backbone spec and weights id, the prefix's own tensors, the split point, the preprocess spec, how it is
computed (autocast dtype) and the activation's shape and dtype; ``key.json`` spells it out. Rows are found by the
sha256 of each file's bytes, so an edited image gets a new row and the old one is never read again. A store is a
set of shards, ``<id>.bin`` (raw rows, written to a temp name and renamed when complete) and ``<id>.json`` (rows,
shape, dtype, the sha256 of the .bin, file hash → row; written last, atomically): a later run with the same key
reuses every row it finds and adds a shard for the rest. A shard that is truncated or whose bytes do not match
its checksum is removed with a warning and its rows rebuilt (the stores and that format live in
:mod:`vision_peft.prefix_store`). Distributed runs: with ``memory`` every rank builds
its own; with ``disk`` rank 0 builds, the others wait at a barrier and open it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vision_peft.backbones.base import SplitPoint, prefix_blockers, prefix_state_hash
from vision_peft.data.episodes import EpisodeDataset
from vision_peft.prefix_store import (  # the stores and their file format
    FORMAT,
    STORAGE,
    CachedDataset,
    GridView,
    PrefixCacheError,
    build_store,
    check_writable,
)
from vision_peft.rundir import atomic_write_json

__all__ = ["CachePlan", "PrefixCacheError", "choose_point", "prepare"]
log = logging.getLogger("vision_peft")


@dataclass
class CachePlan:
    """What :func:`prepare` decided: the datasets to train on, a JSON-able report, and the split point whose output
    the cached items carry (None: nothing is cached, or the datasets carry grids the task consumes itself)."""

    datasets: dict[str, torch.utils.data.Dataset]
    report: dict[str, Any] = field(default_factory=dict)
    point: SplitPoint | None = None

    @contextmanager
    def active(self, model: torch.nn.Module) -> Iterator[None]:
        """While inside, the backbone consumes the cached activations (a no-op when nothing is cached)."""
        if self.point is None:
            yield
            return
        with model.backbone.cached_input(self.point):
            yield


# -- deciding ---------------------------------------------------------------------------------------------------
def _key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cache_root(cfg) -> Path:
    return Path(cfg.train.cache_dir) if cfg.train.cache_dir else Path(cfg.output.runs_root) / ".prefix_cache"


def _evals(t, steps: int, per_epoch: int) -> int:
    """How often the training loop evaluates val: every ``eval_every`` steps before the end, and once at the end."""
    every = t.eval_every or per_epoch
    return (steps - 1) // every + 1


def _steps(t, n: int, world: int) -> tuple[int, int]:
    """(optimizer steps, steps per epoch) of the run over ``n`` training items (as ``engine.Schedule.of``)."""
    per_rank = -(-n // world)
    batches = per_rank // t.batch_size if per_rank >= t.batch_size else 1
    per_epoch = max(1, batches // t.grad_accum)
    total = per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, per_epoch * t.epochs)
    return total, per_epoch


def _choose_mode(cfg, nbytes: int, dtype: torch.dtype) -> str:
    t = cfg.train
    if dtype not in STORAGE:  # no raw file layout for it
        return "memory"
    if t.cache in ("memory", "disk"):
        return t.cache
    return "memory" if nbytes <= t.cache_memory_mb * 2**20 else "disk"


def _skip(plan: CachePlan, reason: str, **extra: Any) -> CachePlan:
    plan.report.update(cached=False, reason=reason, **extra)
    log.info("prefix cache: nothing cached: %s", reason)
    return plan


def _probe(model, point: SplitPoint, fn, device: torch.device) -> tuple[torch.Tensor, str | None]:
    """The prefix output of two random images in eval mode, and why it differs in train mode (None: it does not).
    Buffers are restored afterwards (nothing the probe does stays)."""
    bb = model.backbone
    h, w = bb.input_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    saved = {n: b.detach().clone() for n, b in bb.named_buffers()}
    try:
        model.eval()
        ref = fn(x)
        model.set_train_mode()
        got = fn(x)
    finally:
        with torch.no_grad():
            for n, b in bb.named_buffers():
                b.copy_(saved[n])
    if ref.shape != got.shape or not torch.equal(ref, got):
        diff = float((ref.float() - got.float()).abs().max()) if ref.shape == got.shape else float("nan")
        return ref, f"{point.name}: its output in train mode differs from eval mode (max |Δ| {diff:.3g})"
    return ref, None


def choose_point(model, device, amp_dtype) -> tuple[SplitPoint | None, torch.Tensor | None, dict[str, str]]:
    """The deepest split point whose prefix is frozen and deterministic, a sample of its output, and why each
    deeper point was passed over."""
    bb = model.backbone
    passed: dict[str, str] = {}
    for point in bb.split_points():
        reasons = prefix_blockers(bb, point)
        if model.adapter.condition_fn is not None:
            reasons.append(f"adapter {model.adapter.name} conditions the backbone on the class")
        if not reasons:
            sample, why = _probe(model, point, _prefix_fn(bb, point, device, amp_dtype), device)
            if why is None:
                return point, sample, passed
            reasons.append(why)
        passed[point.name] = "; ".join(reasons)
    return None, None, passed


def _prefix_fn(bb, point: SplitPoint, device: torch.device, amp_dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return bb.forward_prefix(x.to(device), point)

    return fn


def _describe(point: SplitPoint) -> str:
    if point.kind == "features":
        return "the whole backbone"
    if point.layout == "cnn":
        return f"stem + stages 0-{point.stage}"
    return "the patch embedding" if point.layout == "tokens" else "the pixel prompts"


def _where(cfg, mode: str, key_fields: dict[str, Any], nbytes: int) -> Path | None:
    if mode != "disk":
        return None
    directory = _cache_root(cfg) / _key(key_fields)
    check_writable(directory, nbytes, f"train.cache={cfg.train.cache}")
    if not (directory / "key.json").exists():
        atomic_write_json(directory / "key.json", key_fields)
    return directory


# -- prepare ----------------------------------------------------------------------------------------------------
def prepare(cfg, task, model, data: dict, device: torch.device, amp_dtype, rank: int = 0, world: int = 1) -> CachePlan:
    """Decide what to cache for this run, build (or open) it, and return the datasets to train on.

    Raises:
        PrefixCacheError: ``train.cache=disk`` and the cache folder is not writable or too small.
    """
    t = cfg.train
    plan = CachePlan(dict(data), {"requested": t.cache})
    episodes = any(isinstance(ds, EpisodeDataset) for ds in data.values())
    if t.cache == "off":
        why = "train.cache=off" + (": every episode recomputes its grids" if episodes else "")
        return _skip(plan, why, mode="off")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # probing and building leave every RNG where it was
        try:
            if episodes:
                return _prepare_episodes(plan, cfg, model, data, rank, world)
            return _prepare_items(plan, cfg, task, model, data, device, amp_dtype, rank, world)
        finally:
            model.set_train_mode()


def _prepare_items(plan, cfg, task, model, data, device, amp_dtype, rank, world) -> CachePlan:
    t = cfg.train
    key = getattr(task, "prefix_input", None)
    if key is None:
        return _skip(plan, f"task {task.name} declares no input that only the backbone reads (Task.prefix_input)")
    if not hasattr(model.backbone, "split_points"):
        return _skip(plan, f"backbone {model.backbone.spec!r} is not an image backbone with split points")
    sources = {}
    for split, ds in data.items():
        src = ds.cache_source() if hasattr(ds, "cache_source") else None
        if src is None or src.input_key != key:
            return _skip(plan, f"the {split} split does not describe its items (cache_source)")
        if src.augment is not None:
            return _skip(
                plan,
                f"task.augment={src.augment} randomly augments the {split} images before the backbone, so no "
                "activation repeats; set task.augment=none to cache the frozen prefix (the eval splits are not "
                "cached alone: a run feeds the model one kind of input)",
            )
        sources[split] = src
    model.set_train_mode()
    point, sample, passed = choose_point(model, device, amp_dtype)
    plan.report["points_passed_over"] = passed
    if point is None:
        last = list(passed)[-1]
        return _skip(plan, f"no split point has a frozen, deterministic prefix; the shallowest ({last}): "
                           f"{passed[last]}")  # fmt: skip
    files = [f for s in sources.values() for f in s.files]
    distinct = len(set(files))
    total, per_epoch = _steps(t, len(sources["train"].files), world)
    uses = total * t.batch_size * t.grad_accum * world
    if "val" in sources:
        uses += _evals(t, total, per_epoch) * len(sources["val"].files)
    uses += len(sources["test"].files) if "test" in sources else 0
    row_bytes = sample[0].numel() * sample.element_size()
    nbytes = distinct * row_bytes
    plan.report.update(point=point.name, prefix=_describe(point), planned_prefix_passes=uses, rows=distinct)
    if t.cache == "auto" and uses <= distinct:
        return _skip(plan, f"the run computes the prefix {uses} times for {distinct} images, so a cache saves "
                           "nothing (train.cache=memory forces it)")  # fmt: skip
    mode = _choose_mode(cfg, nbytes, sample.dtype)
    bb = model.backbone
    shape, dtype = tuple(sample.shape[1:]), sample.dtype
    key_fields = {
        "format": FORMAT, "backbone": bb.spec, "weights_id": bb.weights_id, "prefix": prefix_state_hash(bb, point),
        "point": point.name, "preprocess": sources["train"].spec, "compute": f"autocast {amp_dtype}",
        "shape": list(shape), "dtype": str(dtype),
    }  # fmt: skip
    directory = _where(cfg, mode, key_fields, nbytes)
    splits = list(sources)
    loads = [(s, i) for s in splits for i in range(len(sources[s].files))]
    model.eval()
    store, rows, stats = build_store(
        mode, files, lambda k: sources[loads[k][0]].load(loads[k][1]), _prefix_fn(bb, point, device, amp_dtype),
        shape, dtype, directory, t.num_workers, f"prefix cache ({point.name})", rank, world,
    )  # fmt: skip
    start = 0
    for s in splits:
        n = len(sources[s].files)
        fields = [sources[s].fields(i) for i in range(n)]
        plan.datasets[s] = CachedDataset(data[s], key, store, rows[start : start + n], fields, s)
        start += n
    plan.point = point
    return _done(plan, mode, point, {s: len(sources[s].files) for s in splits}, distinct, row_bytes, directory, stats)


def _done(plan, mode, point, splits, distinct, row_bytes, directory, stats) -> CachePlan:
    plan.report.update(
        cached=True, mode=mode, point=point.name, prefix=_describe(point), splits=splits, rows=distinct,
        bytes=distinct * row_bytes, path=str(directory) if directory else None, **stats,
    )  # fmt: skip
    where = f"on disk at {directory}" if directory else "in memory"
    build = f"built {stats['rows_built']} rows in {stats['build_seconds']:.1f} s"
    if mode == "disk":
        build += f", reused {stats['rows_reused']} ({stats['store']})"
    log.info(
        "prefix cache: %s (%s) for %s: %d images, %.1f MiB %s; %s",
        point.name, _describe(point), "/".join(f"{s} {n}" for s, n in splits.items()), distinct,
        distinct * row_bytes / 2**20, where, build,
    )  # fmt: skip
    return plan


def _prepare_episodes(plan, cfg, model, data, rank, world) -> CachePlan:
    """MVP: the grids of every image the episodes can draw, into one store the episode datasets read."""
    from vision_peft.preprocess import load_image, preprocess_image

    t = cfg.train
    eps = {s: ds for s, ds in data.items() if isinstance(ds, EpisodeDataset)}
    blocked = [ds.grid_blocker for ds in eps.values() if ds.grid_fn is None]
    if blocked:
        return _skip(plan, blocked[0])
    first = next(iter(eps.values()))
    point, grid_fn, spec = first.grid_point, first.grid_fn, first.cache.spec
    files = list(dict.fromkeys(f for ds in eps.values() for f in ds.files()))

    def load(i: int) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(load_image(files[i]), spec))  # (3, H, W), not kept decoded

    sample = grid_fn(load(0)[None])
    per_episode = {s: len(ds.sampler.episode(0).support) + len(ds.sampler.episode(0).query) for s, ds in eps.items()}
    total, per_epoch = _steps(t, len(eps["train"]), world)
    uses = total * t.grad_accum * world * per_episode["train"]
    if "val" in eps:
        uses += _evals(t, total, per_epoch) * len(eps["val"]) * per_episode["val"]
    uses += len(eps["test"]) * per_episode["test"] if "test" in eps else 0
    row_bytes = sample[0].numel() * sample.element_size()
    plan.report.update(point=point.name, prefix=_describe(point), planned_prefix_passes=uses, rows=len(files))
    if t.cache == "auto" and uses <= len(files):
        why = (
            f"the episodes compute {uses} grids of {len(files)} images, so building every grid first saves nothing; "
            "episodes keep each grid the first time they use it"
        )
        return _skip(plan, why, grids="kept on first use")
    mode = _choose_mode(cfg, len(files) * row_bytes, sample.dtype)
    bb = model.backbone
    key_fields = {
        "format": FORMAT, "backbone": bb.spec, "weights_id": bb.weights_id, "prefix": prefix_state_hash(bb, point),
        "point": point.name, "preprocess": spec, "compute": "FewShotTask.grid_fn: eval mode, no autocast, float32",
        "shape": list(sample.shape[1:]), "dtype": str(sample.dtype),
    }  # fmt: skip
    directory = _where(cfg, mode, key_fields, len(files) * row_bytes)
    store, rows, stats = build_store(
        mode, files, load, grid_fn, tuple(sample.shape[1:]), sample.dtype, directory, t.num_workers,
        f"prefix cache ({point.name} grids)", rank, world,
    )  # fmt: skip
    view = GridView(store, dict(zip(files, rows)))
    for ds in eps.values():
        ds.use_grid_store(view)
    splits = {s: len(set(ds.files())) for s, ds in eps.items()}
    return _done(plan, mode, point, splits, len(files), row_bytes, directory, stats)
