"""The prefix cache's stores and their on-disk format (``vision_peft.prefix_cache/1``): one owner for the files.

:func:`build_store` computes the prefix outputs of a list of files into a :class:`MemoryStore` (one tensor) or a
:class:`DiskStore` (memory-mapped shards under ``<cache_dir>/<key>/``), reusing the rows an earlier run stored under
the same key. A shard is ``<id>.bin`` (raw rows, written to a temp name and renamed when complete) and
``<id>.json`` (rows, shape, dtype, the sha256 of the .bin, file sha256 -> row; written last, atomically). A shard
that is truncated or does not match its checksum is removed with a warning and its rows are rebuilt. What to cache
and where is decided in :mod:`vision_peft.prefix_cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vision_peft.bundle import sha256_file
from vision_peft.rundir import atomic_write, atomic_write_json

log = logging.getLogger("vision_peft")

FORMAT = "vision_peft.prefix_cache/1"
BUILD_BATCH = 64  # images per prefix forward while building
STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}  # bf16 kept as bits


class PrefixCacheError(RuntimeError):
    """The cache cannot be placed where the config says (unwritable folder, no space); the message has the fix."""


# -- the stores -----------------------------------------------------------------------------------------------
class MemoryStore:
    """Rows in one tensor (N, *shape) on the CPU."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def row(self, r: int) -> torch.Tensor:
        return self.rows[r]


class Shard:
    """One complete file of rows on disk, memory-mapped on first use in each process."""

    def __init__(self, directory: Path, meta: dict[str, Any], dtype: torch.dtype) -> None:
        self.directory, self.meta, self.dtype = directory, meta, dtype
        self._mm: np.memmap | None = None

    @property
    def bin_path(self) -> Path:
        return self.directory / f"{self.meta['id']}.bin"

    def row(self, j: int) -> torch.Tensor:
        if self._mm is None:
            shape = (self.meta["rows"], *self.meta["shape"])
            self._mm = np.memmap(self.bin_path, dtype=STORAGE[self.dtype], mode="r", shape=shape)
        t = torch.from_numpy(np.array(self._mm[j]))
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) map the file themselves
        return {**self.__dict__, "_mm": None}


class DiskStore:
    """Rows spread over shards: row r is ``shards[s].row(j)`` for ``locs[r] = (s, j)``."""

    def __init__(self, shards: list[Shard], locs: list[tuple[int, int]]) -> None:
        self.shards, self.locs = shards, locs

    def row(self, r: int) -> torch.Tensor:
        s, j = self.locs[r]
        return self.shards[s].row(j)


class GridView(Mapping):
    """image path -> grid, read from a store (what :meth:`EpisodeDataset.use_grid_store` takes)."""

    def __init__(self, store: MemoryStore | DiskStore, row_of: dict[str, int]) -> None:
        self.store, self.row_of = store, row_of

    def __getitem__(self, path: str) -> torch.Tensor:
        return self.store.row(self.row_of[path])

    def __iter__(self) -> Iterator[str]:
        return iter(self.row_of)

    def __len__(self) -> int:
        return len(self.row_of)


class CachedDataset(torch.utils.data.Dataset):
    """A split whose items carry the prefix's output under the input key, with the fields stored at build time."""

    def __init__(self, base, key: str, store, rows: list[int], fields: list[dict[str, torch.Tensor]], split: str):
        self.base, self.key, self.store, self.rows, self.fields = base, key, store, rows, fields
        self.split = getattr(base, "split", split)  # tasks read the split name off the loader's dataset

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.fields[i], self.key: self.store.row(self.rows[i])}


class _Inputs(torch.utils.data.Dataset):
    def __init__(self, load: Callable[[int], torch.Tensor], n: int) -> None:
        self.load, self.n = load, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.load(j)


