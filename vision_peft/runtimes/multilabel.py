"""Multi-label runtime (numpy only): images -> one sigmoid probability per category -> the categories present.

Preprocessing as the manifest says, the ``model`` graph (image -> ``logits``), a sigmoid per category and the
decision ``prob >= threshold`` with the threshold the training run chose on its val split
(``manifest["task_info"]["threshold"]``). The torch half (:mod:`vision_peft.tasks.multilabel`) uses the same
decision and prediction record, so training-time metrics, ``predict`` and a deployed bundle decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft.bundle import MANIFEST
from vision_peft.preprocess import ImageInput
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import RankedRuntime, image_logits, ranked_record, ranked_result, sigmoid

__all__ = ["MultiLabelRuntime", "multilabel_record", "present", "present_labels", "sigmoid"]


def present(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The decision rule: a category is present when its probability is at or above ``threshold``."""
    return np.asarray(probs) >= float(threshold)


def present_labels(probs: Sequence[float] | np.ndarray, labels: Sequence[str], threshold: float) -> list[str]:
    """The categories at or above ``threshold``, most likely first (ties keep label order); possibly empty."""
    p = np.asarray(probs, np.float64)
    on = present(p, threshold)
    return [labels[i] for i in sorted(range(len(p)), key=lambda i: -float(p[i])) if on[i]]


def multilabel_record(
    file: str | Path, probs: Sequence[float] | np.ndarray, labels: Sequence[str], threshold: float, top_k: int
) -> dict[str, Any]:
    """One prediction: the ranked record (``file``, ``label``, ``prob``, ``top``) plus ``labels`` (every category
    at or above ``threshold``, most likely first; possibly empty) and the ``threshold`` used."""
    return {
        **ranked_record(file, probs, labels, top_k),
        "labels": present_labels(probs, labels, threshold),
        "threshold": float(threshold),
    }


@RUNTIMES.register("multilabel", help="images -> the categories present (one sigmoid per category)")
class MultiLabelRuntime(RankedRuntime):
    """Multi-label bundles: one graph (``model``) image -> ``logits`` (one per category in ``labels``), the decision
    threshold in ``task_info``. CLI, endpoint and load test are the ranked runtimes' (``--top-k``, ``top_k``)."""

    task = "multilabel"
    endpoint = "/v1/multilabel"
    panel = "ranked_images"
    methods = ("multilabel",)
    cli_inputs = "images"
    load_test_inputs = ".jpg images"

    @classmethod
    def check_manifest(cls, path: Path, manifest: dict[str, Any]) -> None:
        super().check_manifest(path, manifest)
        thr = (manifest.get("task_info") or {}).get("threshold")
        if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0.0 <= thr <= 1.0:
            raise ValueError(
                f"{Path(path) / MANIFEST}: a multilabel bundle needs task_info.threshold, a number in [0, 1] "
                f"(got {thr!r}); re-export the run"
            )

    @property
    def threshold(self) -> float:
        """The decision threshold chosen on the run's val split."""
        return float(self.bundle.task_info["threshold"])

    def multilabel(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[dict[str, Any]]:
        """The categories present in raw images (preprocessing as the manifest says, the graph, sigmoid, threshold).

        Args:
            images: Paths, PIL images or HWC uint8 RGB arrays.
            batch_size: Images per onnxruntime call (a graph exported with a fixed batch size uses that instead).

        Returns:
            One dict per image: ``labels`` (categories at or above ``threshold``, most likely first), ``threshold``,
            ``label`` / ``index`` / ``prob`` (the most likely category) and ``probs`` (label -> probability).

        Raises:
            ValueError: The input is not a list, or the graph's width differs from the manifest's labels.
        """
        labels, thr = self.bundle.labels, self.threshold
        out = []
        for logits in image_logits(self.bundle, images, batch_size, "multilabel"):  # (B, categories) each
            for row in sigmoid(logits.astype(np.float64)):  # (categories,) probabilities of one image
                out.append({**ranked_result(labels, row), "labels": present_labels(row, labels, thr), "threshold": thr})
        return out

    def record(self, file: str | Path, result: dict[str, Any], top_k: int) -> dict[str, Any]:
        """:func:`multilabel_record` of one :meth:`multilabel` result (the record ``predict`` prints too)."""
        labels = self.bundle.labels
        return multilabel_record(file, [result["probs"][c] for c in labels], labels, result["threshold"], top_k)
