"""The Runtime contract: the torch-free, numpy half of a task, and the helpers every runtime shares.

A runtime turns raw inputs into a bundle's graph inputs (preprocessing as the manifest says), runs the graph(s)
through the loaded bundle and turns the outputs into results. One subclass per task, registered in
``vision_peft.runtimes.RUNTIMES``; it declares:

- ``task``: the task name written in the manifest; ``endpoint``: its HTTP route; ``panel``: the app's predict-panel
  kind (``ranked_images`` | ``support_query`` | ``ranked_points`` | ``image_phrase_mask`` | ``class_grid``);
- ``methods``: the names of the methods it adds to a loaded ``Bundle`` (the first one is its main one);
- its deploy CLI handling (``cli_inputs``, ``cli_args``, :meth:`Runtime.predict_cli`);
- its HTTP request (``http_fields``, :meth:`Runtime.http`): the generic server builds the endpoint from them;
- :meth:`Runtime.load_test_request`: the requests ``bench/load_test.py`` sends.

:class:`RankedRuntime` is the contract filled in for tasks that rank their labels per uploaded file (the CLI, the
endpoint and the load test of image and point classifiers): such a runtime adds only its main method.

The torch halves of the tasks import the rules from here too (the prediction record, the PMF head, the token
rule, un-letterbox + threshold, the DDIM sampler), so each rule exists once. Nothing here imports torch.
"""

from __future__ import annotations

import abc
import argparse
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from vision_peft.bundle import check_labels
from vision_peft.preprocess import ImageInput, preprocess_batch, validate_spec


class BundleLike(Protocol):
    """What a runtime uses of a loaded ``vision_peft.deploy.Bundle``."""

    path: Path
    manifest: dict[str, Any]
    sessions: dict[str, Any]

    @property
    def task(self) -> str: ...
    @property
    def labels(self) -> list[str]: ...
    @property
    def preprocess(self) -> dict[str, dict[str, Any]]: ...
    @property
    def task_info(self) -> dict[str, Any]: ...
    @property
    def providers(self) -> list[str]: ...
    def run(self, graph_name: str, **inputs: Any) -> dict[str, np.ndarray]: ...
    def batched_run(self, graph: str, x: np.ndarray, batch_size: int, output: str | None = None) -> np.ndarray: ...
    def graph_inputs(self, graph: str) -> list[str]: ...
    def graph_outputs(self, graph: str) -> list[str]: ...


# -- the shared numeric rules ---------------------------------------------------------------------------------
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


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Logistic function on logits clipped to [-60, 60] (no overflow); keeps the input's float dtype."""
    return 1 / (1 + np.exp(-np.clip(logits, -60, 60)))


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def ranked_record(file: str | Path, probs: Sequence[float] | np.ndarray, labels: Sequence[str], top_k: int) -> dict:
    """THE prediction record of a ranked task (predict, the deploy CLI and the HTTP server all print this shape).

    Args:
        file: The input's name.
        probs: One probability per label.
        labels: Class names, in the order of ``probs``.
        top_k: How many (label, prob) pairs ``top`` lists, best first (ties keep label order).

    Returns:
        ``{"file", "label", "prob", "top": [{"label", "prob"}, ...]}`` with the top class first.
    """
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))[:top_k]
    return {
        "file": str(file),
        "label": labels[order[0]],
        "prob": float(probs[order[0]]),
        "top": [{"label": labels[i], "prob": float(probs[i])} for i in order],
    }


def ranked_result(labels: Sequence[str], probs: np.ndarray) -> dict[str, Any]:
    """What ``Bundle.classify`` and its kin return per input: ``label``, ``index``, ``prob`` and ``probs``
    (label -> probability for every class)."""
    idx = int(np.argmax(probs))
    return {
        "label": labels[idx],
        "index": idx,
        "prob": float(probs[idx]),
        "probs": {label: float(p) for label, p in zip(labels, probs, strict=True)},
    }


def record_of(file: str | Path, result: dict[str, Any], top_k: int) -> dict[str, Any]:
    """:func:`ranked_record` of one :func:`ranked_result` (its ``probs`` keep the label order)."""
    labels = list(result["probs"])
    return ranked_record(file, [result["probs"][c] for c in labels], labels, top_k)


# -- bundle helpers ---------------------------------------------------------------------------------------------
def check_list(items: Any, method: str) -> None:
    """Refuses a single path/array where a list of inputs is expected, naming the method."""
    if isinstance(items, (str, Path, np.ndarray)) or not isinstance(items, Sequence):
        raise ValueError(f"{method}() takes a list of inputs, got {type(items).__name__}; wrap one in a list")


