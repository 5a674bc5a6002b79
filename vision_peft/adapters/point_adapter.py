"""PointAdapter of PPT: Parameter-efficient Prompt Learning for 3D Point Cloud Understanding (Sun et al., ICRA 2024,
https://arxiv.org/abs/2402.15823) — the light adapter PPT puts on the frozen point encoder, next to its prompts.

Three registered variants, named by what they train (PPT-Base, "prompts only", is the plain ``linear`` adapter:
nothing in the encoder trains; see ``task.train_head`` for its frozen W_pc):

- ``point_ffn`` (PPT-FFN) — the backbone's ``last_ffn`` target group re-trained: on PointBERT the last transformer
  block's FFN (``mlp.fc1``, ``mlp.fc2``) and its norms (``norm2``, and ``norm1`` as PPT's official ``head_type: 2``,
  which its scripts call "ppt-ffn", also trains): 1,183,104 parameters at ULIP's width 384 (PPT's ≈1.2 M); on
  PointNet its analogue, the last per-point MLP stage (``conv5`` + ``bn5``). PPT's official code
  (``ULIP_models.py``) leaves these modules at random init (``reinit: true``); the default
  ``reinit: false`` tunes the pretrained values instead, because PointNet's conv5 sits on no residual path (a
  re-initialised conv5 discards the pretrained feature, whereas PointBERT's block keeps it through the residual).

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
class PointFFNConfig:
    """PPT-FFN: re-train the last FFN of the point encoder (PointBERT: fc1, fc2 + norms; PointNet: conv5 + bn5)."""

    name: str = "point_ffn"  # registry name
    reinit: bool = False  # start the FFN from random init (PPT's official code) instead of the pretrained weights


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


def _retrain_group(backbone: nn.Module, method: str, group: str, reinit: bool, other: str) -> AdapterHandle:
    """Unfreeze (with ``reinit``: first re-initialise) the modules of the point backbone's target group ``group``."""
    _point_backbone(backbone, method, "reinit_group")
    if group not in backbone.target_groups:
        raise ValueError(
            f"{method} needs a point backbone with a {group!r} target group; {backbone.spec!r} has "
            f"{', '.join(sorted(backbone.target_groups))}. Use {other} instead"
        )
    names = backbone.resolve_targets([group])
    if reinit:
        backbone.reinit_group(group)
    for n in names:
        backbone.get_submodule(n).requires_grad_(True)
    return AdapterHandle(method, touched=names)


@ADAPTERS.register(
    "point_last_stage", config_cls=PointLastStageConfig, help="PointAdapter: re-train the point encoder's last stage",
    requires=("points",), spec={},
)  # fmt: skip
def apply_point_last_stage(backbone: nn.Module, cfg: PointLastStageConfig) -> AdapterHandle:
    """Unfreeze (optionally re-initialise) the modules of the backbone's ``last_stage`` target group."""
    return _retrain_group(backbone, "point_last_stage", "last_stage", cfg.reinit, other="point_mlp")


@ADAPTERS.register(
    "point_ffn", config_cls=PointFFNConfig, help="PPT-FFN: re-train the point encoder's last FFN (norm + fc1/fc2)",
    requires=("points",), spec={},
)  # fmt: skip
def apply_point_ffn(backbone: nn.Module, cfg: PointFFNConfig) -> AdapterHandle:
    """Unfreeze (optionally re-initialise) the modules of the backbone's ``last_ffn`` target group."""
    return _retrain_group(backbone, "point_ffn", "last_ffn", cfg.reinit, other="point_last_stage")
