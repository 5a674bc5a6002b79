"""Run an exported vision_peft bundle with onnxruntime only: no PyTorch, no model code.

A bundle is a folder holding ``manifest.json`` (the contract in :mod:`vision_peft.bundle`) and the ONNX graphs it
names (design.md §8). This module opens one onnxruntime session per graph, runs them (:meth:`Bundle.run`) and hands
the task's pre/post-processing to the bundle's runtime (``vision_peft.runtimes.RUNTIMES``, chosen by the manifest's
task). It imports only torch-free modules, so it runs where only the deployment dependencies are installed.

```
bundle = load_bundle("runs/rs_scenes/bundle", device="auto")
bundle.classify(["airport.jpg"])  # [{"label": "Airport", "index": 0, "prob": 0.97, "probs": {...}}]
bundle.run("model", image=x)       # {"logits": array(...)}
```

The runtime's methods are the bundle's: ``classify`` (images), ``fewshot`` / ``prototypes`` / ``embed`` (support set
+ query images), ``classify_points`` (point files), ``segment`` / ``tokenize`` (image + phrase), ``generate`` (class
names -> images); calling another task's method raises an error naming the right one.

Command line: ``python -m vision_peft.deploy <bundle> <input> [<input> ...] [--device cpu|cuda|auto] [--strict] [--graph NAME]``
prints one JSON line per input (see :func:`main`; ranked tasks print :func:`~vision_peft.runtimes.base.ranked_record`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile

from vision_peft import bundle as contract
from vision_peft.bundle import BUNDLE_FORMAT, MANIFEST, SUPPORTED_FORMATS, sha256_file, verify_files
from vision_peft.deploy_pack import LoadedAdapter, PackMixin, _check_adapter_inputs, _Pack, load_pack_adapters
from vision_peft.preprocess import IMAGE_SUFFIXES
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import Runtime, method_owner, runtime_for_task, softmax
from vision_peft.runtimes.diffusion import save_grid
from vision_peft.runtimes.fewshot import support_folder

__all__ = [
    "BUNDLE_FORMAT",
    "DEVICES",
    "IMAGE_SUFFIXES",
    "MANIFEST",
    "SUPPORTED_FORMATS",
    "Bundle",
    "load_bundle",
    "main",
    "read_manifest",
    "save_grid",
    "sha256_file",
    "softmax",
    "support_folder",
    "verify_files",
]

DEVICES = ("auto", "cpu", "cuda")
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
_cuda_libs_preloaded = False
_cuda_preload_log = ""


@dataclass
class Bundle(PackMixin):
    """A loaded bundle: its manifest, one onnxruntime session per graph, and its task's runtime.

    A pack (``vision_peft.bundle/2``) holds several adapters over one base graph: :attr:`adapters` lists them,
    every runtime method takes ``adapter=<name>`` (required when there is more than one), and :meth:`select`
    returns the view of one adapter (its labels, task facts and runtime; the sessions are shared).

    Attributes:
        path: The bundle folder.
        manifest: The parsed ``manifest.json`` (a view's carries its adapter's labels / preprocess / task_info).
        sessions: Graph name -> onnxruntime session.
        requested_providers: Execution providers asked for, in priority order.
        graph_providers: Graph name -> providers onnxruntime really uses (``session.get_providers()``).
        runtime: The task's runtime bound to this bundle (None for a task no runtime serves: use :meth:`run`).
        active: The pack adapter this view runs (None for a merged bundle and for a pack's own object).
    """

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    sessions: dict[str, ort.InferenceSession] = field(repr=False)
    requested_providers: list[str]
    graph_providers: dict[str, list[str]]
    runtime: Runtime | None = field(default=None, repr=False)
    active: LoadedAdapter | None = field(default=None, repr=False)
    pack: _Pack | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.runtime is None:
            cls = runtime_for_task(self.task)
            self.runtime = cls(self) if cls is not None else None

    @property
    def task(self) -> str:
        """The task the bundle was exported for (``classification``, ``fewshot`` …)."""
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
    def task_info(self) -> dict[str, Any]:
        """Structured facts the runtime needs beyond the graphs (PMF scale/bias, the diffusion schedule …)."""
        return dict(self.manifest.get("task_info") or {})

    @property
    def providers(self) -> list[str]:
        """Execution providers really in use, over all graphs, in priority order."""
        seen: list[str] = []
        for used in self.graph_providers.values():
            seen += [p for p in used if p not in seen]
        return seen

    def __getattr__(self, name: str) -> Any:
        """The runtime's methods (``classify``, ``segment`` …) are the bundle's; another task's method raises a
        ValueError naming the method that fits this bundle when called."""
        if name.startswith("_") or name in ("runtime", "manifest", "path", "sessions"):
            raise AttributeError(name)
        runtime = self.__dict__.get("runtime")
        if runtime is not None and name in runtime.methods:
            return self._method(name)
        owner = method_owner(name)
        if owner is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self._refusal(name, owner)

    def _method(self, name: str) -> Callable[..., Any]:
        """A runtime method that also takes ``adapter=<name>`` (see :meth:`select`)."""

        def call(*args: Any, adapter: str | None = None, **kwargs: Any) -> Any:
            return getattr(self.select(adapter).runtime, name)(*args, **kwargs)

        call.__name__ = name
        call.__doc__ = getattr(type(self.runtime), name).__doc__
        return call

    def __dir__(self) -> list[str]:
        runtime = self.__dict__.get("runtime")
        return sorted(set(super().__dir__()) | set(runtime.methods if runtime is not None else ()))

    def _refusal(self, method: str, owner: type[Runtime]) -> Callable[..., Any]:
        runtime = self.__dict__.get("runtime")
        fix = (
            f"use {runtime.methods[0]}() for it"
            if runtime is not None and runtime.methods
            else f"call run(graph_name, **inputs) with the graphs {list(self.sessions)} instead"
        )

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise ValueError(
                f"{method}() needs a bundle exported for task {owner.task!r}, this one ({self.path}) is "
                f"{self.task!r}; {fix}"
            )

        return refuse

    def use_graph(self, name: str) -> None:
        """Runs the reduced-precision variant ``name`` (e.g. ``model_int8_static``, ``model_fp16``; its manifest
        entry names the graph it stands for in ``variant_of``) wherever the runtime runs that base graph.

        Raises:
            ValueError: No such graph, or the graph is not a variant of another.
        """
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise ValueError(f"--graph {name!r}: bundle {self.path} has graphs {', '.join(graphs)}; pick one of them")
        base = graphs[name].get("variant_of")
        if base is None:
            if name in self.sessions:
                return  # a base graph: nothing to swap
            raise ValueError(f"--graph {name!r}: not loaded from bundle {self.path}")
        if base not in self.sessions:
            raise ValueError(f"--graph {name!r} stands for graph {base!r}, which bundle {self.path} lacks; re-export")
        self.sessions[base] = self.sessions[name]
        self.graph_providers[base] = self.graph_providers[name]

    def graph_inputs(self, graph: str) -> list[str]:
        """Input names of one graph, in the graph's order."""
        return [i.name for i in self._session(graph).get_inputs()]

    def graph_outputs(self, graph: str) -> list[str]:
        """Output names of one graph, in the graph's order."""
        return [o.name for o in self._session(graph).get_outputs()]

    def _session(self, graph: str) -> ort.InferenceSession:
        if graph not in self.sessions:
            raise ValueError(f"bundle {self.path} has no graph {graph!r} (found {list(self.sessions)}); re-export it")
        return self.sessions[graph]

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
            dtype = contract.numpy_dtype(meta.type)
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
        values = session.run(None, feed, self._run_options(graph_name))
        return {o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}

    def batched_run(self, graph: str, x: np.ndarray, batch_size: int, output: str | None = None) -> np.ndarray:
        """Runs a one-input graph over ``x`` in chunks (padding to a fixed batch size when the graph has one).

        Args:
            graph: The graph's name.
            x: The whole batch (N, ...).
            batch_size: Rows per onnxruntime call (a graph exported with a fixed batch size uses that instead).
            output: Which output to return (default: the graph's first).

        Returns:
            The output for all N rows, concatenated.
        """
        session = self._session(graph)
        name, out = session.get_inputs()[0].name, output or session.get_outputs()[0].name
        fixed = session.get_inputs()[0].shape[0]
        step = fixed if isinstance(fixed, int) else max(1, batch_size)
        res = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            n = len(chunk)
            if isinstance(fixed, int) and n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            res.append(self.run(graph, **{name: chunk})[out][:n])
        return np.concatenate(res) if res else np.zeros((0,), np.float32)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """:func:`vision_peft.bundle.read_manifest` (structure and format version; the same argument, result and
    errors) followed by the task runtime's own checks, e.g. a classifier's labels (``ValueError``). Files are not
    hashed."""
    manifest = contract.read_manifest(path)
    runtime = runtime_for_task(manifest["task"])
    if runtime is not None and not contract.is_pack(manifest):  # a pack's labels are its adapters' (checked at load)
        runtime.check_manifest(Path(path), manifest)
    return manifest


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
    if session_options is None and contract.is_pack(manifest):
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3  # else one warning per overridable adapter input
    sessions: dict[str, ort.InferenceSession] = {}
    graph_providers: dict[str, list[str]] = {}
    for name, graph in manifest["graphs"].items():
        file = contract.member(path, graph["file"])
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
        if contract.is_pack(manifest):
            _check_adapter_inputs(path, name, graph, session)
        sessions[name], graph_providers[name] = session, used
    if not contract.is_pack(manifest):
        return Bundle(path, manifest, sessions, requested, graph_providers)
    pack = load_pack_adapters(path, manifest, sessions)
    return Bundle(path, manifest, sessions, requested, graph_providers, pack=pack)


def _check_graph_io(path: Path, name: str, graph: dict[str, Any], session: ort.InferenceSession) -> None:
    """The graph's real input/output names must be the ones the manifest promises."""
    for key, real in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        real_names, listed = sorted(x.name for x in real), sorted(graph[key])
        if real_names != listed:
            raise ValueError(
                f"bundle {path}: graph {name!r} ({graph['file']}) has {key} {real_names} but manifest.json lists "
                f"{listed}; the bundle is inconsistent, re-export it"
            )


def cli_parser() -> argparse.ArgumentParser:
    """The deploy CLI's parser: the generic options, then every runtime's own (a flag several runtimes share is
    added once, its help naming each)."""
    parser = argparse.ArgumentParser(
        prog="python -m vision_peft.deploy",
        description="Run an exported vision_peft bundle on files (onnxruntime only, no PyTorch).",
    )
    parser.add_argument("bundle", type=Path, help="bundle folder (holds manifest.json)")
    inputs = "; ".join(f"{name}: {e.builder.cli_inputs}" for name, e in RUNTIMES.items() if e.builder.cli_inputs)
    parser.add_argument("inputs", nargs="+", help=f"what the bundle's task takes ({inputs})")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="execution device (default: auto)")
    parser.add_argument("--strict", action="store_true", help="fail instead of falling back from CUDA to CPU")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per onnxruntime call (default: 16)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    parser.add_argument("--adapter", help="the pack adapter to run (required when a pack holds several)")
    parser.add_argument(
        "--graph",
        help="run this graph variant instead of its fp32 base (e.g. model_int8, model_int8_static, model_fp16)",
    )
    options: dict[tuple[str, ...], tuple[dict[str, Any], list[str]]] = {}
    for name, entry in RUNTIMES.items():
        for arg in entry.builder.cli_args:
            kwargs, helps = options.setdefault(arg.flags, ({k: v for k, v in arg.kwargs.items() if k != "help"}, []))
            if any(kwargs.get(k) != v for k, v in arg.kwargs.items() if k != "help"):
                raise ValueError(f"runtime {name!r} declares {arg.flags} unlike another runtime: {arg.kwargs}")
            helps.append(f"{name}: {arg.kwargs.get('help', '')}")
    for flags, (kwargs, helps) in options.items():
        parser.add_argument(*flags, **kwargs, help="; ".join(helps))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run a bundle on files, one JSON line per input (``providers`` added to each).

    The inputs and options depend on the bundle's task (``--help`` lists them): e.g. classification = images,
    fewshot = query images with ``--support DIR``, refseg = ``IMAGE::PHRASE``, diffusion = class names.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 1 when the bundle or an input cannot be used.
    """
    args = cli_parser().parse_args(argv)
    try:
        bundle = load_bundle(args.bundle, device=args.device, strict=args.strict, verify=not args.no_verify)
        if bundle.runtime is None:
            raise ValueError(f"bundle task {bundle.task!r} has no command-line prediction; use Bundle.run()")
        if args.graph:
            bundle.use_graph(args.graph)
        chosen = bundle.select(args.adapter)
        records = chosen.runtime.predict_cli(args.inputs, args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    extra = {"adapter": chosen.adapter_name} if chosen.adapter_name else {}
    for rec in records:
        print(json.dumps({**rec, **extra, "providers": bundle.providers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
