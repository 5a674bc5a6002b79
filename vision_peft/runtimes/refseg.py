"""Referring-segmentation runtime: image + phrase -> mask at the image's own size.

The rules both halves share live here: :func:`fit_tokens` (pad / truncate a phrase's token ids to the fixed text
length) and :func:`mask_probs` / :func:`mask_from_logits` (sigmoid, undo the letterbox, threshold). The torch task
(``tasks/refseg.py``) calls them too.
"""

from __future__ import annotations

import argparse
import base64
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft.bundle import member
from vision_peft.preprocess import ImageInput, _as_image, preprocess_batch, unletterbox
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes import base as rt

MAX_PHRASE_CHARS = 1000  # the server refuses longer phrases


def fit_tokens(ids: Sequence[int], length: int) -> tuple[list[int], list[int]]:
    """The token rule: a phrase's token ids (special tokens included, no padding) -> exactly ``length`` ids.

    Right padding with id 0; a longer phrase keeps its first ``length - 1`` tokens and its final (special) token.

    Args:
        ids: The tokenizer's ids for the phrase.
        length: The fixed text length L of the graph.

    Returns:
        (input_ids, attention_mask), two lists of ``length`` ints (mask 1 for real tokens, 0 for padding).
    """
    ids = [int(i) for i in ids]
    n = len(ids)
    if n > length:
        ids = ids[: length - 1] + ids[n - 1 : n]
    mask = [1] * len(ids) + [0] * (length - len(ids))
    return ids + [0] * (length - len(ids)), mask


def mask_probs(logits: np.ndarray, src_hw: Sequence[int], in_hw: Sequence[int]) -> np.ndarray:
    """(h, w) mask logits on the letterboxed input -> float32 (H, W) probabilities at the original image size
    (sigmoid, then the letterbox undone with a bilinear resize)."""
    return unletterbox(rt.sigmoid(np.asarray(logits).astype(np.float32)), tuple(src_hw), tuple(in_hw), "bilinear")


def mask_from_logits(logits: np.ndarray, src_hw: Sequence[int], in_hw: Sequence[int], threshold: float) -> np.ndarray:
    """(h, w) logits on the letterboxed input -> bool mask at the original image size (``prob > threshold``)."""
    return mask_probs(logits, src_hw, in_hw) > threshold