def image_spec(bundle: BundleLike, input_name: str) -> dict[str, Any]:
    """The validated preprocess spec of one image input, from the manifest."""
    specs = bundle.preprocess
    if input_name not in specs:
        raise ValueError(
            f"manifest.json of {bundle.path} has no preprocess spec for input {input_name!r} "
            f"(found {list(specs)}); re-export the bundle"
        )
    try:
        spec = validate_spec(specs[input_name])
    except (ValueError, TypeError) as e:  # TypeError: a value of another JSON type (validate_spec assumes the types)
        raise ValueError(f"manifest.json of {bundle.path}: preprocess[{input_name!r}]: {e}") from None
    if max(spec["size"]) > MAX_IMAGE_SIDE:
        raise ValueError(
            f"manifest.json of {bundle.path}: preprocess[{input_name!r}].size {spec['size']} exceeds "
            f"{MAX_IMAGE_SIDE} pixels per side; the manifest is damaged, re-export the bundle"
        )
    return spec


MAX_IMAGE_SIDE = 16_384  # a preprocess size beyond this is a damaged manifest, not a model input (memory guard)


def logits_graph(bundle: BundleLike) -> tuple[str, str, str]:
    """(graph, input name, output name) of a classifier's one-input -> logits graph (``model`` / ``logits``)."""
    graphs = bundle.manifest["graphs"]
    if "model" in graphs:
        graph = "model"
    elif len(graphs) == 1:
        graph = next(iter(graphs))
    else:
        raise ValueError(f"classification bundle {bundle.path} must have a graph named 'model', found {list(graphs)}")
    inputs, outputs = bundle.graph_inputs(graph), bundle.graph_outputs(graph)
    if len(inputs) != 1:
        raise ValueError(
            f"bundle {bundle.path}: classification graph {graph!r} must take one image input, it takes {inputs}"
        )
    if "logits" in outputs:
        output = "logits"
    elif len(outputs) == 1:
        output = outputs[0]
    else:
        raise ValueError(
            f"bundle {bundle.path}: classification graph {graph!r} must have an output named 'logits', found {outputs}"
        )
    return graph, inputs[0], output


def checked_logits(bundle: BundleLike, graph: str, output: str, logits: np.ndarray) -> np.ndarray:
    """``logits`` when they are (B, classes) with one column per manifest label; else the bundle is refused."""
    if logits.ndim != 2 or logits.shape[1] != len(bundle.labels):
        raise ValueError(
            f"bundle {bundle.path}: graph {graph!r} output {output!r} has shape {list(logits.shape)} but the "
            f"manifest lists {len(bundle.labels)} labels; the bundle is inconsistent, re-export it"
        )
    return logits


def ranked_rows(bundle: BundleLike, graph: str, output: str, logits: np.ndarray) -> list[dict[str, Any]]:
    """Softmax + :func:`ranked_result` of (B, classes) logits, refusing a graph whose width differs from the labels."""
    return [ranked_result(bundle.labels, row) for row in softmax(checked_logits(bundle, graph, output, logits))]


def image_logits(
    bundle: BundleLike, images: Sequence[ImageInput], batch_size: int, method: str
) -> Iterator[np.ndarray]:
    """The (B, classes) logits of raw images through the bundle's one image -> logits graph, chunk by chunk
    (preprocessing as the manifest says; bounded memory).

    Args:
        bundle: The loaded bundle.
        images: Paths, PIL images or HWC uint8 RGB arrays.
        batch_size: Images per chunk and per onnxruntime call (a graph exported with a fixed batch size uses that).
        method: The calling method's name, for the error on a non-list input.

    Raises:
        ValueError: The input is not a list, ``batch_size`` is below 1, or the manifest does not fit the graph.
    """
    check_list(images, method)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    graph, input_name, output_name = logits_graph(bundle)
    spec = image_spec(bundle, input_name)
    for start in range(0, len(images), batch_size):
        x = preprocess_batch(list(images[start : start + batch_size]), spec)  # (B,3,H,W)
        yield checked_logits(bundle, graph, output_name, bundle.batched_run(graph, x, batch_size, output_name))


