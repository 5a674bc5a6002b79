"""Referring-segmentation metrics, always together: mIoU, oIoU and Prec@0.5…0.9, computed at the original image
resolution; their image-level (paired) bootstrap; and the torch-vs-exported-graph agreement on a split.

How sentences are aggregated (as the official DETRIS ``engine.inference`` / its CRIS-LAVT lineage do — read in
``jiaqihuang01/DETRIS`` ``engine/engine.py`` and ``yz93/LAVT-RIS`` ``test.py``): every sentence of every referred
object is one sample. Per sentence, IoU = I / U with I, U the pixel counts of prediction ∧ target and
prediction ∨ target at the image's own size (0 when both are empty: DETRIS divides by U + 1e-6, LAVT sets 0).

- **mIoU**: the mean of the per-sentence IoUs (DETRIS prints it as "Mean IoU"; its tables' "mIoU");
- **oIoU** (overall IoU): ΣI / ΣU over all sentences (LAVT's ``cum_I / cum_U``; DETRIS's released
  ``inference`` does not print it);
- **Prec@t**: the fraction of sentences with IoU **> t**, t = 0.5, 0.6, 0.7, 0.8, 0.9 (DETRIS compares
  ``iou_list > thres``; LAVT uses ``>=`` — the two differ only on ties).

Uncertainty: sentences of one image are not independent (same picture, often the same object), so the bootstrap
resamples **test images** with replacement and keeps all of an image's sentences together
(:func:`bootstrap_metrics`); two models evaluated on the same sentences are compared with the paired version
(:func:`paired_bootstrap`: the same resampled images for both, the interval of the difference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vision_peft.runtimes.refseg import mask_from_logits

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def sentence_ious(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-sentence IoU = I / U (0 where U = 0, i.e. prediction and target both empty, as the official code)."""
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)


def seg_metrics(inter: np.ndarray, union: np.ndarray) -> dict[str, float]:
    """mIoU, oIoU and Prec@0.5…0.9 from per-sentence intersections and unions (pixels; one entry per sentence)."""
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    iou = sentence_ious(inter, union)
    out = {"mIoU": float(iou.mean()) if iou.size else 0.0, "oIoU": float(inter.sum() / max(union.sum(), 1.0))}
    for t in PREC_THRESHOLDS:
        out[f"Prec@{t}"] = float((iou > t).mean()) if iou.size else 0.0
    return out


METRIC_NAMES = ("mIoU", "oIoU", *(f"Prec@{t}" for t in PREC_THRESHOLDS))


def _image_sums(groups: np.ndarray, inter: np.ndarray, union: np.ndarray, order: np.ndarray) -> np.ndarray:
    """(G, 3 + len(PREC_THRESHOLDS)) per-image sums: sentences, ΣIoU, ΣI, ΣU, then Σ[IoU > t] per threshold;
    rows in the order of ``order`` (the image ids)."""
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    iou = sentence_ious(inter, union)
    pos = {g: k for k, g in enumerate(order.tolist())}
    idx = np.array([pos[g] for g in np.asarray(groups).tolist()], dtype=np.int64)
    cols = [np.ones_like(iou), iou, inter, union, *((iou > t).astype(np.float64) for t in PREC_THRESHOLDS)]
    sums = np.zeros((len(order), len(cols)))
    for c, v in enumerate(cols):
        sums[:, c] = np.bincount(idx, weights=v, minlength=len(order))
    return sums


def _metrics_from_sums(s: np.ndarray) -> dict[str, np.ndarray]:
    """Metric values from (..., columns) summed per-image statistics (see :func:`_image_sums`)."""
    n = np.maximum(s[..., 0], 1e-12)
    out = {"mIoU": s[..., 1] / n, "oIoU": s[..., 2] / np.maximum(s[..., 3], 1.0)}
    for k, t in enumerate(PREC_THRESHOLDS):
        out[f"Prec@{t}"] = s[..., 4 + k] / n
    return out


