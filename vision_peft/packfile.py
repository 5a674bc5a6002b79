"""The adapter-pack file contract, torch-free: one ``.onnx_adapter`` + ``.adapter.json`` pair per adapter.

A pack (design.md §8) is a bundle whose base graph(s) are written once, with every trainable tensor of the runs
(LoRA A/B and scale, prompts, prompt maps, VPT tokens, DETRIS aligners, heads) exposed as a named graph input
with a zero default initializer. Each run then travels as two files:

- ``<name>.onnx_adapter``: onnxruntime's adapter format (``onnxruntime.AdapterFormat``), the run's tensors by
  graph-input name; the runtime memory-maps it with ``onnxruntime.LoraAdapter`` and activates it per request
  with ``RunOptions.add_active_adapter``;
- ``<name>.adapter.json``: what the tensors do not say (format ``vision_peft.adapter/1``)::

    {"format": "vision_peft.adapter/1", "name": "...", "task": "...", "backbone": "...",
     "backbone_weights_id": "<sha256 of the backbone weights>", "adapter": "<family, e.g. lora>",
     "source_run": "/abs/run", "labels": [...], "preprocess": {...}, "task_info": {...},
     "tensors": {"<input>": {"shape": [...], "dtype": "float32"}}, "parity": {...}}

The bundle's ``manifest.json`` repeats each adapter's record under ``adapters`` (with the two file names); a
server can take a new pair at run time (``POST /v1/adapters``). Everything that refuses a pair lives here:
:func:`check_name`, :func:`read_meta`, :func:`read_tensors` and :func:`check_against_graph` (names, shapes,
dtypes against the graph's adapter inputs, the backbone hash, task and family against the pack), so the exporter,
the loader and the server apply one rule. Only numpy, onnxruntime and the standard library are imported here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER_FORMAT = "vision_peft.adapter/1"
ADAPTER_SUFFIX = ".onnx_adapter"
META_SUFFIX = ".adapter.json"
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ADAPTER_BYTES = 512 * 2**20  # an upload larger than this is not an adapter of a shared backbone

# onnxruntime OrtValue.data_type() strings <-> numpy
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
           "tensor(bool)": "bool"}  # fmt: skip


class AdapterFileError(ValueError):
    """An adapter pair that cannot be used with this pack; the message names the file, the field and the fix."""


def check_name(name: str) -> str:
    """An adapter name: 1–64 letters, digits, ``_ . -``, starting with a letter or digit (no path characters).

    Raises:
        AdapterFileError: The name could leave its folder or is empty/too long.
    """
    if not isinstance(name, str) or not NAME_RULE.match(name) or ".." in name:
        raise AdapterFileError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit (no '/', '\\' or '..')"
        )
    return name


def adapter_files(name: str) -> tuple[str, str]:
    """(tensor file, metadata file) names of adapter ``name`` inside a pack."""
    check_name(name)
    return f"{name}{ADAPTER_SUFFIX}", f"{name}{META_SUFFIX}"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tensors(path: str | Path, tensors: dict[str, np.ndarray], model_version: int = 1) -> Path:
    """Writes ``tensors`` as an onnxruntime ``.onnx_adapter`` file, atomically (temporary file + rename).

    Args:
        path: The target file.
        tensors: Graph-input name -> array (C-contiguous copies are written).
        model_version: Stored in the file's header (onnxruntime's ``model_version`` field).

    Returns:
        The path written.
    """
    import onnxruntime as ort

    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # OrtValues below keep views of these

    def write(tmp: str) -> None:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(model_version)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
        fmt.export_adapter(tmp)

    _atomic(path, write)
    return path


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of an ``.onnx_adapter`` file (name -> array copy).

    Raises:
        AdapterFileError: Missing, not an onnxruntime adapter file, or truncated.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        return {k: np.array(v.numpy()) for k, v in params.items()}
    except Exception as e:  # onnxruntime raises its own Fail / RuntimeError kinds for a damaged flatbuffer
        raise AdapterFileError(
            f"{path} is not a readable onnxruntime adapter file ({type(e).__name__}: {str(e)[:200]}); export it "
            "again with `python -m vision_peft export <run> --adapter-for <pack>`"
        ) from None


def tensor_specs(tensors: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Name -> ``{"shape", "dtype"}`` of arrays (the ``tensors`` field of the metadata)."""
    return {k: {"shape": [int(d) for d in v.shape], "dtype": str(v.dtype)} for k, v in sorted(tensors.items())}


def build_meta(
    *,
    name: str,
    task: str,
    backbone: str,
    backbone_weights_id: str,
    adapter: str,
    source_run: str,
    labels: list[str],
    preprocess: dict[str, Any],
    task_info: dict[str, Any],
    tensors: dict[str, np.ndarray],
    parity: dict[str, Any],
) -> dict[str, Any]:
    """The ``.adapter.json`` record of one adapter (see the module docstring)."""
    check_name(name)
    return {
        "format": ADAPTER_FORMAT,
        "name": name,
        "task": task,
        "backbone": backbone,
        "backbone_weights_id": backbone_weights_id,
        "adapter": adapter,
        "source_run": source_run,
        "labels": list(labels or []),
        "preprocess": preprocess or {},
        "task_info": task_info or {},
        "tensors": tensor_specs(tensors),
        "parity": parity,
    }


def write_meta(path: str | Path, meta: dict[str, Any]) -> Path:
    """Writes an ``.adapter.json`` atomically."""
    path = Path(path)
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8"))
    return path


REQUIRED_META = {"format": str, "name": str, "task": str, "backbone": str, "backbone_weights_id": str,
                 "adapter": str, "labels": list, "preprocess": dict, "task_info": dict, "tensors": dict}  # fmt: skip