# -- HTTP: what an endpoint takes, described without a web framework --------------------------------------------
class HttpError(Exception):
    """A request the server refuses: ``status`` (4xx) and a ``detail`` naming the file or field and the fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class HttpField:
    """One request parameter of an endpoint.

    Attributes:
        name: Parameter name (multipart part, form field, query parameter).
        kind: ``files`` (one or more uploads), ``file`` (one upload), ``form`` (a string), ``form_list`` (strings),
            ``query`` (an optional query parameter of type ``type``) or ``json`` (the JSON body: ``body`` maps field
            name -> (type, default), ``...`` for required).
        type: The Python type of a ``query`` parameter.
        body: The JSON body's fields (``json`` only).
        model: The name of the generated JSON body model (``json`` only).
    """

    name: str
    kind: str
    type: Any = None
    body: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    model: str = ""


class HttpRequest(Protocol):
    """What a runtime's :meth:`Runtime.http` reads a request through (the server validates as it reads)."""

    limits: Any  # the server's ServeLimits (max_images, max_steps …)

    def value(self, name: str) -> Any:
        """A form / query / JSON-body value (the JSON body as a dict)."""
        ...

    def count(self, name: str) -> int:
        """How many files an upload field holds (nothing is read)."""
        ...

    def images(self, name: str) -> tuple[list[str], list[Any]]:
        """(upload names, decoded RGB PIL images) of an upload field (type, size and pixel limits checked)."""
        ...

    def files_on_disk(self, name: str, suffixes: Sequence[str]) -> tuple[list[str], list[Path]]:
        """(upload names, temporary file paths) of an upload field whose files must end in one of ``suffixes``
        (checked, with the size limit); the files live until the response is sent, and a ``ValueError`` naming a
        temporary path is reported with the upload's name instead."""
        ...


def checked_top_k(top_k: int | None, n: int) -> int:
    """``top_k`` of a request (default min(5, n)), refused outside 1..n."""
    top_k = min(5, n) if top_k is None else top_k
    if not 1 <= top_k <= n:
        raise HttpError(422, f"top_k must lie in 1..{n}, got {top_k}")
    return top_k


# -- command line ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CliArg:
    """One deploy-CLI option of a runtime: ``argparse`` flags and keyword arguments (several runtimes may declare
    the same flag with the same default; their helps are joined)."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]


TOP_K = CliArg(("--top-k",), {"type": int, "default": 5, "help": "classes listed per input (default: 5)"})


# -- load test -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadTestOptions:
    """What ``bench/load_test.py`` tells a runtime's request builder."""

    phrase: str = "the object in the middle"  # the phrase sent with each image (phrase-taking endpoints)
    steps: int = 10  # sampler steps per request (generating endpoints)
    labels: tuple[str, ...] = ()  # the bundle's class names (from /info, without a null class)


class LoadTestRequests(abc.ABC):
    """The requests of a load test: ``good(i)`` and ``malformed(kind)`` return ``httpx`` request keyword arguments.

    Malformed kinds: 0 garbage bytes, 1 a wrong file type or field, 2 a required part missing.
    """

    def __init__(self, route: str) -> None:
        self.route = route

    @abc.abstractmethod
    def good(self, i: int) -> dict[str, Any]:
        """Keyword arguments of the ``i``-th well-formed request."""

    @abc.abstractmethod
    def malformed(self, kind: int) -> dict[str, Any]:
        """Keyword arguments of a malformed request of ``kind`` (see the class docstring)."""


def read_upload_files(inputs: Path, suffixes: Sequence[str], limit: int = 32) -> list[tuple[str, bytes]]:
    """(name, bytes) of the first ``limit`` files under ``inputs`` with one of ``suffixes`` (sorted, recursive).

    Raises:
        SystemExit: No such file (the load test stops with the reason).
    """
    files = [(p.name, p.read_bytes()) for p in sorted(inputs.rglob("*")) if p.suffix.lower() in suffixes][:limit]
    if not files:
        raise SystemExit(f"no {'/'.join(suffixes)} files under {inputs}")
    return files


def malformed_upload(good: dict[str, Any], part: str, ext: str, kind: int) -> dict[str, Any]:
    """A malformed variant of an upload request: ``part``'s file replaced by garbage bytes named ``bad<ext>``
    (kind 0) or by a text file (kind 1); kind 2 sends nothing at all."""
    if kind == 2:
        return {}
    if kind == 0:
        swap = (f"bad{ext}", os.urandom(512))
    else:
        swap = ("bad.txt", b"text", "text/plain")
    return {**good, "files": [(f, swap) if f == part else (f, v) for f, v in good["files"]]}


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


