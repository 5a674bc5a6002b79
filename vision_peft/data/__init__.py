"""Dataset readers, one per format, in one registry."""

from __future__ import annotations

from vision_peft.registry import Registry

DATASETS: Registry = Registry("dataset")

from vision_peft.data import (  # noqa: E402,F401
    episodes,
    folder,
    points,  # noqa: E402,F401
    refer,  # noqa: E402,F401
)

__all__ = ["DATASETS"]
