"""SaRA (Hu et al., ICLR 2025, arXiv 2409.06633) and FISH (Sung et al., NeurIPS 2021) on one sparse engine.

Engine: for each targeted ``nn.Linear`` a set of weight entries M is selected; the trainable vector is
p = W0[M] (initialised so the model is unchanged at step 0) and the forward weight is
W = scatter(W0, M, p) computed by :class:`SparseScatter`, a custom autograd function whose backward returns
``grad_W[M]`` only — ``.grad`` and the AdamW moments exist for the |M| selected entries, nothing dense.

Selection (``select``): ``fraction`` (smallest-|W0| share, ``scope: global`` quantile over all targets or
``per_tensor``) or an absolute ``threshold`` τ (the reference's |W0| < τ); the resulting τ and count are
reported in ``handle.report``. FISH selects the top entries of the empirical Fisher (mean squared gradient)
instead, computed by :func:`fisher_scores` — same engine, fixed mask.

Differences from the reference code (see docs/methods.md §4): the nuclear-norm penalty is applied to the
*scattered* ΔW = W − W0 so its gradient reaches p (:func:`nuclear_penalty`; the handle's ``extra_losses`` returns
``{"nuclear": nuclear_lambda · ‖ΔW‖_*}`` of one random targeted layer per training forward); progressive re-selection
(:meth:`SparseLinear.reselect`) folds the current values into the base, re-selects the same count per tensor
on the current weights and resets that tensor's optimizer moments; checkpoints carry explicit indices +
values + a sha256 of the base weights, and loading onto other base weights is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, set_module


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


class SparseLinear(nn.Linear):
    """nn.Linear whose weight is W0 with the entries at ``sparse_idx`` replaced by the trainable ``sparse_values``.
    Keeps the base ``weight``/``bias`` keys; adds ``sparse_idx`` (int64), ``sparse_values`` and ``sparse_base_hash``."""

    def __init__(self, base: nn.Linear, idx: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        idx = idx.to(device=base.weight.device, dtype=torch.long).sort().values
        self.register_buffer("sparse_idx", idx)
        self.sparse_values = nn.Parameter(base.weight.detach().reshape(-1)[idx].clone())
        # after one progressive re-selection: the previously trained entries that left the set keep their
        # values here (fixed capacity k so checkpoints keep their shapes; the base weight is never modified)
        k = idx.numel()
        self.register_buffer("sparse_frozen_idx", torch.zeros(k, dtype=torch.long, device=idx.device))
        self.register_buffer("sparse_frozen_values", torch.zeros(k, dtype=base.weight.dtype, device=idx.device))
        self.register_buffer("sparse_frozen_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("sparse_reselected", torch.zeros((), dtype=torch.bool))
        self.base_hash = tensor_hash(base.weight)
        self.register_buffer("sparse_base_hash", torch.tensor(list(bytes.fromhex(self.base_hash)), dtype=torch.uint8))

    def base_weight(self) -> torch.Tensor:
        """W0 with the frozen (re-selected-away) entries written in; no gradient."""
        n = int(self.sparse_frozen_count)
        if n == 0:
            return self.weight.detach()
        w = self.weight.detach().clone().reshape(-1)
        w[self.sparse_frozen_idx[:n]] = self.sparse_frozen_values[:n].to(w.dtype)
        return w.reshape(self.weight.shape)

    def dense_weight(self) -> torch.Tensor:
        return SparseScatter.apply(self.sparse_values, self.base_weight(), self.sparse_idx)

    def delta(self) -> torch.Tensor:
        """ΔW = W − W0 as a dense matrix, differentiable w.r.t. ``sparse_values``."""
        return self.dense_weight() - self.weight.detach()  # relative to the original W0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "sparse_base_hash"
        if key in state_dict and not torch.equal(state_dict[key].cpu(), self.sparse_base_hash.cpu()):
            raise SparseCheckpointError(
                f"{prefix.rstrip('.')}: this sparse checkpoint was trained on other base weights "
                f"(hash {bytes(state_dict[key].tolist()).hex()[:12]} vs {self.base_hash[:12]}); refusing to load"
            )
        idx_key = prefix + "sparse_idx"
        if idx_key in state_dict and state_dict[idx_key].shape != self.sparse_idx.shape:
            raise SparseCheckpointError(
                f"{prefix.rstrip('.')}: checkpoint selects {state_dict[idx_key].numel()} entries, "
                f"this adapter {self.sparse_idx.numel()} (another fraction / threshold)"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    @torch.no_grad()
    def reselect(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Progressive step (once): select the same number of smallest-|W| entries of the *current* weight;
        trained entries that leave the set are kept as frozen sparse values; the base weight is untouched and
        the optimizer moments of this tensor are reset."""
        if bool(self.sparse_reselected):
            raise RuntimeError("SaRA re-selection is supported once per layer (fixed-capacity checkpoint)")
        w = self.dense_weight().detach()
        k = self.sparse_idx.numel()
        new_idx = w.abs().reshape(-1).topk(k, largest=False).indices.sort().values
        old_idx = self.sparse_idx
        leaving = old_idx[~torch.isin(old_idx, new_idx)]
        n = leaving.numel()
        self.sparse_frozen_idx[:n] = leaving
        self.sparse_frozen_values[:n] = w.reshape(-1)[leaving]
        self.sparse_frozen_count.fill_(n)
        self.sparse_idx.copy_(new_idx)
        self.sparse_values.data.copy_(w.reshape(-1)[new_idx])
        self.sparse_reselected.fill_(True)
        if optimizer is not None and self.sparse_values in optimizer.state:
            optimizer.state[self.sparse_values] = {}

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)


