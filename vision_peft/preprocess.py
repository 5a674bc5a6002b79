"""Torch-free image preprocessing shared by training-time evaluation, predict and the deployment runtime.

Everything here uses only numpy and Pillow, so ``vision_peft.deploy`` can turn a raw image into a graph's input
tensor on a machine without PyTorch, exactly as training-time evaluation and ``predict`` do. One *spec* dict says
everything about the transform and travels in a bundle's ``manifest.json`` under ``preprocess``:

```
{"size": [224, 224],                         # output (H, W)
 "resize": "shorter_then_center_crop",       # or "squash", "letterbox"
 "interpolation": "bicubic",                 # or "bilinear", "nearest"
 "scale": 1 / 255,                           # pixel (0-255) -> multiplied by scale before mean/std
 "mean": [0.485, 0.456, 0.406],              # in output channel order
 "std": [0.229, 0.224, 0.225],
 "channel_order": "RGB",                     # or "BGR"
 "layout": "CHW",                            # or "HWC"
 "pad_value": 0,                             # letterbox padding in pixel units (0-255), scalar or 3 values
 "crop_pct": 1.0}                            # optional; shorter_then_center_crop only (timm's eval crop_pct)
```

The output is ``(pixel * scale - mean) / std`` as float32. ``shorter_then_center_crop`` scales the image so it
covers ``size / crop_pct`` (for a square target: the shorter side becomes the target) and cuts the centre
(``top = (h - H) // 2``); ``squash`` resizes to exactly ``size``; ``letterbox`` keeps the aspect ratio, centres
the image and pads the rest with ``pad_value`` (undo it with :func:`letterbox_params` / :func:`unletterbox`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("shorter_then_center_crop", "squash", "letterbox")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("CHW", "HWC")
SPEC_DEFAULTS: dict[str, Any] = {
    "resize": "shorter_then_center_crop",
    "interpolation": "bilinear",
    "scale": 1.0 / 255.0,
    "channel_order": "RGB",
    "layout": "CHW",
    "pad_value": 0,
    "crop_pct": 1.0,
}
SPEC_REQUIRED = ("size", "mean", "std")
MAX_SIDE = 8192  # the largest network input side a spec may ask for
MIN_CROP_PCT = 0.1  # the smallest crop_pct (timm's models use 0.875 - 1.0)
SPEC_KEYS = SPEC_REQUIRED + tuple(SPEC_DEFAULTS)

ImageInput = Image.Image | np.ndarray | str | Path
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # image file types read everywhere


class ImageFileError(ValueError):
    """An image file that does not decode; the message names the file, ``reason`` says why (without the path)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"image file {path} is unreadable: {reason}; remove or replace the file")
        self.path, self.reason = str(path), reason


