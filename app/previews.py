"""Dataset previews and result images for the app: pure functions from files (or arrays) to PIL images.

- point clouds: :func:`render_points` draws an orthographic projection with depth-shaded, sphere-like points
  (numpy + Pillow, a z-buffer, no plotting library); :func:`render_point_file` reads any format the project's
  readers know (``vision_peft.data.points``) and draws one or several named views side by side;
- referring segmentation: :func:`overlay_mask` tints the target semi-transparently and outlines it;
  :func:`refseg_previews` captions each overlay with its phrase (folder, coco128-seg or RefCOCO layouts);
- diffusion: :func:`image_grid` lays generated images out one row per class, with the class name in the margin;
- :func:`dataset_preview` picks the table and gallery for a dataset folder by the task's declared preview kind
  (:data:`PREVIEWS`: ``class_folders``, ``point_folders``, ``refer``, ``none``).

Nothing here imports gradio or loads a model; the readers that pull in torch are imported inside the functions,
so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from app.uploads import class_counts, thumbnails

# named camera directions: (azimuth about the up axis, elevation above the horizon), degrees
VIEWS: dict[str, tuple[float, float]] = {
    "3/4": (-35.0, 25.0),
    "front": (0.0, 0.0),
    "side": (90.0, 0.0),
    "top": (0.0, 90.0),
}
FAR_COLOUR = np.array([40, 70, 140], np.float32)  # distant points: dark blue
NEAR_COLOUR = np.array([255, 196, 90], np.float32)  # close points: warm yellow
MASK_COLOUR = (255, 40, 40)
MAX_RENDER_POINTS = 8192  # larger clouds are subsampled (seeded) before drawing


# -- point clouds ----------------------------------------------------------------------------------------------
def _rotation(azim: float, elev: float) -> np.ndarray:
    """(3, 3) rotation: turn the cloud by ``azim`` about y (up), then tilt it by ``elev`` about x."""
    a, e = math.radians(azim), math.radians(elev)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], np.float32)
    rx = np.array([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]], np.float32)
    return rx @ ry


def render_points(
    points: np.ndarray,
    size: int = 224,
    azim: float = -35.0,
    elev: float = 25.0,
    radius: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """An orthographic view of a y-up point cloud: nearer points are brighter and drawn over farther ones.

    The cloud is centred and scaled to the unit sphere first, so any file scale fits the frame. The camera looks
    along -z after the rotation (``azim`` about the up axis, then ``elev`` upwards; ``elev=90`` looks down).

    Args:
        points: (N, 3) xyz with y up (convert z-up files with ``convert_up_axis`` first).
        size: output width and height in pixels.
        azim: camera azimuth in degrees.
        elev: camera elevation in degrees.
        radius: point radius in pixels; None picks one from ``size`` and the number of points.
        background: RGB of the empty canvas.

    Raises:
        ValueError: ``points`` is not a non-empty (N, 3) array of finite numbers.
    """
    p = np.asarray(points, dtype=np.float32)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) == 0:
        raise ValueError(f"render_points needs an (N, 3) array of xyz points, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("render_points: the cloud has NaN/inf coordinates")
    if len(p) > MAX_RENDER_POINTS:
        p = p[np.sort(np.random.default_rng(0).choice(len(p), MAX_RENDER_POINTS, replace=False))]
    p = p - p.mean(axis=0, keepdims=True)
    scale = float(np.sqrt((p**2).sum(axis=1)).max())
    p = p / scale if scale > 0 else p
    view = p @ _rotation(azim, elev).T  # (N, 3) in camera space: x right, y up, z towards the viewer
    if radius is None:
        radius = min(max(1, round(size / 110 * math.sqrt(1024 / len(p)))), max(1, size // 24))  # sparse: bigger
    half = size / 2
    fit = half - radius - 2  # the unit sphere touches the frame minus the point radius
    cx = np.round(half + view[:, 0] * fit).astype(np.int64)
    cy = np.round(half - view[:, 1] * fit).astype(np.int64)
    depth = view[:, 2]
    span = float(depth.max() - depth.min())
    near = (depth - depth.min()) / span if span > 0 else np.ones_like(depth)

    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    inside = dx**2 + dy**2 <= radius * (radius + 1)  # a rounder disc than r² at small radii
    dx, dy = dx[inside], dy[inside]  # (K,) disc offsets
    r2 = (dx**2 + dy**2) / (radius * (radius + 1))  # 0 at the centre, 1 on the rim
    bulge = np.sqrt(np.clip(1 - r2, 0, 1)) * radius / fit  # sphere impostor: the disc centre sticks out
    rim = 1.0 - 0.45 * r2  # darker towards the disc edge

    xs = (cx[:, None] + dx[None]).ravel()  # (N*K,)
    ys = (cy[:, None] + dy[None]).ravel()
    zs = (depth[:, None] + bulge[None]).ravel()
    base = FAR_COLOUR + (NEAR_COLOUR - FAR_COLOUR) * near[:, None]  # (N, 3)
    shade = (0.55 + 0.45 * near)[:, None] * rim[None]  # (N, K)
    colour = (base[:, None, :] * shade[..., None]).reshape(-1, 3)  # (N*K, 3)
    ok = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
    flat, zs, colour = ys[ok] * size + xs[ok], zs[ok], colour[ok]
    order = np.lexsort((-zs, flat))  # per pixel, the nearest fragment first
    flat, colour = flat[order], colour[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    canvas = np.empty((size * size, 3), np.uint8)
    canvas[:] = background
    canvas[flat[first]] = np.clip(colour[first], 0, 255).astype(np.uint8)
    return Image.fromarray(canvas.reshape(size, size, 3), "RGB")


def render_views(
    points: np.ndarray, views: Sequence[str] = ("3/4",), size: int = 224, labels: bool = True
) -> Image.Image:
    """Several named views (keys of :data:`VIEWS`) side by side, each labelled in its corner."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"unknown view(s) {unknown or list(views)}; known: {', '.join(VIEWS)}")
    tiles = [render_points(points, size, *VIEWS[v]) for v in views]
    out = Image.new("RGB", (size * len(tiles) + 2 * (len(tiles) - 1), size), (220, 220, 220))
    for i, (name, tile) in enumerate(zip(views, tiles)):
        if labels and len(tiles) > 1:
            ImageDraw.Draw(tile).text((4, 2), name, fill=(90, 90, 90))
        out.paste(tile, (i * (size + 2), 0))
    return out


