"""Run an exported vision_peft bundle with onnxruntime only: no PyTorch, no model code.

A bundle is a folder holding ``manifest.json`` (format ``vision_peft.bundle/1``: task, graphs with their inputs and
outputs, preprocess specs, labels, the sha256 of every other file, a parity report) and the ONNX graphs it names
(design.md §8). This module reads it with onnxruntime, numpy and Pillow alone; it imports nothing from vision_peft
but the torch-free :mod:`vision_peft.preprocess`, so it runs where only the deployment dependencies are installed.

```
bundle = load_bundle("runs/rs_scenes/bundle", device="auto")
bundle.classify(["airport.jpg"])  # [{"label": "Airport", "index": 0, "prob": 0.97, "probs": {...}}]
bundle.run("model", image=x)       # {"logits": array(...)}
```

Every task has a runtime method: ``classify`` (images), ``fewshot`` (support set + query images; prototypes built
here), ``classify_points`` (point files), ``segment`` (image + phrase; tokenizer.json via ``tokenizers``),
``generate`` (class names -> images; numpy DDIM over the denoiser and decoder graphs).

Command line: ``python -m vision_peft.deploy <bundle> <input> [<input> ...] [--device cpu|cuda|auto] [--strict]``
prints one JSON line per input (see :func:`main` for each task's inputs).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
import json
import platform
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile

from vision_peft import __version__
from vision_peft.preprocess import ImageInput, preprocess_batch, validate_spec

BUNDLE_FORMAT = "vision_peft.bundle/1"
SUPPORTED_FORMATS = (BUNDLE_FORMAT,)
MANIFEST = "manifest.json"
DEVICES = ("auto", "cpu", "cuda")
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_cuda_libs_preloaded = False
_cuda_preload_log = ""


@dataclass
class Bundle:
    """A loaded bundle: its manifest and one onnxruntime session per graph.

    Attributes:
        path: The bundle folder.
        manifest: The parsed ``manifest.json``.
        sessions: Graph name -> onnxruntime session.
        requested_providers: Execution providers asked for, in priority order.
        graph_providers: Graph name -> providers onnxruntime really uses (``session.get_providers()``).
    """

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    sessions: dict[str, ort.InferenceSession] = field(repr=False)
    requested_providers: list[str]
    graph_providers: dict[str, list[str]]
    _tok: Any = field(default=None, init=False, repr=False)  # the refseg tokenizer, loaded on first use

    @property
    def task(self) -> str:
        """The task the bundle was exported for (``classification``, ``few_shot`` …)."""
        return self.manifest["task"]

    @property
    def labels(self) -> list[str]:
        """Class names in logit order (empty when the task has none)."""
        return list(self.manifest.get("labels") or [])

    @property
    def preprocess(self) -> dict[str, dict[str, Any]]:
        """Input name -> preprocess spec, as written in the manifest."""
        return dict(self.manifest.get("preprocess") or {})

    @property
    def providers(self) -> list[str]:
        """Execution providers really in use, over all graphs, in priority order."""
        seen: list[str] = []
        for used in self.graph_providers.values():
            seen += [p for p in used if p not in seen]
        return seen

    def run(self, graph_name: str, **inputs: Any) -> dict[str, np.ndarray]:
        """Runs one graph on already preprocessed tensors.

        Args:
            graph_name: A key of the manifest's ``graphs``.
            **inputs: One array per graph input, by name. Numbers are cast to the graph's dtype when that is
                lossless in kind (float64 -> float32 is fine, float -> int64 is refused).

        Returns:
            Output name -> array, for every graph output.

        Raises:
            ValueError: Unknown graph, missing/unknown input names, or a shape/dtype the graph cannot take.
        """
        if graph_name not in self.sessions:
            raise ValueError(f"unknown graph {graph_name!r}; this bundle has: {', '.join(self.sessions)}")
        session = self.sessions[graph_name]
        expected = {i.name: i for i in session.get_inputs()}
        missing, unknown = sorted(set(expected) - set(inputs)), sorted(set(inputs) - set(expected))
        if missing or unknown:
            want = ", ".join(f"{n} {list(i.shape)} {i.type}" for n, i in expected.items())
            raise ValueError(f"graph {graph_name!r} takes inputs {want}; missing {missing}, unknown {unknown}")
        feed = {}
        for name, meta in expected.items():
            arr = np.asarray(inputs[name])
            dtype = _ORT_DTYPES.get(meta.type)
            if dtype is not None and arr.dtype != dtype:
                if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                    raise ValueError(f"input {name!r} of graph {graph_name!r} needs {meta.type}, got {arr.dtype}")
                arr = arr.astype(dtype)
            shape = list(meta.shape)
            if arr.ndim != len(shape) or any(
                isinstance(d, int) and d != n for d, n in zip(shape, arr.shape, strict=True)
            ):
                raise ValueError(
                    f"input {name!r} of graph {graph_name!r} must have shape {shape} (strings are free axes), "
                    f"got {list(arr.shape)}"
                )
            feed[name] = np.ascontiguousarray(arr)
        values = session.run(None, feed)
        return {o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}

    def classify(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[dict[str, Any]]:
        """Classifies raw images (preprocessing as the manifest says, then the graph, then softmax).

        Args:
            images: Paths, PIL images or HWC uint8 RGB arrays.
            batch_size: Images per onnxruntime call (a graph exported with a fixed batch size uses that instead).

        Returns:
            One dict per image: ``label`` (top class), ``index`` (its logit index), ``prob`` (its probability) and
            ``probs`` (label -> probability for every class).

        Raises:
            ValueError: The bundle is not a classification bundle, or its manifest does not fit its graph.
        """
        if self.task != "classification":
            raise ValueError(
                f"classify() needs a bundle exported for task 'classification', this one is {self.task!r}; "
                f"call run(graph_name, **inputs) with the graphs {list(self.sessions)} instead"
            )
        _check_list(images, "classify")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        graph, input_name, output_name = self._classification_io()
        spec = self._image_spec(input_name)
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):  # preprocess chunk by chunk: bounded memory
            x = preprocess_batch(list(images[start : start + batch_size]), spec)  # (B,3,H,W)
            results += self._ranked_rows(graph, output_name, self._batched_run(graph, x, batch_size, output_name))
        return results

    def _ranked_rows(self, graph: str, output: str, logits: np.ndarray) -> list[dict[str, Any]]:
        """Softmax + ranking of (B, classes) logits, refusing a graph whose width differs from the labels."""
        labels = self.labels
        if logits.ndim != 2 or logits.shape[1] != len(labels):
            raise ValueError(
                f"graph {graph!r} output {output!r} has shape {list(logits.shape)} but the manifest lists "
                f"{len(labels)} labels; the bundle is inconsistent, re-export it"
            )
        return [_ranked(labels, row) for row in softmax(logits)]

    # -- the other tasks ----------------------------------------------------------------------------------------
    @property
    def task_info(self) -> dict[str, Any]:
        """Structured facts the runtime needs beyond the graphs (PMF scale/bias, the diffusion schedule …)."""
        return dict(self.manifest.get("task_info") or {})

    def _require(self, task: str, method: str) -> None:
        if self.task != task:
            raise ValueError(
                f"{method}() needs a bundle exported for task {task!r}, this one ({self.path}) is {self.task!r}; "
                f"use {TASK_METHODS.get(self.task, 'run')}() for it"
            )

    def _single_io(self, graph: str) -> tuple[str, str]:
        if graph not in self.sessions:
            raise ValueError(f"bundle {self.path} has no graph {graph!r} (found {list(self.sessions)}); re-export it")
        ins, outs = self.sessions[graph].get_inputs(), self.sessions[graph].get_outputs()
        return ins[0].name, outs[0].name

    def _batched_run(self, graph: str, x: np.ndarray, batch_size: int, output: str | None = None) -> np.ndarray:
        """Runs a one-input graph over ``x`` in chunks (padding to a fixed batch size when the graph has one);
        returns ``output`` (default: the graph's first output)."""
        name, out = self._single_io(graph)
        out = output or out
        fixed = self.sessions[graph].get_inputs()[0].shape[0]
        step = fixed if isinstance(fixed, int) else max(1, batch_size)
        res = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            n = len(chunk)
            if isinstance(fixed, int) and n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            res.append(self.run(graph, **{name: chunk})[out][:n])
        return np.concatenate(res) if res else np.zeros((0,), np.float32)

    def embed(self, images: Sequence[ImageInput], batch_size: int = 16) -> np.ndarray:
        """Few-shot bundles: (N, D) L2-normalised image embeddings (meta-trained prompts inside the graph)."""
        self._require("fewshot", "embed")
        _check_list(images, "embed")
        name, _ = self._single_io("embedding")
        spec = self._image_spec(name)
        parts = [preprocess_batch(list(images[i : i + batch_size]), spec) for i in range(0, len(images), batch_size)]
        emb = self._batched_run("embedding", np.concatenate(parts), batch_size).astype(np.float64)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def prototypes(self, support: dict[str, Sequence[ImageInput]], batch_size: int = 16) -> dict[str, np.ndarray]:
        """Class name -> prototype (mean of the class's L2-normalised support embeddings), as in training."""
        self._require("fewshot", "prototypes")
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
        self._require("fewshot", "fewshot")
        protos = support if all(isinstance(v, np.ndarray) and v.ndim == 1 for v in support.values()) else None
        protos = protos or self.prototypes(support, batch_size)  # type: ignore[arg-type]
        labels = list(protos)
        p = np.stack([protos[c] for c in labels]).astype(np.float64)
        p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        info = self.task_info
        if "scale" not in info or "bias" not in info:
            raise ValueError(f"manifest.json of {self.path} has no task_info scale/bias; re-export the bundle")
        q = self.embed(queries, batch_size)
        logits = float(info["scale"]) * (q @ p.T + float(info["bias"]))
        return [_ranked(labels, row) for row in softmax(logits)]

    def classify_points(self, clouds: Sequence[str | Path | np.ndarray], batch_size: int = 16) -> list[dict[str, Any]]:
        """Point-cloud bundles: point files (PCD, OFF, PLY, NPY/NPZ, HDF5 ``file.h5``) or (N, 3+) arrays ->
        class + probabilities, preprocessed exactly as in training (up axis, sampling, unit sphere)."""
        from vision_peft import pointio

        self._require("pointcloud", "classify_points")
        _check_list(clouds, "classify_points")
        spec = self.preprocess.get("points")
        if not isinstance(spec, dict) or "num_points" not in spec:
            raise ValueError(f"manifest.json of {self.path} has no 'points' preprocess spec; re-export the bundle")
        info = self.task_info
        batch = []
        for i, c in enumerate(clouds):
            if isinstance(c, np.ndarray):
                raw, name = np.asarray(c, dtype=np.float32)[:, :3], f"array {i}"
            else:
                raw = pointio.read_points(
                    c, info.get("extra_columns", "take_xyz"), off_points=info.get("off_points", 0)
                )
                name = str(c)
            batch.append(
                pointio.preprocess_points(
                    raw,
                    int(spec["num_points"]),
                    spec["sampling"]["rule"],
                    spec["up_axis"]["rule"],
                    pointio.eval_rng(0),
                    name,
                )
            )
        graph, _, output = self._classification_io()
        return self._ranked_rows(graph, output, self._batched_run(graph, np.stack(batch), batch_size, output))

    def tokenize(self, phrase: str) -> tuple[np.ndarray, np.ndarray]:
        """Referring-segmentation bundles: phrase -> (input_ids, attention_mask), int64 (L,), with the bundle's
        ``tokenizer.json`` (``tokenizers`` library) and the training rule: special tokens added, right padding
        with id 0 to exactly L, longer phrases keep their first L-1 tokens and the final special token."""
        self._require("refseg", "tokenize")
        if not isinstance(phrase, str):
            raise ValueError(f"a referring phrase must be a string, got {type(phrase).__name__}")
        tok = self._tokenizer()
        length = int(self.task_info.get("max_length") or self.preprocess["input_ids"]["max_length"])
        ids = list(tok.encode(phrase).ids)
        n = len(ids)
        if n > length:
            warnings.warn(
                f"phrase {phrase[:60]!r} has {n} tokens, more than the bundle's {length}: truncated, keeping the "
                "final special token",
                RuntimeWarning,
                stacklevel=2,
            )
            ids = ids[: length - 1] + ids[n - 1 : n]
        mask = [1] * len(ids) + [0] * (length - len(ids))
        ids = ids + [0] * (length - len(ids))
        return np.asarray(ids, np.int64), np.asarray(mask, np.int64)

    def _tokenizer(self):
        if self._tok is None:
            name = self.task_info.get("tokenizer_file")
            if not name:
                lib = (self.preprocess.get("input_ids") or {}).get("library", "?")
                raise ValueError(
                    f"bundle {self.path} ships no tokenizer file (its text encoder's tokenizer is {lib!r}, which the "
                    "torch-free runtime cannot run); tokenize outside and call run('refseg', image=…, input_ids=…, "
                    "attention_mask=…), or use a text encoder with a tokenizer.json (MiniLM)"
                )
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(_member(self.path, name)))
            tok.no_padding()
            tok.no_truncation()
            self._tok = tok
        return self._tok

    def segment(self, image: ImageInput, phrase: str) -> dict[str, Any]:
        """Image + referring phrase -> ``mask`` (H, W) bool at the image's own size, ``prob`` (H, W) float32,
        ``area_fraction`` and ``max_prob``: sigmoid, letterbox undone, threshold from the bundle."""
        from vision_peft.preprocess import _as_image, unletterbox

        self._require("refseg", "segment")
        img = _as_image(image)
        spec = self._image_spec("image")
        x = preprocess_batch([img], spec)
        ids, mask = self.tokenize(phrase)
        graph = "refseg" if "refseg" in self.sessions else next(iter(self.sessions))
        out = self.run(graph, image=x, input_ids=ids[None], attention_mask=mask[None])
        logits = next(iter(out.values()))[0, 0].astype(np.float32)
        prob = unletterbox(1 / (1 + np.exp(-np.clip(logits, -60, 60))), (img.height, img.width), tuple(spec["size"]))
        thr = float(self.task_info.get("threshold", self.preprocess.get("mask_logits", {}).get("threshold", 0.5)))
        m = prob > thr
        return {"mask": m, "prob": prob, "area_fraction": float(m.mean()), "max_prob": float(prob.max())}

    def generate(
        self,
        classes: Sequence[str | int],
        steps: int = 25,
        guidance: float = 2.0,
        seed: int = 0,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """Diffusion bundles: one image per entry of ``classes`` (names or ids) -> (N, 3, H, W) float32 in [0, 1].

        Deterministic DDIM (eta = 0) with classifier-free guidance on the denoiser graph, then the decoder graph;
        ``noise`` (N, C, g, g) replaces the seeded initial latents (numpy ``RandomState(seed)``)."""
        self._require("diffusion", "generate")
        info = self.task_info
        names = list(info["classes"])
        ids = []
        for c in classes:
            if isinstance(c, str) and c in names:
                ids.append(names.index(c))
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= int(c) < len(names):
                ids.append(int(c))
            else:
                raise ValueError(f"class {c!r} is outside the trained set; known: {names} (or ids 0..{len(names) - 1})")
        if not ids:
            raise ValueError("generate() needs at least one class")
        T = int(info["num_timesteps"])
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
            raise ValueError(f"sampling steps must be an integer in [1, {T}], got {steps!r}")
        max_g = float(info.get("max_guidance", 20.0))
        if not isinstance(guidance, (int, float)) or not np.isfinite(guidance) or not 0.0 <= guidance <= max_g:
            raise ValueError(f"guidance scale must lie in [0, {max_g}], got {guidance!r}")
        labels = np.asarray(ids, np.int64)
        c, g = int(info["latent_channels"]), int(info["latent_size"])
        if noise is None:
            noise = np.random.RandomState(seed).standard_normal((len(labels), c, g, g))
        x = np.asarray(noise, np.float32)
        if x.shape != (len(labels), c, g, g):
            raise ValueError(f"noise must have shape {(len(labels), c, g, g)}, got {x.shape}")
        ac = np.asarray(info["alphas_cumprod"], np.float64)
        clip = float(info.get("clip_x0", 0.0))
        v_pred = info.get("prediction", "eps") == "v"
        null = np.full_like(labels, int(info["null_class"]))
        ts = np.linspace(0, T - 1, int(steps)).round().astype(int)[::-1]
        for i, t in enumerate(ts):
            tt = np.full(len(labels), t, np.int64)
            e = self.run(
                "denoiser", x=np.concatenate([x, x]), t=np.concatenate([tt, tt]), y=np.concatenate([labels, null])
            )
            ec, eu = np.split(next(iter(e.values())), 2)
            out = eu + guidance * (ec - eu)
            a_t, a_p = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else 1.0)
            if v_pred:  # the denoiser predicts v = sqrt(a) eps - sqrt(1-a) x0
                x0, eps = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out, np.sqrt(1 - a_t) * x + np.sqrt(a_t) * out
            else:
                x0, eps = (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t), out
            if clip > 0:  # the training side's rule: clip the x0 estimate, re-derive eps from it
                x0 = np.clip(x0, -clip, clip)
                eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
            x = (np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps).astype(np.float32)
        return np.clip(next(iter(self.run("decoder", z=x).values())), 0.0, 1.0)

    def _classification_io(self) -> tuple[str, str, str]:
        """(graph, input name, output name) of the image -> logits graph."""
        graphs = self.manifest["graphs"]
        if "model" in graphs:
            graph = "model"
        elif len(graphs) == 1:
            graph = next(iter(graphs))
        else:
            raise ValueError(f"classification bundle must have a graph named 'model', found {list(graphs)}")
        inputs = [i.name for i in self.sessions[graph].get_inputs()]
        outputs = [o.name for o in self.sessions[graph].get_outputs()]
        if len(inputs) != 1:
            raise ValueError(f"classification graph {graph!r} must take one image input, it takes {inputs}")
        if "logits" in outputs:
            output = "logits"
        elif len(outputs) == 1:
            output = outputs[0]
        else:
            raise ValueError(f"classification graph {graph!r} must have an output named 'logits', found {outputs}")
        return graph, inputs[0], output

    def _image_spec(self, input_name: str) -> dict[str, Any]:
        specs = self.preprocess
        if input_name not in specs:
            raise ValueError(
                f"manifest.json of {self.path} has no preprocess spec for input {input_name!r} "
                f"(found {list(specs)}); re-export the bundle"
            )
        try:
            return validate_spec(specs[input_name])
        except ValueError as e:
            raise ValueError(f"manifest.json of {self.path}: preprocess[{input_name!r}]: {e}") from e


