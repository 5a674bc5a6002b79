"""The referring-segmentation torch dataset: letterboxed image + mask, tokenised phrase, the left/right swap of
phrases under horizontal flips, and the crop-free ``flip`` augmentation.

Evaluation items are **sentences**: every phrase of every referred object is one item (as the official DETRIS
``inference`` loops over all sentences of an object), or only the first with ``phrases="first"`` (DETRIS's
in-training validation). Training items are objects, each drawing one of its phrases per epoch."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from vision_peft.data.refer import RefSample

_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}


def swap_left_right(phrase: str) -> str:
    """The phrase for a horizontally flipped image."""
    return " ".join(_SWAP.get(w, w) for w in phrase.split(" "))


def letterbox_pair(
    img: Image.Image, mask: np.ndarray, size: tuple[int, int], pad: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Letterbox an RGB image (bilinear) and its mask (nearest) to ``size`` (H, W); uint8 arrays."""
    from vision_peft.preprocess import letterbox_params

    p = letterbox_params((img.height, img.width), size)
    im = np.asarray(img.resize((p["new_w"], p["new_h"]), Image.Resampling.BILINEAR), dtype=np.uint8)
    mk = np.asarray(Image.fromarray(mask).resize((p["new_w"], p["new_h"]), Image.Resampling.NEAREST), dtype=np.uint8)
    canvas = np.full((size[0], size[1], 3), pad, np.uint8)
    mcanvas = np.zeros(size, np.uint8)
    t, lft = p["pad_top"], p["pad_left"]
    canvas[t : t + p["new_h"], lft : lft + p["new_w"]] = im
    mcanvas[t : t + p["new_h"], lft : lft + p["new_w"]] = mk
    return canvas, mcanvas


class FlipAugment:
    """Letterbox-only geometry plus a seeded horizontal flip (p = 0.5) of image and mask together.

    Nothing is cropped or rescaled, so every instance — the referent and its distractors — stays in the picture
    and generated phrases ("the leftmost dog", "the only cat") stay true; the dataset swaps left/right in the
    phrase when the flip happened. Same call as :class:`vision_peft.augment.Augment`.
    """

    preset = "flip"

    def __call__(
        self, image: np.ndarray, seed: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if random.Random(int(seed)).random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])  # (H, W, 3) mirrored columns
            mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
        return image, mask


CROPPING_PRESETS = ("light", "standard", "aerial")  # augment presets that crop / rescale (vision_peft.augment)


class RefSegDataset(torch.utils.data.Dataset):
    """Items → {image (3,H,W), mask (H,W) float 0/1 on the letterboxed input, input_ids, attention_mask, index}.

    Training: one item per object, which picks one of its phrases per epoch (seeded). Evaluation: one item per
    (object, phrase) — every phrase with ``phrases="all"``, the first with ``"first"``; ``index`` is the item's
    position, :meth:`sample_index` / :meth:`phrase` / :meth:`image_id` say which object, phrase and image it is.
    With an augment, the letterboxed image and mask go through it together; a horizontal flip is detected (the
    mask carries a column code through the pipeline) and "left"/"right" are swapped in the phrase.
    """

    def __init__(
        self,
        samples: list[RefSample],
        spec: dict[str, Any],
        tokenize: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
        augment=None,
        seed: int = 0,
        train: bool = False,
        phrases: str = "all",
    ) -> None:
        if phrases not in ("all", "first"):
            raise ValueError(f"phrases must be 'all' or 'first', got {phrases!r}")
        self.samples, self.spec, self.tokenize, self.augment = samples, spec, tokenize, augment
        self.seed, self.train, self.epoch = seed, train, 0
        if train:
            self.items = [(i, -1) for i in range(len(samples))]  # (object, phrase drawn per epoch)
        else:
            n_of = (lambda s: max(1, len(s.phrases))) if phrases == "all" else (lambda s: 1)
            self.items = [(i, j) for i, s in enumerate(samples) for j in range(n_of(s))]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._sizes: dict[int, tuple[int, int]] = {}
        self._targets: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def sample_index(self, k: int) -> int:
        """The object (index into ``samples``) of item ``k``."""
        return self.items[k][0]

    def phrase(self, k: int) -> str:
        """The phrase of evaluation item ``k`` ("" for an object without phrases)."""
        i, j = self.items[k]
        ph = self.samples[i].phrases
        return ph[j] if 0 <= j < len(ph) else (ph[0] if ph else "")

    def image_id(self, k: int) -> str:
        """The image of item ``k`` (the bootstrap's resampling unit)."""
        return self.samples[self.items[k][0]].image_id or self.samples[self.items[k][0]].image

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(original RGB image, original-size target mask uint8)."""
        from vision_peft.preprocess import load_image

        s = self.samples[i]
        img = load_image(s.image)
        return img, s.mask((img.height, img.width))

    def _letterboxed(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            img, m = self.load(i)
            self._sizes[i] = (img.height, img.width)
            pad = self.spec.get("pad_value", 0)
            self._cache[i] = letterbox_pair(img, m, tuple(self.spec["size"]), int(np.mean(pad)))
        return self._cache[i]

    def target(self, k: int) -> np.ndarray:
        """The target mask of item ``k`` at the original image size (bool), for metrics at full resolution."""
        i = self.items[k][0]
        if i not in self._targets:
            if i not in self._sizes:
                self._letterboxed(i)
            self._targets[i] = self.samples[i].mask(self._sizes[i]).astype(bool)
        return self._targets[i]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        from vision_peft.augment import normalize

        i = self.items[k][0]
        s = self.samples[i]
        img, mask = self._letterboxed(i)
        phrase = self.phrase(k)
        if self.train:
            rng = random.Random(self.seed * 1_000_003 + self.epoch * 100_003 + i)
            phrase = rng.choice(s.phrases)
            if self.augment is not None:
                h, w = mask.shape
                cols = (np.arange(w, dtype=np.uint16) * 1000 // w)[None, :].repeat(h, 0)  # (H, W) column code
                coded = (mask.astype(np.uint16) + 2 * cols).astype(np.uint16)
                img, coded = self.augment(img, rng.randrange(2**31), coded)
                mask = (coded & 1).astype(np.uint8)
                code = (coded >> 1).astype(np.int32)
                if code[:, 0].mean() > code[:, -1].mean():  # columns now run right-to-left: flipped
                    phrase = swap_left_right(phrase)
        x = normalize(img, self.spec["mean"], self.spec["std"])  # (3, H, W)
        ids, am = self.tokenize(phrase)
        return {
            "image": torch.from_numpy(x),
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "input_ids": ids,
            "attention_mask": am,
            "index": torch.tensor(k),
        }
