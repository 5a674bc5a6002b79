"""Referring-segmentation metrics, always together: mIoU (mean per-sample IoU), oIoU (ΣI / ΣU) and Prec@0.5…0.9,
computed at the original image resolution; and the torch-vs-exported-graph agreement on a split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vision_peft.runtimes.refseg import mask_from_logits

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def seg_metrics(inter: np.ndarray, union: np.ndarray) -> dict[str, float]:
    """mIoU, oIoU and Prec@0.5…0.9 from per-sample intersections and unions (pixels)."""
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # both empty = perfect
    out = {"mIoU": float(iou.mean()) if iou.size else 0.0, "oIoU": float(inter.sum() / max(union.sum(), 1.0))}
    for t in PREC_THRESHOLDS:
        out[f"Prec@{t}"] = float((iou >= t).mean()) if iou.size else 0.0
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
