"""SaRA (Hu et al., ICLR 2025, arXiv 2409.06633) and FISH (Sung et al., NeurIPS 2021, "Training Neural Networks with
Fixed Sparse Masks") on one sparse engine.

Engine: for each eligible tensor W0 a set of entries M is selected; the trainable vector is p = W0[M] (so the model
is unchanged at step 0) and the forward tensor is W = scatter(W0, M, p), computed by :class:`SparseScatter`, a custom
autograd function whose backward returns ``grad_W[M]`` only — ``.grad`` and the AdamW moments exist for the |M|
selected entries, nothing dense. A targeted ``nn.Linear``'s weight lives in a :class:`SparseLinear`; every other
tensor (biases, norm affines, adaLN, embeddings) gets a :class:`SparseTensor` parametrization.

Eligible tensors (``eligible``): ``linear`` — the weights of the targeted ``nn.Linear`` layers; ``all`` — every
parameter tensor of the targeted modules, as SaRA's reference (which masks every ``model.parameters()`` tensor).
Rule for old configs: a config without the key means ``linear`` (what every run written before the field existed
trained), so old run directories keep their checkpoint layout; the shipped diffusion recipes choose ``all``.

Selection (``select``): ``fraction`` (smallest-|W0| share, ``scope: global`` quantile over all eligible tensors or
``per_tensor``) or an absolute ``threshold`` τ (the reference's |W0| < τ); the resulting τ and count are reported in
``handle.report``. FISH selects the top entries of the empirical Fisher instead — the mean over N examples of the
*per-example* squared gradient of the per-example loss (:func:`fisher_scores`; for the diffusion task the
per-example "log-likelihood" is the per-example denoising loss) — same engine, fixed mask.

Differences from the reference code (see docs/methods.md §4): the nuclear-norm penalty is applied to the
*scattered* ΔW = W − W0 of one random targeted Linear per training forward, so its gradient reaches p (the
reference penalises W ⊙ M, a tensor its optimizer never updates). Its gradient is the minimum-norm subgradient
U_r V_rᵀ over the non-zero singular values only (:func:`nuclear_penalty`): at step 0, where ΔW = 0, it is zero
instead of an arbitrary full-size U Vᵀ, and ``nuclear_start`` can keep it off during the warm-up. Progressive
re-selection (:func:`reselect`) happens once, re-selects the same count per tensor on the current values (the
reference re-thresholds with the same τ) and resets that tensor's optimizer moments (the reference rebuilds its
optimizer and skips that step); the optimizer hook that drives it is removed after it fires. Checkpoints carry
explicit indices + values + a sha256 of the base tensor, and loading onto other base weights is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, set_module
from vision_peft.adapters.sara_fisher import fisher_scores

FISHER_FORMAT = "vision_peft.fisher/2"  # fisher files keyed by parameter name; older ones: Linear module names
ELIGIBLE = ("linear", "all")


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
        return SparseScatter.apply(self.sparse_values, self.base_weight(), self.sparse_idx)

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
        return SparseScatter.apply(self.sparse_values, _with_frozen(self, w0), self.sparse_idx)

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


@dataclass
class SaRAConfig:
    """Sparse fine-tuning of the smallest-magnitude (SaRA) or highest-Fisher (FISH) entries."""

    name: str = "sara"  # registry name
    targets: list[str] = field(default_factory=lambda: ["blocks_linear"])  # portable groups or module patterns
    fraction: float | None = 0.1  # share of entries to train (ignored when threshold is set)
    threshold: float | None = None  # absolute τ: train entries with |W0| < τ (the reference's rule)
    scope: str = "global"  # global | per_tensor quantile for `fraction`
    # which tensors of the targeted modules can be selected: "linear" = the weights of nn.Linear layers (a config
    # without this key means "linear": every run before the field existed); "all" = every parameter tensor
    # (biases, norm affines, adaLN …), SaRA's reference
    eligible: str = "linear"
    nuclear_lambda: float = 5e-4  # weight of ‖ΔW‖_* on one random targeted Linear per step; 0 disables
    nuclear_start: int = 0  # optimizer steps before the penalty switches on (e.g. the lr warm-up); 0 = from step 0
    reselect_step: int = 0  # progressive re-selection after this many optimizer steps; 0 = never
    fisher_file: str | None = None  # FISH: safetensors of Fisher scores (parameter name → tensor)
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
        if self.eligible not in ELIGIBLE:
            raise ValueError(f"{self.name} eligible must be one of {ELIGIBLE}, got {self.eligible!r}")
        if self.nuclear_lambda < 0 or self.reselect_step < 0 or self.nuclear_start < 0:
            raise ValueError("SaRA nuclear_lambda, nuclear_start and reselect_step must be >= 0")


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


def nuclear_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖_* whose gradient is the minimum-norm subgradient U_r V_rᵀ over the singular values above the numerical
    rank tolerance (max(m, n) · eps · σ_max): zero at x = 0, and the singular directions with σ = 0 (arbitrary in
    an SVD) get no gradient. ``torch.linalg.matrix_norm(x, "nuc")`` instead returns the full U Vᵀ there."""
    x = x.float()
    u, s, vh = torch.linalg.svd(x.detach(), full_matrices=False)
    tol = max(x.shape) * torch.finfo(s.dtype).eps * (float(s[0]) if s.numel() else 0.0)
    r = int((s > tol).sum()) if s.numel() and float(s[0]) > 0 else 0
    return torch.einsum("ir,ij,rj->", u[:, :r], x, vh[:r])  # = Σ_{i<r} σ_i, d/dx = U_r V_rᵀ


