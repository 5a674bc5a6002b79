"""The deployment-bundle contract, torch-free: the ``manifest.json`` schema, its writing, reading and verification.

A bundle is a folder holding ``manifest.json`` and the ONNX graphs (plus extra files such as ``tokenizer.json``)
it names (design.md §8). The manifest, format ``vision_peft.bundle/1``::

    {"format": "vision_peft.bundle/1", "task": "...", "backbone": "...", "adapter": "...",
     "vision_peft_version": "0.1.0",
     "graphs": {"<name>": {"file": "<name>.onnx",
                           "inputs": {"<input>": {"shape": ["batch", 3, 224, 224], "dtype": "float32"}},
                           "outputs": {"<output>": {"shape": [...], "dtype": "...", "meaning": "..."}}}},
     "preprocess": {"<input>": {...preprocess spec...}}, "labels": [...], "task_info": {...},
     "files": {"<file name>": "<sha256 hex>"}, "parity": {...}, "source_run": "/abs/run/dir"}

``export`` writes it with :func:`write_manifest`, ``deploy`` reads it with :func:`read_manifest` and checks the
hashes with :func:`verify_files`. Only numpy and the standard library are imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft import __version__

BUNDLE_FORMAT = "vision_peft.bundle/1"
PACK_FORMAT = (
    "vision_peft.bundle/2"  # a pack: base graph(s) once + adapters (vision_peft.packfile); /1 readers refuse it
)
SUPPORTED_FORMATS = (BUNDLE_FORMAT, PACK_FORMAT)  # every format this version reads (old bundles keep loading)
MANIFEST = "manifest.json"
RESERVED_FILES = (MANIFEST, "parity.json", "preprocess.json")  # written by export itself, never an extra file

# onnxruntime's tensor type string -> (numpy dtype, the name written in the manifest)
ONNX_DTYPES: dict[str, tuple[Any, str]] = {
    "tensor(float)": (np.float32, "float32"),
    "tensor(float16)": (np.float16, "float16"),
    "tensor(double)": (np.float64, "float64"),
    "tensor(int64)": (np.int64, "int64"),
    "tensor(int32)": (np.int32, "int32"),
    "tensor(int8)": (np.int8, "int8"),
    "tensor(uint8)": (np.uint8, "uint8"),
    "tensor(bool)": (np.bool_, "bool"),
}


def numpy_dtype(onnx_type: str) -> Any | None:
    """The numpy dtype of an onnxruntime tensor type string (``"tensor(float)"`` -> float32), None if unknown."""
    entry = ONNX_DTYPES.get(onnx_type)
    return entry[0] if entry else None


def dtype_name(onnx_type: str) -> str:
    """The manifest's dtype name of an onnxruntime tensor type string (``"tensor(float)"`` -> ``"float32"``);
    an unknown type keeps its onnxruntime spelling."""
    entry = ONNX_DTYPES.get(onnx_type)
    return entry[1] if entry else onnx_type


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: str | Path) -> dict[str, str]:
    """File name -> sha256 for every plain file directly in ``folder`` (sorted; the manifest itself excluded)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST}


def member(path: str | Path, name: str) -> Path:
    """Resolves a file named in the manifest, refusing names that leave the bundle folder.

    Args:
        path: The bundle folder.
        name: A file name from the manifest.

    Raises:
        ValueError: The name is absolute or climbs out of the folder with ``..``.
    """
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"manifest.json of {path} names file {name!r} outside the bundle; re-export the bundle")
    return Path(path) / rel