TASK_METHODS = {
    "classification": "classify",
    "fewshot": "fewshot",
    "pointcloud": "classify_points",
    "refseg": "segment",
    "diffusion": "generate",
}


def _check_list(items: Any, method: str) -> None:
    if isinstance(items, (str, Path, np.ndarray)) or not isinstance(items, Sequence):
        raise ValueError(f"{method}() takes a list of inputs, got {type(items).__name__}; wrap one in a list")


def _ranked(labels: list[str], probs: np.ndarray) -> dict[str, Any]:
    idx = int(np.argmax(probs))
    return {
        "label": labels[idx],
        "index": idx,
        "prob": float(probs[idx]),
        "probs": {label: float(p) for label, p in zip(labels, probs, strict=True)},
    }


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (subtracts the max; computed in float64).

    Args:
        logits: Scores of any shape.
        axis: Axis holding the classes.

    Returns:
        float64 probabilities summing to 1 along ``axis``.
    """
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads and checks a bundle's ``manifest.json`` (structure and format version only; files are not hashed).

    Args:
        path: The bundle folder.

    Returns:
        The parsed manifest.

    Raises:
        FileNotFoundError: No bundle folder or no manifest in it.
        ValueError: Unknown format version, or a required field is missing or malformed.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found: {path} is not a vision_peft bundle folder; "
            "pass the folder that `python -m vision_peft export` wrote"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}); re-export the bundle") from e
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise ValueError(f"{manifest_path} has no 'format' field; it is not a vision_peft bundle manifest")
    fmt = manifest["format"]
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(
            f"unsupported bundle format {fmt!r} in {manifest_path}; vision_peft {__version__} reads "
            f"{', '.join(SUPPORTED_FORMATS)}. Upgrade vision_peft to the version that exported the bundle "
            f"({manifest.get('vision_peft_version', 'unknown')}) or re-export it with this one"
        )
    for key, kind in (("task", str), ("graphs", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{manifest_path}: field {key!r} must be a {kind.__name__}; re-export the bundle")
    if not manifest["graphs"]:
        raise ValueError(f"{manifest_path} lists no graphs; re-export the bundle")
    for name, graph in manifest["graphs"].items():
        if not isinstance(graph, dict) or not isinstance(graph.get("file"), str):
            raise ValueError(f"{manifest_path}: graph {name!r} needs a 'file' entry; re-export the bundle")
        for key in ("inputs", "outputs"):
            if not isinstance(graph.get(key), dict) or not graph[key]:
                raise ValueError(f"{manifest_path}: graph {name!r} needs non-empty {key!r}; re-export the bundle")
    if manifest["task"] in ("classification", "pointcloud"):
        labels = manifest.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{manifest_path}: a classification bundle needs 'labels', a list of class names")
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"{manifest_path}: duplicate labels {dupes}; class names must be unique")
    return manifest


def _member(path: Path, name: str) -> Path:
    """Resolves a file named in the manifest, refusing names that leave the bundle folder."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"manifest.json of {path} names file {name!r} outside the bundle; re-export the bundle")
    return path / rel


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def verify_files(path: str | Path, manifest: dict[str, Any]) -> None:
    """Checks the sha256 of every file the manifest lists, and that every graph file is listed.

    Args:
        path: The bundle folder.
        manifest: Its parsed manifest.

    Raises:
        FileNotFoundError: A listed file is missing.
        ValueError: A file's hash differs from the manifest, or a graph file has no hash.
    """
    path = Path(path)
    files: dict[str, str] = manifest["files"]
    for name, graph in manifest["graphs"].items():
        if graph["file"] not in files:
            raise ValueError(
                f"manifest.json of {path} has no sha256 for {graph['file']!r} (graph {name!r}); re-export the "
                "bundle, or load it with verify=False at your own risk"
            )
    for name, expected in files.items():
        file = _member(path, name)
        if not file.is_file():
            raise FileNotFoundError(
                f"bundle file {name!r} listed in manifest.json is missing from {path}; copy the whole bundle folder"
            )
        actual = sha256_file(file)
        if actual != str(expected).lower():
            raise ValueError(
                f"bundle file {name!r} in {path} does not match manifest.json (sha256 {actual} != {expected}): it "
                "was changed or corrupted after export; restore the original file or re-export the bundle "
                "(load_bundle(..., verify=False) skips this check at your own risk)"
            )