def nuclear_penalty(layers: list[SparseLinear], gen: torch.Generator | None = None) -> torch.Tensor:
    """‖ΔW‖_* of one randomly chosen layer (differentiable in its sparse values; see :func:`nuclear_norm`)."""
    i = int(torch.randint(len(layers), (1,), generator=gen)) if gen is not None else 0
    return nuclear_norm(layers[i].delta())


def eligible_tensors(backbone: nn.Module, targets: list[str], eligible: str) -> list[tuple[str, str, str]]:
    """(key, module name, tensor name) of every selectable tensor; key = the module name for an ``nn.Linear``'s
    weight (the older keys), ``<module>.<tensor>`` for every other tensor."""
    out = []
    for n in backbone.resolve_targets(targets):
        m = backbone.get_submodule(n)
        if eligible == "linear":
            if type(m) is nn.Linear:
                out.append((n, n, "weight"))
            continue
        for pn, _ in m.named_parameters(recurse=False):
            out.append((n if (type(m) is nn.Linear and pn == "weight") else f"{n}.{pn}", n, pn))
    return out


def load_fisher(path: str | Path, entries: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
    """Fisher scores for ``entries`` from a file keyed by parameter name (``vision_peft.fisher/2``) or, for Linear
    weights, by module name (files written before per-example scores; they still load)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        out, missing = {}, []
        for key, mod, pn in entries:
            name = f"{mod}.{pn}"
            hit = name if name in keys else (key if key in keys else None)
            if hit is None:
                missing.append(name)
            else:
                out[key] = f.get_tensor(hit)
    if missing:
        raise ValueError(
            f"fisher_file {path} lacks scores for {missing[:3]} ({len(missing)} tensors); recompute it for these "
            "targets / eligible tensors: python -m vision_peft.diffusion_tools fisher <recipe> --out <file>"
        )
    return out


class SparseHandle(AdapterHandle):
    """AdapterHandle + the sparse engine's layers; the nuclear-norm penalty is its ``loss_fn`` (``extra_losses``)."""

    def layers(self, backbone: nn.Module) -> list[SparseLinear]:
        return [backbone.get_submodule(n) for n in self.touched if isinstance(backbone.get_submodule(n), SparseLinear)]


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
    from safetensors.torch import save_file

    save_file(sparse_state(backbone, touched), str(path), metadata={"format": "vision_peft.sparse/1"})


def load_sparse(path: str | Path, backbone: nn.Module, touched: list[str]) -> None:
    """Load indices + values; refuses a checkpoint whose base-tensor hash differs from this backbone's."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    for n in touched:
        m = backbone.get_submodule(n)
        m.load_state_dict({k[len(n) + 1 :]: v for k, v in sd.items() if k.startswith(n + ".")}, strict=False)


def _apply_sparse(backbone: nn.Module, cfg: SaRAConfig, fisher: bool) -> SparseHandle:
    entries = eligible_tensors(backbone, cfg.targets, cfg.eligible)
    if not entries:
        what = "nn.Linear" if cfg.eligible == "linear" else "module with parameters"
        raise ValueError(f"{cfg.name} targets {cfg.targets} matched no {what}")
    if fisher:
        if not cfg.fisher_file:
            raise ValueError(
                "FISH needs adapter.fisher_file (Fisher scores: python -m vision_peft.diffusion_tools fisher <recipe> "
                "--out <file>, or vision_peft.adapters.sara.fisher_scores)"
            )
        scores = load_fisher(cfg.fisher_file, entries)
        for key, mod, pn in entries:
            want = tuple(getattr(backbone.get_submodule(mod), pn).shape)
            if tuple(scores[key].shape) != want:
                raise ValueError(f"fisher_file {cfg.fisher_file}: {key} has shape {tuple(scores[key].shape)}, "
                                 f"the model's tensor {want} (scores of another backbone)")  # fmt: skip
    else:
        scores = {key: getattr(backbone.get_submodule(mod), pn).detach().abs().cpu() for key, mod, pn in entries}
    idx, report = select_entries(scores, cfg.fraction, cfg.threshold, cfg.scope, largest=fisher)
    touched: list[str] = []
    for key, mod, pn in entries:
        if idx[key].numel() == 0:
            continue
        m = backbone.get_submodule(mod)
        if type(m) is nn.Linear and pn == "weight":
            set_module(backbone, mod, SparseLinear(m, idx[key]))
        else:
            parametrize.register_parametrization(m, pn, SparseTensor(getattr(m, pn), idx[key]))
        if mod not in touched:
            touched.append(mod)
    if not touched:
        raise ValueError(f"{cfg.name}: the selection (τ={report['threshold']}) picked no entries; raise the threshold")

    def merge() -> None:
        if getattr(handle, "hook", None) is not None:
            handle.hook.remove()
            handle.hook = None
        for n in touched:
            m = backbone.get_submodule(n)
            for pn in list(getattr(m, "parametrizations", {}).keys()):
                parametrize.remove_parametrizations(m, pn, leave_parametrized=True)
                getattr(m, pn).requires_grad_(False)
            if isinstance(m, SparseLinear):
                set_module(backbone, n, m.merged())

    handle = SparseHandle(cfg.name, touched=touched, merge_fn=merge)
    handle.hook = None
    holders = sparse_holders(backbone, touched)
    first = holders[0][0]
    if cfg.reselect_step > 0:

        def hook(opt, args, kwargs) -> None:  # progressive re-selection, driven by the optimizer's own step count
            st = opt.state.get(first.sparse_values)
            if bool(first.sparse_reselected) or not st or "step" not in st:
                return
            if int(st["step"]) >= cfg.reselect_step:
                reselect(backbone, touched, opt)
                handle.report["reselected_at"] = int(cfg.reselect_step)

        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle.hook = register_optimizer_step_post_hook(hook)
    steps = None
    if cfg.nuclear_lambda > 0 and cfg.nuclear_start > 0:  # steps done, kept in the adapter state (exact resume)
        steps = torch.zeros((), dtype=torch.long, device=first.sparse_idx.device)
        first.register_buffer("sparse_nuclear_step", steps)

    def step_fn(step: int, total: int) -> None:
        """After each optimizer step: the penalty's step count; the re-selection hook is removed once it has fired
        (here, not inside the hook: the optimizer is iterating its hooks during the step)."""
        if steps is not None:
            steps.fill_(step)
        if handle.hook is not None and bool(first.sparse_reselected):
            handle.hook.remove()
            handle.hook = None

    handle.step_fn = step_fn
    handle.report = report
    if cfg.nuclear_lambda > 0:
        gen = torch.Generator().manual_seed(cfg.seed)  # picks the penalised layer of each training forward

        def loss_fn(model: nn.Module) -> dict[str, torch.Tensor]:
            if steps is not None and int(steps) < cfg.nuclear_start:
                return {}
            layers = [m for m in backbone.modules() if isinstance(m, SparseLinear)]
            return {"nuclear": cfg.nuclear_lambda * nuclear_penalty(layers, gen)} if layers else {}

        handle.loss_fn = loss_fn
    return handle


@ADAPTERS.register(
    "sara", config_cls=SaRAConfig, help="SaRA: train the smallest-|W| entries, sparse autograd",
    requires=("linear",), spec={"fraction": 0.1},
)  # fmt: skip
def apply_sara(backbone: nn.Module, cfg: SaRAConfig) -> SparseHandle:
    """Select the smallest-magnitude entries of the eligible tensors and make only them trainable."""
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
    "SparseTensor",
    "SparseScatter",
    "SparseCheckpointError",
    "select_entries",
    "nuclear_norm",
    "nuclear_penalty",
    "fisher_scores",
    "eligible_tensors",
    "load_fisher",
    "reselect",
    "save_sparse",
    "load_sparse",
    "optimizer_state_bytes",
]