def build_manifest(
    folder: str | Path,
    *,
    task: str,
    backbone: str,
    adapter: str,
    graphs: dict[str, dict[str, Any]],
    preprocess: dict[str, Any],
    labels: list[str],
    task_info: dict[str, Any],
    parity: dict[str, Any],
    source_run: str,
    pack: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a bundle folder whose graphs and extra files are already written (hashes taken now).

    Args:
        folder: The bundle folder.
        task: The task's registry name (selects the deploy runtime).
        backbone: The backbone's registry name.
        adapter: The adapter's registry name.
        graphs: Graph name -> ``{"file", "inputs", "outputs"}`` (see the module docstring).
        preprocess: Input name -> preprocess spec.
        labels: Class names in logit order (empty when the task has none).
        task_info: Facts the runtime needs beyond the graphs.
        parity: The export's parity report.
        source_run: The run directory the bundle was exported from.
        pack: For a pack (format ``vision_peft.bundle/2``): ``{"backbone_weights_id", "adapters": {name: record
            with "file" and "meta_file"}}``; its graphs list their ``adapter_inputs``. None for a merged bundle.

    Returns:
        The manifest dict, in the key order bundles have always had (a pack adds its two fields at the end).
    """
    manifest = {
        "format": PACK_FORMAT if pack else BUNDLE_FORMAT,
        "task": task,
        "backbone": backbone,
        "adapter": adapter,
        "vision_peft_version": __version__,
        "graphs": graphs,
        "preprocess": preprocess or {},
        "labels": labels or [],
        "task_info": task_info or {},
        "files": file_hashes(folder),
        "parity": parity,
        "source_run": source_run,
    }
    if pack:
        manifest["backbone_weights_id"] = pack["backbone_weights_id"]
        manifest["adapters"] = pack["adapters"]
    return manifest


def is_pack(manifest: dict[str, Any]) -> bool:
    """Whether a manifest describes an adapter pack (base graph + adapters) rather than a merged bundle."""
    return manifest.get("format") == PACK_FORMAT


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Writes ``folder/manifest.json`` atomically (temporary file + rename: a reader never sees half a file).

    Args:
        folder: The bundle folder.
        manifest: The manifest (from :func:`build_manifest`).

    Returns:
        The manifest's path.
    """
    path = Path(folder) / MANIFEST
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2, default=str) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600: a server running as another user must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads and checks a bundle's ``manifest.json`` (structure and format version only; files are not hashed).

    Task-specific checks (e.g. the labels of a classifier) belong to the task's runtime
    (``vision_peft.deploy.read_manifest`` runs both).

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
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{manifest_path} is not UTF-8 text ({e}); re-export the bundle") from None
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested deeper than the parser goes
        raise ValueError(f"{manifest_path} is not valid JSON ({str(e)[:200]}); re-export the bundle") from None
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
    for key, kind in (("preprocess", dict), ("labels", list), ("task_info", dict)):  # optional, but typed
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            raise ValueError(f"{manifest_path}: field {key!r} must be a {kind.__name__}; re-export the bundle")
    bad = sorted(str(k) for k, v in (manifest.get("preprocess") or {}).items() if not isinstance(v, dict))
    if bad:
        raise ValueError(f"{manifest_path}: 'preprocess' must map each input to a spec object ({bad} do not)")
    if is_pack(manifest):
        if not isinstance(manifest.get("adapters"), dict) or not isinstance(manifest.get("backbone_weights_id"), str):
            raise ValueError(f"{manifest_path}: a pack needs 'adapters' and 'backbone_weights_id'; re-export it")
        for name, rec in manifest["adapters"].items():
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("file", "meta_file")):
                raise ValueError(f"{manifest_path}: adapter {name!r} needs 'file' and 'meta_file'; re-export the pack")
    for name, graph in manifest["graphs"].items():
        if not isinstance(graph, dict) or not isinstance(graph.get("file"), str):
            raise ValueError(f"{manifest_path}: graph {name!r} needs a 'file' entry; re-export the bundle")
        for key in ("inputs", "outputs"):
            if not isinstance(graph.get(key), dict) or not graph[key]:
                raise ValueError(f"{manifest_path}: graph {name!r} needs non-empty {key!r}; re-export the bundle")
    return manifest


def check_labels(path: str | Path, manifest: dict[str, Any]) -> None:
    """A classifier's manifest must list its class names: a non-empty list of unique strings.

    Args:
        path: The bundle folder (named in the error).
        manifest: Its parsed manifest.

    Raises:
        ValueError: The labels are missing, not strings, or repeated.
    """
    manifest_path = Path(path) / MANIFEST
    labels = manifest.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{manifest_path}: a classification bundle needs 'labels', a list of class names")
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"{manifest_path}: duplicate labels {dupes}; class names must be unique")


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
        file = member(path, name)
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