def _cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads, i.e. a CUDA GPU can exist on this machine at all."""
    name = {"Linux": "libcuda.so.1", "Windows": "nvcuda.dll"}.get(platform.system())
    if name is None:
        return False
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def _preload_cuda_libs() -> None:
    """Loads the CUDA/cuDNN libraries of pip's nvidia-* packages once, so CUDA works without ``import torch``."""
    global _cuda_libs_preloaded, _cuda_preload_log
    if _cuda_libs_preloaded or not hasattr(ort, "preload_dlls"):
        return
    _cuda_libs_preloaded = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):  # preload_dlls prints; keep stdout clean for the CLI's JSON lines
            ort.preload_dlls()
    except Exception as e:  # noqa: BLE001 - best effort; a real failure shows up as a CPU fallback below
        buf.write(f"preload_dlls failed: {e}\n")
    _cuda_preload_log = buf.getvalue().strip()


def _request_providers(device: str) -> list[str]:
    """Execution providers to ask onnxruntime for, in priority order."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU_EP]
    available = ort.get_available_providers()
    if device == "cuda" and CUDA_EP not in available:
        raise RuntimeError(
            f"device='cuda' needs onnxruntime's {CUDA_EP}, but onnxruntime {ort.__version__} only offers "
            f"{available}; install the GPU build (pip uninstall onnxruntime && pip install onnxruntime-gpu) "
            "or use device='cpu' / 'auto'"
        )
    if device == "auto" and (CUDA_EP not in available or not _cuda_driver_present()):
        return [CPU_EP]
    _preload_cuda_libs()
    return [CUDA_EP, CPU_EP]


def _fallback_message(graph: str, file: str, used: list[str]) -> str:
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:  # CPU builds have no CUDA version
        cuda_version = "?"
    msg = (
        f"onnxruntime fell back to CPU for graph {graph!r} ({file}): {CUDA_EP} was requested but the session uses "
        f"{used}. onnxruntime-gpu {ort.__version__} (built for CUDA {cuda_version}) could not start CUDA; its own "
        f"log above says which library failed. Fix: install the CUDA {cuda_version} and cuDNN 9 libraries matching "
        "onnxruntime-gpu (e.g. pip install 'onnxruntime-gpu[cuda,cudnn]', or put the toolkit on LD_LIBRARY_PATH), "
        "check that nvidia-smi sees a GPU, or load with device='cpu' to run on the CPU on purpose"
    )
    return msg + (f". preload_dlls said: {_cuda_preload_log}" if _cuda_preload_log else "")


def load_bundle(
    path: str | Path,
    device: str = "auto",
    strict: bool = False,
    verify: bool = True,
    session_options: ort.SessionOptions | None = None,
) -> Bundle:
    """Loads a bundle folder and opens an onnxruntime session for each graph.

    Args:
        path: The bundle folder (or its ``manifest.json``).
        device: "cpu"; "cuda" (needs onnxruntime-gpu); or "auto": CUDA first when onnxruntime offers it and an
            NVIDIA driver is present, else CPU.
        strict: Raise instead of silently running on the CPU when CUDA was requested but onnxruntime could not
            start it. Without it, ``device="cuda"`` falling back only warns; check ``Bundle.providers``.
        verify: Check the sha256 of every file listed in the manifest before loading.
        session_options: Passed to every ``onnxruntime.InferenceSession`` (threads, optimisation level …).

    Returns:
        The loaded bundle.

    Raises:
        FileNotFoundError: No bundle or a listed file is missing.
        ValueError: Unknown format, malformed manifest, a file changed since export, or graph I/O not matching it.
        RuntimeError: CUDA asked for but unavailable (``device="cuda"``), or not really used (``strict=True``).
    """
    path = Path(path)
    if path.name == MANIFEST and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"bundle folder {path} does not exist; pass the folder holding manifest.json")
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    requested = _request_providers(device)
    sessions: dict[str, ort.InferenceSession] = {}
    graph_providers: dict[str, list[str]] = {}
    for name, graph in manifest["graphs"].items():
        file = _member(path, graph["file"])
        if not file.is_file():
            raise FileNotFoundError(f"graph {name!r} file {graph['file']!r} is missing from {path}")
        try:
            session = ort.InferenceSession(str(file), sess_options=session_options, providers=requested)
        except (InvalidProtobuf, InvalidGraph, NoSuchFile, Fail) as e:
            raise ValueError(
                f"onnxruntime cannot load graph {name!r} from {file} ({type(e).__name__}: {e}); the file is damaged "
                "or was written by a newer exporter: re-export the bundle or upgrade onnxruntime"
            ) from e
        used = list(session.get_providers())
        if CUDA_EP in requested and CUDA_EP not in used:
            if strict:
                raise RuntimeError(_fallback_message(name, graph["file"], used))
            if device == "cuda":
                warnings.warn(_fallback_message(name, graph["file"], used), RuntimeWarning, stacklevel=2)
        _check_graph_io(path, name, graph, session)
        sessions[name], graph_providers[name] = session, used
    return Bundle(path, manifest, sessions, requested, graph_providers)


def _check_graph_io(path: Path, name: str, graph: dict[str, Any], session: ort.InferenceSession) -> None:
    """The graph's real input/output names must be the ones the manifest promises."""
    for key, real in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        real_names, listed = sorted(x.name for x in real), sorted(graph[key])
        if real_names != listed:
            raise ValueError(
                f"bundle {path}: graph {name!r} ({graph['file']}) has {key} {real_names} but manifest.json lists "
                f"{listed}; the bundle is inconsistent, re-export it"
            )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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


