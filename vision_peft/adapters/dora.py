"""DoRA: Enhancing Parameter-Efficient Fine-Tuning with Dynamic Rank Distribution (Mao et al., ACL 2024,
https://arxiv.org/abs/2405.17357) — the dynamic-rank DoRA, not the weight-decomposed DoRA of Liu et al.

The low-rank update is written as a sum of rank-one components, Δ = s · B diag(c ⊙ m) A, with A (k × fan_in),
B (fan_out × k), per-component scalars c and a 0/1 mask m, s = alpha / r. Every layer starts with
k = ⌈init_ratio · r⌉ components (1.5 r); during training each component gets an importance
‖c_i b_i a_iᵀ‖_F / ‖B diag(c ⊙ m) A‖_F (its share of its layer's update), smoothed by an exponential moving
average, and the global budget of live components shrinks on a cubic schedule from Σ k to Σ r between
``prune_start`` and ``prune_end`` (fractions of training; 15 % and 50 %, the AdaLoRA-style schedule). The
least important components are masked out for good, so the final adapter spends its rank where the task needs
it: different layers end with different ranks. B = 0 at initialisation (the model starts frozen-equal).

Where this implementation differs from the paper: the dimensional-equilibrium regulariser (a variance penalty
on the components) is not implemented; pruning is permanent (a masked component never returns); the
importance is computed from the weights after each optimizer step (‖c_i b_i a_iᵀ‖_F = |c_i|·‖b_i‖·‖a_i‖, no
gradient needed). Like ``lora``: nn.Linear uses the activation path, convolutions and open_clip's fused
``nn.MultiheadAttention`` weights are re-parameterised in weight space, and ``merge()`` folds everything into
plain weights for export. Masks and importances are buffers, so checkpoints resume exactly and
``adapter.safetensors`` records which components survived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, cubic_remaining, delta_handle, inject_seeded


@dataclass
class DoRAConfig:
    """Rank-one components with learned scalars, pruned to a global budget during training."""

    name: str = "dora"  # registry name
    r: int = 8  # average rank per layer after pruning (the final budget is r × number of layers)
    init_ratio: float = 1.5  # each layer starts with ceil(init_ratio * r) components
    alpha: float = 16.0  # scale numerator: the update is multiplied by alpha / r
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # portable groups or module-name patterns
    prune_start: float = 0.15  # fraction of training when pruning starts (budget still the initial one)
    prune_end: float = 0.5  # fraction of training when the budget reaches r per layer
    ema: float = 0.85  # smoothing of the importance: imp ← ema · imp + (1 − ema) · current
    seed: int = 0  # seed of A's initialisation

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"DoRA rank must be positive, got r={self.r}")
        if self.init_ratio < 1.0:
            raise ValueError(
                f"DoRA init_ratio must be >= 1 (layers start with at least r components), got {self.init_ratio}"
            )
        if self.alpha <= 0:
            raise ValueError(f"DoRA alpha must be positive, got alpha={self.alpha}")
        if not 0.0 <= self.prune_start < self.prune_end <= 1.0:
            raise ValueError(
                f"DoRA needs 0 <= prune_start < prune_end <= 1, got {self.prune_start} and {self.prune_end}"
            )
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"DoRA ema must lie in [0, 1), got {self.ema}")
        if not self.targets:
            raise ValueError("DoRA needs at least one target (e.g. qkv, mlp, conv_pw or a module-name pattern)")

    @property
    def initial_rank(self) -> int:
        return math.ceil(self.init_ratio * self.r)


class DoRAComponents(nn.Module):
    """A (k × fan_in), B (fan_out × k), scalars c (k); buffers: mask m (k) and EMA importance (k)."""

    pack_scalars = ("scale",)  # float attributes an adapter pack exposes as graph inputs (vision_peft.pack)

    def __init__(self, fan_in: int, fan_out: int, cfg: DoRAConfig, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        k = cfg.initial_rank
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5) bound, as nn.Linear and LoRA use for A
        a = torch.empty(k, fan_in).uniform_(-bound, bound, generator=gen)
        self.lora_A = nn.Parameter(a.to(device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, k, device=like.device, dtype=like.dtype))
        self.lora_c = nn.Parameter(torch.ones(k, device=like.device, dtype=like.dtype))
        self.register_buffer("mask", torch.ones(k, device=like.device))
        self.register_buffer("importance", torch.zeros(k, device=like.device))
        self.scale = cfg.alpha / cfg.r

    def gate(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.lora_c * self.mask.to(self.lora_c.dtype)).to(dtype)  # (k,) pruned components are 0

    def side(self, x: torch.Tensor) -> torch.Tensor:
        """The activation path (…, fan_in) → (…, fan_out): s · B diag(c ⊙ m) A x."""
        z = F.linear(x, self.lora_A.to(x.dtype)) * self.gate(x.dtype)  # (…, k)
        return F.linear(z, self.lora_B.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """s · B diag(c ⊙ m) A, (fan_out, fan_in)."""
        return (self.lora_B * self.gate(self.lora_B.dtype)) @ self.lora_A * self.scale

    @torch.no_grad()
    def current_importance(self) -> torch.Tensor:
        """|c_i m_i| ‖b_i‖ ‖a_i‖ / ‖ΔW‖_F: each live component's share of this layer's update (0 if pruned)."""
        comp = self.gate(torch.float32).abs() * self.lora_B.float().norm(dim=0) * self.lora_A.float().norm(dim=1)
        total = self.delta().float().norm() / self.scale  # a tensor: no host sync
        return comp / (total + 1e-12)

    @property
    def rank(self) -> int:
        return int(self.mask.sum())


def budget(step: int, total: int, start_budget: int, end_budget: int, cfg: DoRAConfig) -> int:
    """Live components allowed after ``step`` of ``total``: cubic decay between prune_start and prune_end."""
    left = cubic_remaining(step, cfg.prune_start * total, cfg.prune_end * total)
    return end_budget + math.ceil((start_budget - end_budget) * left)


def prune_to(components: list[DoRAComponents], keep: int) -> int:
    """Mask out the live components with the lowest EMA importance until ``keep`` remain; returns how many live.

    Vectorised over all layers (one host sync per call), so it stays cheap on a GPU."""
    masks = torch.cat([c.mask for c in components])  # (Σk,)
    live = int(masks.sum())
    if live <= keep:
        return live
    imp = torch.cat([c.importance for c in components]).masked_fill(masks == 0, float("inf"))  # pruned: never again
    masks[torch.topk(imp, live - keep, largest=False).indices] = 0.0
    offset = 0
    with torch.no_grad():
        for c in components:
            c.mask.copy_(masks[offset : offset + len(c.mask)])
            offset += len(c.mask)
    return keep


@ADAPTERS.register(
    "dora", config_cls=DoRAConfig, help="DoRA (dynamic rank, Mao et al. 2024): pruned rank-1 components", spec={"r": 2}
)
def apply_dora(backbone: nn.Module, cfg: DoRAConfig) -> AdapterHandle:
    """Add ⌈init_ratio·r⌉ rank-one components to every targeted module; the handle's ``step_fn`` prunes them."""
    targets = inject_seeded(backbone, cfg, "dora", "DoRA", DoRAComponents)

    def components() -> list[DoRAComponents]:
        return [m for m in backbone.modules() if isinstance(m, DoRAComponents)]

    start_budget = cfg.initial_rank * len(targets)
    end_budget = cfg.r * len(targets)
    report = {"layers": len(targets), "initial_components": start_budget, "final_budget": end_budget}

    def step_fn(step: int, total: int) -> dict[str, float]:
        comps = components()
        with torch.no_grad():
            for c in comps:
                c.importance.mul_(cfg.ema).add_(c.current_importance() * (1.0 - cfg.ema))
        live = prune_to(comps, budget(step, total, start_budget, end_budget, cfg))
        ranks = [int(r) for r in torch.stack([c.mask.sum() for c in comps]).tolist()]
        report["ranks"] = ranks
        return {"dora_components": float(live), "dora_rank_min": float(min(ranks)), "dora_rank_max": float(max(ranks))}

    return delta_handle("dora", backbone, targets, report=report, step_fn=step_fn)
