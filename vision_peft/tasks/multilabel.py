"""Multi-label image classification: which object categories appear in an image.

Frozen backbone (+ adapter) → pooled features → linear head with one logit per category; sigmoid + binary
cross-entropy over every (image, category) pair. The head bias starts at ``logit(init_prior)`` (the prior
initialisation of Lin et al., "Focal Loss for Dense Object Detection", https://arxiv.org/abs/1708.02002), so the
first steps do not spend themselves pushing ~40 mostly-absent categories down from p = 0.5.

Data: coco128-seg (YOLO-seg ``labels/<id>.txt``, COCO-80 ids). An image's labels are the categories with at least
one instance line (a class id in 0–79 and at least three polygon points); an image without a label file is a
negative for every category. The category list (logit order) is the configured one, or every COCO-80 category
present in at least ``min_images`` images, in COCO order. The split is image-level and seeded (test drawn first).

Metrics (numpy, below): per-category average precision (AP: the mean, over the category's positives, of the
precision at that positive's rank; tied scores share the precision at the end of their tie group, so AP does not
depend on input order) and their mean (mAP) over the categories with at least one positive in the split; micro
and macro F1 at one decision threshold. Evaluating the ``val`` split selects the threshold that maximises micro-F1
on val (an exact search over the observed probabilities) and stores it in the model's ``threshold`` buffer, so it
is saved with the adapter, used on the test split and by ``predict``, and exported into the bundle's
``task_info``. The numpy rules (sigmoid, the ``prob >= threshold`` decision, the prediction record) live in
:mod:`vision_peft.runtimes.multilabel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.config import ConfigError, check_choices
from vision_peft.data.coco128_refer import COCO80
from vision_peft.data.folder import DatasetError, ImageClassificationDataset, check_image
from vision_peft.data.refer import split_by_image
from vision_peft.paths import resolve_data_path
from vision_peft.preprocess import IMAGE_SUFFIXES
from vision_peft.runtimes import multilabel as rt
from vision_peft.tasks import TASKS
from vision_peft.tasks.base import ExportSpec, ImageGraph, LinearHeadModel, Task, TaskModel, check_split

log = logging.getLogger("vision_peft")

AugmentPreset = Literal["none", "light", "standard", "aerial"]
ResizeMode = Literal["squash", "letterbox", "shorter_then_center_crop"]


@dataclass
class MultiLabelConfig:
    """Multi-label image classification on YOLO-seg annotations (coco128-seg)."""

    name: str = "multilabel"  # registry name
    data_root: str = "coco128-seg"  # YOLO-seg folder with images/ and labels/ (relative paths: under $VISION_PEFT_DATA)
    classes: list[str] | None = None  # COCO-80 category names in logit order; None = those in >= min_images images
    min_images: int = 3  # with classes=None: keep the categories present in at least this many images
    split: dict[str, int] = field(
        default_factory=lambda: {"train": 50, "val": 20, "test": 30}
    )  # images per split (image-level); -1 = the rest
    split_seed: int = 0  # seed of the image-level split
    augment: AugmentPreset = "light"  # training augmentation (vision_peft.augment); light = flip + mild crop
    resize: ResizeMode = "squash"  # eval-time resize; squash keeps every object in view
    head_dropout: float = 0.0  # dropout before the linear head
    init_prior: float = 0.05  # the head bias starts at logit(init_prior)

    def __post_init__(self) -> None:
        check_choices(self, "task")
        check_split(self.split)
        if self.min_images < 1:
            raise ConfigError(f"task.min_images must be >= 1, got {self.min_images}")
        if not 0.0 < self.init_prior < 1.0:
            raise ConfigError(f"task.init_prior must lie in (0, 1), got {self.init_prior}")
        if self.classes is not None:
            bad = [c for c in self.classes if c not in COCO80]
            if bad or len(set(self.classes)) != len(self.classes) or not self.classes:
                raise ConfigError(
                    f"task.classes must be distinct COCO-80 names; unknown {bad}; known: {', '.join(COCO80)}"
                )


# -- metrics (numpy) -----------------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> float:
    """AP of one category: mean over its positives of the precision at the positive's rank (scores descending).

    Items with equal scores form one tie group and every positive in it gets the precision at the group's end
    (the same value as the area under the step precision–recall curve, so the input order never matters).
    With ``weights`` every item counts ``weights[i]`` times (precision = weighted positives / weighted items
    ranked at or above; the mean over positives is weighted alike): the Bayesian bootstrap's resampling.

    Args:
        scores: (N,) scores, higher = more likely present.
        targets: (N,) 0/1 ground truth.
        weights: (N,) positive item weights; None = 1 each.

    Returns:
        AP in [0, 1]; NaN when the category has no positive.
    """
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets).astype(bool)
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("average_precision: scores must be finite")
    if not targets.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t, w = scores[order], targets[order], w[order]
    tp, seen = np.cumsum(w * t), np.cumsum(w)  # (weighted) positives / items among the first k+1
    new_group = s[1:] != s[:-1]
    end = np.flatnonzero(np.r_[new_group, True])[np.r_[0, np.cumsum(new_group)]]  # each item's tie-group end
    precision = tp[end] / seen[end]
    return float(np.sum(w[t] * precision[t]) / np.sum(w[t]))


def per_class_ap(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(C,) AP per category of (N, C) scores and 0/1 targets (optional (N,) image weights); NaN without positives."""
    return np.array([average_precision(scores[:, c], targets[:, c], weights) for c in range(scores.shape[1])])


