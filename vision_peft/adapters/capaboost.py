"""CapaBoost: increasing model capacity for free (Haobo Song, Hao Zhao, Soumajit Majumder & Tao Lin, ICLR 2024,
https://arxiv.org/abs/2407.01320).

Idea: n parallel copies of a low-rank module share one set of weights but each sees it through its own static
random binary mask, ΔW = s Σᵢ (B ⊙ M_Bⁱ)(A ⊙ M_Aⁱ): the sum can reach rank n·r at LoRA's parameter count.

Bases (``adapter.base``): ``lora`` (A random, B = 0 so ΔW = 0 at step 0; parameters per layer r · (fan_in +
fan_out), LoRA's count) and ``flora`` (FLoRA's own factor module, :class:`~vision_peft.adapters.flora.FLoRAFactors`,
wrapped: every copy masks the shared core and factors, ΔW = s Σᵢ (G ⊙ M_Gⁱ) ×₁ (U¹ ⊙ M₁ⁱ) … — G = 0 keeps ΔW = 0 at
step 0; FLoRA's parameter count, its kernel modes uncompressed as FLoRA's default). The paper also boosts
adapters and prefix tuning; HUT does not fit (its identity start W0 ⊙ (M_A M_B) is not a sum of masked copies that
starts at zero). Masks are drawn once from the seeded generator with keep-probability ``density`` and stored as
buffers (saved with the adapter, never trained or re-drawn): n stored 0/1 values per trainable value.

CNN / ViT mapping: as LoRA — ViT ``qkv`` / ``mlp`` Linears via the activation path, EfficientNet-Lite0's
``conv_pw`` and depthwise ``conv_dw`` (kernel as (out, in/groups · kh · kw)) in weight space. ``merge()``
folds the summed masked update exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, delta_handle, inject_seeded
from vision_peft.adapters.flora import FLoRAConfig, FLoRAFactors


@dataclass
class CapaBoostConfig:
    """n masked copies of one shared LoRA pair per targeted module."""

    name: str = "capaboost"  # registry name
    base: str = "lora"  # the wrapped low-rank method: lora or flora
    n: int = 2  # number of parallel masked copies
    density: float = 0.5  # keep-probability of every mask entry
    r: int = 8  # rank of the shared pair
    alpha: float = 16.0  # scale numerator: alpha / r
    targets: list[str] = field(default_factory=lambda: ["qkv"])
    seed: int = 0  # seed of A and of the masks

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"CapaBoost adapter.base must be one of {sorted(BASES)}, got {self.base!r}")
        if self.n < 1:
            raise ValueError(f"CapaBoost adapter.n must be an integer >= 1, got {self.n}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"CapaBoost adapter.density must lie in (0, 1], got {self.density}")
        if self.r <= 0:
            raise ValueError(f"CapaBoost adapter.r must be positive, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"CapaBoost adapter.alpha must be positive, got {self.alpha}")
        if not self.targets:
            raise ValueError("CapaBoost needs at least one target (e.g. qkv, mlp, conv_pw or a module-name pattern)")


class CapaBoostFactors(nn.Module):
    """Shared A (r × fan_in), B (fan_out × r); static masks (n, r, fan_in) and (n, fan_out, r) as buffers."""

    pack_scalars = ("scale",)

    def __init__(
        self, fan_in: int, fan_out: int, cfg: CapaBoostConfig, gen: torch.Generator, like: torch.Tensor
    ) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        bound = 1.0 / math.sqrt(fan_in)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, fan_in).uniform_(-bound, bound, generator=gen).to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, cfg.r, **kw))
        mask_a = (torch.rand(cfg.n, cfg.r, fan_in, generator=gen) < cfg.density).to(**kw)
        mask_b = (torch.rand(cfg.n, fan_out, cfg.r, generator=gen) < cfg.density).to(**kw)
        self.register_buffer("mask_A", mask_a)
        self.register_buffer("mask_B", mask_b)
        self.scale = cfg.alpha / cfg.r

    def delta(self) -> torch.Tensor:
        """s Σᵢ (B ⊙ M_Bⁱ)(A ⊙ M_Aⁱ), (fan_out, fan_in)."""
        b = self.lora_B.unsqueeze(0) * self.mask_B  # (n, out, r)
        a = self.lora_A.unsqueeze(0) * self.mask_A  # (n, r, in)
        return torch.bmm(b, a).sum(0) * self.scale

    def side(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta().to(x.dtype))


class CapaBoostFLoRA(nn.Module):
    """FLoRA's factor module (``inner``: core G, factors Uⁱ) seen through n static masks per tensor (buffers
    ``mask_core`` (n, *G.shape) and ``mask_factor<k>`` (n, *Uᵏ.shape)); ``delta()`` sums the n masked Tucker products."""

    def __init__(
        self, fan_in: int, fan_out: int, cfg: CapaBoostConfig, gen: torch.Generator, like: torch.Tensor
    ) -> None:
        super().__init__()
        inner = FLoRAConfig(r=cfg.r, alpha=cfg.alpha, targets=list(cfg.targets), seed=cfg.seed)
        self.inner = FLoRAFactors(fan_in, fan_out, inner, gen, like)

        def mask(t: torch.Tensor) -> torch.Tensor:
            return (torch.rand(cfg.n, *t.shape, generator=gen) < cfg.density).to(device=t.device, dtype=t.dtype)

        self.register_buffer("mask_core", mask(self.inner.core))
        for k, u in enumerate(self.inner.factors):
            self.register_buffer(f"mask_factor{k}", mask(u))

    def delta(self) -> torch.Tensor:
        """s Σᵢ (G ⊙ M_Gⁱ) ×₁ (U¹ ⊙ M₁ⁱ) …, (fan_out, fan_in)."""
        f = self.inner
        total = sum(
            f.full_from(
                f.core * self.mask_core[i], [u * getattr(self, f"mask_factor{k}")[i] for k, u in enumerate(f.factors)]
            )
            for i in range(len(self.mask_core))
        )
        return total.reshape(f.shape[0], -1)

    def side(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta().to(x.dtype))


BASES = {"lora": CapaBoostFactors, "flora": CapaBoostFLoRA}  # adapter.base → the factor module per target


@ADAPTERS.register(
    "capaboost", config_cls=CapaBoostConfig, help="CapaBoost: masked parallel copies of one LoRA pair",
    spec={"r": 2, "n": 2, "density": 0.5},
)  # fmt: skip
def apply_capaboost(backbone: nn.Module, cfg: CapaBoostConfig) -> AdapterHandle:
    """n statically masked copies of one shared LoRA pair (or FLoRA core + factors) per target (B = 0 / G = 0:
    outputs unchanged at step 0)."""
    targets = inject_seeded(backbone, cfg, "capaboost", "CapaBoost", BASES[cfg.base])
    return delta_handle("capaboost", backbone, targets, report={"layers": len(targets), "n": cfg.n, "base": cfg.base})
