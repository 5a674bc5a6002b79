"""Tensor files of a run directory: adapter tensors in safetensors, resumable checkpoints, strict loading.

File names, ``config.json`` and the atomic writes belong to :mod:`vision_peft.rundir` (re-exported here).

The last two checkpoints are kept: ``checkpoint/{state.pt,meta.json}`` is the latest and
``checkpoint/previous/`` the one before. ``meta.json`` records the sha256 and size of its ``state.pt``, so a
truncated or corrupted latest checkpoint is recognised and ``--resume`` continues from the previous one
(:func:`load_resume_checkpoint`). Run directories written before this (one checkpoint, no hash) still resume.

Nothing here unpickles arbitrary objects: adapters are safetensors; the resume checkpoint is written with
``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vision_peft.bundle import sha256_file
from vision_peft.rundir import (  # noqa: F401  (file names and atomic writes re-exported: one owner, rundir)
    ADAPTER_FILE,
    CKPT_DIR,
    CONFIG_FILE,
    PREV_CKPT_DIR,
    CheckpointError,
    WriteError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    write_error,
)

log = logging.getLogger("vision_peft")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors as safetensors (contiguous CPU copies)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); re-export or re-train the run"
        ) from None


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: refuses pickles that would run code, with a clear message."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). vision_peft never unpickles arbitrary objects; "
            "use a safetensors file or a state dict saved with torch.save"
        ) from None


def load_adapter_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load adapter tensors strictly: the keys must be exactly the model's adapter keys, with equal shapes."""
    expected = model.adapter_state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not fit this model: {len(missing)} missing key(s) {missing[:4]}, {len(extra)} "
            f"unexpected key(s) {extra[:4]}. It was trained with another backbone, adapter or head"
        )
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(t.shape)}, this model expects {tuple(expected[k].shape)} "
                "(another backbone, rank or class count)"
            )
    full = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, t in state.items():
            full[k].copy_(t.to(full[k].dtype))


