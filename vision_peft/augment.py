"""Image augmentation behind one small interface (albumentations 2.0.8, the last MIT release, is an
implementation detail of this module only).

``build_augment(preset, size)`` returns an :class:`Augment` whose call takes an RGB uint8 array (H, W, 3),
an optional mask (H, W) and a per-sample seed, so augmentation is reproducible and a resumed run sees the
same augmented samples as an uninterrupted one.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # otherwise every import tries to reach the index

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

PRESETS = ("none", "light", "standard", "aerial")
_INTERP = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


class Augment:
    """A seeded augmentation pipeline for images (and masks that must move with them)."""

    def __init__(self, preset: str, size: tuple[int, int], interpolation: str = "bilinear") -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; known: {', '.join(PRESETS)}")
        self.preset, self.size = preset, (int(size[0]), int(size[1]))
        interp = _INTERP.get(interpolation, cv2.INTER_LINEAR)
        ops: list = []
        if preset in ("light", "standard", "aerial"):
            scale = (0.6, 1.0) if preset == "light" else (0.35, 1.0)
            ops.append(A.RandomResizedCrop(size=self.size, scale=scale, interpolation=interp, p=1.0))
            ops.append(A.HorizontalFlip(p=0.5))
        else:
            ops.append(A.Resize(*self.size, interpolation=interp))
        if preset == "aerial":  # overhead imagery has no canonical orientation
            ops += [A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
        if preset in ("standard", "aerial"):
            ops.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8))
        self.pipeline = A.Compose(ops, seed=0)

    def __call__(
        self, image: np.ndarray, seed: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment ``image`` (H, W, 3) uint8 and an optional ``mask`` (H, W) with the given seed."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"augment expects an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
        if mask is not None and mask.shape[:2] != image.shape[:2]:
            raise ValueError(f"mask size {mask.shape[:2]} differs from image size {image.shape[:2]}")
        self.pipeline.set_random_seed(int(seed) % (2**32))
        out = self.pipeline(image=image, mask=mask) if mask is not None else self.pipeline(image=image)
        return out["image"], out.get("mask")


def build_augment(preset: str, size: tuple[int, int], interpolation: str = "bilinear") -> Augment | None:
    """An :class:`Augment`, or None for preset ``none`` (evaluation-style preprocessing only)."""
    if preset == "none":
        return None
    return Augment(preset, size, interpolation)


def normalize(image: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 (H, W, 3) → float32 (3, H, W) scaled to [0, 1] and normalised."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)
