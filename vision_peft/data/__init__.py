"""Dataset readers, one per format, in one registry."""

from __future__ import annotations

from vision_peft.registry import Registry

DATASETS: Registry = Registry("dataset")

from vision_peft.data import folder  # noqa: E402,F401

__all__ = ["DATASETS"]