def save_grid(images: np.ndarray, nrow: int, path: str | Path) -> Path:
    """(N, 3, H, W) images in [0, 1] -> one PNG grid with ``nrow`` images per row (2-pixel white gaps)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + 2), nrow * (w + 2), 3), 255, np.uint8)
    arr = (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = arr[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return Path(path)


def predict_cli(bundle: Bundle, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CLI's per-task prediction: one JSON-able record per input (see :func:`main`)."""
    task = bundle.task
    if task == "classification":
        return [{"image": str(i), **_short(r)} for i, r in zip(inputs, bundle.classify(list(inputs), args.batch_size))]
    if task == "pointcloud":
        res = bundle.classify_points(list(inputs), args.batch_size)
        return [{"file": str(i), **_short(r)} for i, r in zip(inputs, res, strict=True)]
    if task == "fewshot":
        if not args.support:
            raise ValueError("a few-shot bundle needs --support DIR (one sub-folder of images per class)")
        res = bundle.fewshot(support_folder(args.support), list(inputs), args.batch_size)
        return [{"image": str(i), **_short(r)} for i, r in zip(inputs, res, strict=True)]
    if task == "refseg":
        from PIL import Image

        out = []
        for item in inputs:
            if "::" not in item:
                raise ValueError(f"referring segmentation takes IMAGE::PHRASE (e.g. 'a.jpg::the dog'), got {item!r}")
            path, phrase = item.split("::", 1)
            r = bundle.segment(path, phrase)
            rec = {"image": path, "phrase": phrase, "area_fraction": r["area_fraction"], "max_prob": r["max_prob"]}
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                dest = Path(args.out) / f"{Path(path).stem}-{len(out)}.mask.png"
                Image.fromarray((r["mask"] * 255).astype(np.uint8)).save(dest)
                rec["mask"] = str(dest)
            out.append(rec)
        return out
    if task == "diffusion":
        classes = [c for c in inputs for _ in range(args.n)]
        images = bundle.generate(classes, steps=args.steps, guidance=args.guidance, seed=args.seed)
        dest = save_grid(images, args.n, args.out or "samples.png")
        return [{"classes": list(inputs), "n_per_class": args.n, "grid": str(dest), "shape": list(images.shape)}]
    raise ValueError(f"bundle task {task!r} has no command-line prediction; use Bundle.run()")


