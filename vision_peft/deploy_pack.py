"""The adapter-pack half of the torch-free runtime: what a loaded ``vision_peft.bundle/2`` bundle adds to a Bundle.

A pack (design.md §8; exported by ``vision_peft.pack``, its file pair checked by :mod:`vision_peft.packfile`) is one
set of onnxruntime sessions plus adapters: :class:`PackMixin` gives ``vision_peft.deploy.Bundle`` its pack methods
(``adapters``, ``select``, ``add_adapter``, ``remove_adapter``) and the per-run ``RunOptions`` that activate an
adapter; :func:`load_pack_adapters` checks and memory-maps a pack's adapters at load. Only onnxruntime, numpy and
the standard library are imported (plus the runtimes' registry).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from vision_peft import bundle as contract
from vision_peft import packfile
from vision_peft.runtimes.base import runtime_for_task

if TYPE_CHECKING:  # the Bundle this mixin completes (deploy imports this module)
    from vision_peft.deploy import Bundle


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter of a pack, checked against the graphs: its record and onnxruntime's memory-mapped copy."""

    name: str
    meta: dict[str, Any]
    lora: Any  # onnxruntime.LoraAdapter
    source: str  # the file it was read from (named in errors)
    nbytes: int  # size of its tensor file


class _Pack:
    """The adapters of a loaded pack, shared by the bundle and its per-adapter views; changed under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.adapters: dict[str, LoadedAdapter] = {}
        self.views: dict[str, Bundle] = {}


class PackMixin:
    """The pack methods of ``vision_peft.deploy.Bundle`` (a dataclass with ``path``, ``manifest``, ``sessions``,
    ``active`` and ``pack`` fields); on a merged bundle (``pack`` None) they say there is nothing to choose."""

    @property
    def adapter_name(self) -> str | None:
        """The adapter this view runs (None for a merged bundle and for a pack's own object)."""
        return self.active.name if self.active is not None else None

    @property
    def is_pack(self) -> bool:
        """Whether this bundle is an adapter pack."""
        return self.pack is not None

    @property
    def adapters(self) -> list[str]:
        """The pack's adapter names, sorted (empty for a merged bundle)."""
        if self.pack is None:
            return []
        with self.pack.lock:
            return sorted(self.pack.adapters)

    def adapter_info(self, name: str) -> dict[str, Any]:
        """The record of one adapter (name, source run, labels, preprocess, task_info, tensors, parity)."""
        return dict(self._adapter(name).meta)

    def _adapter(self, name: str) -> LoadedAdapter:
        if self.pack is None:
            raise ValueError(
                f"bundle {self.path} is a merged bundle (one adapter, folded into the graph); omit adapter=, or "
                "export several runs with `export <run> <run> … --pack` to choose between adapters"
            )
        with self.pack.lock:
            found = self.pack.adapters.get(name)
            known = sorted(self.pack.adapters)
        if found is None:
            raise ValueError(f"unknown adapter {name!r} in pack {self.path}; known adapters: {', '.join(known)}")
        return found

    def select(self, adapter: str | None = None) -> Bundle:
        """The bundle that runs ``adapter``: a merged bundle itself (``adapter`` must be None), a pack's view of
        the named adapter, or of its only one when ``adapter`` is None.

        Raises:
            ValueError: an unknown name (the known ones listed), a name for a merged bundle, or no name for a pack
                with several adapters.
        """
        if self.pack is None:
            if adapter is not None:
                self._adapter(adapter)  # raises the merged-bundle error
            return self
        if adapter is None:
            if self.adapter_name is not None:
                return self
            names = self.adapters
            if len(names) != 1:
                raise ValueError(
                    f"pack {self.path} holds {len(names)} adapters ({', '.join(names)}); pass adapter=<name> "
                    "(--adapter NAME on the command line, the 'adapter' field over HTTP)"
                )
            adapter = names[0]
        loaded = self._adapter(adapter)
        with self.pack.lock:
            view = self.pack.views.get(adapter)
            if view is None or view.active is not loaded:
                view = _view(self, loaded)
                self.pack.views[adapter] = view
        return view

    def add_adapter(self, tensor_file: str | Path, meta: str | Path | dict[str, Any], name: str | None = None) -> str:
        """Adds an adapter pair to a loaded pack (checked against the graphs as at load; nothing is written).

        Args:
            tensor_file: The ``.onnx_adapter`` file.
            meta: Its ``.adapter.json`` path or the parsed record.
            name: The name to serve it under (default: the record's).

        Returns:
            The adapter's name.

        Raises:
            ValueError: not a pack, a name in use or not allowed, or a pair that does not fit
                (:class:`vision_peft.packfile.AdapterFileError`).
        """
        if self.pack is None:
            self._adapter("")  # the merged-bundle error
        is_file = isinstance(meta, (str, Path))
        record = packfile.read_meta(meta) if is_file else meta  # a record that is no dict: check_meta refuses it
        source = str(tensor_file)
        record = packfile.check_meta(record, str(meta) if is_file else source)
        name = packfile.check_name(record["name"] if name is None else name)
        loaded = _load_adapter(self.path, self.manifest, self.sessions, name, {**record, "name": name}, tensor_file)
        with self.pack.lock:
            if name in self.pack.adapters:
                raise ValueError(f"pack {self.path} already has an adapter named {name!r}; remove it first")
            self.pack.adapters[name] = loaded
        return name

    def remove_adapter(self, name: str) -> None:
        """Removes an adapter from a loaded pack (requests already running with it finish; the files stay).

        Raises:
            ValueError: unknown name, not a pack, or the last adapter (a pack must keep one).
        """
        self._adapter(name)
        with self.pack.lock:
            if name not in self.pack.adapters:
                raise ValueError(f"unknown adapter {name!r} in pack {self.path}")
            if len(self.pack.adapters) == 1:
                raise ValueError(
                    f"{name!r} is the last adapter of pack {self.path}; add another one before removing it"
                )
            del self.pack.adapters[name]
            self.pack.views.pop(name, None)

    def _run_options(self, graph_name: str) -> ort.RunOptions | None:
        if self.pack is None or not self.manifest["graphs"][graph_name].get("adapter_inputs"):
            return None
        if self.adapter_name is None:
            return self.select()._run_options(graph_name)
        options = ort.RunOptions()
        options.add_active_adapter(self.active.lora)
        return options


def _view(base, loaded: LoadedAdapter):
    """The bundle of one pack adapter: the base's sessions, the adapter's labels / preprocess / task facts."""
    meta = loaded.meta
    manifest = {
        **base.manifest,
        "labels": list(meta.get("labels") or []),
        "preprocess": meta.get("preprocess") or base.manifest.get("preprocess") or {},
        "task_info": meta.get("task_info") or {},
        "adapter_name": loaded.name,
    }
    return dataclasses.replace(base, manifest=manifest, runtime=None, active=loaded)


def _load_adapter(
    path: Path, manifest: dict[str, Any], sessions: dict[str, Any], name: str, meta: dict[str, Any], tensor_file
) -> LoadedAdapter:
    """Checks one adapter pair against the pack (record, tensors vs the graphs' adapter inputs, the task's own
    manifest rules on its labels) and memory-maps it with ``onnxruntime.LoraAdapter``."""
    tensor_file = Path(tensor_file)
    tensors = packfile.read_tensors(tensor_file)
    packfile.check_against_graph(manifest, meta, tensors, str(tensor_file))
    runtime = runtime_for_task(manifest["task"])
    if runtime is not None:
        try:
            runtime.check_manifest(path, {**manifest, "labels": meta["labels"], "task_info": meta["task_info"]})
        except ValueError as e:
            raise packfile.AdapterFileError(f"adapter {name!r} ({tensor_file}): {e}") from None
    lora = ort.LoraAdapter()
    try:
        lora.Load(str(tensor_file))
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error kinds
        raise packfile.AdapterFileError(f"onnxruntime cannot load adapter file {tensor_file}: {e}") from None
    return LoadedAdapter(name, meta, lora, str(tensor_file), tensor_file.stat().st_size)


def _check_adapter_inputs(path: Path, name: str, graph: dict[str, Any], session: ort.InferenceSession) -> None:
    """A pack graph's overridable inputs must be the adapter inputs its manifest lists (names, shapes, dtypes)."""
    real = {
        i.name: {"shape": [d if isinstance(d, int) else str(d) for d in i.shape], "dtype": contract.dtype_name(i.type)}
        for i in session.get_overridable_initializers()
    }
    if real != (graph.get("adapter_inputs") or {}):
        raise ValueError(
            f"bundle {path}: graph {name!r} ({graph['file']}) takes adapter inputs {sorted(real)[:4]}… that differ "
            "from manifest.json's 'adapter_inputs'; the pack is inconsistent, re-export it"
        )


def load_pack_adapters(path: Path, manifest: dict[str, Any], sessions: dict[str, Any]) -> _Pack:
    """Every adapter a pack's manifest lists, checked against the graphs (:func:`_load_adapter`) and memory-mapped.

    Raises:
        ValueError: a record naming another adapter, a pair that does not fit, or no adapter at all.
    """
    pack = _Pack()
    for name, rec in manifest["adapters"].items():
        tensor_file = contract.member(path, rec["file"])
        meta = packfile.read_meta(contract.member(path, rec["meta_file"]))
        if meta["name"] != name:
            raise ValueError(f"bundle {path}: adapter {name!r} points at the record of {meta['name']!r}; re-export")
        pack.adapters[name] = _load_adapter(path, manifest, sessions, name, meta, tensor_file)
    if not pack.adapters:
        raise ValueError(f"pack {path} lists no adapters; re-export it with at least one run")
    return pack