def mean_ap(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> float:
    """mAP over the categories with at least one positive (NaN when there is none)."""
    ap = per_class_ap(scores, targets, weights)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def f1_scores(probs: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    """Micro and macro F1 (plus micro precision / recall) of the decision ``prob >= threshold``.

    Micro pools every (image, category) pair; macro averages per-category F1 = 2TP / (2TP + FP + FN) over the
    categories with at least one positive. A zero denominator counts as F1 = 0 (micro: no positive and no
    prediction at all gives 0 as well, since there is nothing to find).
    """
    pred = rt.present(probs, threshold)
    y = np.asarray(targets).astype(bool)
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)  # (C,) each
    den = 2 * tp + fp + fn
    per_class = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
    has_pos = y.any(0)
    TP, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
    return {
        "micro_f1": 2 * TP / (2 * TP + FP + FN) if TP + FP + FN else 0.0,
        "macro_f1": float(per_class[has_pos].mean()) if has_pos.any() else float("nan"),
        "precision": TP / (TP + FP) if TP + FP else 0.0,
        "recall": TP / (TP + FN) if TP + FN else 0.0,
    }


def choose_threshold(probs: np.ndarray, targets: np.ndarray) -> float:
    """The decision threshold with the highest micro-F1 on (probs, targets), searched exactly.

    Micro-F1 only changes where the threshold crosses an observed probability, so every distinct decision is tried:
    predicting the ``k`` most likely (image, category) pairs gives F1 = 2·TP_k / (k + P) (P = all positives). The
    threshold is placed halfway between the last predicted and the next lower distinct probability (half the
    lowest one when everything is predicted); ties in F1 go to the lowest threshold. Without any positive every
    threshold scores 0 and 0.5 is returned.
    """
    p, y = np.asarray(probs, np.float64).ravel(), np.asarray(targets).astype(bool).ravel()
    if not y.any():
        return 0.5
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    ends = np.flatnonzero(np.r_[p[1:] != p[:-1], True])  # last index of each group of equal probabilities
    tp = np.cumsum(y)[ends]
    f1 = 2 * tp / (ends + 1 + y.sum())
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last (= lowest-threshold) maximum
    below = p[ends[best] + 1] if best + 1 < len(ends) else 0.0
    return float((p[ends[best]] + below) / 2)


# -- data ----------------------------------------------------------------------------------------------------------
@dataclass
class LabelledImage:
    """One image and the indices (into COCO80) of the categories present in it."""

    image: str  # image file
    categories: tuple[int, ...]  # COCO-80 ids present, sorted
    image_id: str  # file stem (the split is image-level)


def read_yolo_image_labels(root: str | Path) -> list[LabelledImage]:
    """Every image of a YOLO-seg folder with the COCO-80 categories it contains.

    Raises:
        DatasetError: ``root/images`` is missing or holds no image; an image does not decode (named).
    """
    root = Path(root)
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise DatasetError(f"{root} is not a YOLO-seg dataset: {img_dir} is missing (expected images/ and labels/)")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{img_dir} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    out, bad_lines = [], 0
    for i, img in enumerate(images):
        reason = check_image(img)
        if reason is not None:
            raise DatasetError(f"image {i} of {root.name} ({img.name}) is unreadable: {reason}; remove or replace it")
        lab = lab_dir / f"{img.stem}.txt"
        cats: set[int] = set()
        for line in lab.read_text().splitlines() if lab.is_file() else []:
            parts = line.split()
            if not parts:
                continue
            try:
                cid, n_coords = int(float(parts[0])), len(parts) - 1
            except ValueError:
                bad_lines += 1
                continue
            if 0 <= cid < len(COCO80) and n_coords >= 6:  # a polygon needs three (x, y) points
                cats.add(cid)
            else:
                bad_lines += 1
        out.append(LabelledImage(str(img), tuple(sorted(cats)), img.stem))
    if bad_lines:
        log.warning("%s: %d label line(s) without a valid class id and polygon were ignored", root, bad_lines)
    return out


class MultiLabelDataset(ImageClassificationDataset):
    """(image (3, H, W), label (C,) 0/1) pairs of one named split (``evaluate`` reads the name)."""

    def __init__(self, samples: list[tuple[str, list[int]]], spec: dict, split: str, augment=None, seed: int = 0):
        super().__init__(samples, spec, augment=augment, seed=seed)
        self.split = split


# -- model ---------------------------------------------------------------------------------------------------------
class MultiLabelModel(LinearHeadModel):
    """backbone → pooled features → dropout → linear head (one logit per category, bias logit(init_prior));
    binary cross-entropy; keeps the decision threshold."""

    def __init__(self, backbone: nn.Module, adapter, num_classes: int, dropout: float, init_prior: float) -> None:
        super().__init__(backbone, adapter, num_classes, dropout, bias=float(np.log(init_prior / (1.0 - init_prior))))
        # the decision threshold: chosen on val by evaluate(), saved with the adapter, exported in task_info
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, label.float())