def load_points_for_view(path: str | Path, up_axis: str = "swap_yz", h5_index: int = 0) -> np.ndarray:
    """A point file as a y-up (N, 3) array, via the project's readers (PointFileError names a bad file).

    Args:
        path: .pcd, .ply, .off, .npy, .npz, .h5 or "file.h5[i]" (a shape inside an HDF5 file).
        up_axis: the file's convention as a task's ``up_axis`` rule: ``swap_yz`` for z-up files (ModelNet),
            ``none`` for y-up files.
        h5_index: the shape to draw from an HDF5 file without an ``[i]`` suffix.
    """
    from vision_peft.data.points import convert_up_axis, read_points

    text = str(path)
    if text.endswith("]") and "[" in text:
        text, idx = text[:-1].rsplit("[", 1)
        h5_index = int(idx)
    return convert_up_axis(read_points(text, index=h5_index), up_axis)


def render_point_file(
    path: str | Path, views: Sequence[str] = ("3/4",), size: int = 224, up_axis: str = "swap_yz"
) -> Image.Image:
    """Read a point file and draw it (see :func:`render_views`); unreadable files raise ``PointFileError``."""
    return render_views(load_points_for_view(path, up_axis), views, size)


def point_previews(
    root: str | Path, per_class: int = 1, limit: int = 12, size: int = 192, up_axis: str = "swap_yz"
) -> tuple[list[str], list[list[Any]], list[tuple[Image.Image, str]]]:
    """Shapes per class and split, and one 3/4 rendering per class, for a point-cloud dataset folder.

    Returns:
        (headers ``[class, <split>…]``, rows of shape counts, gallery items (rendering, caption)).
    """
    from vision_peft.data.points import scan_point_folder

    scan = scan_point_folder(root)
    names = point_split_names(scan.splits)
    rows = [
        [cls, *(sum(1 for s in scan.splits[n] if s.label == i) for n in names)] for i, cls in enumerate(scan.classes)
    ]
    items: list[tuple[Image.Image, str]] = []
    for i, cls in enumerate(scan.classes):
        picks = [s for n in names for s in scan.splits[n] if s.label == i][:per_class]
        for s in picks:
            pts = load_points_for_view(s.path, up_axis)
            items.append((render_views(pts, ("3/4",), size), f"{cls} — {Path(s.path).name} ({len(pts)} points)"))
        if len(items) >= limit:
            break
    return ["class", *names], rows, items[:limit]


