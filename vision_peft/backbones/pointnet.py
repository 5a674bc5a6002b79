"""PointNet: Deep Learning on Point Sets for 3D Classification and Segmentation (Qi et al., CVPR 2017,
https://arxiv.org/abs/1612.00593), in the layout of learning3d's ModelNet40 classifier (vinits5/learning3d).

The idea: a shared per-point MLP (1×1 convolutions) lifts every point to 1,024 channels and a symmetric max-pool
over points gives an order-invariant global feature. Where this differs from the paper: no input/feature
transform nets (the shipped weights have none); ReLU after the last conv, as learning3d trains it.

Weights: ``backbone.weights`` → ``$VISION_PEFT_WEIGHTS/pointnet-modelnet40/pointnet_classifier_modelnet40.safetensors``,
loaded **strictly** (encoder ``feature_model.conv{1..5}``/``bn{1..5}`` and the ModelNet40 head ``linear{1,2,3}``,
``bn{1,2}``: 819,624 parameters). Input: (B, N, 3) float32 xyz, centred, unit sphere, **y-up**.

This file also holds :class:`PointBackbone`, the contract of the point family: ``forward_features(points)`` →
(B, embed_dim) with ``feature_adapters`` (residual modules on the global feature) applied last, and a
``last_stage`` target group that PointAdapter's ``last_stage`` variant re-trains.
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.backbones import BACKBONES
from vision_peft.backbones.base import (
    Backbone,
    WeightsNotFoundError,
    _AbstractModuleMeta,
    explicit_weights_file,
    load_state_file,
    register_weights_finder,
    seeded_init,
    state_hash,
)
from vision_peft.config import BackboneConfig, weights_root

MODELNET40_CLASSES = (
    "airplane bathtub bed bench bookshelf bottle bowl car chair cone cup curtain desk door dresser flower_pot "
    "glass_box guitar keyboard lamp laptop mantel monitor night_stand person piano plant radio range_hood sink sofa "
    "stairs stool table tent toilet tv_stand vase wardrobe xbox"
).split()
WEIGHTS_FILE = "pointnet-modelnet40/pointnet_classifier_modelnet40.safetensors"


class PointBackbone(Backbone, metaclass=_AbstractModuleMeta):
    """Point encoder: (B, N, 3) float32 points → global feature (B, embed_dim)."""

    kind = "points"

    def __init__(self) -> None:
        super().__init__()
        self.feature_adapters = nn.ModuleList()  # residual modules on the pooled feature (PointAdapter)

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        f = self._features(points)
        for a in self.feature_adapters:
            f = a(f)
        return f

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward_features(points)

    @abc.abstractmethod
    def _features(self, points: torch.Tensor) -> torch.Tensor:
        """Pooled feature (B, embed_dim) of points (B, N, 3), before the feature adapters."""

    def reinit_group(self, group: str) -> None:
        """Re-initialise the modules of target group ``group`` randomly (torch's default init from the global RNG,
        i.e. the run's seed): PPT re-trains its tuned modules from scratch."""
        for name in self.resolve_targets([group]):
            m = self.get_submodule(name)
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def _point_data_config(num_points: int) -> dict:
    return {
        "input": "points (B, N, 3) float32 xyz",
        "num_points": num_points,
        "normalize": "center_unit_sphere",  # subtract the centroid, divide by the largest point norm
        "up_axis": "y",  # the model expects y-up; z-up files need task.up_axis=swap_yz
    }


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = [3, 64, 64, 64, 128, 1024]
        for i in range(5):
            setattr(self, f"conv{i + 1}", nn.Conv1d(chans[i], chans[i + 1], 1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm1d(chans[i + 1]))

    def forward(self, x: torch.Tensor, upto: int = 5, start: int = 1) -> torch.Tensor:
        for i in range(start, upto + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x


class PointNet(PointBackbone):
    """PointNet encoder (1,024-d max-pooled feature) plus its frozen ModelNet40 head (for sanity checks only)."""

    def __init__(self, num_points: int = 1024) -> None:
        super().__init__()
        self.spec = "pointnet"
        self.embed_dim = 1024
        self.feature_model = _Encoder()
        self.linear1, self.bn1 = nn.Linear(1024, 512), nn.BatchNorm1d(512)
        self.linear2, self.bn2 = nn.Linear(512, 256), nn.BatchNorm1d(256)
        self.linear3 = nn.Linear(256, 40)
        self.head_classes = list(MODELNET40_CLASSES)
        self.data_config = _point_data_config(num_points)
        convs = [f"feature_model.conv{i}" for i in range(1, 6)]
        self.target_groups = {
            **{f"conv{i}": [f"feature_model.conv{i}"] for i in range(1, 6)},
            "convs": convs,
            "conv_pw": convs,
            "last_stage": ["feature_model.conv5", "feature_model.bn5"],
            "last_ffn": ["feature_model.conv5", "feature_model.bn5"],  # PPT-FFN's analogue: the last per-point MLP
        }

    def point_stem(self, points: torch.Tensor) -> torch.Tensor:
        """Per-point features before the last stage: (B, N, 3) → (B, 128, N) (for caching in benchmarks)."""
        return self.feature_model(points.transpose(1, 2), upto=4)  # (B,N,3)->(B,3,N)

    def last_stage(self, stem: torch.Tensor) -> torch.Tensor:
        """conv5 + bn5 + ReLU + max-pool: (B, 128, N) → (B, 1024)."""
        return self.feature_model(stem, upto=5, start=5).amax(dim=2)

    def _features(self, points: torch.Tensor) -> torch.Tensor:
        return self.last_stage(self.point_stem(points))

    def forward_intermediates(self, points: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Per-point features (B, C_i, N) after conv stage i (0-based, negative counts from the end)."""
        x, outs = points.transpose(1, 2), []  # (B,N,3)->(B,3,N)
        want = {i % 5 for i in indices}
        for i in range(5):
            x = self.feature_model(x, upto=i + 1, start=i + 1)
            if i in want:
                outs.append(x)
        return outs

    def head_logits(self, points: torch.Tensor, classes: list[str] | None = None) -> torch.Tensor:
        """The pretrained ModelNet40 head's logits, optionally restricted to ``classes`` (in that order)."""
        f = self._features(points)
        h = F.relu(self.bn1(self.linear1(f)))
        h = F.relu(self.bn2(self.linear2(h)))
        logits = self.linear3(h)
        if classes is None:
            return logits
        missing = [c for c in classes if c not in self.head_classes]
        if missing:
            raise ValueError(f"class(es) {missing} are not ModelNet40 classes; the head knows: {self.head_classes}")
        return logits[:, [self.head_classes.index(c) for c in classes]]


def find_pointnet_weights(cfg: BackboneConfig) -> Path:
    explicit = explicit_weights_file(cfg)
    if explicit is not None:
        return explicit
    p = weights_root() / WEIGHTS_FILE
    if p.is_file():
        return p
    raise WeightsNotFoundError(
        f"PointNet ModelNet40 weights not found: looked for {p}. Fix: set $VISION_PEFT_WEIGHTS to the folder that "
        f"holds {WEIGHTS_FILE}, or backbone.weights=<file>, or backbone.pretrained=false for a random network"
    )


register_weights_finder("pointnet", find_pointnet_weights)


@BACKBONES.register(
    "pointnet", config_cls=BackboneConfig, help="PointNet point encoder (ModelNet40 weights)",
    spec={"name": "pointnet", "pretrained": False}, provides=("points",),
)  # fmt: skip
def build_pointnet(arg: str, cfg: BackboneConfig) -> PointNet:
    """PointNet point encoder, 1,024-d global feature (learning3d ModelNet40 weights, strict)."""
    if arg:
        raise ValueError(f"pointnet takes no argument, got 'pointnet:{arg}'")
    if cfg.pretrained:
        path = find_pointnet_weights(cfg)
        model = PointNet()
        sd = load_state_file(path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path} is not a learning3d PointNet classifier state dict: {e}") from None
        model.weights_source = str(path)
    else:
        model = seeded_init(PointNet)
        model.weights_source = "random init (seed 0)"
    model.weights_id = state_hash(model)
    return model