@TASKS.register(
    "multilabel",
    config_cls=MultiLabelConfig,
    help="multi-label image classification (sigmoid + BCE, mAP), COCO categories of coco128-seg",
    spec={"classes": ["person", "car", "dog"], "augment": "none"},  # tiny offline config for the contract tests
    requires=("image",), provides=("pooled",),
)
class MultiLabelTask(Task):
    """Which categories appear in an image: one sigmoid per category, a threshold chosen on val."""

    name = "multilabel"
    runtime = "multilabel"
    upload_suffixes = (*IMAGE_SUFFIXES, ".txt")  # YOLO-seg: images/ + labels/<image stem>.txt
    preview = "none"
    has_classes = True
    predict_options = ("top_k",)
    # the batch key that reaches the model only through backbone.forward_features (LinearHeadModel.logits), so a
    # frozen prefix of the backbone can be computed once per image (vision_peft.prefix_cache)
    prefix_input = "image"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._images: list[LabelledImage] | None = None

    # -- data -------------------------------------------------------------------------------------------
    def images(self) -> list[LabelledImage]:
        """Every image of the dataset with its categories (read once)."""
        if self._images is None:
            self._images = read_yolo_image_labels(resolve_data_path(self.cfg.task.data_root))
        return self._images

    def recipe_classes(self) -> list[str] | None:
        return list(self.cfg.task.classes) if self.cfg.task.classes is not None else None

    def discover_classes(self) -> list[str]:
        """The recipe's categories, or every COCO-80 category present in ``min_images``+ images (COCO order)."""
        t = self.cfg.task
        if t.classes is not None:
            return list(t.classes)
        counts = np.zeros(len(COCO80), np.int64)
        for im in self.images():
            counts[list(im.categories)] += 1
        found = [COCO80[c] for c in range(len(COCO80)) if counts[c] >= t.min_images]
        if not found:
            raise DatasetError(
                f"{t.data_root}: no category is present in {t.min_images}+ images; lower task.min_images"
            )
        return found

    def splits(self) -> dict[str, list[tuple[str, list[int]]]]:
        """Split name → (image file, multi-hot label in ``classes`` order), images sorted by id."""
        index = {COCO80.index(c): k for k, c in enumerate(self.classes)}
        parts = split_by_image(self.images(), dict(self.cfg.task.split), self.cfg.task.split_seed)
        out = {}
        for name, items in parts.items():
            rows = []
            for im in sorted(items, key=lambda s: s.image_id):
                y = [0] * len(self.classes)
                for c in im.categories:
                    if c in index:
                        y[index[c]] = 1
                rows.append((im.image, y))
            out[name] = rows
        return out

    def datasets(self, model: TaskModel) -> dict[str, torch.utils.data.Dataset]:
        spec = self.image_spec(model)
        aug = self.train_augment(spec)
        return {
            split: MultiLabelDataset(samples, spec, split, aug if split == "train" else None, self.cfg.train.seed)
            for split, samples in self.splits().items()
            if samples
        }

    # -- model ------------------------------------------------------------------------------------------
    def build_model(self) -> MultiLabelModel:
        t = self.cfg.task
        return self.build_head_model(
            lambda backbone, handle: MultiLabelModel(backbone, handle, len(self.classes), t.head_dropout, t.init_prior)
        )

    # -- metrics ----------------------------------------------------------------------------------------
    def metrics(self, probs: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, Any]:
        """mAP, per-category AP (categories with positives) and F1 at ``threshold`` of (N, C) probabilities."""
        ap = per_class_ap(probs, targets)
        has_pos = np.isfinite(ap)
        return {
            "map": float(ap[has_pos].mean()) if has_pos.any() else float("nan"),
            **f1_scores(probs, targets, threshold),
            "threshold": float(threshold),
            "n": int(len(targets)),
            "classes_evaluated": int(has_pos.sum()),
            "per_class_ap": {c: float(ap[k]) for k, c in enumerate(self.classes) if has_pos[k]},
        }

    @torch.no_grad()
    def evaluate(self, model: TaskModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        """Metrics of a loader; on the ``val`` split this first re-selects and stores the decision threshold."""
        model.eval()
        probs, targets, loss_sum = [], [], 0.0
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(batch)
            loss_sum += float(out["loss"]) * len(batch["label"])
            probs.append(torch.sigmoid(out["output"].float()).cpu().numpy())
            targets.append(batch["label"].cpu().numpy())
        p, y = np.concatenate(probs), np.concatenate(targets)
        if getattr(loader.dataset, "split", None) == "val":
            model.threshold.fill_(choose_threshold(p, y))
        return {**self.metrics(p, y, float(model.threshold)), "loss": loss_sum / len(y)}

    @torch.no_grad()
    def predict(
        self, model: TaskModel, inputs: list[str], device: torch.device, top_k: int = 5
    ) -> list[dict[str, Any]]:
        """Per image: the categories at or above the run's threshold, and the top-k categories by probability."""
        from vision_peft.preprocess import load_image, preprocess_image

        model.eval()
        spec = self.image_spec(model)
        out = []
        for path in inputs:
            x = torch.from_numpy(preprocess_image(load_image(path), spec))[None].to(device)  # (1, 3, H, W)
            probs = torch.sigmoid(model.logits(x).float())[0].cpu().numpy()
            out.append(rt.multilabel_record(path, probs, self.classes, float(model.threshold), top_k))
        return out

    def evaluate_onnx(self, run_fn, model: TaskModel) -> dict[str, Any] | None:
        """Metrics of an exported graph on the test split (``predictions``: the 0/1 decisions, flattened)."""
        ds = self.datasets(model).get("test")
        if ds is None:
            return None
        logits, targets = [], []
        for start in range(0, len(ds), 32):
            items = [ds[i] for i in range(start, min(start + 32, len(ds)))]
            logits.append(run_fn({"image": np.stack([it["image"].numpy() for it in items])}))
            targets.append(np.stack([it["label"].numpy() for it in items]))
        probs, y, thr = rt.sigmoid(np.concatenate(logits)), np.concatenate(targets), float(model.threshold)
        res = self.metrics(probs, y, thr)
        res.pop("per_class_ap")
        res["predictions"] = rt.present(probs, thr).astype(int).ravel().tolist()
        return res

    # -- export / tests ---------------------------------------------------------------------------------
    def export_spec(self, model: TaskModel) -> ExportSpec:
        h, w = model.backbone.input_size
        return ExportSpec(
            module=ImageGraph(model, "logits", inference_only=True),
            example_inputs={"image": torch.randn(2, 3, h, w)},
            output_names=["logits"],
            outputs_meaning={
                "logits": "per-category logits in labels order; sigmoid for probabilities, present if prob >= "
                "task_info.threshold"
            },
            preprocess={"image": self.image_spec(model)},
            labels=list(self.classes),
            task_info={"activation": "sigmoid", "threshold": float(model.threshold), "decision": "prob >= threshold"},
        )

    def synthetic_batch(self, model: TaskModel, n: int = 2) -> dict[str, torch.Tensor]:
        h, w = model.backbone.input_size
        return {"image": torch.randn(n, 3, h, w), "label": torch.randint(0, 2, (n, len(self.classes)))}