def point_split_names(splits: dict[str, Any]) -> list[str]:
    """Split names in table order: train, val, test, then any others alphabetically."""
    known = [n for n in ("train", "val", "test") if n in splits]
    return known + sorted(n for n in splits if n not in known)


# -- referring segmentation ------------------------------------------------------------------------------------
def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary erosion, ``steps`` times (pixels outside the image count as background)."""
    m = mask.copy()
    for _ in range(steps):
        pad = np.pad(m, 1, constant_values=False)
        m = m & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return m


def overlay_mask(
    image: Image.Image | np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int] = MASK_COLOUR,
    alpha: float = 0.45,
    outline: int = 2,
) -> Image.Image:
    """The image with the mask tinted (``alpha`` of ``colour``) and its border drawn ``outline`` pixels wide.

    Pixels outside the mask are returned unchanged.

    Raises:
        ValueError: the mask's (H, W) differs from the image's, or ``alpha`` is outside [0, 1].
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)  # (H,W)->(H,W,3)
    m = np.asarray(mask).astype(bool)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask is {m.shape[1]}×{m.shape[0]} but the image is {rgb.shape[1]}×{rgb.shape[0]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = rgb.astype(np.float32)
    c = np.asarray(colour, np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * c
    if outline > 0:
        out[m & ~_erode(m, outline)] = c
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def read_refer_samples(root: str | Path) -> tuple[list[Any], str]:
    """(RefSample list, format name) for a referring-segmentation folder, whichever layout it has.

    Raises:
        ValueError: the folder matches none of: ``refs.json`` (folder format), ``images/`` + ``labels/``
            (coco128-seg, phrases generated), ``refs(*).p`` + ``instances.json`` (RefCOCO).
    """
    from vision_peft.data import refer

    root = Path(root)
    if (root / "refs.json").is_file():
        return refer.read_refer_folder(root), "folder"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return refer.read_coco128_seg(root)[0], "coco128_seg"
    pickles = sorted(root.glob("refs*.p"))
    if pickles and (root / "instances.json").is_file():
        return refer.read_refcoco(root, pickles[0].name), "refcoco"
    raise ValueError(
        f"{root} is not a referring-segmentation dataset: expected refs.json (folder format), images/ + labels/ "
        "(coco128-seg) or refs(*).p + instances.json + images/ (RefCOCO)"
    )


def refer_thumbnail(sample: Any, size: int = 224) -> Image.Image:
    """One RefSample as a thumbnail (longest side ``size``) with its target mask overlaid."""
    from vision_peft.preprocess import load_image

    img = load_image(sample.image)
    img.thumbnail((size, size))
    return overlay_mask(img, sample.mask((img.height, img.width)))


def refseg_previews(
    root: str | Path, limit: int = 12, size: int = 224
) -> tuple[list[list[Any]], list[tuple[Image.Image, str]]]:
    """Dataset summary rows and up to ``limit`` overlays captioned with their phrase (one per image first)."""
    samples, fmt = read_refer_samples(root)
    if not samples:
        raise ValueError(f"{root} holds no referring targets ({fmt} format)")
    images = {s.image for s in samples}
    rows: list[list[Any]] = [
        ["format", fmt],
        ["images with targets", len(images)],
        ["referred objects", len(samples)],
        ["phrases", sum(len(s.phrases) for s in samples)],
    ]
    seen: set[str] = set()
    picks = []
    for s in samples:  # one object per image first, then the rest
        if s.image not in seen:
            seen.add(s.image)
            picks.append(s)
    picks += [s for s in samples if s not in picks]
    items = []
    for s in picks[:limit]:
        extra = f" (+{len(s.phrases) - 1} more)" if len(s.phrases) > 1 else ""
        items.append((refer_thumbnail(s, size), f"“{s.phrases[0]}”{extra} — {Path(s.image).name}"))
    return rows, items


def mask_stats(mask: np.ndarray, prob: np.ndarray | None = None, threshold: float | None = None) -> dict[str, Any]:
    """IoU-free facts about a predicted mask: area, fraction, bounding box, probabilities."""
    m = np.asarray(mask).astype(bool)
    h, w = m.shape
    out: dict[str, Any] = {
        "image_size": [w, h],
        "mask_area_px": int(m.sum()),
        "area_fraction": float(m.mean()),
        "bbox_xyxy": None,
    }
    if m.any():
        ys, xs = np.nonzero(m)
        out["bbox_xyxy"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    if prob is not None:
        out["max_prob"] = float(np.max(prob))
        out["mean_prob_in_mask"] = float(np.asarray(prob)[m].mean()) if m.any() else None
    if threshold is not None:
        out["threshold"] = float(threshold)
    return out


# -- generated images -------------------------------------------------------------------------------------------
def image_grid(
    images: np.ndarray, ncol: int, row_labels: Sequence[str] | None = None, min_tile: int = 128
) -> Image.Image:
    """Images (N, H, W, 3), uint8 or float in [0, 1], as a grid of ``ncol`` columns with optional row labels.

    Tiles smaller than ``min_tile`` are enlarged (nearest neighbour: generated pixels stay visible as they are).
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise ValueError(f"image_grid needs (N, H, W, 3) images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    n, h, w, _ = arr.shape
    zoom = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * zoom, w * zoom
    rows = math.ceil(n / ncol)
    margin = 0
    if row_labels:
        margin = 8 + 6 * max(len(t) for t in row_labels)  # the default bitmap font is ~6 px per character
    gap = 2
    out = Image.new("RGB", (margin + ncol * (tw + gap) + gap, rows * (th + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(arr[i], "RGB").resize((tw, th), Image.Resampling.NEAREST)
        out.paste(tile, (margin + gap + c * (tw + gap), gap + r * (th + gap)))
    for r, text in enumerate(row_labels or []):
        if r < rows:
            draw.text((4, gap + r * (th + gap) + th // 2 - 5), text, fill=(0, 0, 0))
    return out


# -- dataset previews by kind ------------------------------------------------------------------------------------
PreviewResult = tuple[list[str], list[list[Any]], list[tuple[Any, str]]]  # (table headers, rows, gallery items)


def class_folder_preview(root: str | Path) -> PreviewResult:
    """Files per class folder + one thumbnail per class (folder-per-class image datasets)."""
    return ["class", "files"], [[k, v] for k, v in class_counts(root).items()], thumbnails(root)


def point_folder_preview(root: str | Path) -> PreviewResult:
    """Shapes per class and split + one rendering per class (point-cloud folders)."""
    return point_previews(root)


def refer_preview(root: str | Path) -> PreviewResult:
    """A dataset summary + mask overlays captioned with their phrases (referring-segmentation layouts)."""
    rows, items = refseg_previews(root)
    return ["statistic", "value"], rows, items


def no_preview(root: str | Path) -> PreviewResult:
    """Tasks whose data has no preview: nothing to show."""
    return [], [], []


@dataclass(frozen=True)
class PreviewKind:
    """How one kind of dataset folder is previewed: the table's headers and labels, and the function."""

    headers: list[str]  # table headers before the first preview (point folders add their split names)
    table_label: str
    gallery_label: str
    build: Callable[[str | Path], PreviewResult]
    visible: bool = True  # False: the tab shows no preview table or gallery


PREVIEWS: dict[str, PreviewKind] = {  # a task's declared ``preview`` kind -> its preview
    "class_folders": PreviewKind(["class", "files"], "class counts", "samples (one per class)", class_folder_preview),
    "point_folders": PreviewKind(
        ["class", "train", "test"], "shapes per class and split", "sample shapes (one per class, 3/4 view)",
        point_folder_preview,
    ),
    "refer": PreviewKind(["statistic", "value"], "dataset summary", "targets: mask overlay + phrase", refer_preview),
    "none": PreviewKind([], "dataset", "samples", no_preview, visible=False),
}  # fmt: skip


def preview_kind(kind: str) -> PreviewKind:
    """The preview of ``kind``; a task declaring an unknown kind is named with the known ones."""
    if kind not in PREVIEWS:
        raise ValueError(
            f"unknown dataset preview kind {kind!r} (a task's `preview` attribute); known: {', '.join(PREVIEWS)}"
        )
    return PREVIEWS[kind]


def dataset_preview(kind: str, root: str | Path) -> PreviewResult:
    """(table headers, table rows, gallery items) previewing the dataset folder ``root`` as preview ``kind``.

    Point folders: shapes per class and split + one rendering per class; refer: a summary + mask overlays
    captioned with phrases; class folders: files per class folder + one thumbnail per class; none: nothing.
    """
    return preview_kind(kind).build(root)