def _short(r: dict[str, Any]) -> dict[str, Any]:
    return {"label": r["label"], "index": r["index"], "prob": r["prob"]}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run a bundle on files, one JSON line per input.

    Inputs by task: classification = images; pointcloud = point files; fewshot = query images with
    ``--support DIR``; refseg = ``IMAGE::PHRASE`` (``--out DIR`` writes mask PNGs); diffusion = class names
    (``--n`` per class, ``--out grid.png``).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 1 when the bundle or an input cannot be used.
    """
    parser = argparse.ArgumentParser(
        prog="python -m vision_peft.deploy",
        description="Run an exported vision_peft bundle on files (onnxruntime only, no PyTorch).",
    )
    parser.add_argument("bundle", type=Path, help="bundle folder (holds manifest.json)")
    parser.add_argument("inputs", nargs="+", help="images / point files / IMAGE::PHRASE / class names (by task)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="execution device (default: auto)")
    parser.add_argument("--strict", action="store_true", help="fail instead of falling back from CUDA to CPU")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per onnxruntime call (default: 16)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    parser.add_argument("--support", help="fewshot: support folder, one sub-folder of images per class")
    parser.add_argument("--out", help="refseg: folder for mask PNGs; diffusion: the PNG grid (default samples.png)")
    parser.add_argument("--n", type=int, default=4, help="diffusion: images per class (default: 4)")
    parser.add_argument("--steps", type=int, default=25, help="diffusion: DDIM steps (default: 25)")
    parser.add_argument("--guidance", type=float, default=2.0, help="diffusion: guidance scale (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="diffusion: noise seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        bundle = load_bundle(args.bundle, device=args.device, strict=args.strict, verify=not args.no_verify)
        records = predict_cli(bundle, args.inputs, args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for rec in records:
        print(json.dumps({**rec, "providers": bundle.providers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
