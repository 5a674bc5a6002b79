"""Image classification runtime: images -> class probabilities (preprocess per the manifest, graph, softmax)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vision_peft.preprocess import ImageInput, preprocess_batch
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import (
    CliArg,
    HttpField,
    HttpRequest,
    LoadTestOptions,
    LoadTestRequests,
    Runtime,
    check_list,
    checked_top_k,
    image_spec,
    logits_graph,
    malformed_upload,
    ranked_rows,
    read_upload_files,
    record_of,
)

TOP_K = CliArg(("--top-k",), {"type": int, "default": 5, "help": "classes listed per input (default: 5)"})


@RUNTIMES.register("classification", help="images -> class probabilities")
class ClassificationRuntime(Runtime):
    """Image classifier bundles: one graph (``model``) image -> ``logits``, class names in ``labels``."""

    task = "classification"
    endpoint = "/v1/classify"
    panel = "ranked_images"
    methods = ("classify",)
    needs_labels = True
    cli_inputs = "images"
    cli_args = (TOP_K,)
    http_fields = (HttpField("files", "files"), HttpField("top_k", "query", type=int))
    load_test_inputs = ".jpg images"

    def classify(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[dict[str, Any]]:
        """Classifies raw images (preprocessing as the manifest says, then the graph, then softmax).

        Args:
            images: Paths, PIL images or HWC uint8 RGB arrays.
            batch_size: Images per onnxruntime call (a graph exported with a fixed batch size uses that instead).

        Returns:
            One dict per image: ``label`` (top class), ``index`` (its logit index), ``prob`` (its probability) and
            ``probs`` (label -> probability for every class).

        Raises:
            ValueError: The input is not a list, or the manifest does not fit the graph.
        """
        check_list(images, "classify")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        b = self.bundle
        graph, input_name, output_name = logits_graph(b)
        spec = image_spec(b, input_name)
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):  # preprocess chunk by chunk: bounded memory
            x = preprocess_batch(list(images[start : start + batch_size]), spec)  # (B,3,H,W)
            results += ranked_rows(b, graph, output_name, b.batched_run(graph, x, batch_size, output_name))
        return results

    def predict_cli(self, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
        res = self.classify(list(inputs), args.batch_size)
        return [record_of(i, r, args.top_k) for i, r in zip(inputs, res, strict=True)]

    def http(self, request: HttpRequest) -> dict[str, Any]:
        top_k = checked_top_k(request.value("top_k"), len(self.bundle.labels))
        names, images = request.images("files")
        return {"results": [record_of(n, r, top_k) for n, r in zip(names, self.classify(images), strict=True)]}

    @classmethod
    def load_test_request(cls, inputs: Path | None, options: LoadTestOptions) -> LoadTestRequests:
        return UploadRequests(cls.endpoint, read_upload_files(inputs or Path("."), (".jpg",)), ".jpg")


class UploadRequests(LoadTestRequests):
    """One uploaded file per request in the ``files`` part; malformed = garbage bytes, a text file, nothing."""

    def __init__(self, route: str, files: list[tuple[str, bytes]], ext: str) -> None:
        super().__init__(route)
        self.files, self.ext = files, ext

    def good(self, i: int) -> dict[str, Any]:
        name, data = self.files[i % len(self.files)]
        return {"files": [("files", (name, data))]}

    def malformed(self, kind: int) -> dict[str, Any]:
        return malformed_upload(self.good(0), "files", self.ext, kind)
