"""Multi-label runtime (numpy only): images -> one sigmoid probability per category -> the categories present.

Preprocessing as the manifest says, the ``model`` graph (image -> ``logits``), a sigmoid per category and the
decision ``prob >= threshold`` with the threshold the training run chose on its val split
(``manifest["task_info"]["threshold"]``). The torch half (:mod:`vision_peft.tasks.multilabel`) uses the same
decision and prediction record, so training-time metrics, ``predict`` and a deployed bundle decide alike.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft.bundle import MANIFEST
from vision_peft.preprocess import ImageInput, preprocess_batch
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import (
    HttpField,
    HttpRequest,
    LoadTestOptions,
    LoadTestRequests,
    Runtime,
    check_list,
    checked_top_k,
    image_spec,
    logits_graph,
    ranked_record,
    ranked_result,
    read_upload_files,
    sigmoid,
)
from vision_peft.runtimes.classification import TOP_K, UploadRequests

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
class MultiLabelRuntime(Runtime):
    """Multi-label bundles: one graph (``model``) image -> ``logits`` (one per category in ``labels``), the decision
    threshold in ``task_info``."""

    task = "multilabel"
    endpoint = "/v1/multilabel"
    panel = "ranked_images"
    methods = ("multilabel",)
    needs_labels = True
    cli_inputs = "images"
    cli_args = (TOP_K,)
    http_fields = (HttpField("files", "files"), HttpField("top_k", "query", type=int))
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
        check_list(images, "multilabel")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        b = self.bundle
        labels, thr = b.labels, self.threshold
        graph, input_name, output_name = logits_graph(b)
        spec = image_spec(b, input_name)
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):  # preprocess chunk by chunk: bounded memory
            x = preprocess_batch(list(images[start : start + batch_size]), spec)  # (B,3,H,W)
            logits = b.batched_run(graph, x, batch_size, output_name)
            if logits.ndim != 2 or logits.shape[1] != len(labels):
                raise ValueError(
                    f"graph {graph!r} output {output_name!r} has shape {list(logits.shape)} but the manifest lists "
                    f"{len(labels)} labels; the bundle is inconsistent, re-export it"
                )
            for row in sigmoid(logits.astype(np.float64)):  # (C,) probabilities of one image
                results.append(
                    {**ranked_result(labels, row), "labels": present_labels(row, labels, thr), "threshold": thr}
                )
        return results

    def _records(self, names: Sequence[str], images: Sequence[ImageInput], top_k: int, batch_size: int = 16):
        out = []
        for name, r in zip(names, self.multilabel(list(images), batch_size), strict=True):
            probs = [r["probs"][c] for c in self.bundle.labels]
            out.append(multilabel_record(name, probs, self.bundle.labels, r["threshold"], top_k))
        return out

    def predict_cli(self, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
        return self._records([str(i) for i in inputs], list(inputs), args.top_k, args.batch_size)

    def http(self, request: HttpRequest) -> dict[str, Any]:
        top_k = checked_top_k(request.value("top_k"), len(self.bundle.labels))
        names, images = request.images("files")
        return {"results": self._records(names, images, top_k)}

    @classmethod
    def load_test_request(cls, inputs: Path | None, options: LoadTestOptions) -> LoadTestRequests:
        return UploadRequests(cls.endpoint, read_upload_files(inputs or Path("."), (".jpg",)), ".jpg")