def _compute(n: int, load, fn, sink, workers: int, desc: str, show: bool) -> None:
    """``sink(start, rows)`` for the prefix outputs of inputs 0..n-1, in order and in batches."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        _Inputs(load, n), batch_size=BUILD_BATCH, num_workers=workers, generator=torch.Generator().manual_seed(0)
    )  # the generator keeps the global RNG untouched
    bar = tqdm(total=n, desc=desc, unit="img", file=sys.stderr, disable=not show, mininterval=2, dynamic_ncols=True)
    start = 0
    for x in loader:
        out = fn(x).detach().cpu().contiguous()
        sink(start, out)
        start += len(out)
        bar.update(len(out))
    bar.close()


def _open_shards(directory: Path, shape: tuple[int, ...], dtype: torch.dtype) -> list[Shard]:
    """The complete, intact shards of a store; broken ones are removed with a warning (their rows get rebuilt)."""
    out = []
    row_bytes = int(np.prod(shape)) * np.dtype(STORAGE[dtype]).itemsize
    for meta_path in sorted(directory.glob("*.json")):
        if meta_path.name == "key.json":
            continue
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT or tuple(meta["shape"]) != shape or meta["dtype"] != str(dtype):
                raise ValueError(f"written for another layout ({meta.get('format')}, {meta.get('shape')})")
            shard = Shard(directory, meta, dtype)
            size = shard.bin_path.stat().st_size if shard.bin_path.exists() else -1
            if size != meta["rows"] * row_bytes:
                raise ValueError(f"{shard.bin_path.name} holds {size} bytes, {meta['rows'] * row_bytes} expected")
            h = hashlib.sha256()
            with open(shard.bin_path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            if h.hexdigest() != meta["sha256"]:
                raise ValueError(f"{shard.bin_path.name} does not match its checksum")
            out.append(shard)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("prefix cache: shard %s is corrupt or truncated (%s); removing it, its rows are rebuilt",
                        meta_path, e)  # fmt: skip
            for p in (meta_path, meta_path.with_suffix(".bin")):
                try:
                    p.unlink()
                except OSError:
                    pass
    return out


def _write_shard(directory: Path, hashes: list[str], n, load, fn, shape, dtype, workers, desc, show) -> Shard:
    """Compute the rows of ``hashes`` into a new shard: the .bin under a temp name renamed when complete, then the
    .json (the shard's existence mark)."""
    sid = uuid.uuid4().hex[:16]
    meta = {"format": FORMAT, "id": sid, "rows": n, "shape": list(shape), "dtype": str(dtype)}
    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        mm = np.memmap(tmp, dtype=STORAGE[dtype], mode="w+", shape=(n, *shape))

        def sink(start: int, rows: torch.Tensor) -> None:
            arr = (rows.view(torch.int16) if dtype == torch.bfloat16 else rows).numpy()
            mm[start : start + len(arr)] = arr
            digest.update(np.ascontiguousarray(arr).tobytes())

        _compute(n, load, fn, sink, workers, desc, show)
        mm.flush()

    atomic_write(directory / f"{sid}.bin", write)
    meta.update(sha256=digest.hexdigest(), files={h: j for j, h in enumerate(hashes)}, created=time.time())
    atomic_write_json(directory / f"{sid}.json", meta)
    return Shard(directory, meta, dtype)


def check_writable(directory: Path, need_bytes: int, setting: str) -> None:
    """Raise :class:`PrefixCacheError` naming ``directory`` and the fix when it cannot take ``need_bytes``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PrefixCacheError(
            f"{setting}: the prefix cache folder {directory} is not writable ({type(e).__name__}: {e}); set "
            "train.cache_dir to a writable folder, or use train.cache=memory (or off)"
        ) from None
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise PrefixCacheError(
            f"{setting}: the prefix cache needs {need_bytes / 2**20:.0f} MiB but {directory} has "
            f"{free / 2**20:.0f} MiB free; set train.cache_dir to a larger disk, or use train.cache=memory (or off)"
        )


def build_store(
    mode: str,
    files: list[str],
    load: Callable[[int], torch.Tensor],
    fn: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    directory: Path | None,
    workers: int,
    desc: str,
    rank: int,
    world: int,
) -> tuple[MemoryStore | DiskStore, list[int], dict[str, Any]]:
    """The store of the prefix outputs of ``files`` (``load(i)``: the input of ``files[i]``; ``fn``: inputs ->
    outputs) and the row of each file; plus what it cost. Memory: one row per distinct path; disk: one per
    distinct content, reusing the rows an earlier run stored under the same key."""
    show = rank == 0
    t0 = time.perf_counter()
    if mode == "memory":
        pos_of: dict[str, int] = {}
        for i, p in enumerate(files):
            pos_of.setdefault(p, i)  # the first item of each path
        first, pos = list(pos_of), list(pos_of.values())
        index = {p: j for j, p in enumerate(first)}
        rows = torch.empty((len(first), *shape), dtype=dtype)

        def sink(start: int, out: torch.Tensor) -> None:
            rows[start : start + len(out)] = out

        _compute(len(first), lambda j: load(pos[j]), fn, sink, workers, desc, show)
        stats = {"rows_built": len(first), "rows_reused": 0, "store": "miss", "build_seconds": time.perf_counter() - t0}
        return MemoryStore(rows), [index[p] for p in files], stats
    assert directory is not None
    hashes = [sha256_file(p) for p in files]
    t_hash = time.perf_counter() - t0
    if rank != 0 and world > 1 and dist.is_initialized():
        dist.barrier()  # rank 0 builds first
    shards = _open_shards(directory, shape, dtype)
    have = {h: (s, j) for s, sh in enumerate(shards) for h, j in sh.meta["files"].items()}
    missing = list(dict.fromkeys(h for h in hashes if h not in have))
    built_s = 0.0
    if missing and rank != 0:
        raise PrefixCacheError(
            f"rank {rank}: the prefix cache {directory} that rank 0 built lacks {len(missing)} rows; train.cache_dir "
            "must be a folder every rank sees (or use train.cache=memory)"
        )
    if missing:
        t1 = time.perf_counter()
        rep = {h: i for i, h in reversed(list(enumerate(hashes)))}  # first item of each content
        pos = [rep[h] for h in missing]
        shard = _write_shard(directory, missing, len(missing), lambda j: load(pos[j]), fn, shape, dtype, workers,
                             desc, show)  # fmt: skip
        shards.append(shard)
        have.update({h: (len(shards) - 1, j) for j, h in enumerate(missing)})
        built_s = time.perf_counter() - t1
    if rank == 0 and world > 1 and dist.is_initialized():
        dist.barrier()
    distinct = list(dict.fromkeys(hashes))
    index = {h: r for r, h in enumerate(distinct)}
    store = DiskStore(shards, [have[h] for h in distinct])
    stats = {
        "rows_built": len(missing),
        "rows_reused": len(distinct) - len(missing),
        "store": "miss" if len(missing) == len(distinct) else ("partial" if missing else "hit"),
        "build_seconds": built_s,
        "hash_seconds": t_hash,
        "open_seconds": time.perf_counter() - t0 - t_hash - built_s,
    }
    return store, [index[h] for h in hashes], stats
