"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685),
with the asymmetric B-only variant of Zhu et al. (ICML 2024, https://arxiv.org/abs/2402.16842).

A frozen weight W0 gets a low-rank update: h = W0 x + (alpha / r) B A x, with B = 0 at initialisation so the
adapted model equals the frozen one at step 0. ``train_a: false`` keeps the random A frozen (a buffer saved
with the adapter) and trains only B: half the parameters, similar quality.

Where this implementation differs: ``nn.Linear`` uses the activation path (x Aᵀ Bᵀ) like HF peft;
convolutions (1×1, k×k, grouped/depthwise, timm's TF-"same" convs) are re-parameterised in weight space,
W = W0 + B A reshaped to the kernel, so every conv shape keeps its own forward; open_clip's ``nn.MultiheadAttention`` keeps its fused
``in_proj_weight`` and we re-parameterise that tensor with ``torch.nn.utils.parametrize`` (targeting
``out_proj`` alone would be silently bypassed by MHA's fused path). ``merge()`` folds every update into
plain ``nn.Linear`` / ``nn.Conv2d`` / MHA weights for export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, delta_handle, inject_seeded


@dataclass
class LoRAConfig:
    """Low-rank update on the targeted Linear / Conv / MultiheadAttention modules."""

    name: str = "lora"  # registry name
    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator: the update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the LoRA input path (Linear only)
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # portable groups or module-name patterns
    train_a: bool = True  # false = asymmetric LoRA: A stays a frozen random projection, only B trains
    seed: int = 0  # seed for A's initialisation (so frozen-A adapters are reproducible)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target (e.g. qkv, mlp, conv_pw or a module-name pattern)")


def _init_a(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    a = torch.empty(shape)
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform(a=sqrt(5)) bound, as nn.Linear and peft use
    return a.uniform_(-bound, bound, generator=gen)


class LoRAFactors(nn.Module):
    """A (r × fan_in) and B (fan_out × r); A is a buffer when it is not trained. Dropout acts on the activation
    path only (``side``); ``delta()`` is the inference-time update."""

    pack_scalars = ("scale",)  # float attributes an adapter pack exposes as graph inputs (vision_peft.pack)

    def __init__(self, fan_in: int, fan_out: int, cfg: LoRAConfig, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        a = _init_a((cfg.r, fan_in), gen).to(device=like.device, dtype=like.dtype)
        if cfg.train_a:
            self.lora_A = nn.Parameter(a)
        else:
            self.register_buffer("lora_A", a)
        self.lora_B = nn.Parameter(torch.zeros(fan_out, cfg.r, device=like.device, dtype=like.dtype))
        self.scale = cfg.alpha / cfg.r
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def side(self, x: torch.Tensor) -> torch.Tensor:
        """(…, fan_in) → (…, fan_out): s · B A dropout(x)."""
        z = F.linear(F.linear(self.drop(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return z * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (fan_out, fan_in)


@ADAPTERS.register("lora", config_cls=LoRAConfig, help="LoRA on Linear, Conv and fused MHA projections", spec={"r": 2})
def apply_lora(backbone: nn.Module, cfg: LoRAConfig) -> AdapterHandle:
    """Wrap every targeted module with a low-rank update (B = 0, so outputs are unchanged at step 0)."""
    targets = inject_seeded(backbone, cfg, "lora", "LoRA", LoRAFactors)
    return delta_handle("lora", backbone, targets)