def save_checkpoint(run_dir: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a new latest checkpoint (``checkpoint/state.pt`` + ``meta.json``, each atomically), keeping the
    current latest as ``checkpoint/previous/`` when it is intact.

    Order: (1) the new ``state.pt`` is written in full to a temp file beside it (the big write: a full disk
    fails here, naming ``state.pt``); (2) the intact latest is copied into a fresh ``previous/`` (a copy, not a hard
    link: damage to one file must not reach the other); (3) the temp file replaces ``state.pt``; (4) ``meta.json``
    (step, RNG, sha256 and size of ``state.pt``) is replaced. A crash or a full disk at any point leaves at least
    one complete, verifiable checkpoint.

    Raises:
        WriteError: the disk is full or a size limit was hit; names the file and the fix. The checkpoints already
            on disk are untouched.
    """
    d = Path(run_dir) / CKPT_DIR
    buf = io.BytesIO()  # serialised in memory: torch's zip writer hides the OS error (ENOSPC, EFBIG) of a file
    torch.save(state, buf)

    def write_state(tmp: str) -> None:
        Path(tmp).write_bytes(buf.getbuffer())
        if _check(d) is None:  # an intact latest becomes the previous one; a corrupt one is never kept
            _keep_as_previous(d)

    atomic_write(d / "state.pt", write_state)
    meta = {**meta, "state_sha256": sha256_file(d / "state.pt"), "state_bytes": (d / "state.pt").stat().st_size}
    atomic_write_json(d / "meta.json", meta)


def _keep_as_previous(d: Path) -> None:
    """``d/previous/`` := fsynced copies of ``d/state.pt`` and ``d/meta.json``, swapped in by renames."""
    if not (d / "state.pt").is_file():
        return
    staging = d / f".{PREV_CKPT_DIR}.new"
    old = d / f".{PREV_CKPT_DIR}.old"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        staging.mkdir()
        for name in ("state.pt", "meta.json"):
            shutil.copy2(d / name, staging / name)
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        prev = d / PREV_CKPT_DIR
        if prev.exists():
            prev.rename(old)
        staging.rename(prev)
        fsync_dir(d)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(d / PREV_CKPT_DIR, e) from e
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _check(d: Path) -> str | None:
    """Why checkpoint folder ``d`` cannot be resumed from (None: it can). Verifies presence, meta.json, and the
    recorded size and sha256 of state.pt (checkpoints written before the hash was recorded: presence only)."""
    state, meta_path = d / "state.pt", d / "meta.json"
    if not state.is_file() or not meta_path.is_file():
        missing = state if not state.is_file() else meta_path
        return f"{missing} is missing"
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{meta_path} is unreadable ({type(e).__name__}: {e})"
    size = state.stat().st_size
    if "state_bytes" in meta and size != meta["state_bytes"]:
        return f"{state} is truncated or replaced: {size} bytes, {meta_path} records {meta['state_bytes']}"
    if "state_sha256" in meta and sha256_file(state) != meta["state_sha256"]:
        return f"{state} is corrupted: its sha256 differs from the one recorded in {meta_path}"
    return None


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The latest checkpoint (``checkpoint/state.pt``, ``meta.json``), strictly: no fallback.

    Raises:
        CheckpointError: it is missing, truncated, corrupted or not a plain tensor checkpoint.
    """
    d = Path(run_dir) / CKPT_DIR
    if not (d / "state.pt").is_file() or not (d / "meta.json").is_file():
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from ({d}/state.pt is missing)")
    state = safe_torch_load(d / "state.pt")  # first: a file with code in it is refused as such
    problem = _check(d)
    if problem:
        raise CheckpointError(f"{problem}; resume from {d / PREV_CKPT_DIR} or train again")
    return state, json.loads((d / "meta.json").read_text())


def checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of the latest checkpoint that is intact (the previous one when the latest is not), or None."""
    d = Path(run_dir) / CKPT_DIR
    for folder in (d, d / PREV_CKPT_DIR):
        if folder.is_dir() and _check(folder) is None:
            return int(json.loads((folder / "meta.json").read_text())["step"])
    return None


@dataclass
class ResumePoint:
    """The checkpoint a resume continues from, and the newer ones that had to be skipped (with why)."""

    state: dict[str, Any]
    meta: dict[str, Any]
    path: Path  # the state.pt loaded
    skipped: list[str] = field(default_factory=list)  # one message per unusable newer checkpoint

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def load_resume_checkpoint(run_dir: str | Path) -> ResumePoint:
    """The newest intact checkpoint of ``run_dir``: the latest, else ``checkpoint/previous/`` (logging a warning
    that names the unusable file and why).

    Raises:
        CheckpointError: no intact checkpoint; the message lists each one's problem and the fix.
    """
    d = Path(run_dir) / CKPT_DIR
    problems: list[str] = []
    for folder in (d, d / PREV_CKPT_DIR):
        if folder != d and not folder.is_dir():
            continue
        problem = _check(folder)
        if problem is None:
            try:
                state = safe_torch_load(folder / "state.pt")
                if not isinstance(state, dict) or "model" not in state:
                    raise CheckpointError(f"{folder / 'state.pt'} holds no model state")
            except CheckpointError as e:
                problem = str(e)
        if problem is not None:
            problems.append(problem)
            continue
        point = ResumePoint(state, json.loads((folder / "meta.json").read_text()), folder / "state.pt", problems)
        if problems:
            log.warning(
                "cannot resume from the latest checkpoint: %s. Resuming from the previous one, %s (step %d)",
                "; ".join(problems),
                folder,
                point.step,
            )
        return point
    if not problems:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from ({d}/state.pt is missing)")
    raise CheckpointError(
        f"{run_dir} has no intact checkpoint to resume from: {'; '.join(problems)}. Train again without --resume "
        "(or restore the checkpoint folder from a backup)"
    )
