"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., ICLR 2023,
https://arxiv.org/abs/2303.10512).

The update of every targeted weight is written in SVD form, Δ = P diag(λ) Q · (alpha / init_r), with
P = ``lora_B`` (fan_out × init_r), λ = ``lora_E`` (init_r) and Q = ``lora_A`` (init_r × fan_in); λ = 0 and P, Q
~ N(0, 0.02²) at initialisation, so the adapted model starts equal to the frozen one. A triplet (P_i, λ_i, Q_i)
is one rank. Training adds an orthogonality regulariser on P and Q. The paper's objective writes it
γ · Σ_layers (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F) (``orth_reg: squared_sum``); the authors' released code and peft
compute γ · the mean over all P and Q of the unsquared ‖·‖_F (``orth_reg: mean_norm``, the default: peft's
γ = 0.5 is set for that form; on EfficientNet-Lite0's 31 pointwise convs the squared sum with γ = 0.5 was
~100× the task loss after 10 steps). After every optimizer step (the ``step_fn`` hook):

1. the sensitivity I(w) = |w · ∂L/∂w| of every entry of P, λ, Q is smoothed, Ī ← β1 Ī + (1 − β1) I, with its
   uncertainty Ū ← β2 Ū + (1 − β2) |I − Ī|, and s(w) = Ī · Ū;
2. each triplet scores S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij);
3. the global budget (live triplets over all layers) follows the cubic schedule b(t) from Σ init_r down to
   target_r × layers: flat for the first ``tinit`` steps, b(T) from step T − ``tfinal`` on; every ``deltaT``
   steps in between (and every step of the final phase) the λ of all but the b(t) best-scoring triplets are set
   to 0 — masked λ keep training and may come back at the next allocation, as in the paper; the scores stop
   updating from step T − ``tfinal`` on, so the final phase keeps one fixed allocation.

The gradients of step 3 come from the engine: ``train.run`` calls ``step_fn`` right after the optimizer step and
``zero_grad`` only at the start of the next step, so ``.grad`` still holds the last backward's gradients (peft's
``update_and_allocate`` is documented to run at the same point, after ``optimizer.step()``); ``step_fn`` raises
if a gradient is missing. Non-finite gradients (an fp16 step the scaler skips) count as zero sensitivity.

Where the paper's language models meet vision: the paper adapts every weight matrix of the transformer blocks (DeBERTaV3, BART); here
``targets`` picks ViT block Linears (``qkv``, ``mlp``, …) on the activation path, and convolutions of CNN
stages (``conv_pw``, k×k, Conv1d of point backbones) are re-parameterised in weight space with the kernel
flattened to (fan_out, fan_in · k…), the matrix the SVD form factorises; ``merge()`` folds every update into
plain weights for export.