@dataclass
class SaRAConfig:
    """Sparse fine-tuning of the smallest-magnitude (SaRA) or highest-Fisher (FISH) weight entries."""

    name: str = "sara"  # registry name
    targets: list[str] = field(default_factory=lambda: ["blocks_linear"])  # portable groups or module patterns
    fraction: float | None = 0.1  # share of entries to train (ignored when threshold is set)
    threshold: float | None = None  # absolute τ: train entries with |W0| < τ (the reference's rule)
    scope: str = "global"  # global | per_tensor quantile for `fraction`
    nuclear_lambda: float = 5e-4  # weight of ‖ΔW‖_* on one random targeted layer per step; 0 disables
    reselect_step: int = 0  # progressive re-selection after this many optimizer steps; 0 = never
    fisher_file: str | None = None  # FISH: safetensors of per-layer Fisher scores (module name → tensor)
    seed: int = 0  # seed for the nuclear-norm layer choice

    def __post_init__(self) -> None:
        if self.threshold is None and self.fraction is None:
            raise ValueError("SaRA needs `fraction` or `threshold`")
        if self.threshold is not None and self.threshold <= 0:
            raise ValueError(f"SaRA threshold must be positive, got {self.threshold}")
        if self.threshold is None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"SaRA fraction must lie in (0, 1], got {self.fraction}")
        if self.scope not in ("global", "per_tensor"):
            raise ValueError(f"SaRA scope must be global or per_tensor, got {self.scope!r}")
        if self.nuclear_lambda < 0 or self.reselect_step < 0:
            raise ValueError("SaRA nuclear_lambda and reselect_step must be >= 0")


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


def nuclear_penalty(layers: list[SparseLinear], gen: torch.Generator | None = None) -> torch.Tensor:
    """‖ΔW‖_* of one randomly chosen layer (differentiable in its sparse values)."""
    i = int(torch.randint(len(layers), (1,), generator=gen)) if gen is not None else 0
    return torch.linalg.matrix_norm(layers[i].delta().float(), ord="nuc")


def fisher_scores(model: nn.Module, module_names: list[str], loss_fn, batches) -> dict[str, torch.Tensor]:
    """Empirical Fisher diag (mean squared gradient) of each named Linear's weight over ``batches``."""
    mods = {n: model.get_submodule(n) for n in module_names}
    flags = {n: m.weight.requires_grad for n, m in mods.items()}
    for m in mods.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    acc = {n: torch.zeros_like(m.weight) for n, m in mods.items()}
    count = 0
    for batch in batches:
        loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, [m.weight for m in mods.values()])
        for n, g in zip(mods, grads, strict=True):
            acc[n] += g.detach() ** 2
        count += 1
    for n, m in mods.items():
        m.weight.requires_grad_(flags[n])
    return {n: a / max(1, count) for n, a in acc.items()}


class SparseHandle(AdapterHandle):
    """AdapterHandle + the sparse engine's layers; the nuclear-norm penalty is its ``loss_fn`` (``extra_losses``)."""

    def layers(self, backbone: nn.Module) -> list[SparseLinear]:
        return [backbone.get_submodule(n) for n in self.touched if isinstance(backbone.get_submodule(n), SparseLinear)]


def sparse_state(backbone: nn.Module, touched: list[str]) -> dict[str, torch.Tensor]:
    """Explicit checkpoint: per layer indices, values, frozen re-selected-away entries and the base-weight hash."""
    out = {}
    for n in touched:
        m = backbone.get_submodule(n)
        for k, v in m.state_dict().items():  # idx, values, base hash, frozen (re-selected-away) entries
            if k.startswith("sparse_"):
                out[f"{n}.{k}"] = v.detach().cpu().contiguous()
    return out


