"""SaRA (Hu et al., ICLR 2025, arXiv 2409.06633) and FISH (Sung et al., NeurIPS 2021, "Training Neural Networks with
Fixed Sparse Masks") on one sparse engine.

The engine itself (scatter, sparse holders, selection, sparse checkpoints) is :mod:`vision_peft.adapters.sparse`;
this module is the methods: eligibility, the nuclear norm, Fisher files, the handle and the registrations.

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

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, set_module
from vision_peft.adapters.sara_fisher import fisher_scores
from vision_peft.adapters.sparse import (  # the engine; names re-exported for callers of this module
    SparseCheckpointError as SparseCheckpointError,
)
from vision_peft.adapters.sparse import (
    SparseLinear as SparseLinear,
)
from vision_peft.adapters.sparse import (
    SparseScatter as SparseScatter,
)
from vision_peft.adapters.sparse import (
    SparseTensor as SparseTensor,
)
from vision_peft.adapters.sparse import (
    load_sparse as load_sparse,
)
from vision_peft.adapters.sparse import (
    reselect as reselect,
)
from vision_peft.adapters.sparse import (
    save_sparse as save_sparse,
)
from vision_peft.adapters.sparse import (
    select_entries as select_entries,
)
from vision_peft.adapters.sparse import (
    sparse_holders as sparse_holders,
)
from vision_peft.adapters.sparse import (
    sparse_state as sparse_state,
)
from vision_peft.adapters.sparse import (
    tensor_hash as tensor_hash,
)

FISHER_FORMAT = "vision_peft.fisher/2"  # fisher files keyed by parameter name; older ones: Linear module names
ELIGIBLE = ("linear", "all")


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
