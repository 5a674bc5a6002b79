"""PointAdapter of PPT: Parameter-efficient Prompt Learning for 3D Point Cloud Understanding (Sun et al., ICRA 2024,
https://arxiv.org/abs/2402.15823) — the light adapter PPT puts on the frozen point encoder, next to its prompts.

Two registered variants, named by what they train (PPT-Base, "prompts only", is the plain ``linear`` adapter: nothing
in the encoder trains):

- ``point_mlp`` (v1: ``task.point_adapter: residual_mlp``) — a bottleneck MLP on the pooled global feature,
  f ← f + W2 · ReLU(W1 · f), W2 = 0 at initialisation so step 0 equals the frozen encoder. It is appended to the
  point backbone's ``feature_adapters`` (checkpoint keys ``feature_adapters.0.fc{1,2}.{weight,bias}``).
- ``point_last_stage`` (v1: ``task.point_adapter: last_stage``) — the backbone's ``last_stage`` target group
  (PointNet ``conv5`` + ``bn5``, PointBERT's last block + final norm) re-trained, from the pretrained values or, with
  ``reinit: true`` (PPT's choice), from random initialisation.

Where this differs from PPT: the MLP acts on the pooled feature of any point backbone with ``feature_adapters``
rather than inside ULIP's PointBERT; both variants need a point backbone (``requires=("points",)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle


@dataclass
class PointMLPConfig:
    """PointAdapter ``residual_mlp``: a zero-initialised residual bottleneck MLP on the pooled point feature."""

    name: str = "point_mlp"  # registry name
    hidden: int = 256  # bottleneck width

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"point_mlp hidden width must be positive, got hidden={self.hidden}")


@dataclass
class PointLastStageConfig:
    """PointAdapter ``last_stage``: re-train the point encoder's last stage."""

    name: str = "point_last_stage"  # registry name
    reinit: bool = False  # start the last stage from random init (PPT) instead of the pretrained weights


class ResidualMLP(nn.Module):
    """f + W2 · ReLU(W1 · f), W2 = 0 at init (the frozen feature at step 0)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.fc2(self.fc1(f).relu())


def _point_backbone(backbone: nn.Module, method: str, needs: str) -> None:
    if getattr(backbone, "kind", "") != "points" or not hasattr(backbone, needs):
        raise ValueError(
            f"{method} needs a point backbone with {needs} (pointnet, pointbert); "
            f"{getattr(backbone, 'spec', type(backbone).__name__)!r} is not one. Use lora or linear instead"
        )


@ADAPTERS.register(
    "point_mlp", config_cls=PointMLPConfig, help="PointAdapter: residual MLP on the pooled point feature (PPT)",
    requires=("points",), spec={"hidden": 8},
)  # fmt: skip
def apply_point_mlp(backbone: nn.Module, cfg: PointMLPConfig) -> AdapterHandle:
    """Append a zero-initialised residual MLP to the point backbone's ``feature_adapters``."""
    _point_backbone(backbone, "point_mlp", "feature_adapters")
    p = next(backbone.parameters())
    backbone.feature_adapters.append(ResidualMLP(backbone.embed_dim, cfg.hidden).to(device=p.device, dtype=p.dtype))
    return AdapterHandle("point_mlp", touched=[f"feature_adapters.{len(backbone.feature_adapters) - 1}"])


@ADAPTERS.register(
    "point_last_stage", config_cls=PointLastStageConfig, help="PointAdapter: re-train the point encoder's last stage",
    requires=("points",), spec={},
)  # fmt: skip
def apply_point_last_stage(backbone: nn.Module, cfg: PointLastStageConfig) -> AdapterHandle:
    """Unfreeze (optionally re-initialise) the modules of the backbone's ``last_stage`` target group."""
    _point_backbone(backbone, "point_last_stage", "reinit_last_stage")
    names = backbone.resolve_targets(["last_stage"])
    if cfg.reinit:
        backbone.reinit_last_stage()
    for n in names:
        backbone.get_submodule(n).requires_grad_(True)
    return AdapterHandle("point_last_stage", touched=names)
