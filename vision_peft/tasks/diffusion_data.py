"""The diffusion task's data: class-folder images, the centre-cropped RGB loader and TAEF2 latents.

Latent space: the frozen TAEF2 autoencoder (image [0, 1] ↔ 32×H/8×W/8), latents multiplied by ``LATENT_SCALE`` so
their std is ≈ 1. Latents of a training split are encoded once per process (``LATENT_CACHE``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vision_peft.preprocess import IMAGE_SUFFIXES
from vision_peft.runtimes.diffusion import DiffusionInputError

LATENT_SCALE = 1.25  # 1 / std of TAEF2 latents of 64² AID images (measured 0.795)
IMAGE_EXT = IMAGE_SUFFIXES  # the image file types a class folder may hold


def list_class_images(root: Path, classes: list[str]) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DiffusionInputError(f"image folder {root} does not exist (set $VISION_PEFT_DATA or task.data_root)")
    out = {}
    for c in classes:
        d = root / c
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXT) if d.is_dir() else []
        if not files:
            raise DiffusionInputError(f"class folder {d} is missing or holds no images ({', '.join(IMAGE_EXT)})")
        out[c] = files
    return out


def load_rgb(path: Path, size: int, min_side: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: shorter side resized, centre crop. Refuses images below ``min_side``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if min(w, h) < min_side:
            raise DiffusionInputError(
                f"{path} is {w}x{h}: smaller than the smallest latent grid ({min_side}x{min_side} pixels)"
            )
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


LATENT_CACHE: dict[tuple, torch.Tensor] = {}  # (train files, size, flip, VAE) -> scaled latents (CPU)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Scaled latents (N, 32, H/8, W/8) of images (N, 3, H, W) in [0, 1]."""
    if images.shape[-1] < 16 or images.shape[-2] < 16:
        raise DiffusionInputError(f"images of {tuple(images.shape[-2:])} are smaller than the 2×2 latent grid (16 px)")
    dev = next(vae.parameters()).device  # the VAE follows the model (CUDA in training); images come from disk
    out = [vae.encode(images[i : i + batch].to(dev)) * LATENT_SCALE for i in range(0, len(images), batch)]
    return torch.cat(out)


class TensorDictDataset(torch.utils.data.Dataset):
    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}
