"""Adapter packs: several runs of one frozen backbone exported as ONE base graph + one adapter file per run.

``export_pack(runs, out)`` checks that the runs share a task, a backbone (spec and weight hash), an adapter family
and a tensor layout, exports the first run's *unmerged* graph(s) with every trainable tensor as a named graph
input (a zero default initializer, so onnxruntime's ``RunOptions.add_active_adapter`` can override it per run;
a head's class dimension is the symbolic ``classes``), writes each run's tensors as an ``.onnx_adapter`` file with
its ``.adapter.json`` record (:mod:`vision_peft.packfile`) and checks every adapter through the pack graph against
that run's own PyTorch model (parity at two batch sizes; a failing adapter aborts the export and nothing is
written). ``export_adapter_for(run, pack)`` adds one more run to an existing pack's graph (the pair a server takes
at ``POST /v1/adapters``).

Float attributes of adapter layers that a run's config sets (LoRA's and DoRA's ``scale`` = alpha / r, declared by
the layer class as ``pack_scalars``) become one-element tensor inputs too, so runs with different alpha share the graph.
A single run keeps exporting merged (``vision_peft.export``), which stays the fastest path. The pack graph itself
(a run's model with its adapter tensors as graph inputs) is built in :mod:`vision_peft.pack_graph`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vision_peft import bundle, packfile
from vision_peft.export import ExportError, _batched, _export_graph, ort_session, staged_folder
from vision_peft.pack_graph import (  # noqa: F401  (CLASSES, PackGraph: re-exported, the pack's public names)
    CLASSES,
    PackGraph,
    _export_pack_graph,
    _slots,
    _wrapper_tensors,
    adapter_tensors,
    scalars_to_buffers,
)
from vision_peft.predict import load_run
from vision_peft.rundir import RunInfo

NOT_PACKABLE = {"full": "full fine-tuning changes every backbone weight: there is no frozen base to share"}


@dataclass
class _Run:
    """One source run, reduced to what the pack needs (its model is dropped after the reference outputs)."""

    path: Path
    name: str
    info: RunInfo
    tensors: dict[str, np.ndarray]  # adapter input name -> value (model-level state-dict names)
    labels: list[str]
    preprocess: dict[str, Any]
    task_info: dict[str, Any]
    refs: dict[str, list[list[np.ndarray]]]  # graph -> per parity batch -> outputs of the run's own module


def _head_ids(model: nn.Module) -> set[int]:
    head = getattr(model, "head", None)
    return {id(t) for t in [*head.parameters(), *head.buffers()]} if isinstance(head, nn.Module) else set()


def _check_runs(paths: list[Path], infos: list[RunInfo]) -> None:
    """Same task, backbone spec + weights, adapter family and frozen encoders; a family that can be packed."""
    first, p0 = infos[0], paths[0]
    family = first.adapter_name
    if family in NOT_PACKABLE:
        raise ExportError(f"{p0}: adapter {family!r} cannot be packed ({NOT_PACKABLE[family]}); export it merged")
    for p, info in zip(paths[1:], infos[1:]):
        checks = [
            ("task.name", info.task_name, first.task_name),
            ("backbone spec", info.backbone.spec, first.backbone.spec),
            ("backbone weights_id", info.backbone.weights_id, first.backbone.weights_id),
            ("adapter.name", info.adapter_name, family),
        ]
        for key, rec in first.task_state.items():  # frozen encoders beside the backbone (text towers …)
            if isinstance(rec, dict) and rec.get("weights_id"):
                other = info.task_state.get(key) if isinstance(info.task_state.get(key), dict) else {}
                checks.append((f"task_state.{key}.weights_id", other.get("weights_id"), rec["weights_id"]))
        for field, got, want in checks:
            if got != want:
                raise ExportError(
                    f"{p} cannot join a pack with {p0}: its {field} is {got!r}, the pack's is {want!r}. A pack shares "
                    "one frozen backbone; export runs of another task, backbone or adapter family as their own bundle"
                )


def _load(path: Path, name: str) -> tuple:
    """(run record without reference outputs, cfg, model, export specs) of one run, its scalars as buffers."""
    cfg, task, model, info = load_run(path, "cpu")
    scalars_to_buffers(model)
    spec = task.export_spec(model)
    specs = [spec, *(spec.extra_graphs or [])]
    for s in specs:
        s.module.eval()
    every = {**adapter_tensors(model), **_wrapper_tensors(specs, model)}
    tensors = {
        k: (v.detach().cpu().float() if v.dtype.is_floating_point else v.detach().cpu())
        .reshape(v.shape or (1,))
        .numpy()
        for k, v in every.items()
    }  # fmt: skip  (0-d as one element, as adapter files store it)
    run = _Run(path, name, info, tensors, list(spec.labels or []), spec.preprocess or {}, spec.task_info or {}, {})
    return run, cfg, model, specs


def _examples(specs, batch_sizes: tuple[int, ...]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The parity inputs of every graph (seeded, one per batch size; the same for every run)."""
    return {s.graph_name: [_batched(s.example_inputs, b, seed=1234 + i) for i, b in enumerate(batch_sizes)]
            for s in specs}  # fmt: skip