Where this implementation differs from Hugging Face peft's AdaLoRA (``bench/adalora_vs_peft.py`` checks the
rest step by step): none in the default orthogonality term (above); the scale is alpha / init_r
(peft: lora_alpha / (init_r + 1e-5)); masking keeps exactly b(t) triplets (top-b by score; peft masks every
score ≤ the k-th smallest, which removes more on ties); the schedule's tinit / tfinal are checked against the
run's total steps at the first step (the engine tells an adapter the total only then; peft needs
``total_step`` in its config). Scores, masks and their moving averages are buffers, so checkpoints resume
exactly and ``adapter.safetensors`` records the rank pattern (``mask``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, cubic_remaining, delta_handle, inject_seeded

TENSORS = ("lora_A", "lora_E", "lora_B")  # Q, λ, P


@dataclass
class AdaLoRAConfig:
    """SVD-form low-rank updates whose rank budget is reallocated by sensitivity during training (peft's names)."""

    name: str = "adalora"  # registry name
    init_r: int = 12  # triplets per layer at the start
    target_r: int = 8  # average triplets per layer at the end (the final budget is target_r × layers)
    alpha: float = 16.0  # scale numerator: the update is multiplied by alpha / init_r
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # portable groups or module-name patterns
    tinit: int = 0  # warm-up steps with the full budget
    tfinal: int = 0  # final steps with the target budget and a fixed allocation
    deltaT: int = 1  # steps between two allocations during the budget decay
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5  # γ of the orthogonality regulariser (0 = off)
    orth_reg: Literal["mean_norm", "squared_sum"] = "mean_norm"  # peft / the authors' code | the paper's objective
    seed: int = 0  # seed of P and Q's initialisation

    def __post_init__(self) -> None:
        if self.init_r < 1:
            raise ValueError(f"AdaLoRA adapter.init_r must be >= 1, got {self.init_r}")
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(
                f"AdaLoRA adapter.target_r must lie in [1, init_r={self.init_r}] (the budget only shrinks), "
                f"got {self.target_r}"
            )
        if self.alpha <= 0:
            raise ValueError(f"AdaLoRA adapter.alpha must be positive, got {self.alpha}")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"AdaLoRA adapter.tinit and adapter.tfinal must be >= 0, got {self.tinit}, {self.tfinal}")
        if self.deltaT < 1:
            raise ValueError(f"AdaLoRA adapter.deltaT must be >= 1 (steps between allocations), got {self.deltaT}")
        for key in ("beta1", "beta2"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ValueError(f"AdaLoRA adapter.{key} must lie in (0, 1), got {getattr(self, key)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRA adapter.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not self.targets:
            raise ValueError("AdaLoRA needs at least one target (e.g. qkv, mlp, conv_pw or a module-name pattern)")

    def check_schedule(self, total: int) -> None:
        """Refuse a schedule without a budget-decay phase: tinit + tfinal must stay below the run's steps."""
        if self.tinit + self.tfinal >= total:
            raise ValueError(
                f"AdaLoRA adapter.tinit ({self.tinit}) + adapter.tfinal ({self.tfinal}) must be < the run's "
                f"total steps ({total}), so that the budget can decay in between; lower them (tinit + tfinal "
                f"<= {total - 1}) or train longer"
            )


class AdaLoRATriplets(nn.Module):
    """P = lora_B (fan_out × r), λ = lora_E (r), Q = lora_A (r × fan_in); buffers: the live-triplet ``mask`` and
    the moving averages of each tensor's sensitivity (``<tensor>_importance``, peft's ``exp_avg_ipt``) and its
    uncertainty (``<tensor>_uncertainty``)."""

    pack_scalars = ("scale",)  # float attributes an adapter pack exposes as graph inputs (vision_peft.pack)

    def __init__(self, fan_in: int, fan_out: int, cfg: AdaLoRAConfig, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        r, kw = cfg.init_r, {"device": like.device, "dtype": like.dtype}
        self.lora_A = nn.Parameter((torch.randn(r, fan_in, generator=gen) * 0.02).to(**kw))
        self.lora_E = nn.Parameter(torch.zeros(r, **kw))
        self.lora_B = nn.Parameter((torch.randn(fan_out, r, generator=gen) * 0.02).to(**kw))
        self.register_buffer("mask", torch.ones(r, device=like.device))
        for name in TENSORS:
            shape = getattr(self, name).shape
            self.register_buffer(f"{name}_importance", torch.zeros(shape, device=like.device))
            self.register_buffer(f"{name}_uncertainty", torch.zeros(shape, device=like.device))
        self.scale = cfg.alpha / cfg.init_r

    def side(self, x: torch.Tensor) -> torch.Tensor:
        """The activation path (…, fan_in) → (…, fan_out): s · P diag(λ) Q x."""
        qe = (self.lora_A * self.lora_E[:, None]).to(x.dtype)
        return F.linear(F.linear(x, qe), self.lora_B.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """s · P diag(λ) Q, (fan_out, fan_in)."""
        return self.lora_B @ (self.lora_A * self.lora_E[:, None]) * self.scale

    def orthogonality(self, squared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F), squared or not, in float32."""
        q, p = self.lora_A.float(), self.lora_B.float()
        eye = torch.eye(q.shape[0], device=q.device)
        terms = (torch.linalg.matrix_norm(q @ q.T - eye), torch.linalg.matrix_norm(p.T @ p - eye))
        return (terms[0] ** 2, terms[1] ** 2) if squared else terms

    @torch.no_grad()
    def update_sensitivity(self, beta1: float, beta2: float) -> None:
        """One EMA step of Ī and Ū from I = |w · ∂L/∂w| (the gradients of the last backward)."""
        for name in TENSORS:
            p = getattr(self, name)
            if p.grad is None:
                raise RuntimeError(
                    "AdaLoRA's step_fn needs the gradients of the last backward: call it after optimizer.step() "
                    "and before zero_grad()"
                )
            ipt = torch.nan_to_num((p.float() * p.grad.float()).abs(), nan=0.0, posinf=0.0)
            avg, unc = getattr(self, f"{name}_importance"), getattr(self, f"{name}_uncertainty")
            avg.copy_(beta1 * avg + (1 - beta1) * ipt)
            unc.copy_(beta2 * unc + (1 - beta2) * (ipt - avg).abs())

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        """S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), with s = Ī · Ū; shape (r,)."""
        s = {name: getattr(self, f"{name}_importance") * getattr(self, f"{name}_uncertainty") for name in TENSORS}
        return s["lora_E"] + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))

    @property
    def rank(self) -> int:
        return int(self.mask.sum())


def budget(step: int, total: int, start: int, end: int, cfg: AdaLoRAConfig) -> int:
    """Live triplets allowed after ``step`` of ``total``: ``start`` up to tinit, then the cubic decay
    b = ⌊(start − end) · (1 − (step − tinit) / (total − tfinal − tinit))³ + end⌋, ``end`` from total − tfinal."""
    return int((start - end) * cubic_remaining(step, cfg.tinit, total - cfg.tfinal) + end)


def allocates(step: int, total: int, cfg: AdaLoRAConfig) -> bool:
    """Whether the allocation runs after ``step``: every deltaT steps of the decay, every step from total − tfinal
    on (the scores are frozen there, so the allocation stays fixed)."""
    return step >= total - cfg.tfinal or (step > cfg.tinit and step % cfg.deltaT == 0)


@torch.no_grad()
def mask_to_budget(layers: list[AdaLoRATriplets], keep: int) -> None:
    """Keep the ``keep`` best-scoring triplets over all layers, set every other λ to 0 (and its mask to 0)."""
    scores = torch.cat([t.scores() for t in layers])
    mask = torch.zeros_like(scores)
    mask[torch.topk(scores, min(keep, len(scores))).indices] = 1.0
    for t, m in zip(layers, mask.split([len(t.mask) for t in layers])):
        t.mask.copy_(m)
        t.lora_E.masked_fill_(m == 0, 0.0)


def orthogonality_loss(layers: list[AdaLoRATriplets], cfg: AdaLoRAConfig) -> torch.Tensor:
    """γ · mean of the 2·layers norms ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F (``mean_norm``) or γ · Σ of their squares
    (``squared_sum``)."""
    with torch.autocast(layers[0].lora_A.device.type, enabled=False):
        terms = [x for t in layers for x in t.orthogonality(squared=cfg.orth_reg == "squared_sum")]
        total = torch.stack(terms).sum()
    return cfg.orth_reg_weight * (total if cfg.orth_reg == "squared_sum" else total / len(terms))


@ADAPTERS.register(
    "adalora",
    config_cls=AdaLoRAConfig,
    help="AdaLoRA (Zhang et al. 2023): SVD-form triplets, rank budget reallocated by sensitivity",
    spec={"init_r": 3, "target_r": 2},
)
def apply_adalora(backbone: nn.Module, cfg: AdaLoRAConfig) -> AdapterHandle:
    """Add init_r triplets to every targeted module; ``loss_fn`` adds the orthogonality term, ``step_fn`` scores
    the triplets and masks λ to the scheduled budget."""
    targets = inject_seeded(backbone, cfg, "adalora", "AdaLoRA", AdaLoRATriplets)

    def layers() -> list[AdaLoRATriplets]:
        return [m for m in backbone.modules() if isinstance(m, AdaLoRATriplets)]

    start, end = cfg.init_r * len(targets), cfg.target_r * len(targets)
    report = {"layers": len(targets), "initial_budget": start, "final_budget": end}

    def step_fn(step: int, total: int) -> dict[str, float]:
        cfg.check_schedule(total)
        ts, final_from = layers(), total - cfg.tfinal
        if step < final_from:
            for t in ts:
                t.update_sensitivity(cfg.beta1, cfg.beta2)
        b = budget(step, total, start, end, cfg)
        if allocates(step, total, cfg):
            mask_to_budget(ts, b)
        ranks = [int(r) for r in torch.stack([t.mask.sum() for t in ts]).tolist()]
        report["ranks"] = ranks
        return {
            "adalora_budget": float(b),
            "adalora_triplets": float(sum(ranks)),
            "adalora_rank_min": float(min(ranks)),
            "adalora_rank_max": float(max(ranks)),
        }

    def loss_fn(_model: nn.Module) -> dict[str, torch.Tensor]:
        return {"orth": orthogonality_loss(layers(), cfg)} if cfg.orth_reg_weight > 0 else {}

    return delta_handle("adalora", backbone, targets, report=report, step_fn=step_fn, loss_fn=loss_fn)
