"""The sparse fine-tuning engine under SaRA and FISH (:mod:`vision_peft.adapters.sara`): selected entries of frozen
tensors trained through a scatter, with explicit sparse checkpoints.

For each eligible tensor W0 a set of entries M is selected; the trainable vector is p = W0[M] (so the model is
unchanged at step 0) and the forward tensor is W = scatter(W0, M, p), computed by :class:`SparseScatter`, a custom
autograd function whose backward returns ``grad_W[M]`` only — ``.grad`` and the AdamW moments exist for the |M|
selected entries, nothing dense. A targeted ``nn.Linear``'s weight lives in a :class:`SparseLinear`; every other
tensor (biases, norm affines, adaLN, embeddings) gets a :class:`SparseTensor` parametrization. Checkpoints carry
explicit indices + values + a sha256 of the base tensor, and loading onto other base weights is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.checkpoint import save_tensors


class SparseCheckpointError(ValueError):
    """A sparse checkpoint that does not belong to these base weights."""


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class SparseScatter(torch.autograd.Function):
    """W = W0 with W0.flatten()[idx] replaced by p; backward gives p the gradient at idx only."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, w0: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.shape = w0.shape
        w = w0.detach().clone().reshape(-1)
        w[idx] = p.to(w.dtype)
        return w.reshape(w0.shape)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad_w.reshape(-1)[idx], None, None


