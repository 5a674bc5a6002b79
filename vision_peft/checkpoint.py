"""Tensor files of a run directory: adapter tensors in safetensors, resumable checkpoints, strict loading.

File names, ``config.json`` and the atomic writes belong to :mod:`vision_peft.rundir` (re-exported here).

Nothing here unpickles arbitrary objects: adapters are safetensors; the resume checkpoint is written with
``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vision_peft.rundir import (  # noqa: F401  (file names and atomic writes re-exported: one owner, rundir)
    ADAPTER_FILE,
    CKPT_DIR,
    CONFIG_FILE,
    CheckpointError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
)


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
    """Write checkpoint/state.pt (tensors, optimizer) and checkpoint/meta.json (step …) atomically."""
    d = Path(run_dir) / CKPT_DIR
    atomic_write(d / "state.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_json(d / "meta.json", meta)


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    d = Path(run_dir) / CKPT_DIR
    if not (d / "state.pt").is_file() or not (d / "meta.json").is_file():
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from ({d}/state.pt is missing)")
    return safe_torch_load(d / "state.pt"), json.loads((d / "meta.json").read_text())