# -- the contract ------------------------------------------------------------------------------------------------
class Runtime(abc.ABC):
    """The numpy half of one task, bound to a loaded bundle (``Bundle.runtime``).

    Subclasses set the class attributes below and implement :meth:`predict_cli`, :meth:`http` and
    :meth:`load_test_request`; every name in ``methods`` is a method of the subclass that ``Bundle`` exposes.
    """

    task: ClassVar[str] = ""
    endpoint: ClassVar[str] = ""
    panel: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()
    needs_labels: ClassVar[bool] = False  # the manifest must list unique class names
    cli_inputs: ClassVar[str] = ""  # what the CLI's positional inputs are, for --help
    cli_args: ClassVar[tuple[CliArg, ...]] = ()
    http_fields: ClassVar[tuple[HttpField, ...]] = ()
    load_test_inputs: ClassVar[str] = ""  # what bench/load_test.py's --inputs must hold ("" = nothing needed)

    def __init__(self, bundle: BundleLike) -> None:
        self.bundle = bundle

    @classmethod
    def check_manifest(cls, path: Path, manifest: dict[str, Any]) -> None:
        """Task-specific manifest checks at load time (structure is checked by ``bundle.read_manifest``)."""
        if cls.needs_labels:
            check_labels(path, manifest)

    @abc.abstractmethod
    def predict_cli(self, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
        """The deploy CLI's prediction: one JSON-able record per input (or per request)."""

    @abc.abstractmethod
    def http(self, request: HttpRequest) -> dict[str, Any]:
        """Answers one request of :attr:`endpoint` (the server adds ``providers``); raises :class:`HttpError`
        or ``ValueError`` (-> 422) for bad input."""

    @classmethod
    @abc.abstractmethod
    def load_test_request(cls, inputs: Path | None, options: LoadTestOptions) -> LoadTestRequests:
        """The load test's request builder for this endpoint (called on the class: tests/test_runtimes.py checks
        that no registered runtime leaves it abstract).

        Raises:
            SystemExit: ``inputs`` does not hold what the endpoint needs.
        """


class RankedRuntime(Runtime):
    """A runtime that ranks a bundle's labels for each uploaded file: its main method (``methods[0]``) takes a list
    of inputs and a batch size and returns one :func:`ranked_result`-like dict per input; the deploy CLI prints
    and the endpoint answers one :func:`record_of` record per input, ``top_k`` from ``--top-k`` / the ``top_k``
    query parameter; the load test uploads one file per request."""

    needs_labels = True
    cli_args = (TOP_K,)
    http_fields = (HttpField("files", "files"), HttpField("top_k", "query", type=int))
    load_test_suffixes: ClassVar[tuple[str, ...]] = (".jpg",)  # the files the load test uploads
    malformed_suffix: ClassVar[str] = ".jpg"  # the name of the load test's garbage upload ends in this

    def results(self, inputs: Sequence[Any], batch_size: int = 16) -> list[dict[str, Any]]:
        """The main method's results for ``inputs``."""
        return getattr(self, self.methods[0])(list(inputs), batch_size)

    def uploads(self, request: HttpRequest) -> tuple[list[str], list[Any]]:
        """(upload names, inputs for the main method) of a request's ``files`` part: decoded images here."""
        return request.images("files")

    def record(self, file: str | Path, result: dict[str, Any], top_k: int) -> dict[str, Any]:
        """The printed / answered record of one result."""
        return record_of(file, result, top_k)

    def predict_cli(self, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
        res = self.results(inputs, args.batch_size)
        return [self.record(i, r, args.top_k) for i, r in zip(inputs, res, strict=True)]

    def http(self, request: HttpRequest) -> dict[str, Any]:
        top_k = checked_top_k(request.value("top_k"), len(self.bundle.labels))
        names, items = self.uploads(request)
        return {"results": [self.record(n, r, top_k) for n, r in zip(names, self.results(items), strict=True)]}

    @classmethod
    def load_test_request(cls, inputs: Path | None, options: LoadTestOptions) -> LoadTestRequests:
        files = read_upload_files(inputs or Path("."), cls.load_test_suffixes)
        return UploadRequests(cls.endpoint, files, cls.malformed_suffix)


def runtime_for_task(task: str) -> type[Runtime] | None:
    """The runtime class registered for a manifest's task name, None when no runtime serves it."""
    from vision_peft.runtimes import RUNTIMES

    for _, entry in RUNTIMES.items():
        if entry.builder.task == task:
            return entry.builder
    return None


def method_owner(method: str) -> type[Runtime] | None:
    """The runtime class whose ``methods`` include ``method``, None when no runtime has it."""
    from vision_peft.runtimes import RUNTIMES

    for _, entry in RUNTIMES.items():
        if method in entry.builder.methods:
            return entry.builder
    return None
