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
from torch.nn.utils import parametrize

from vision_peft.adapters import ADAPTERS, AdapterHandle, add_weight_delta, fold_weight_delta, merged_linear, set_module


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


class _LoRAFactors(nn.Module):
    """A (r × fan_in) and B (fan_out × r); A is a buffer when it is not trained."""

    def __init__(self, fan_in: int, fan_out: int, cfg: LoRAConfig, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        a = _init_a((cfg.r, fan_in), gen).to(device=like.device, dtype=like.dtype)
        if cfg.train_a:
            self.lora_A = nn.Parameter(a)
        else:
            self.register_buffer("lora_A", a)
        self.lora_B = nn.Parameter(torch.zeros(fan_out, cfg.r, device=like.device, dtype=like.dtype))
        self.scale = cfg.alpha / cfg.r

    @classmethod
    def for_weight(cls, w: torch.Tensor, cfg: LoRAConfig, gen: torch.Generator) -> _LoRAFactors:
        """Factors for a weight of shape (fan_out, *fan_in dims), e.g. a conv kernel or MHA's in_proj_weight."""
        return cls(w[0].numel(), w.shape[0], cfg, gen, w)

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (fan_out, fan_in)


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank side path; keeps the base ``weight``/``bias`` keys unchanged."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig, gen: torch.Generator) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora = _LoRAFactors(base.in_features, base.out_features, cfg, gen, base.weight)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        z = F.linear(F.linear(self.drop(x), self.lora.lora_A.to(x.dtype)), self.lora.lora_B.to(x.dtype))
        return out + z * self.lora.scale

    def merged(self) -> nn.Linear:
        return merged_linear(self, self.lora.delta())


@ADAPTERS.register("lora", config_cls=LoRAConfig, help="LoRA on Linear, Conv and fused MHA projections")
def apply_lora(backbone: nn.Module, cfg: LoRAConfig) -> AdapterHandle:
    """Wrap every targeted module with a low-rank update (B = 0, so outputs are unchanged at step 0)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    names = backbone.resolve_targets(cfg.targets)
    touched: list[str] = []
    for name in names:
        mod = backbone.get_submodule(name)
        parent = backbone.get_submodule(name.rpartition(".")[0]) if "." in name else backbone
        if isinstance(parent, nn.MultiheadAttention) and isinstance(mod, nn.Linear):
            # MHA's fused forward reads out_proj.weight directly, so a side path would be bypassed: re-parameterise
            if parametrize.is_parametrized(mod, "weight"):
                continue
            add_weight_delta(mod, "weight", "lora", _LoRAFactors.for_weight(mod.weight, cfg, gen))
        elif isinstance(mod, nn.Linear) and not isinstance(mod, LoRALinear):
            set_module(backbone, name, LoRALinear(mod, cfg, gen))
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)) and not parametrize.is_parametrized(mod, "weight"):
            add_weight_delta(mod, "weight", "lora", _LoRAFactors.for_weight(mod.weight, cfg, gen))
        elif isinstance(mod, nn.MultiheadAttention):
            if mod.in_proj_weight is None:
                raise ValueError(f"{name}: MultiheadAttention with separate q/k/v weights; target them directly")
            add_weight_delta(mod, "in_proj_weight", "lora", _LoRAFactors.for_weight(mod.in_proj_weight, cfg, gen))
        else:
            continue  # a pattern may also match containers (e.g. 'blocks.*'); only leaf layers are adapted
        touched.append(name)
    if not touched:
        raise ValueError(f"LoRA targets {cfg.targets} matched no Linear, Conv or MultiheadAttention in {backbone.spec}")

    def merge() -> None:
        for name in touched:
            mod = backbone.get_submodule(name)
            if isinstance(mod, LoRALinear):
                set_module(backbone, name, mod.merged())
            else:
                fold_weight_delta(mod)

    return AdapterHandle("lora", touched=touched, merge_fn=merge)
