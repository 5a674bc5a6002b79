"""Run-directory files: atomic writes, adapter tensors in safetensors, resumable checkpoints, strict loading.

Nothing here unpickles arbitrary objects: adapters are safetensors; the resume checkpoint is written with
``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be loaded as asked; the message says why and what to do."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to a temp file next to ``path`` and rename it into place."""

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), w)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors as safetensors (contiguous CPU copies)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(clean, tmp, metadata=metadata))


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
    _atomic(d / "state.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_json(d / "meta.json", meta)


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    d = Path(run_dir) / CKPT_DIR
    if not (d / "state.pt").is_file() or not (d / "meta.json").is_file():
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from ({d}/state.pt is missing)")
    return safe_torch_load(d / "state.pt"), json.loads((d / "meta.json").read_text())
