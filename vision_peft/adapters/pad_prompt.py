"""Padding prompts: Exploring Visual Prompts for Adapting Large-Scale Models (Bahng et al., 2022,
https://arxiv.org/abs/2203.17274).

A learnable frame of width ``pad`` pixels is added to the (normalised) input image, so any image backbone,
CNN or ViT, accepts it. Parameters: 2·pad·W + 2·pad·(H − 2·pad) per channel. Zero at initialisation, so the
adapted model equals the frozen one at step 0 (the paper initialises randomly; zero keeps our invariant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle


@dataclass
class PadPromptConfig:
    """Learnable pixel frame on the input border."""

    name: str = "pad_prompt"  # registry name
    pad: int = 16  # frame width in pixels at the backbone's input size
    init_std: float = 0.0  # normal init std (0 = start from the frozen model exactly)

    def __post_init__(self) -> None:
        if self.pad <= 0:
            raise ValueError(f"pad_prompt needs a positive frame width, got pad={self.pad}")


class PadPrompt(nn.Module):
    """x + frame, where the frame is learnable on a border of ``pad`` pixels and zero inside."""

    def __init__(self, size: tuple[int, int], pad: int, init_std: float) -> None:
        super().__init__()
        h, w = size
        if 2 * pad >= min(h, w):
            raise ValueError(f"pad_prompt pad={pad} leaves no image inside a {h}×{w} input; use pad < {min(h, w) // 2}")
        self.size, self.pad = (h, w), pad
        self.top = nn.Parameter(torch.randn(1, 3, pad, w) * init_std)
        self.bottom = nn.Parameter(torch.randn(1, 3, pad, w) * init_std)
        self.left = nn.Parameter(torch.randn(1, 3, h - 2 * pad, pad) * init_std)
        self.right = nn.Parameter(torch.randn(1, 3, h - 2 * pad, pad) * init_std)

    def frame(self) -> torch.Tensor:
        h, w = self.size
        inner = torch.zeros(1, 3, h - 2 * self.pad, w - 2 * self.pad, device=self.top.device, dtype=self.top.dtype)
        mid = torch.cat([self.left, inner, self.right], dim=3)  # (1, 3, h-2p, w)
        return torch.cat([self.top, mid, self.bottom], dim=2)  # (1, 3, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"pad_prompt was built for {self.size} inputs, got {tuple(x.shape[-2:])}")
        return x + self.frame().to(x.dtype)


@ADAPTERS.register(
    "pad_prompt",
    config_cls=PadPromptConfig,
    help="learnable input-border pixel prompts (any image backbone)",
    requires=("image",),
    spec={"pad": 4},
)
def apply_pad_prompt(backbone: nn.Module, cfg: PadPromptConfig) -> AdapterHandle:
    """Add a learnable pixel frame in front of any image backbone."""
    if not hasattr(backbone, "input_prompts"):
        raise ValueError(f"pad_prompt needs an image backbone; {backbone.spec!r} takes no images")
    backbone.input_prompts.append(PadPrompt(backbone.input_size, cfg.pad, cfg.init_std))
    return AdapterHandle("pad_prompt", touched=[f"input_prompts.{len(backbone.input_prompts) - 1}"])