def _refs(specs, examples) -> dict[str, list[list[np.ndarray]]]:
    """Outputs of a run's own PyTorch graph modules on the parity inputs (graphs in ``examples`` only)."""
    refs: dict[str, list[list[np.ndarray]]] = {}
    for s in specs:
        if s.graph_name not in examples:
            continue
        refs[s.graph_name] = []
        for inputs in examples[s.graph_name]:
            with torch.no_grad():
                out = s.module(*inputs.values())
            out = [out] if isinstance(out, torch.Tensor) else list(out)
            refs[s.graph_name].append([o.float().numpy() for o in out])
    return refs


def _names(paths: list[Path], names: list[str] | None) -> list[str]:
    names = list(names) if names else [p.resolve().name for p in paths]
    if len(names) != len(paths):
        raise ExportError(f"{len(names)} adapter names for {len(paths)} runs; give one name per run")
    for n in names:
        try:
            packfile.check_name(n)
        except packfile.AdapterFileError as e:
            raise ExportError(f"{e} (pass --names to choose adapter names)") from None
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExportError(f"adapter names {dupes} repeat (runs with the same folder name); pass --names a,b,c")
    return names


def _check_layout(runs: list[_Run], head_dims: dict[str, int | None]) -> None:
    """Every run has the same tensor names and shapes (a head's class dimension excepted)."""
    ref = runs[0]
    for r in runs[1:]:
        missing, extra = sorted(set(ref.tensors) - set(r.tensors)), sorted(set(r.tensors) - set(ref.tensors))
        if missing or extra:
            raise ExportError(
                f"{r.path} has another adapter layout than {ref.path}: {len(missing)} tensor(s) missing "
                f"{missing[:3]}, {len(extra)} extra {extra[:3]} (other targets or method options); pack runs "
                "trained with the same adapter section"
            )
        for k, a in ref.tensors.items():
            b = r.tensors[k]
            free = head_dims.get(k)
            same = a.ndim == b.ndim and all(x == y or i == free for i, (x, y) in enumerate(zip(a.shape, b.shape)))
            if not same or a.dtype != b.dtype:
                raise ExportError(
                    f"{r.path}: tensor {k!r} is {list(b.shape)} {b.dtype}, in {ref.path} it is {list(a.shape)} "
                    f"{a.dtype} (another rank or width); pack runs trained with the same adapter section"
                )
        problem = packfile.preprocess_conflict(ref.preprocess, r.preprocess)
        if problem:
            raise ExportError(
                f"{r.path} cannot share {ref.path}'s graph: its {problem}; one graph takes one input size"
            )


def _adapter_parity(
    folder: Path, graphs: dict[str, dict], run: _Run, adapter_file: Path, examples, atol: float, rtol: float
) -> dict[str, Any]:
    """The pack graph with ``run``'s adapter (activated through onnxruntime's LoraAdapter) vs the run's own PyTorch
    module, on the parity inputs of every adapted graph."""
    import onnxruntime as ort

    lora = ort.LoraAdapter()
    lora.Load(str(adapter_file))
    report: dict[str, Any] = {"per_batch": [], "atol": atol, "rtol": rtol, "via": "RunOptions.add_active_adapter"}
    ok, worst = True, 0.0
    for gname, entry in graphs.items():
        if not entry.get("adapter_inputs"):
            continue
        sess = ort_session(folder / entry["file"])
        outs = list(entry["outputs"])
        for inputs, ref in zip(examples[gname], run.refs[gname], strict=True):
            ro = ort.RunOptions()
            ro.add_active_adapter(lora)
            got = sess.run(outs, {k: v.numpy() for k, v in inputs.items()}, ro)
            row: dict[str, Any] = {"graph": gname, "batch": int(next(iter(inputs.values())).shape[0])}
            for name, r, g in zip(outs, ref, got, strict=True):
                diff = float(np.abs(r - g).max()) if r.size else 0.0
                row[f"{name}_max_abs_diff"] = diff
                if r.ndim == 2 and r.shape[1] > 1:
                    row[f"{name}_top1_agreement"] = float((r.argmax(1) == g.argmax(1)).mean())
                worst = max(worst, diff)
                if g.shape != r.shape or not diff <= atol + rtol * float(np.abs(r).max() if r.size else 0):
                    ok = False
            report["per_batch"].append(row)
    report.update(max_abs_diff=worst, passed=ok)
    return report


