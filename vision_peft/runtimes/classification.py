"""Image classification runtime: images -> class probabilities (preprocess per the manifest, graph, softmax)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vision_peft.preprocess import ImageInput
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import RankedRuntime, image_logits, ranked_result, softmax


@RUNTIMES.register("classification", help="images -> class probabilities")
class ClassificationRuntime(RankedRuntime):
    """Image classifier bundles: one graph (``model``) image -> ``logits``, class names in ``labels``."""

    task = "classification"
    endpoint = "/v1/classify"
    panel = "ranked_images"
    methods = ("classify",)
    cli_inputs = "images"
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
        chunks = image_logits(self.bundle, images, batch_size, "classify")  # (B, classes) each
        return [ranked_result(self.bundle.labels, row) for logits in chunks for row in softmax(logits)]