def load_image(path: str | Path, exif_transpose: bool = True, draft: tuple[int, int] | None = None) -> Image.Image:
    """Reads an image file fully into memory as RGB.

    Grayscale, 16-bit, RGBA/LA (alpha dropped), palette and CMYK images are converted to 8-bit RGB. The file is
    decoded completely (``Image.load``) so a truncated file fails here, not later inside a data loader. Images
    above Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` x 2) are refused from the header,
    before any pixel is allocated.

    Args:
        path: Image file.
        exif_transpose: Apply the EXIF orientation tag (photos from phones), so the pixels are upright.
        draft: Decode JPEGs at a reduced scale close to this (W, H) (for validating many files quickly).

    Returns:
        An RGB image that no longer holds the file open.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageFileError: (a ValueError) The file is not a readable image (unknown format, truncated or corrupt
            data, a decompression bomb); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist; check the path")
    try:
        with Image.open(path) as im:
            _check_png_size(im, path)
            if draft is not None:
                im.draft("RGB", draft)
            im.load()
            img = _to_rgb(ImageOps.exif_transpose(im) if exif_transpose else im)
    except ImageFileError:
        raise
    except UnidentifiedImageError as e:
        raise ImageFileError(path, f"cannot identify image file ({e})") from e
    except Image.DecompressionBombError as e:
        raise ImageFileError(
            path, f"{e} (a decompression bomb, or a huge image: raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
        ) from e
    except (OSError, SyntaxError, EOFError) as e:  # Pillow raises these for truncated/corrupt data
        raise ImageFileError(path, f"truncated or corrupt data ({e})") from e
    except Exception as e:  # Pillow's decoders and EXIF parser raise many other types for corrupt data
        raise ImageFileError(path, f"corrupt data ({type(e).__name__}: {e})") from e
    return img


PNG_MAX_DEFLATE_RATIO = 1032  # deflate (zlib) never expands data by more than this factor


def _check_png_size(im: Image.Image, path: Path) -> None:
    """Refuse a PNG whose header claims more pixels than its bytes can encode (checked before decoding).

    Every PNG row holds at least a filter byte and one bit per pixel, and deflate expands at most
    ``PNG_MAX_DEFLATE_RATIO``:1, so a file smaller than that bound is certainly truncated or a decompression bomb
    (Pillow would otherwise decode a 100-byte file into a 116 x 554296 image of zeros).
    """
    if im.format != "PNG":
        return
    w, h = im.size
    size = path.stat().st_size
    if h * (1 + (w + 7) // 8) > size * PNG_MAX_DEFLATE_RATIO + 1024:
        raise ImageFileError(
            path, f"its header claims {w}x{h} pixels, more than its {size} bytes can encode (truncated, or a "
            "decompression bomb)"
        )  # fmt: skip


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to a new 8-bit RGB image (always a copy, detached from the file)."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit (0-65535) -> 8-bit (0-255)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow asks for this route for palette images with transparency
    return img.convert("RGB")


def validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Checks a preprocess spec and returns a complete copy with defaults filled in.

    Args:
        spec: Preprocess spec (see the module docstring); ``size``, ``mean`` and ``std`` are required.

    Returns:
        A new dict holding every key of ``SPEC_KEYS`` with plain Python values (JSON-ready).

    Raises:
        ValueError: Unknown or missing keys, or a value out of range; the message names the valid choices.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"preprocess spec must be a dict, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"unknown preprocess spec key(s) {unknown}; valid keys: {', '.join(SPEC_KEYS)}")
    missing = [k for k in SPEC_REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"preprocess spec is missing {missing}; required keys: {', '.join(SPEC_REQUIRED)}")
    out = {**SPEC_DEFAULTS, **spec}

    size = out["size"]
    if _is_int(size):
        size = [size, size]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
        raise ValueError(f"preprocess 'size' must be [H, W] with positive integers, got {out['size']!r}")
    if max(size) > MAX_SIDE:
        raise ValueError(f"preprocess 'size' {list(size)} exceeds {MAX_SIDE} pixels per side")
    out["size"] = [int(s) for s in size]
    for key, valid in (("resize", RESIZE_MODES), ("interpolation", INTERPOLATIONS), ("channel_order", CHANNEL_ORDERS),
                       ("layout", LAYOUTS)):  # fmt: skip
        if not isinstance(out[key], str) or out[key] not in valid:
            word = "mode" if key == "resize" else ""
            raise ValueError(f"unknown {key} {word + ' ' if word else ''}{out[key]!r}; valid: {', '.join(valid)}")
    for key in ("mean", "std"):
        vals = out[key]
        if _is_number(vals):
            vals = [vals] * 3
        if not (isinstance(vals, (list, tuple)) and len(vals) == 3):
            raise ValueError(f"preprocess {key!r} needs 3 values (one per channel), got {out[key]!r}")
        out[key] = [_finite(v, key) for v in vals]
    if any(s == 0 for s in out["std"]):
        raise ValueError(f"preprocess 'std' must be non-zero, got {out['std']}")
    out["scale"] = _finite(out["scale"], "scale")
    if out["scale"] <= 0:
        raise ValueError(f"preprocess 'scale' must be positive (e.g. 1/255), got {out['scale']}")
    pad = out["pad_value"]
    if isinstance(pad, (list, tuple)):
        if len(pad) != 3:
            raise ValueError(f"preprocess 'pad_value' must be one number or 3 (pixel units 0-255), got {pad!r}")
        out["pad_value"] = [_plain_number(_finite(p, "pad_value")) for p in pad]
    else:
        out["pad_value"] = _plain_number(_finite(pad, "pad_value"))
    pixels = np.asarray([0.0, 255.0, *np.ravel(out["pad_value"])], dtype=np.float64)[:, None]  # (P, 1)
    with np.errstate(over="ignore"):
        normed = (pixels * out["scale"] - np.asarray(out["mean"])) / np.asarray(out["std"])  # (P, 3)
    if not (np.abs(normed) < np.finfo(np.float32).max).all() or (np.float32(out["std"]) == 0).any():
        raise ValueError(
            f"preprocess 'scale', 'mean', 'std' and 'pad_value' ({out['scale']}, {out['mean']}, {out['std']}, "
            f"{out['pad_value']}) overflow float32 for pixel values 0-255"
        )
    crop_pct = _finite(out["crop_pct"], "crop_pct")
    if not MIN_CROP_PCT <= crop_pct <= 1:  # a tiny crop_pct would scale the image up without bound first
        raise ValueError(f"preprocess 'crop_pct' must be in [{MIN_CROP_PCT}, 1], got {crop_pct}")
    if crop_pct != 1.0 and out["resize"] != "shorter_then_center_crop":
        raise ValueError(
            f"preprocess 'crop_pct'={crop_pct} only applies to resize='shorter_then_center_crop', "
            f"not {out['resize']!r}; drop it or set it to 1.0"
        )
    out["crop_pct"] = crop_pct
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _finite(v: Any, key: str) -> float:
    """``v`` as a float when it is a finite number, else a ValueError naming the spec key."""
    if not _is_number(v) or not np.isfinite(float(v)):
        raise ValueError(f"preprocess {key!r} must hold finite numbers, got {v!r}")
    return float(v)


def _plain_number(v: Any) -> int | float:
    f = float(v)
    return int(f) if f.is_integer() else f


def image_spec(data_config: dict[str, Any], resize: str = "shorter_then_center_crop") -> dict[str, Any]:
    """Builds a preprocess spec from a backbone's ``data_config``.

    Args:
        data_config: ``{"input_size": [3, H, W], "mean": [...], "std": [...], "interpolation": "bicubic"}``;
            an optional ``crop_pct`` (timm) is kept for ``shorter_then_center_crop``; other keys are ignored.
        resize: One of ``RESIZE_MODES``.

    Returns:
        A complete, validated spec (see :func:`validate_spec`).

    Raises:
        ValueError: A required data_config key is missing or malformed, or the resize mode is unknown.
    """
    missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
    if missing:
        raise ValueError(f"backbone data_config is missing {missing}; it needs input_size [3, H, W], mean and std")
    input_size = list(data_config["input_size"])
    if len(input_size) != 3 or input_size[0] != 3:
        raise ValueError(f"data_config 'input_size' must be [3, H, W], got {data_config['input_size']!r}")
    spec: dict[str, Any] = {
        "size": [int(input_size[1]), int(input_size[2])],
        "resize": resize,
        "interpolation": data_config.get("interpolation", "bilinear"),
        "scale": 1.0 / 255.0,
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "channel_order": "RGB",
        "layout": "CHW",
        "pad_value": 0,
    }
    if resize == "shorter_then_center_crop" and data_config.get("crop_pct") is not None:
        spec["crop_pct"] = float(data_config["crop_pct"])
    return validate_spec(spec)


def letterbox_params(src_hw: Sequence[int], dst_hw: Sequence[int]) -> dict[str, Any]:
    """Geometry of a letterbox resize, so a caller can map outputs back onto the source image.

    A source pixel coordinate ``(y, x)`` lands at ``(y * scale + pad_top, x * scale + pad_left)``; the inverse is
    ``((y' - pad_top) / scale, (x' - pad_left) / scale)``.

    Args:
        src_hw: Source image (H, W).
        dst_hw: Target (H, W).

    Returns:
        ``dict(scale, pad_top, pad_left, new_h, new_w)``: the resize factor, the padding before the image, and the
        size of the resized image inside the target.
    """
    (h, w), (dh, dw) = (int(src_hw[0]), int(src_hw[1])), (int(dst_hw[0]), int(dst_hw[1]))
    if min(h, w, dh, dw) <= 0:
        raise ValueError(f"letterbox sizes must be positive, got src {tuple(src_hw)} dst {tuple(dst_hw)}")
    scale = min(dh / h, dw / w)
    new_h = min(dh, max(1, round(h * scale)))
    new_w = min(dw, max(1, round(w * scale)))
    return {"scale": scale, "pad_top": (dh - new_h) // 2, "pad_left": (dw - new_w) // 2, "new_h": new_h, "new_w": new_w}


def unletterbox(
    array: np.ndarray, src_hw: Sequence[int], dst_hw: Sequence[int], interpolation: str = "bilinear"
) -> np.ndarray:
    """Undoes a letterbox on a 2-D map (e.g. mask logits), returning it at the source image's size.

    The map may be at a lower resolution than ``dst_hw`` (e.g. 1/4 of the input): the padding is cut
    proportionally before resizing.

    Args:
        array: (h, w) map predicted on the letterboxed image.
        src_hw: The original image (H, W).
        dst_hw: The letterboxed network input (H, W) the map corresponds to.
        interpolation: One of ``INTERPOLATIONS``.

    Returns:
        float32 (H, W) map aligned with the original image.
    """
    if array.ndim != 2:
        raise ValueError(f"unletterbox expects a 2-D (h, w) map, got shape {array.shape}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    p = letterbox_params(src_hw, dst_hw)
    ry, rx = array.shape[0] / dst_hw[0], array.shape[1] / dst_hw[1]
    box = (p["pad_left"] * rx, p["pad_top"] * ry, (p["pad_left"] + p["new_w"]) * rx, (p["pad_top"] + p["new_h"]) * ry)
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))  # mode "F"
    out = img.resize((int(src_hw[1]), int(src_hw[0])), INTERPOLATIONS[interpolation], box=box)
    return np.asarray(out, dtype=np.float32)


def _as_image(item: ImageInput) -> Image.Image:
    if isinstance(item, Image.Image):
        return _to_rgb(item)
    if isinstance(item, (str, Path)):
        return load_image(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be uint8 HWC with values 0-255, got dtype {item.dtype}; "
                "convert with np.clip(a, 0, 255).astype(np.uint8) (scale float images by 255 first)"
            )
        if item.ndim == 3 and item.shape[2] == 1:
            item = item[:, :, 0]  # (H,W,1)->(H,W)
        if not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4))):
            raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {item.shape}")
        return _to_rgb(Image.fromarray(np.ascontiguousarray(item)))
    raise ValueError(f"cannot preprocess {type(item).__name__}; pass a PIL image, an HWC uint8 array or a path")


def _resize(img: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """Resizes per the spec; returns float32 (H, W, 3) in pixel units (0-255)."""
    dh, dw = spec["size"]
    resample = INTERPOLATIONS[spec["interpolation"]]
    w, h = img.size
    mode = spec["resize"]
    if mode == "squash":
        return np.asarray(img.resize((dw, dh), resample), dtype=np.float32)
    if mode == "shorter_then_center_crop":
        ch, cw = dh / spec["crop_pct"], dw / spec["crop_pct"]  # region the target is cut from
        scale = max(ch / h, cw / w)
        new_h, new_w = max(dh, round(h * scale)), max(dw, round(w * scale))
        top, left = (new_h - dh) // 2, (new_w - dw) // 2
        resized = img.resize((new_w, new_h), resample)
        return np.asarray(resized, dtype=np.float32)[top : top + dh, left : left + dw]
    p = letterbox_params((h, w), (dh, dw))
    resized = np.asarray(img.resize((p["new_w"], p["new_h"]), resample), dtype=np.float32)
    canvas = np.empty((dh, dw, 3), dtype=np.float32)
    canvas[...] = np.asarray(spec["pad_value"], dtype=np.float32)  # scalar or (3,) broadcasts over (H,W,3)
    canvas[p["pad_top"] : p["pad_top"] + p["new_h"], p["pad_left"] : p["pad_left"] + p["new_w"]] = resized
    return canvas


def preprocess_image(img: ImageInput, spec: dict[str, Any]) -> np.ndarray:
    """Turns one raw image into a network input.

    Args:
        img: A PIL image (any mode), an (H, W[, C]) uint8 array in RGB order, or a path to an image file.
        spec: Preprocess spec (see the module docstring); validated here.

    Returns:
        float32 array, (3, H, W) for layout "CHW" (the default) or (H, W, 3) for "HWC".
    """
    return _preprocess(img, validate_spec(spec))


def _preprocess(img: ImageInput, spec: dict[str, Any]) -> np.ndarray:
    """:func:`preprocess_image` for an already validated spec."""
    arr = _resize(_as_image(img), spec)  # (H,W,3) RGB, 0-255
    if spec["channel_order"] == "BGR":
        arr = arr[:, :, ::-1]
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    arr = (arr * np.float32(spec["scale"]) - mean) / std
    if spec["layout"] == "CHW":
        arr = arr.transpose(2, 0, 1)  # (H,W,3)->(3,H,W)
    return np.ascontiguousarray(arr, dtype=np.float32)


def preprocess_batch(items: Sequence[ImageInput], spec: dict[str, Any]) -> np.ndarray:
    """Preprocesses several images into one batch.

    Args:
        items: Images as accepted by :func:`preprocess_image`.
        spec: Preprocess spec.

    Returns:
        float32 (B, 3, H, W) array (or (B, H, W, 3) for layout "HWC").
    """
    if len(items) == 0:
        raise ValueError("preprocess_batch got no images; pass at least one")
    spec = validate_spec(spec)
    return np.stack([_preprocess(item, spec) for item in items])