def png_base64(array: np.ndarray) -> str:
    """A 2-D uint8 array as a base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@RUNTIMES.register("refseg", help="image + referring phrase -> mask (tokenizer.json via tokenizers)")
class RefSegRuntime(rt.Runtime):
    """Referring-segmentation bundles: graph inputs ``image``, ``input_ids``, ``attention_mask``."""

    task = "refseg"
    endpoint = "/v1/segment"
    panel = "image_phrase_mask"
    methods = ("segment", "tokenize")
    cli_inputs = "IMAGE::PHRASE (--out DIR writes mask PNGs)"
    cli_args = (rt.CliArg(("--out",), {"help": "folder for mask PNGs"}),)
    http_fields = (rt.HttpField("file", "file"), rt.HttpField("phrase", "form"))
    load_test_inputs = ".jpg images"

    def __init__(self, bundle: Any) -> None:
        super().__init__(bundle)
        self._tok: Any = None  # the tokenizer, loaded on first use

    def tokenize(self, phrase: str) -> tuple[np.ndarray, np.ndarray]:
        """Phrase -> (input_ids, attention_mask), int64 (L,), with the bundle's ``tokenizer.json`` (``tokenizers``
        library) and the training rule (:func:`fit_tokens`): special tokens added, right padding with id 0 to
        exactly L, longer phrases keep their first L-1 tokens and the final special token."""
        if not isinstance(phrase, str):
            raise ValueError(f"a referring phrase must be a string, got {type(phrase).__name__}")
        b = self.bundle
        length = int(b.task_info.get("max_length") or b.preprocess["input_ids"]["max_length"])
        ids = list(self._tokenizer().encode(phrase).ids)
        if len(ids) > length:
            warnings.warn(
                f"phrase {phrase[:60]!r} has {len(ids)} tokens, more than the bundle's {length}: truncated, keeping "
                "the final special token",
                RuntimeWarning,
                stacklevel=2,
            )
        ids, mask = fit_tokens(ids, length)
        return np.asarray(ids, np.int64), np.asarray(mask, np.int64)

    def _tokenizer(self) -> Any:
        if self._tok is None:
            b = self.bundle
            name = b.task_info.get("tokenizer_file")
            if not name:
                lib = (b.preprocess.get("input_ids") or {}).get("library", "?")
                raise ValueError(
                    f"bundle {b.path} ships no tokenizer file (its text encoder's tokenizer is {lib!r}, which the "
                    "torch-free runtime cannot run); tokenize outside and call run('refseg', image=…, input_ids=…, "
                    "attention_mask=…), or use a text encoder with a tokenizer.json (MiniLM)"
                )
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(member(b.path, name)))
            tok.no_padding()
            tok.no_truncation()
            self._tok = tok
        return self._tok

    def segment(self, image: ImageInput, phrase: str) -> dict[str, Any]:
        """Image + referring phrase -> ``mask`` (H, W) bool at the image's own size, ``prob`` (H, W) float32,
        ``area_fraction`` and ``max_prob``: sigmoid, letterbox undone, threshold from the bundle."""
        b = self.bundle
        img = _as_image(image)
        spec = rt.image_spec(b, "image")
        x = preprocess_batch([img], spec)  # (1, 3, H, W)
        ids, mask = self.tokenize(phrase)
        graph = "refseg" if "refseg" in b.sessions else next(iter(b.sessions))
        out = b.run(graph, image=x, input_ids=ids[None], attention_mask=mask[None])
        logits = next(iter(out.values()))[0, 0]  # (1, 1, h, w) -> (h, w)
        prob = mask_probs(logits, (img.height, img.width), spec["size"])
        thr = float(b.task_info.get("threshold", b.preprocess.get("mask_logits", {}).get("threshold", 0.5)))
        m = prob > thr
        return {"mask": m, "prob": prob, "area_fraction": float(m.mean()), "max_prob": float(prob.max())}

    def predict_cli(self, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
        from PIL import Image

        out = []
        for item in inputs:
            if "::" not in item:
                raise ValueError(f"referring segmentation takes IMAGE::PHRASE (e.g. 'a.jpg::the dog'), got {item!r}")
            path, phrase = item.split("::", 1)
            r = self.segment(path, phrase)
            rec = {"image": path, "phrase": phrase, "area_fraction": r["area_fraction"], "max_prob": r["max_prob"]}
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                dest = Path(args.out) / f"{Path(path).stem}-{len(out)}.mask.png"
                Image.fromarray((r["mask"] * 255).astype(np.uint8)).save(dest)
                rec["mask"] = str(dest)
            out.append(rec)
        return out

    def http(self, request: rt.HttpRequest) -> dict[str, Any]:
        phrase = request.value("phrase")
        if len(phrase) > MAX_PHRASE_CHARS:
            raise rt.HttpError(413, f"phrase has {len(phrase)} characters; the limit is {MAX_PHRASE_CHARS}")
        (name,), (image,) = request.images("file")
        r = self.segment(image, phrase)
        return {
            "file": name,
            "phrase": phrase,
            "width": image.width,
            "height": image.height,
            "area_fraction": r["area_fraction"],
            "max_prob": r["max_prob"],
            "mask_png_base64": png_base64((r["mask"] * 255).astype(np.uint8)),
        }

    @classmethod
    def load_test_request(cls, inputs: Path | None, options: rt.LoadTestOptions) -> rt.LoadTestRequests:
        return _SegmentRequests(cls.endpoint, rt.read_upload_files(inputs or Path("."), (".jpg",)), options.phrase)


class _SegmentRequests(rt.LoadTestRequests):
    def __init__(self, route: str, files: list[tuple[str, bytes]], phrase: str) -> None:
        super().__init__(route)
        self.files, self.phrase = files, phrase

    def good(self, i: int) -> dict[str, Any]:
        name, data = self.files[i % len(self.files)]
        return {"files": [("file", (name, data, "image/jpeg"))], "data": {"phrase": self.phrase}}

    def malformed(self, kind: int) -> dict[str, Any]:
        return rt.malformed_upload(self.good(0), "file", ".jpg", kind)