def save_sparse(path: str | Path, backbone: nn.Module, touched: list[str]) -> None:
    from safetensors.torch import save_file

    save_file(sparse_state(backbone, touched), str(path), metadata={"format": "vision_peft.sparse/1"})


def load_sparse(path: str | Path, backbone: nn.Module, touched: list[str]) -> None:
    """Load indices + values; refuses a checkpoint whose base-weight hash differs from this backbone's."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    for n in touched:
        m = backbone.get_submodule(n)
        m.load_state_dict({k[len(n) + 1 :]: v for k, v in sd.items() if k.startswith(n + ".")}, strict=False)


def _apply_sparse(backbone: nn.Module, cfg: SaRAConfig, fisher: bool) -> SparseHandle:
    names = [n for n in backbone.resolve_targets(cfg.targets) if type(backbone.get_submodule(n)) is nn.Linear]
    if not names:
        raise ValueError(f"{cfg.name} targets {cfg.targets} matched no nn.Linear")
    if fisher:
        if not cfg.fisher_file:
            raise ValueError(
                "FISH needs adapter.fisher_file (Fisher scores; see vision_peft.adapters.sara.fisher_scores)"
            )
        from safetensors.torch import load_file

        sc = load_file(cfg.fisher_file)
        missing = [n for n in names if n not in sc]
        if missing:
            raise ValueError(f"fisher_file lacks scores for {missing[:3]}")
        scores = {n: sc[n] for n in names}
    else:
        scores = {n: backbone.get_submodule(n).weight.detach().abs().cpu() for n in names}
    idx, report = select_entries(scores, cfg.fraction, cfg.threshold, cfg.scope, largest=fisher)
    touched = []
    for n in names:
        if idx[n].numel() == 0:
            continue
        set_module(backbone, n, SparseLinear(backbone.get_submodule(n), idx[n]))
        touched.append(n)
    if not touched:
        raise ValueError(f"{cfg.name}: the selection (τ={report['threshold']}) picked no entries; raise the threshold")

    def merge() -> None:
        for n in touched:
            set_module(backbone, n, backbone.get_submodule(n).merged())

    handle = SparseHandle(cfg.name, touched=touched, merge_fn=merge)
    if cfg.reselect_step > 0:
        layers = [backbone.get_submodule(n) for n in touched]
        first = layers[0].sparse_values

        def hook(opt, args, kwargs) -> None:  # progressive re-selection, driven by the optimizer's own step count
            st = opt.state.get(first)
            if not st or "step" not in st or bool(layers[0].sparse_reselected):
                return
            if int(st["step"]) >= cfg.reselect_step:
                for m in layers:
                    m.reselect(opt)
                handle.report["reselected_at"] = int(cfg.reselect_step)

        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle.hook = register_optimizer_step_post_hook(hook)
    handle.report = report
    if cfg.nuclear_lambda > 0:
        gen = torch.Generator().manual_seed(cfg.seed)  # picks the penalised layer of each training forward

        def loss_fn(model: nn.Module) -> dict[str, torch.Tensor]:
            layers = [m for m in backbone.modules() if isinstance(m, SparseLinear)]
            return {"nuclear": cfg.nuclear_lambda * nuclear_penalty(layers, gen)} if layers else {}

        handle.loss_fn = loss_fn
    return handle


@ADAPTERS.register(
    "sara", config_cls=SaRAConfig, help="SaRA: train the smallest-|W| entries, sparse autograd",
    requires=("linear",), spec={"fraction": 0.1},
)  # fmt: skip
def apply_sara(backbone: nn.Module, cfg: SaRAConfig) -> SparseHandle:
    """Select the smallest-magnitude entries of the targeted Linear weights and make only them trainable."""
    return _apply_sparse(backbone, cfg, fisher=False)


@dataclass
class FISHConfig(SaRAConfig):
    """Fisher-masked sparse tuning (FISH): top-Fisher entries, fixed mask, same engine."""

    name: str = "fish"
    nuclear_lambda: float = 0.0


@ADAPTERS.register(
    "fish", config_cls=FISHConfig, help="FISH: train the top empirical-Fisher entries (fixed mask)",
    requires=("linear",), spec={"fraction": 0.1},  # + fisher_file: scores from data (diffusion_tools fisher)
)  # fmt: skip
def apply_fish(backbone: nn.Module, cfg: FISHConfig) -> SparseHandle:
    return _apply_sparse(backbone, cfg, fisher=True)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's per-parameter state tensors (AdamW: exp_avg + exp_avg_sq + step)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


__all__ = [
    "SaRAConfig",
    "FISHConfig",
    "SparseLinear",
    "SparseScatter",
    "SparseCheckpointError",
    "select_entries",
    "nuclear_penalty",
    "fisher_scores",
    "save_sparse",
    "load_sparse",
    "optimizer_state_bytes",
]