def export_pack(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    names: list[str] | None = None,
    exporter: str = "dynamo",
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Export several runs of one backbone as a pack (module docstring); returns the manifest.

    Args:
        run_dirs: Finished run directories (the first one's graph is exported; all must fit it).
        out_dir: The bundle folder (replaced atomically on success).
        names: Adapter names, one per run (default: the run folders' names).
        exporter: ``dynamo`` or ``torchscript`` (a task's graph may force one).
        batch_sizes: Parity batch sizes.
        atol: Parity tolerance (absolute) of every adapter through the pack graph vs its own PyTorch model.
        rtol: Parity tolerance relative to the largest reference output.

    Raises:
        ExportError: runs that cannot share a graph (the message names the run and the field), an export
            failure, or an adapter whose pack outputs differ from its PyTorch model; nothing is written.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ExportError("export --pack needs at least one run directory")
    out_dir = Path(out_dir)
    names = _names(paths, names)
    infos = [RunInfo.read(p) for p in paths]
    _check_runs(paths, infos)
    first, cfg, model, specs = _load(paths[0], names[0])
    examples = _examples(specs, batch_sizes)
    first.refs = _refs(specs, examples)
    head = _head_ids(model)
    sd = model.state_dict(keep_vars=True)
    ncls = len(first.labels)
    head_dims = {k: 0 for k, v in first.tensors.items() if ncls and v.ndim and v.shape[0] == ncls
                 and (k.startswith("graph.") or (k in sd and id(sd[k]) in head))}  # fmt: skip
    runs = [first]
    for p, n in zip(paths[1:], names[1:]):
        run, _, _, run_specs = _load(p, n)  # only the record is kept: the model is freed here
        run.refs = _refs(run_specs, examples)
        runs.append(run)
    _check_layout(runs, head_dims)
    for r in runs:
        for k in head_dims:
            if r.tensors[k].shape[0] != len(r.labels):
                raise ExportError(f"{r.path}: head tensor {k!r} has {r.tensors[k].shape[0]} rows for "
                                  f"{len(r.labels)} labels")  # fmt: skip
    with staged_folder(out_dir, ".pack-") as tmp:
        graphs: dict[str, dict[str, Any]] = {}
        graph_reports: dict[str, Any] = {}
        inputs_used: set[str] = set()
        for s in specs:
            if _slots(s, model, list(first.tensors)):
                graphs[s.graph_name], used = _export_pack_graph(s, model, first.tensors, head_dims, tmp, paths[0],
                                                                 exporter)  # fmt: skip
                inputs_used |= set(used)
            else:  # a frozen graph (e.g. the diffusion decoder): exported and checked like a merged one
                graphs[s.graph_name], graph_reports[s.graph_name] = _export_graph(
                    s, tmp, paths[0], exporter, batch_sizes, atol, rtol, "cpu", None
                )
        for name, src in (specs[0].extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        pack = {"task": first.info.task_name, "adapter": first.info.adapter_name, "graphs": graphs,
                "backbone_weights_id": first.info.backbone.weights_id, "preprocess": first.preprocess}  # fmt: skip
        adapters: dict[str, dict[str, Any]] = {}
        for r in runs:
            tensors = {k: v for k, v in r.tensors.items() if k in inputs_used}
            baked = sorted(k for k, v in r.tensors.items() if k not in inputs_used and k in first.tensors
                           and (v.shape != first.tensors[k].shape or not np.array_equal(v, first.tensors[k])))  # fmt: skip
            meta = _write_adapter(tmp, r, tensors, pack, examples, atol, rtol, baked)
            adapters[r.name] = meta
        parity = {
            "adapters": {n: m["parity"] for n, m in adapters.items()},
            "frozen_graphs": graph_reports,
            "max_abs_diff": max([m["parity"]["max_abs_diff"] for m in adapters.values()]
                                + [g["max_abs_diff"] for g in graph_reports.values()]),
            "passed": True,
        }  # fmt: skip
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
        (tmp / "preprocess.json").write_text(json.dumps(first.preprocess, indent=2) + "\n")
        manifest = bundle.build_manifest(
            tmp, task=first.info.task_name, backbone=cfg.backbone.name, adapter=first.info.adapter_name,
            graphs=graphs, preprocess=first.preprocess, labels=[], task_info={}, parity=parity,
            source_run=str(paths[0].resolve()),
            pack={"backbone_weights_id": first.info.backbone.weights_id,
                  "adapters": {n: {**m, **dict(zip(("file", "meta_file"), packfile.adapter_files(n)))}
                               for n, m in adapters.items()}},
        )  # fmt: skip
        bundle.write_manifest(tmp, manifest)
    return manifest


def _write_adapter(
    folder: Path, run: _Run, tensors, pack: dict, examples, atol: float, rtol: float, baked: list[str] | None = None
) -> dict:
    """Writes ``<name>.onnx_adapter`` + ``<name>.adapter.json`` into ``folder`` after checking the adapter against
    the pack (:func:`packfile.check_against_graph`) and its parity; returns the record."""
    tensor_file, meta_file = packfile.adapter_files(run.name)
    packfile.write_tensors(folder / tensor_file, tensors)
    meta = packfile.build_meta(
        name=run.name, task=run.info.task_name, backbone=run.info.backbone.spec,
        backbone_weights_id=run.info.backbone.weights_id, adapter=run.info.adapter_name,
        source_run=str(run.path.resolve()), labels=run.labels, preprocess=run.preprocess, task_info=run.task_info,
        tensors=tensors, parity={},
    )  # fmt: skip
    packfile.check_against_graph(pack, meta, tensors, str(run.path))
    meta["parity"] = _adapter_parity(folder, pack["graphs"], run, folder / tensor_file, examples, atol, rtol)
    if not meta["parity"]["passed"]:
        raise ExportError(
            f"adapter {run.name!r} ({run.path}) through the pack graph differs from its own PyTorch model: max |Δ| "
            f"{meta['parity']['max_abs_diff']:.3g} > atol {atol} (+ rtol {rtol}·|ref|); its config changes the graph "
            f"beyond its tensors, so it cannot share this pack; export it merged. "
            + (
                f"Trained tensors this task's export bakes into the graph as constants, which differ from the first "
                f"run's: {baked[:6]}. "
                if baked
                else ""
            )
            + "Per batch: "
            f"{json.dumps(meta['parity']['per_batch'])}"
        )
    packfile.write_meta(folder / meta_file, meta)
    return meta


def export_adapter_for(
    run_dir: str | Path,
    pack_dir: str | Path,
    out_dir: str | Path | None = None,
    name: str | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Writes the adapter pair of one more run for an existing pack (checked against the pack's graph, with
    parity through it), into ``out_dir`` (default: ``<run>/adapter``); returns the record. The pack is not changed:
    add the pair to a running server with ``POST /v1/adapters``, or re-export the pack with the run.

    Raises:
        ExportError: the run does not fit the pack (the message names the field) or fails parity.
    """
    run_dir, pack_dir = Path(run_dir), Path(pack_dir)
    manifest = bundle.read_manifest(pack_dir)
    if not manifest.get("adapters"):
        raise ExportError(f"{pack_dir} is a merged bundle, not a pack; export a pack first (export <runs> --pack)")
    name = name or run_dir.resolve().name
    try:
        packfile.check_name(name)
    except packfile.AdapterFileError as e:
        raise ExportError(str(e)) from None
    graphs = manifest["graphs"]
    info = RunInfo.read(run_dir)
    for field, got, want in (("task.name", info.task_name, manifest["task"]), ("adapter.name", info.adapter_name,
                             manifest["adapter"]), ("backbone weights_id", info.backbone.weights_id,
                             manifest.get("backbone_weights_id"))):  # fmt: skip
        if got != want:
            raise ExportError(
                f"{run_dir} does not fit the pack {pack_dir}: its {field} is {got!r}, the pack's {want!r}"
            )
    run, _, _, specs = _load(run_dir, name)
    adapted = [s for s in specs if graphs.get(s.graph_name, {}).get("adapter_inputs")]
    examples = _examples(adapted, (1, 3))
    run.refs = _refs(adapted, examples)
    wanted = set().union(*[set(e.get("adapter_inputs") or {}) for e in graphs.values()])
    tensors = {k: v for k, v in run.tensors.items() if k in wanted}
    out_dir = Path(out_dir) if out_dir else run_dir / "adapter"
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        for e in graphs.values():  # the parity run needs the pack's graph files next to the adapter
            for f in (e["file"], f"{e['file']}.data"):
                if (pack_dir / f).is_file():
                    (tmp / f).symlink_to((pack_dir / f).resolve())
        pack = {**manifest, "graphs": {g: e for g, e in graphs.items() if g in examples}}
        meta = _write_adapter(tmp, run, tensors, pack, examples, atol, rtol)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in packfile.adapter_files(name):
            (tmp / f).replace(out_dir / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
