"""Backbone registry: ``build_backbone(BackboneConfig)`` from a spec like ``timm:vit_small_patch16_224``.

The part before ``:`` names the registry entry; the rest is passed to its builder.
"""

from __future__ import annotations

from vision_peft.registry import Registry

BACKBONES: Registry = Registry("backbone")

from vision_peft.backbones import dit, effnet_lite, minilm, open_clip_models, pointbert, pointnet, taef2, timm_models  # noqa: E402,F401
from vision_peft.backbones.base import (  # noqa: E402
    Backbone,
    GridInfo,
    ImageBackbone,
    TextBackbone,
    WeightsNotFoundError,
    weights_status,
)


def build_backbone(cfg) -> Backbone:
    """Build a frozen-ready backbone from a :class:`~vision_peft.config.BackboneConfig`."""
    family, _, arg = cfg.name.partition(":")
    entry = BACKBONES.get(family)
    return entry.builder(arg, cfg)


__all__ = [
    "BACKBONES",
    "Backbone",
    "GridInfo",
    "ImageBackbone",
    "TextBackbone",
    "WeightsNotFoundError",
    "build_backbone",
    "weights_status",
]