def _resample_weights(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_images) multiplicities of each test image in each bootstrap resample (drawn with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n_boot, n_images))  # (B, G) image indices
    return np.stack([np.bincount(d, minlength=n_images) for d in draws]).astype(np.float64)


def _interval(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_metrics(
    groups, inter, union, n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, float | list[float]]]:
    """Every metric with a 95 % percentile interval from an image-level bootstrap.

    Args:
        groups: per sentence, the id of its image (the resampling unit: an image's sentences stay together).
        inter: per sentence, the intersection (pixels).
        union: per sentence, the union (pixels).
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``{metric: {"value": point estimate on the full split, "ci95": [lo, hi]}}`` plus ``n_sentences``,
        ``n_images``.
    """
    order = np.array(sorted(set(np.asarray(groups).tolist())), dtype=object)
    sums = _image_sums(np.asarray(groups), inter, union, order)
    point = seg_metrics(inter, union)
    boot = _metrics_from_sums(_resample_weights(len(order), n_boot, seed) @ sums)
    out: dict[str, Any] = {m: {"value": point[m], "ci95": _interval(boot[m])} for m in METRIC_NAMES}
    out.update({"n_sentences": int(len(np.asarray(inter))), "n_images": len(order), "n_boot": n_boot})
    return out


def paired_bootstrap(
    groups, inter_a, union_a, inter_b, union_b, n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, float | list[float]]]:
    """The difference a − b of every metric between two models on the **same sentences** (aligned arrays), with
    a 95 % interval from resampling images (the same resampled images for both) and the share of resamples
    where a is not better than b.

    Returns:
        ``{metric: {"diff": a − b on the full split, "ci95": [lo, hi], "p_le_0": share of resamples with a − b
        <= 0}}`` plus ``n_sentences``, ``n_images``.
    """
    groups = np.asarray(groups)
    if not (len(groups) == len(inter_a) == len(union_a) == len(inter_b) == len(union_b)):
        raise ValueError("paired_bootstrap needs both models' intersections/unions on the same, aligned sentences")
    order = np.array(sorted(set(groups.tolist())), dtype=object)
    w = _resample_weights(len(order), n_boot, seed)
    ba = _metrics_from_sums(w @ _image_sums(groups, inter_a, union_a, order))
    bb = _metrics_from_sums(w @ _image_sums(groups, inter_b, union_b, order))
    pa, pb = seg_metrics(inter_a, union_a), seg_metrics(inter_b, union_b)
    out: dict[str, Any] = {}
    for m in METRIC_NAMES:
        d = ba[m] - bb[m]
        out[m] = {"diff": pa[m] - pb[m], "ci95": _interval(d), "p_le_0": float((d <= 0).mean())}
    out.update({"n_sentences": int(len(groups)), "n_images": len(order), "n_boot": n_boot})
    return out


