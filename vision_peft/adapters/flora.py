"""FLoRA: low-rank core space for N-dimensional parameters (Si et al., "Maintaining Structural Integrity in
Parameter Spaces for Parameter Efficient Fine-tuning", ICLR 2025, https://arxiv.org/abs/2405.14739).

Idea: instead of flattening a conv kernel (out, in, kh, kw) into a matrix, the update is a Tucker product
ΔW = s · G ×₁ U¹ ×₂ U² … ×_N Uᴺ with a small core G (r₁ × … × r_N) and one factor Uⁱ (dimᵢ × rᵢ) per mode,
so the kernel's spatial structure is kept; on a Linear (N = 2) it is the rank-r matrix update s · U¹ G U²ᵀ.

Where this implementation differs: the core starts at G = 0 and the factors are random (bound 1/√dimᵢ), so
ΔW = 0 at step 0 (an initialisation of our own choosing); s = alpha / r. Mode ranks: ``r`` for the out / in
modes, ``r_spatial`` for the kernel modes (default: the kernel size, i.e. no compression there); a rank is
capped at its mode's size (a depthwise conv's in-mode has size 1) and ``handle.report`` lists the ranks used.
An uncompressed kernel mode has the identity as its factor (not stored). Parameters per layer:
Σ_factored modes dimᵢ·rᵢ + Πᵢ rᵢ (a 1×1 conv or Linear: r·(out + in) + r²).

CNN / ViT mapping: EfficientNet-Lite0's ``conv_pw`` (1×1, N = 4 with 1-sized kernel modes) and depthwise
``conv_dw`` (in-mode size 1, 3×3/5×5 kernel modes kept) are re-parameterised in weight space; ViT ``qkv`` /
``mlp`` Linears use the activation path x → U² → Gᵀ → U¹. ``merge()`` folds ΔW into plain weights exactly.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, delta_handle, inject_seeded


@dataclass
class FLoRAConfig:
    """Tucker-factored update keeping each weight's N-D shape."""

    name: str = "flora"  # registry name
    r: int = 8  # core rank of the out and in modes (capped at each mode's size)
    r_spatial: int = 0  # core rank of the kernel modes of convolutions; 0 = the kernel size (no compression)
    alpha: float = 16.0  # scale numerator: the update is multiplied by alpha / r
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # portable groups or module-name patterns
    seed: int = 0  # seed of the factors' initialisation

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"FLoRA adapter.r must be a positive integer (1 … a layer's channel count), got {self.r}")
        if self.r_spatial < 0:
            raise ValueError(
                f"FLoRA adapter.r_spatial must be 0 (= kernel size) or 1 … the kernel size, got {self.r_spatial}"
            )
        if self.alpha <= 0:
            raise ValueError(f"FLoRA adapter.alpha must be positive, got {self.alpha}")
        if not self.targets:
            raise ValueError("FLoRA needs at least one target (e.g. qkv, mlp, conv_pw or a module-name pattern)")


def mode_ranks(shape: tuple[int, ...], cfg: FLoRAConfig) -> list[int]:
    """The core's size per mode of a weight of ``shape`` (out, in, *kernel)."""
    ranks = [min(cfg.r, shape[0]), min(cfg.r, shape[1])]
    for k in shape[2:]:
        if cfg.r_spatial > k:
            raise ValueError(
                f"FLoRA adapter.r_spatial={cfg.r_spatial} exceeds a kernel size of {k} (shape {tuple(shape)}); "
                f"valid: 0 (= kernel size) or 1 … {k}"
            )
        ranks.append(cfg.r_spatial or k)
    return ranks


def factored(shape: tuple[int, ...], ranks: list[int], cfg: FLoRAConfig) -> list[bool]:
    """Which modes get a factor: out / in always, kernel modes only when compressed (``r_spatial`` > 0); an
    uncompressed kernel mode is the identity factor, so the core carries the kernel there directly."""
    return [i < 2 or cfg.r_spatial > 0 for i in range(len(shape))]


class FLoRAFactors(nn.Module):
    """Core G (r₁ … r_N) and one factor Uⁱ (dimᵢ × rᵢ) per mode; ``delta()`` is the (fan_out, fan_in) update."""

    pack_scalars = ("scale",)

    def __init__(self, fan_in: int, fan_out: int, cfg: FLoRAConfig, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(like.shape)
        self.ranks = mode_ranks(self.shape, cfg)
        kw = {"device": like.device, "dtype": like.dtype}
        self.has_factor = factored(self.shape, self.ranks, cfg)
        self.factors = nn.ParameterList()
        for dim, r, f in zip(self.shape, self.ranks, self.has_factor):
            if f:
                bound = 1.0 / math.sqrt(dim)
                u = torch.empty(dim, r).uniform_(-bound, bound, generator=gen)
                self.factors.append(nn.Parameter(u.to(**kw)))
        self.core = nn.Parameter(torch.zeros(*self.ranks, **kw))
        self.scale = cfg.alpha / cfg.r
        n = len(self.shape)
        core_idx, out_idx = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
        terms = [f"{o}{c}" for o, c, f in zip(out_idx, core_idx, self.has_factor) if f]
        out = "".join(o if f else c for o, c, f in zip(out_idx, core_idx, self.has_factor))
        self.equation = ",".join([core_idx, *terms]) + f"->{out}"

    def full(self) -> torch.Tensor:
        """ΔW in the weight's own N-D shape: s · G ×₁ U¹ … ×_N Uᴺ."""
        return self.full_from(self.core, list(self.factors))

    def full_from(self, core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
        """s · core ×₁ factors[0] … : the same Tucker product from other tensors of this layer's shapes (CapaBoost's
        masked copies of the core and factors, :mod:`vision_peft.adapters.capaboost`)."""
        return torch.einsum(self.equation, core, *factors) * self.scale

    def delta(self) -> torch.Tensor:
        return self.full().reshape(self.shape[0], -1)

    def side(self, x: torch.Tensor) -> torch.Tensor:
        """Linear activation path (…, fan_in) → (…, fan_out): s · U¹ G U²ᵀ x."""
        u1, u2 = self.factors[0].to(x.dtype), self.factors[1].to(x.dtype)
        z = F.linear(F.linear(x @ u2, self.core.to(x.dtype)), u1)
        return z * self.scale

    def num_params(self) -> int:
        return sum(d * r for d, r, f in zip(self.shape, self.ranks, self.has_factor) if f) + math.prod(self.ranks)


@ADAPTERS.register(
    "flora",
    config_cls=FLoRAConfig,
    help="FLoRA: Tucker-factored update keeping conv kernels N-D",
    spec={"r": 2, "alpha": 64.0},
)
def apply_flora(backbone: nn.Module, cfg: FLoRAConfig) -> AdapterHandle:
    """Add a Tucker-factored update to every targeted Linear / Conv (G = 0: outputs unchanged at step 0)."""
    targets = inject_seeded(backbone, cfg, "flora", "FLoRA", FLoRAFactors)
    mods = [m for m in backbone.modules() if isinstance(m, FLoRAFactors)]
    report = {"ranks": [m.ranks for m in mods], "params": sum(m.num_params() for m in mods)}
    return delta_handle("flora", backbone, targets, report=report)