def check_meta(meta: Any, source: str) -> dict[str, Any]:
    """Structure of an adapter record (format, required fields and their types, the name rule).

    Raises:
        AdapterFileError: naming ``source`` and the field.
    """
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{source}: an adapter record must be a JSON object")
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(
            f"{source}: format {meta.get('format')!r} is not {ADAPTER_FORMAT!r}; it is not a vision_peft adapter "
            "record (export one with `python -m vision_peft export <run> --adapter-for <pack>`)"
        )
    for key, kind in REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            raise AdapterFileError(f"{source}: field {key!r} must be a {kind.__name__}; re-export the adapter")
    try:
        check_name(meta["name"])
    except AdapterFileError as e:
        raise AdapterFileError(f"{source}: field 'name': {e}") from None
    bad = sorted(str(k) for k, v in meta["preprocess"].items() if not isinstance(v, dict))
    if bad:
        raise AdapterFileError(f"{source}: 'preprocess' must map each input to a spec object ({bad} do not)")
    if not all(isinstance(x, str) for x in meta["labels"]) or len(set(meta["labels"])) != len(meta["labels"]):
        raise AdapterFileError(f"{source}: 'labels' must be unique class-name strings")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """Reads and checks an ``.adapter.json`` (:func:`check_meta`).

    Raises:
        AdapterFileError: Missing, not JSON, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter record {path} does not exist")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # Recursion: nested too deep to parse
        raise AdapterFileError(f"{path} is not valid JSON ({str(e)[:200]}); re-export the adapter") from None
    return check_meta(meta, str(path))


SHAPE_FIELDS = ("size", "num_points")  # preprocess fields that fix a graph input's shape


def preprocess_conflict(pack: dict[str, Any], adapter: dict[str, Any]) -> str:
    """Why an adapter's preprocess cannot feed the pack's graph ("" when it can): the same inputs, and per input
    the same shape-fixing fields (image size, number of points). The rest (resize rule, normalisation) is the
    adapter's own: each adapter's runtime preprocesses with its own record."""
    if sorted(pack) != sorted(adapter):
        return f"preprocess covers inputs {sorted(adapter)}, the pack's graph takes {sorted(pack)}"
    for name, spec in pack.items():
        for key in SHAPE_FIELDS:
            if isinstance(spec, dict) and spec.get(key) != (adapter.get(name) or {}).get(key):
                return (
                    f"preprocess[{name!r}].{key} is {(adapter.get(name) or {}).get(key)!r}, the pack's graph takes "
                    f"{spec.get(key)!r}"
                )
    return ""


def _dim_ok(want: Any, got: int, symbols: dict[str, int]) -> bool:
    if isinstance(want, int):
        return want == got
    if isinstance(want, str):  # a symbolic dim: free, but one value per symbol within an adapter
        return symbols.setdefault(want, got) == got
    return True  # unknown dim (None): free


def check_against_graph(
    pack: dict[str, Any], meta: dict[str, Any], tensors: dict[str, np.ndarray], source: str
) -> None:
    """Refuses an adapter pair that this pack cannot run: another task, family or backbone hash, a preprocess
    for another input shape (:func:`preprocess_conflict`), or tensors whose names, shapes or dtypes differ from the graphs' adapter inputs
    (symbolic dims such as ``classes`` are free but must agree across tensors, and ``classes`` must equal the
    number of labels when the adapter has labels).

    Args:
        pack: The pack's manifest (``graphs[*]["adapter_inputs"]``, ``task``, ``adapter``, ``backbone_weights_id``,
            ``preprocess``).
        meta: The adapter record (checked with :func:`check_meta`).
        tensors: The adapter's tensors.
        source: The file named in errors.

    Raises:
        AdapterFileError: naming the field or tensor and the fix.
    """
    for key in ("task", "adapter", "backbone_weights_id"):
        if meta.get(key) != pack.get(key):
            raise AdapterFileError(
                f"{source}: {key} {meta.get(key)!r} differs from this pack's {pack.get(key)!r}; an adapter joins a "
                "pack only when it was trained for the same task, adapter family and backbone weights"
            )
    problem = preprocess_conflict(pack.get("preprocess", {}), meta["preprocess"])
    if problem:
        raise AdapterFileError(f"{source}: {problem}; train at the pack's input size")
    expected: dict[str, dict[str, Any]] = {}
    for graph in pack["graphs"].values():
        expected.update(graph.get("adapter_inputs") or {})
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise AdapterFileError(
            f"{source} does not fit this pack's graph: {len(missing)} missing tensor(s) {missing[:4]}, "
            f"{len(unknown)} unknown tensor(s) {unknown[:4]}; it was trained with another adapter layout "
            "(targets, rank or method)"
        )
    symbols: dict[str, int] = {}
    for name, spec in sorted(expected.items()):
        arr = tensors[name]
        if str(arr.dtype) != spec["dtype"]:
            raise AdapterFileError(f"{source}: tensor {name!r} is {arr.dtype}, the graph takes {spec['dtype']}")
        shape = spec["shape"]
        if arr.ndim != len(shape) or not all(_dim_ok(w, int(g), symbols) for w, g in zip(shape, arr.shape)):
            raise AdapterFileError(
                f"{source}: tensor {name!r} has shape {list(arr.shape)}, the graph takes {shape} (named dims are "
                f"free but must agree across tensors: {symbols}); another rank, width or class count"
            )
    if meta["labels"] and "classes" in symbols and symbols["classes"] != len(meta["labels"]):
        raise AdapterFileError(
            f"{source}: the head has {symbols['classes']} classes but the record lists {len(meta['labels'])} labels"
        )
    if meta.get("tensors") and meta["tensors"] != tensor_specs(tensors):
        raise AdapterFileError(f"{source}: the record's 'tensors' do not describe the adapter file; re-export it")