def onnx_agreement(
    model: torch.nn.Module,
    ds,
    run_fn: Callable[[dict[str, np.ndarray]], np.ndarray],
    threshold: float,
    max_samples: int = 64,
) -> dict[str, Any]:
    """A split through torch and an exported graph: logit max |Δ|, torch-vs-onnx mask IoU, both metric sets.

    Args:
        model: the refseg model (``logits(image, input_ids, attention_mask)``), put in eval mode here.
        ds: a :class:`~vision_peft.data.refer_dataset.RefSegDataset` (its ``target(i)`` is the full-size mask).
        run_fn: the exported graph: inputs by name -> mask logits (B, 1, h, w).
        threshold: the mask probability threshold.
        max_samples: at most this many samples, from the start of ``ds``.
    """
    model.eval()
    in_hw = tuple(ds.spec["size"])
    diffs, agree, it_t, un_t, it_o, un_o = [], [], [], [], [], []
    for i in range(min(len(ds), max_samples)):
        item = ds[i]
        x = {k: item[k][None] for k in ("image", "input_ids", "attention_mask")}
        with torch.no_grad():
            ref = model.logits(**x).float().numpy()[0, 0]
        got = run_fn({k: v.numpy() for k, v in x.items()})[0, 0]
        diffs.append(float(np.abs(ref - got).max()))
        gt = ds.target(i)
        mt = mask_from_logits(ref, gt.shape, in_hw, threshold)
        mo = mask_from_logits(got, gt.shape, in_hw, threshold)
        u = int((mt | mo).sum())
        agree.append(1.0 if u == 0 else int((mt & mo).sum()) / u)
        it_t.append(int((mt & gt).sum()))
        un_t.append(int((mt | gt).sum()))
        it_o.append(int((mo & gt).sum()))
        un_o.append(int((mo | gt).sum()))
    return {
        "n": len(diffs),
        "logits_max_abs_diff": max(diffs),
        "mask_iou_torch_vs_onnx_mean": float(np.mean(agree)),
        "mask_iou_torch_vs_onnx_min": float(np.min(agree)),
        "torch": seg_metrics(np.array(it_t), np.array(un_t)),
        "onnx": seg_metrics(np.array(it_o), np.array(un_o)),
    }


def sentence_results(
    model: torch.nn.Module, loader, device: torch.device, threshold: float, amp_dtype=None
) -> dict[str, Any]:
    """Every item (sentence) of ``loader``'s dataset through the model: per sentence its intersection and
    union with the target at the image's own size, plus its image, object, phrase and annotation split.

    Returns:
        ``{"inter", "union"}`` int arrays, ``{"image", "ref_id", "phrase", "split"}`` lists (one entry per
        sentence, in dataset order) and ``"loss"`` (mean BCE over sentences).
    """
    model.eval()
    ds = loader.dataset
    in_hw = tuple(ds.spec["size"])
    rec: dict[str, list] = {k: [] for k in ("inter", "union", "image", "ref_id", "phrase", "split")}
    loss_sum = 0.0
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(batch)
        loss_sum += float(out["loss"]) * len(batch["index"])
        logits = out["output"].float().cpu().numpy()[:, 0]  # (B, h, w)
        for lg, idx in zip(logits, batch["index"].cpu().tolist()):
            gt = ds.target(idx)
            pred = mask_from_logits(lg, gt.shape, in_hw, threshold)
            s = ds.samples[ds.sample_index(idx)]
            rec["inter"].append(int((pred & gt).sum()))
            rec["union"].append(int((pred | gt).sum()))
            rec["image"].append(ds.image_id(idx))
            rec["ref_id"].append(s.ref_id)
            rec["phrase"].append(ds.phrase(idx))
            rec["split"].append(s.split or "")
    n = len(rec["inter"])
    return {
        **rec,
        "inter": np.asarray(rec["inter"], np.int64),
        "union": np.asarray(rec["union"], np.int64),
        "loss": loss_sum / max(n, 1),
    }


def sentence_metrics(r: dict[str, Any]) -> dict[str, Any]:
    """mIoU, oIoU, Prec@0.5…0.9 over the sentences of :func:`sentence_results` (``n`` sentences of ``n_objects`` objects in
    ``n_images`` images); with several annotation splits in one set (test = testA ∪ testB) each one's metrics
    too, under ``by_split``."""
    res: dict[str, Any] = seg_metrics(r["inter"], r["union"])
    res.update(
        {
            "loss": r["loss"],
            "n": len(r["inter"]),
            "n_objects": len({(i, o) for i, o in zip(r["image"], r["ref_id"])}),
            "n_images": len(set(r["image"])),
        }
    )
    parts = sorted(set(r["split"]))
    if len(parts) > 1:
        split = np.asarray(r["split"])
        res["by_split"] = {
            p: {**seg_metrics(r["inter"][split == p], r["union"][split == p]), "n": int((split == p).sum())}
            for p in parts
        }
    return res
