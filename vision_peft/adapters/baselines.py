"""The two reference points every PEFT number is read against: a linear probe and full fine-tuning.

``linear`` keeps the whole backbone frozen (only the task head trains); ``full`` unfreezes every backbone
parameter and lets BatchNorm statistics update.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle


@dataclass
class LinearConfig:
    """Linear probe: the backbone stays frozen; only the task head learns."""

    name: str = "linear"  # registry name


@dataclass
class FullConfig:
    """Full fine-tuning baseline: every backbone parameter learns."""

    name: str = "full"  # registry name


@ADAPTERS.register("linear", config_cls=LinearConfig, help="linear probe: frozen backbone, head only", spec={})
def apply_linear(backbone: nn.Module, cfg: LinearConfig) -> AdapterHandle:
    """Linear probe baseline (nothing in the backbone trains)."""
    return AdapterHandle("linear")


@ADAPTERS.register("full", config_cls=FullConfig, help="full fine-tuning baseline", spec={})
def apply_full(backbone: nn.Module, cfg: FullConfig) -> AdapterHandle:
    """Full fine-tuning baseline (every backbone parameter trains)."""
    backbone.requires_grad_(True)
    return AdapterHandle("full", touched=[""])