def scatter(p: torch.Tensor, w0: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:class:`SparseScatter` (W0 with ``idx`` replaced by ``p``); under the TorchScript tracer (an adapter pack
    exports the unmerged graph with ``p`` as an input) the same value as a plain ``index_put``, which it can record."""
    if torch.jit.is_tracing():
        return w0.detach().reshape(-1).index_put((idx,), p.to(w0.dtype)).reshape(w0.shape)
    return SparseScatter.apply(p, w0, idx)


# -- the state every sparse holder carries (same keys for SparseLinear and SparseTensor) ------------------------
def _init_sparse(holder: nn.Module, w0: torch.Tensor, idx: torch.Tensor) -> None:
    """``sparse_idx`` (sorted flat indices), trainable ``sparse_values`` = W0[idx], the fixed-capacity store of
    entries re-selected away (``sparse_frozen_*``), the re-selection flag and the base tensor's sha256."""
    idx = idx.to(device=w0.device, dtype=torch.long).sort().values
    holder.register_buffer("sparse_idx", idx)
    holder.sparse_values = nn.Parameter(w0.detach().reshape(-1)[idx].clone())
    k = idx.numel()  # after one re-selection the entries that left keep their values here (shapes stay fixed)
    holder.register_buffer("sparse_frozen_idx", torch.zeros(k, dtype=torch.long, device=idx.device))
    holder.register_buffer("sparse_frozen_values", torch.zeros(k, dtype=w0.dtype, device=idx.device))
    holder.register_buffer("sparse_frozen_count", torch.zeros((), dtype=torch.long))
    holder.register_buffer("sparse_reselected", torch.zeros((), dtype=torch.bool))
    holder.base_hash = tensor_hash(w0)
    holder.register_buffer("sparse_base_hash", torch.tensor(list(bytes.fromhex(holder.base_hash)), dtype=torch.uint8))


def _check_sparse_state(holder: nn.Module, state_dict: dict, prefix: str) -> None:
    key = prefix + "sparse_base_hash"
    if key in state_dict and not torch.equal(state_dict[key].cpu(), holder.sparse_base_hash.cpu()):
        raise SparseCheckpointError(
            f"{prefix.rstrip('.')}: this sparse checkpoint was trained on other base weights "
            f"(hash {bytes(state_dict[key].tolist()).hex()[:12]} vs {holder.base_hash[:12]}); refusing to load"
        )
    idx_key = prefix + "sparse_idx"
    if idx_key in state_dict and state_dict[idx_key].shape != holder.sparse_idx.shape:
        raise SparseCheckpointError(
            f"{prefix.rstrip('.')}: checkpoint selects {state_dict[idx_key].numel()} entries, "
            f"this adapter {holder.sparse_idx.numel()} (another fraction / threshold / eligible set)"
        )


def _with_frozen(holder: nn.Module, w0: torch.Tensor) -> torch.Tensor:
    """W0 with the frozen (re-selected-away) entries written in; no gradient."""
    n = int(holder.sparse_frozen_count)
    if n == 0:
        return w0.detach()
    w = w0.detach().clone().reshape(-1)
    w[holder.sparse_frozen_idx[:n]] = holder.sparse_frozen_values[:n].to(w.dtype)
    return w.reshape(w0.shape)


@torch.no_grad()
def _reselect(holder: nn.Module, current: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Progressive step (once): the same number of smallest-|W| entries of the *current* tensor; trained entries
    that leave the set are kept as frozen sparse values; the base tensor is untouched; moments are reset."""
    if bool(holder.sparse_reselected):
        raise RuntimeError("SaRA re-selection is supported once per tensor (fixed-capacity checkpoint)")
    w = current.detach().reshape(-1)
    k = holder.sparse_idx.numel()
    new_idx = w.abs().topk(k, largest=False).indices.sort().values
    old_idx = holder.sparse_idx
    leaving = old_idx[~torch.isin(old_idx, new_idx)]
    n = leaving.numel()
    holder.sparse_frozen_idx[:n] = leaving
    holder.sparse_frozen_values[:n] = w[leaving]
    holder.sparse_frozen_count.fill_(n)
    holder.sparse_idx.copy_(new_idx)
    holder.sparse_values.data.copy_(w[new_idx])
    holder.sparse_reselected.fill_(True)
    if optimizer is not None and holder.sparse_values in optimizer.state:
        optimizer.state[holder.sparse_values] = {}


class SparseLinear(nn.Linear):
    """nn.Linear whose weight is W0 with the entries at ``sparse_idx`` replaced by the trainable ``sparse_values``.
    Keeps the base ``weight``/``bias`` keys; adds ``sparse_idx`` (int64), ``sparse_values`` and ``sparse_base_hash``."""

    def __init__(self, base: nn.Linear, idx: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        _init_sparse(self, base.weight, idx)

    def base_weight(self) -> torch.Tensor:
        """W0 with the frozen (re-selected-away) entries written in; no gradient."""
        return _with_frozen(self, self.weight)

    def dense_weight(self) -> torch.Tensor:
        return scatter(self.sparse_values, self.base_weight(), self.sparse_idx)

    def delta(self) -> torch.Tensor:
        """ΔW = W − W0 as a dense matrix, differentiable w.r.t. ``sparse_values``."""
        return self.dense_weight() - self.weight.detach()  # relative to the original W0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        _check_sparse_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def reselect(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Progressive re-selection of this weight (see :func:`_reselect`)."""
        _reselect(self, self.dense_weight(), optimizer)

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)


class SparseTensor(nn.Module):
    """Parametrization of any other tensor (bias, norm affine, adaLN, embedding): W0 → scatter(W0, idx, p).
    Registered with ``torch.nn.utils.parametrize``; keys ``<module>.parametrizations.<tensor>.0.sparse_*``."""

    def __init__(self, w0: torch.Tensor, idx: torch.Tensor) -> None:
        super().__init__()
        _init_sparse(self, w0, idx)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return scatter(self.sparse_values, _with_frozen(self, w0), self.sparse_idx)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        _check_sparse_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def sparse_holders(backbone: nn.Module, touched: list[str]) -> list[tuple[nn.Module, Callable[[], torch.Tensor]]]:
    """(holder, current dense tensor) of every sparse tensor in the touched modules, in a fixed order."""
    out = []
    for n in touched:
        m = backbone.get_submodule(n)
        if isinstance(m, SparseLinear):
            out.append((m, m.dense_weight))
        for pn, plist in getattr(m, "parametrizations", {}).items():
            for hold in plist:
                if isinstance(hold, SparseTensor):
                    out.append((hold, lambda m=m, pn=pn: getattr(m, pn)))
    return out


def reselect(backbone: nn.Module, touched: list[str], optimizer: torch.optim.Optimizer | None = None) -> None:
    """SaRA's progressive step on every sparse tensor of the touched modules (once)."""
    for hold, current in sparse_holders(backbone, touched):
        _reselect(hold, current(), optimizer)


def select_entries(
    scores: dict[str, torch.Tensor], fraction: float | None, threshold: float | None, scope: str, largest: bool
) -> tuple[dict[str, torch.Tensor], dict]:
    """Flat indices per tensor: smallest ``scores`` (SaRA: |W0|) or largest (FISH: Fisher).

    Returns (indices, report) with the effective threshold τ and the selected / total counts."""
    total = sum(s.numel() for s in scores.values())
    out: dict[str, torch.Tensor] = {}
    taus: dict[str, float] = {}
    if threshold is not None:
        for n, s in scores.items():
            m = (s > threshold) if largest else (s < threshold)
            out[n] = m.reshape(-1).nonzero().squeeze(1)
        tau = threshold
    elif scope == "global":
        flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
        k = max(1, int(round(fraction * flat.numel())))
        vals = flat.topk(k, largest=largest).values
        tau = float(vals[-1])
        # ties at τ are broken by taking exactly k entries overall
        order = flat.topk(k, largest=largest).indices
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[order] = True
        start = 0
        for n, s in scores.items():
            out[n] = mask[start : start + s.numel()].nonzero().squeeze(1)
            start += s.numel()
    else:
        for n, s in scores.items():
            k = max(1, int(round(fraction * s.numel())))
            res = s.reshape(-1).float().topk(k, largest=largest)
            out[n], taus[n] = res.indices, float(res.values[-1])
        tau = max(taus.values()) if not largest else min(taus.values())
    count = sum(int(i.numel()) for i in out.values())
    report = {
        "threshold": tau,
        "per_tensor_threshold": taus or None,
        "selected": count,
        "total": total,
        "fraction": count / max(1, total),
        "per_tensor": {n: int(i.numel()) for n, i in out.items()},
    }
    return out, report


def sparse_state(backbone: nn.Module, touched: list[str]) -> dict[str, torch.Tensor]:
    """Explicit checkpoint: per tensor indices, values, frozen re-selected-away entries and the base-tensor hash."""
    out = {}
    for n in touched:
        m = backbone.get_submodule(n)
        for k, v in m.state_dict().items():  # idx, values, base hash, frozen (re-selected-away) entries
            if k.rsplit(".", 1)[-1].startswith("sparse_"):
                out[f"{n}.{k}"] = v.detach().cpu().contiguous()
    return out


def save_sparse(path: str | Path, backbone: nn.Module, touched: list[str]) -> None:
    """Write :func:`sparse_state` atomically (``checkpoint.save_tensors``)."""
    save_tensors(path, sparse_state(backbone, touched), metadata={"format": "vision_peft.sparse/1"})


def load_sparse(path: str | Path, backbone: nn.Module, touched: list[str]) -> None:
    """Load indices + values; refuses a checkpoint whose base-tensor hash differs from this backbone's."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    for n in touched:
        m = backbone.get_submodule(n)
        m.load_state_dict({k[len(n) + 1 :]: v for k, v in sd.items() if k.startswith(n + ".")}, strict=False)
