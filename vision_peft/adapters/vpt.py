"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119).

Learnable prompt tokens are inserted after the prefix (class/register) tokens of a token backbone.
Shallow: p tokens at the input, carried through every block. Deep: a fresh set of p tokens at every block,
replacing the previous block's prompt outputs.

Where this implementation differs: instead of rewriting each model's forward, forward hooks insert the
prompts before each block and strip them after it, so every block's *output* has the original token layout.
That keeps timm's and open_clip's pooling and ``forward_intermediates`` untouched and works on any backbone
whose ``token_blocks()`` returns (blocks, number of prefix tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle


@dataclass
class VPTConfig:
    """Learnable prompt tokens for ViT-style backbones."""

    name: str = "vpt"  # registry name
    num_tokens: int = 10  # prompt tokens per block (p, 1–50 in the paper)
    deep: bool = True  # true = a fresh prompt set at every block; false = shallow (input only)
    dropout: float = 0.0  # dropout on the prompt tokens
    init_std: float | None = None  # normal init std; None = VPT's uniform xavier-style init

    def __post_init__(self) -> None:
        if self.num_tokens <= 0:
            raise ValueError(f"VPT needs at least one prompt token, got num_tokens={self.num_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VPT dropout must lie in [0, 1), got {self.dropout}")


class VPTPrompts(nn.Module):
    """Prompt tokens (depth, p, D) and the hooks that insert and strip them."""

    def __init__(self, cfg: VPTConfig, blocks: nn.ModuleList, num_prefix: int, dim: int) -> None:
        super().__init__()
        depth = len(blocks) if cfg.deep else 1
        self.p, self.num_prefix, self.deep = cfg.num_tokens, num_prefix, cfg.deep
        self.tokens = nn.Parameter(torch.empty(depth, cfg.num_tokens, dim))
        if cfg.init_std is not None:
            nn.init.normal_(self.tokens, std=cfg.init_std)
        else:
            bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))  # VPT's init for 16×16 patches
            nn.init.uniform_(self.tokens, -bound, bound)
        self.drop = nn.Dropout(cfg.dropout)
        self._carry: torch.Tensor | None = None
        self.handles = []
        for i, blk in enumerate(blocks):
            self.handles.append(blk.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            self.handles.append(blk.register_forward_hook(self._post, with_kwargs=True))

    def _make_pre(self, i: int):
        def pre(module, args, kwargs):
            x = args[0]  # (B, L, D)
            if self.deep or i == 0 or self._carry is None:
                prompt = self.tokens[i if self.deep else 0].unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, p, D)
                prompt = self.drop(prompt).to(x.dtype)
            else:
                prompt = self._carry
            n = self.num_prefix
            x = torch.cat([x[:, :n], prompt, x[:, n:]], dim=1)  # (B, L, D) -> (B, L+p, D)
            return (x, *args[1:]), kwargs

        return pre

    def _post(self, module, args, kwargs, out):
        y = out[0] if isinstance(out, tuple) else out
        n, p = self.num_prefix, self.p
        self._carry = y[:, n : n + p]  # (B, p, D): shallow prompts flow to the next block
        y = torch.cat([y[:, :n], y[:, n + p :]], dim=1)  # (B, L+p, D) -> (B, L, D)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@ADAPTERS.register(
    "vpt", config_cls=VPTConfig, help="visual prompt tuning (shallow/deep) for token backbones",
    requires=("tokens",), spec={"num_tokens": 3},
)  # fmt: skip
def apply_vpt(backbone: nn.Module, cfg: VPTConfig) -> AdapterHandle:
    """Insert learnable prompt tokens into every block of a token backbone."""
    tb = backbone.token_blocks() if hasattr(backbone, "token_blocks") else None
    if tb is None:
        raise ValueError(
            f"VPT needs a token backbone (timm ViT, open_clip image tower); {backbone.spec!r} has no token blocks. "
            "For CNNs use adapter pad_prompt (pixel prompts) or lora"
        )
    blocks, num_prefix = tb
    dim = blocks[0].norm1.normalized_shape[0] if hasattr(blocks[0], "norm1") else blocks[0].ln_1.normalized_shape[0]
    backbone.vpt = VPTPrompts(cfg, blocks, num_prefix, dim)
    return AdapterHandle("vpt", touched=["vpt"])
