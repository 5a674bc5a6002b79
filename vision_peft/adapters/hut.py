"""HUT: Hadamard Updated Transformation (Zhang, Zhou & Chen 2024, https://arxiv.org/abs/2409.13501).

Idea: the "updated transformation" paradigm writes the tuned weight as a function of the frozen one,
W' = U(W0), instead of an increment W0 + ΔW; HUT's U is a Hadamard product with a map built from two low-rank
matrices: W' = W0 ⊙ (M_A M_B), M_A (fan_out × r), M_B (r × fan_in), so every change is proportional to W0.

Where this implementation differs: we could not read the paper's exact initialisation in our sources; ours
sets M_A's first column and M_B's first row to ones and M_A's other columns to zero (M_B's other rows random),
so M_A M_B = 1 and W' = W0 at step 0 while a gradient reaches M_A at once (the LoRA-style asymmetry). The
wrappers of :mod:`vision_peft.adapters.base` carry the transformation as W0 + (W0 ⊙ (M_A M_B) − W0), which is
the same weight. Parameters per layer: r · (fan_in + fan_out), as LoRA at rank r.

CNN / ViT mapping: a conv kernel is viewed as (out, in/groups · kh · kw) — EfficientNet-Lite0's ``conv_pw``
(1×1) and depthwise ``conv_dw`` (fan_in = kh·kw) are re-parameterised in weight space; ViT ``qkv`` / ``mlp``
Linears take the activation path with the same transformed weight. ``merge()`` writes W' into plain weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, delta_handle, inject_seeded


@dataclass
class HUTConfig:
    """W' = W0 ⊙ (M_A M_B) on the targeted Linear / Conv modules."""

    name: str = "hut"  # registry name
    r: int = 8  # inner rank of M_A M_B (≥ 2: the first component carries the identity)
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # portable groups or module-name patterns
    seed: int = 0  # seed of M_B's random rows

    def __post_init__(self) -> None:
        if self.r < 2:
            raise ValueError(f"HUT adapter.r must be an integer >= 2 (one component holds the identity), got {self.r}")
        if not self.targets:
            raise ValueError("HUT needs at least one target (e.g. qkv, mlp, conv_pw or a module-name pattern)")


class HUTFactors(nn.Module):
    """M_A (fan_out × r), M_B (r × fan_in) and a reference to the frozen W0 (not owned, not saved)."""

    def __init__(self, fan_in: int, fan_out: int, cfg: HUTConfig, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self._w0 = [like]  # the frozen weight itself (a list keeps it out of this module's state dict)
        m_a = torch.zeros(fan_out, cfg.r)
        m_a[:, 0] = 1.0
        bound = 1.0 / math.sqrt(fan_in)
        m_b = torch.empty(cfg.r, fan_in).uniform_(-bound, bound, generator=gen)
        m_b[0] = 1.0
        self.hut_A = nn.Parameter(m_a.to(**kw))
        self.hut_B = nn.Parameter(m_b.to(**kw))

    def transform(self) -> torch.Tensor:
        """The multiplicative map M_A M_B, (fan_out, fan_in)."""
        return self.hut_A @ self.hut_B

    def updated(self) -> torch.Tensor:
        """W' = W0 ⊙ (M_A M_B), (fan_out, fan_in)."""
        w0 = self._w0[0]
        return w0.reshape(w0.shape[0], -1).to(self.hut_A.dtype) * self.transform()

    def delta(self) -> torch.Tensor:
        w0 = self._w0[0]
        return self.updated() - w0.reshape(w0.shape[0], -1).to(self.hut_A.dtype)

    def side(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta().to(x.dtype))


@ADAPTERS.register(
    "hut", config_cls=HUTConfig, help="HUT: W' = W0 ⊙ (M_A M_B), a Hadamard transformation", spec={"r": 2}
)
def apply_hut(backbone: nn.Module, cfg: HUTConfig) -> AdapterHandle:
    """Transform every targeted weight by a Hadamard product with a low-rank map (= identity at step 0)."""
    targets = inject_seeded(backbone, cfg, "hut", "HUT", HUTFactors)
    return delta_handle("hut", backbone, targets)
