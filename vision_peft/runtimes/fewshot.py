"""Few-shot runtime: a support set (class -> images) + query images -> classes, by the PMF cosine head.

The graph maps images to embeddings (the meta-trained prompts are inside it); prototypes and the classifier
``logits_c = s · (cos(embedding, prototype_c) + b)`` (s, b from training, in the manifest's ``task_info``) run here
in numpy. No per-episode fine-tuning happens at deploy time.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft.preprocess import IMAGE_SUFFIXES, ImageInput, preprocess_batch
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes import base as rt


def pmf_logits(query: np.ndarray, prototypes: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """PMF's cosine classifier: (Q, D) query embeddings x (N, D) prototypes -> (Q, N) logits
    ``scale · (cos(query, prototype) + bias)`` (both sides L2-normalised here)."""
    q, p = rt.l2_normalize(np.asarray(query, np.float64)), rt.l2_normalize(np.asarray(prototypes, np.float64))
    return float(scale) * (q @ p.T + float(bias))  # (Q, D) x (D, N) -> (Q, N)


def support_folder(root: str | Path) -> dict[str, list[Path]]:
    """A few-shot support set on disk: ``root/<class>/<image>`` -> class name -> image paths (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"support folder {root} does not exist; give a folder with one sub-folder per class")
    out = {
        d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    empty = [c for c, files in out.items() if not files]
    if empty:
        raise ValueError(f"support folder {root}: class folder(s) {empty} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(out) < 2:
        raise ValueError(f"support folder {root} needs at least two class sub-folders, found {list(out)}")
    return out


@RUNTIMES.register("fewshot", help="support set + query images -> classes (PMF prototypes and cosine head)")
class FewShotRuntime(rt.Runtime):
    """Few-shot bundles: one graph (``embedding``) image -> embedding; PMF scale/bias in ``task_info``."""

    task = "fewshot"
    endpoint = "/v1/fewshot"
    panel = "support_query"
    methods = ("fewshot", "prototypes", "embed")
    cli_inputs = "query images (with --support DIR)"
    cli_args = (
        rt.CliArg(("--support",), {"help": "support folder, one sub-folder of images per class"}),
        rt.TOP_K,
    )
    http_fields = (
        rt.HttpField("support", "files"),
        rt.HttpField("support_labels", "form_list"),
        rt.HttpField("query", "files"),
    )
    load_test_inputs = "class folders of .jpg images"

    def embed(self, images: Sequence[ImageInput], batch_size: int = 16) -> np.ndarray:
        """(N, D) L2-normalised image embeddings (meta-trained prompts inside the graph)."""
        rt.check_list(images, "embed")
        b = self.bundle
        name = b.graph_inputs("embedding")[0]
        spec = rt.image_spec(b, name)
        parts = [preprocess_batch(list(images[i : i + batch_size]), spec) for i in range(0, len(images), batch_size)]
        return rt.l2_normalize(b.batched_run("embedding", np.concatenate(parts), batch_size).astype(np.float64))

    def prototypes(self, support: dict[str, Sequence[ImageInput]], batch_size: int = 16) -> dict[str, np.ndarray]:
        """Class name -> prototype (mean of the class's L2-normalised support embeddings), as in training."""
        if not isinstance(support, dict) or len(support) < 2:
            raise ValueError(
                "the support set must map at least two class names to lists of images, "
                f"got {type(support).__name__} with {len(support) if isinstance(support, dict) else 0} classes"
            )
        empty = [c for c, imgs in support.items() if not imgs]
        if empty:
            raise ValueError(f"support classes {empty} have no images; give every class at least one image")
        return {c: self.embed(list(imgs), batch_size).mean(0) for c, imgs in support.items()}

    def fewshot(
        self,
        support: dict[str, Sequence[ImageInput]] | dict[str, np.ndarray],
        queries: Sequence[ImageInput],
        batch_size: int = 16,
    ) -> list[dict[str, Any]]:
        """Classifies query images among the support set's classes with the PMF cosine classifier
        ``s · (cos(embedding, prototype) + b)`` (s, b from training, in ``task_info``). ``support`` maps class
        names to images, or to prototypes from :meth:`prototypes` (computed once for a fixed class set).
        No per-episode fine-tuning happens at deploy time: the graph holds the meta-trained prompts."""
        protos = support if all(isinstance(v, np.ndarray) and v.ndim == 1 for v in support.values()) else None
        protos = protos or self.prototypes(support, batch_size)  # type: ignore[arg-type]
        labels = list(protos)
        info = self.bundle.task_info
        if "scale" not in info or "bias" not in info:
            raise ValueError(f"manifest.json of {self.bundle.path} has no task_info scale/bias; re-export the bundle")
        p = np.stack([protos[c] for c in labels])  # (N, D)
        logits = pmf_logits(self.embed(queries, batch_size), p, info["scale"], info["bias"])
        return [rt.ranked_result(labels, row) for row in rt.softmax(logits)]

    def predict_cli(self, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
        if not args.support:
            raise ValueError("a few-shot bundle needs --support DIR (one sub-folder of images per class)")
        res = self.fewshot(support_folder(args.support), list(inputs), args.batch_size)
        return [rt.record_of(i, r, args.top_k) for i, r in zip(inputs, res, strict=True)]

    def http(self, request: rt.HttpRequest) -> dict[str, Any]:
        support_labels = list(request.value("support_labels"))
        n_support = request.count("support")
        if len(support_labels) == 1 and n_support > 1 and "," in support_labels[0]:
            support_labels = [x.strip() for x in support_labels[0].split(",")]
        if len(support_labels) != n_support:
            raise rt.HttpError(
                422,
                f"support_labels must give one class name per support image: {len(support_labels)} names for "
                f"{n_support} images",
            )
        _, s_imgs = request.images("support")
        q_names, q_imgs = request.images("query")
        sets: dict[str, list[Any]] = {}
        for label, img in zip(support_labels, s_imgs, strict=True):
            sets.setdefault(label, []).append(img)
        res = self.fewshot(sets, q_imgs)
        return {"results": [rt.record_of(n, r, len(sets)) for n, r in zip(q_names, res, strict=True)],
                "classes": list(sets)}  # fmt: skip

    @classmethod
    def load_test_request(cls, inputs: Path | None, options: rt.LoadTestOptions) -> rt.LoadTestRequests:
        return _EpisodeRequests(cls.endpoint, inputs or Path("."))


class _EpisodeRequests(rt.LoadTestRequests):
    """A folder of class folders: each request = 1 support image per class + 1 query."""

    def __init__(self, route: str, inputs: Path) -> None:
        super().__init__(route)
        sets = {
            d.name: [p.read_bytes() for p in sorted(d.glob("*.jpg"))[:8]]
            for d in sorted(inputs.iterdir())
            if d.is_dir()
        }
        self.sets = {k: v for k, v in sets.items() if len(v) >= 2}
        if len(self.sets) < 2:
            raise SystemExit(f"{inputs}: a few-shot load test needs ≥ 2 class folders with ≥ 2 .jpg files each")

    def good(self, i: int) -> dict[str, Any]:
        labels = list(self.sets)
        support = [("support", (f"{c}.jpg", self.sets[c][i % (len(self.sets[c]) - 1)], "image/jpeg")) for c in labels]
        q = labels[i % len(labels)]
        query = [("query", ("q.jpg", self.sets[q][-1], "image/jpeg"))]
        return {"files": support + query, "data": {"support_labels": ",".join(labels)}}

    def malformed(self, kind: int) -> dict[str, Any]:
        return rt.malformed_upload(self.good(0), "query", ".jpg", kind)
