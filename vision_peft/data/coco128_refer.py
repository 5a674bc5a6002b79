"""coco128-seg (YOLO-seg polygons, COCO-80 ids) as referring segmentation, with phrases generated from the
annotations by :func:`generate_phrases` (its rules are in its docstring and the README).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft.data.folder import DatasetError
from vision_peft.data.refer import RefSample, _PolyStats, clean_polygon, register_refer_format
from vision_peft.preprocess import IMAGE_SUFFIXES

log = logging.getLogger("vision_peft")


COCO80 = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()
COCO80 = tuple(c.replace("_", " ") for c in COCO80)
_PLURAL = {
    "person": "people",
    "mouse": "mice",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "bus": "buses",
}
_PLURAL.update({"knife": "knives", "couch": "couches", "sandwich": "sandwiches", "toothbrush": "toothbrushes"})
_PLURAL.update({"wine glass": "wine glasses", "hair drier": "hair driers", "bench": "benches", "tv": "tvs"})
ORDINALS = ("first", "second", "third", "fourth", "fifth")


def plural(name: str) -> str:
    if name in _PLURAL:
        return _PLURAL[name]
    if name.endswith(("s", "x", "ch", "sh")):
        return name + "es"
    return name + "s"


@dataclass
class Instance:
    """One annotated object of an image (normalised coordinates)."""

    category: str
    polygons: list[np.ndarray]
    area: float  # polygon area (shoelace, [0, 1] units; overlaps not removed)
    cx: float  # bounding-box centre
    cy: float


def _instance(category: str, polys: list[np.ndarray]) -> Instance:
    area = sum(
        0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))) for p in polys
    )
    allp = np.concatenate(polys)
    lo, hi = allp.min(0), allp.max(0)
    return Instance(category, polys, area, float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2)


def generate_phrases(
    instances: list[Instance], min_area: float = 0.01, pos_margin: float = 0.1, size_ratio: float = 1.5
) -> list[tuple[int, list[str]]]:
    """Referring phrases that pick out one instance among the others of its category.

    Rules (all instances of a category count as distractors; only instances with area ≥ ``min_area`` of the
    image become targets; an instance that no rule singles out is not used):

    - the only one of its category: "the {c}", "{c}";
    - one of two: "the {c} on the left / right" (centres ≥ ``pos_margin`` apart horizontally), "the left / right
      {c}"; "the larger / smaller of the two {cs}" (area ratio ≥ ``size_ratio``), "the bigger / smaller {c}";
      "the {c} at the top / bottom" (centres ≥ ``pos_margin`` apart vertically);
    - one of three or more: "the leftmost / rightmost {c}" and "the second / third … {c} from the left / right"
      (up to five; neighbours in left-to-right order ≥ ``pos_margin`` / 2 apart), "the largest / smallest {c}"
      (≥ ``size_ratio`` times the runner-up), "the {c} at the top / bottom" (topmost/bottommost by ≥ ``pos_margin`` / 2).

    Order of preference: horizontal position, size, vertical (the first is shown in previews and split.json;
    evaluation runs every phrase, training draws one per epoch). The phrases hold for the whole image and for its
    mirror image with left/right swapped — not for a crop, which can remove the referent or a distractor.

    Returns:
        (instance index, phrases) for every instance that got at least one phrase.
    """
    by_cat: dict[str, list[int]] = {}
    for i, ins in enumerate(instances):
        by_cat.setdefault(ins.category, []).append(i)
    out: list[tuple[int, list[str]]] = []
    for cat, members in by_cat.items():
        pl = plural(cat)
        for i in members:
            t = instances[i]
            if t.area < min_area:
                continue
            others = [instances[j] for j in members if j != i]
            ph: list[str] = []
            if not others:
                ph = [f"the {cat}", cat]
            elif len(others) == 1:
                o = others[0]
                if abs(t.cx - o.cx) >= pos_margin:
                    side = "left" if t.cx < o.cx else "right"
                    ph += [f"the {cat} on the {side}", f"the {side} {cat}"]
                big, small = max(t.area, o.area), max(min(t.area, o.area), 1e-9)
                if big / small >= size_ratio:
                    larger = t.area > o.area
                    ph += [f"the {'larger' if larger else 'smaller'} of the two {pl}"]
                    ph += [f"the {'bigger' if larger else 'smaller'} {cat}"]
                if abs(t.cy - o.cy) >= pos_margin:
                    ph += [f"the {cat} at the {'top' if t.cy < o.cy else 'bottom'}"]
            else:
                group = [t, *others]
                xs = sorted(group, key=lambda s: s.cx)
                r = next(k for k, s in enumerate(xs) if s is t)
                gaps = [abs(t.cx - xs[k].cx) for k in (r - 1, r + 1) if 0 <= k < len(xs)]
                if min(gaps) >= pos_margin / 2:
                    if r == 0:
                        ph += [f"the leftmost {cat}", f"the first {cat} from the left"]
                    elif r == len(xs) - 1:
                        ph += [f"the rightmost {cat}", f"the first {cat} from the right"]
                    else:
                        k, side = (r, "left") if r <= len(xs) - 1 - r else (len(xs) - 1 - r, "right")
                        if k < len(ORDINALS):
                            ph += [f"the {ORDINALS[k]} {cat} from the {side}"]
                areas = sorted((s.area for s in group), reverse=True)
                if t.area == areas[0] and t.area >= size_ratio * max(areas[1], 1e-9):
                    ph += [f"the largest {cat}", f"the biggest {cat}"]
                elif t.area == areas[-1] and areas[-2] >= size_ratio * max(t.area, 1e-9):
                    ph += [f"the smallest {cat}"]
                ys = sorted(group, key=lambda s: s.cy)
                if ys[0] is t and ys[1].cy - t.cy >= pos_margin / 2:
                    ph += [f"the {cat} at the top"]
                elif ys[-1] is t and t.cy - ys[-2].cy >= pos_margin / 2:
                    ph += [f"the {cat} at the bottom"]
            if ph:
                out.append((i, ph))
    return out


def read_coco128_seg(
    root: str | Path, min_area: float = 0.01, names: tuple[str, ...] = COCO80
) -> tuple[list[RefSample], dict[str, Any]]:
    """coco128-seg (YOLO-seg polygons, COCO-80 ids) with phrases from :func:`generate_phrases`.

    Returns:
        (samples, stats): stats count images, images without instances, instances, targets and dropped polygons;
        ``stats["phrases"] == "generated"`` tells the task the phrases describe the whole, uncropped image.
    """
    root = Path(root)
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise DatasetError(f"{root} is not a YOLO-seg dataset: {img_dir} is missing")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    stats = _PolyStats()
    out: list[RefSample] = []
    counts = {"images": len(images), "images_without_instances": 0, "instances": 0, "targets": 0, "bad_lines": 0}
    for img in images:
        lab = lab_dir / f"{img.stem}.txt"
        insts: list[Instance] = []
        for line in lab.read_text().splitlines() if lab.is_file() else []:
            parts = line.split()
            if not parts:
                continue
            try:
                cid = int(float(parts[0]))
                coords = [float(v) for v in parts[1:]]
            except ValueError:
                counts["bad_lines"] += 1
                continue
            if not 0 <= cid < len(names):
                counts["bad_lines"] += 1
                continue
            poly = clean_polygon(coords, stats, True)
            if poly is None:
                continue
            insts.append(_instance(names[cid], [poly]))
        counts["instances"] += len(insts)
        if not insts:
            counts["images_without_instances"] += 1
            continue
        for i, phrases in generate_phrases(insts, min_area=min_area):
            out.append(
                RefSample(
                    image=str(img),
                    phrases=phrases,
                    polygons=insts[i].polygons,
                    normalized=True,
                    ref_id=f"{img.stem}:{i}",
                    image_id=img.stem,
                )
            )
    counts["targets"] = len(out)
    counts["phrases"] = "generated"  # from the whole image: crop augmentations can make them false (the task warns)
    counts["dropped_polygons"], counts["clipped_polygons"] = stats.few_points, stats.clipped
    stats.report(str(root))
    if counts["images_without_instances"]:
        log.info("%s: %d image(s) have no instances (no samples)", root, counts["images_without_instances"])
    return out, counts


def _is_coco128_seg(root: Path) -> dict[str, Any] | None:
    if (root / "refs.json").is_file():  # the folder format wins when both are present
        return None
    return {} if (root / "images").is_dir() and (root / "labels").is_dir() else None


@register_refer_format(
    "coco128_seg", "coco128_seg_refer", "coco128-seg (YOLO-seg) with generated referring phrases", _is_coco128_seg
)
def coco128_seg_refer(root: str | Path, min_area: float = 0.01, **_: Any) -> tuple[list[RefSample], dict[str, Any]]:
    """coco128-seg with phrases generated from its annotations; options of other formats are ignored."""
    return read_coco128_seg(root, min_area)
