"""ONNX export of a finished run into a deployment bundle (design.md §8), with a parity gate.

Steps: load the run, merge re-parameterising adapters (checked: merged torch == unmerged torch), freeze,
export with torch's ONNX exporter (dynamo by default, TorchScript as an option), run the graph on
onnxruntime at two batch sizes and compare with PyTorch (max |Δ| and top-1 agreement). A graph that fails
parity is never written: the bundle is assembled in a temporary folder and moved into place only on success.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision_peft import bundle, rundir
from vision_peft.bundle import BUNDLE_FORMAT, dtype_name  # noqa: F401  (BUNDLE_FORMAT: re-exported)
from vision_peft.predict import load_run

log = logging.getLogger("vision_peft")


class ExportError(RuntimeError):
    """The exported graph does not reproduce PyTorch (or could not be built); nothing was written."""


@contextmanager
def staged_folder(out_dir: Path, prefix: str = ".export-") -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` to assemble a bundle in: when the block succeeds it takes
    ``out_dir``'s place (a previous folder is moved aside first and deleted after, so the name never holds half a
    bundle); when it raises, the temporary folder is removed and ``out_dir`` is left as it was.

    A process killed part-way (SIGKILL, power loss) leaves only dot-folders beside ``out_dir``; the next staging
    for the same ``out_dir`` removes them, and puts a previous bundle that was moved aside back in place when the
    kill fell between the two renames.

    Raises:
        WriteError: the disk is full or a file-size limit was hit while writing the bundle; names ``out_dir``,
            the cause and the fix.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(out_dir, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{out_dir.name}-{os.getpid()}-", dir=out_dir.parent))
    try:
        try:
            yield tmp
        except Exception as e:
            err = _write_failure(e, tmp)
            if err is None:
                raise
            raise rundir.write_error(
                out_dir, err, f"nothing was written under {out_dir}" + (" (its previous bundle is intact)"
                                                                        if out_dir.exists() else "")
            ) from e  # fmt: skip
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.rglob("*"):  # some writers (mkstemp, onnx's external data) create 0600 files
            if f.is_file():
                f.chmod(0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        tmp.chmod(0o755)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            if old is not None:
                old.rename(out_dir)  # the previous bundle goes back under its name
            raise
        rundir.fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(out_dir: Path, prefix: str) -> None:
    """Clean up after a staging process that was killed: its temp folder goes; a previous bundle it had moved
    aside comes back when nothing took its place."""
    for d in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue
        if not out_dir.exists():
            d.rename(out_dir)
            log.warning("restored %s: an export was killed while replacing it", out_dir)
        else:
            shutil.rmtree(d, ignore_errors=True)
    for d in out_dir.parent.glob(f"{prefix}{out_dir.name}-*-*"):
        pid = d.name[len(f"{prefix}{out_dir.name}-") :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _write_failure(e: BaseException, folder: Path) -> OSError | None:
    """The OS write error behind ``e`` (onnx and numpy may drop the errno: then it is worked out from the
    file-size limit and the free space), or None when ``e`` is not a write failure."""
    err = rundir.os_error_in(e)
    if err is not None:
        return err
    cur: BaseException | None = e
    seen: set[int] = set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError):
            break
        cur = cur.__cause__ or cur.__context__
    else:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    biggest = max((f.stat().st_size for f in folder.rglob("*") if f.is_file()), default=0)
    if soft != resource.RLIM_INFINITY and biggest >= soft:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    st = os.statvfs(folder)
    if st.f_bavail * st.f_frsize < (1 << 20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, f"{cur} (the write failed)")


def _batched(example: dict[str, torch.Tensor], b: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in example.items():
        shape = (b, *v.shape[1:])
        if v.dtype.is_floating_point:
            out[k] = torch.randn(shape, generator=g, dtype=v.dtype)
        else:  # integer inputs (token ids, class ids): resample within the example's range
            hi = int(v.max()) + 1
            out[k] = torch.randint(0, max(hi, 1), shape, generator=g, dtype=v.dtype)
    return out


def onnx_export(
    module: torch.nn.Module,
    example: dict[str, torch.Tensor],
    output_names: list[str],
    path: Path,
    exporter: str = "dynamo",
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> None:
    """Export ``module(*example.values())`` to ``path`` (a ``.onnx.data`` sidecar may be written beside it)."""
    names = list(example)
    args = tuple(example[n] for n in names)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the MHA fast path breaks tracing exporters
    module.eval()
    try:
        _export(module, args, names, output_names, path, exporter, dynamic_batch, opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        module.eval()  # the TorchScript exporter restores the wrapper's own (train) mode recursively


def _export(module, args, names, output_names, path, exporter, dynamic_batch, opset) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dyn = None
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1, max=4096)
                dyn = tuple({0: batch} for _ in names)  # positional: forward's own argument names may differ
            kw = {"dynamic_shapes": dyn, "dynamo": True, "external_data": True, "verbose": False}
            if opset:
                kw["opset_version"] = opset
        elif exporter == "torchscript":
            axes = {n: {0: "batch"} for n in names + output_names} if dynamic_batch else None
            kw = {"dynamic_axes": axes, "dynamo": False, "opset_version": opset or 17}
        else:
            raise ValueError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
        torch.onnx.export(module, args, str(path), input_names=names, output_names=output_names, **kw)


def ort_session(path: Path, device: str = "cpu"):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def parity_check(
    module: torch.nn.Module,
    example: dict[str, torch.Tensor],
    output_names: list[str],
    onnx_path: Path,
    batch_sizes: tuple[int, ...],
    atol: float,
    rtol: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """Compare torch and onnxruntime on random inputs at each batch size; returns the report."""
    sess = ort_session(onnx_path, device)
    report: dict[str, Any] = {
        "batch_sizes": list(batch_sizes),
        "atol": atol,
        "rtol": rtol,
        "providers": sess.get_providers(),
        "per_batch": [],
    }
    ok = True
    for i, b in enumerate(batch_sizes):
        inputs = _batched(example, b, seed=1234 + i)
        with torch.no_grad():
            ref = module(*inputs.values())
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = sess.run(output_names, {k: v.numpy() for k, v in inputs.items()})
        entry: dict[str, Any] = {"batch": b}
        for name, r, g in zip(output_names, ref, got):
            r = r.float().numpy()
            diff = float(np.abs(r - g).max()) if r.size else 0.0
            scale = float(np.abs(r).max()) if r.size else 0.0
            entry[f"{name}_max_abs_diff"] = diff
            entry[f"{name}_max_abs_ref"] = scale
            if r.ndim == 2 and r.shape[1] > 1:
                entry[f"{name}_top1_agreement"] = float((r.argmax(1) == g.argmax(1)).mean())
            if not diff <= atol + rtol * scale or g.shape != r.shape:  # `not <=` also fails on NaN
                ok = False
        report["per_batch"].append(entry)
    report["max_abs_diff"] = max(v for e in report["per_batch"] for k, v in e.items() if k.endswith("max_abs_diff"))
    report["passed"] = ok
    return report


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    exporter: str = "dynamo",
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-4,
    rtol: float = 1e-4,
    device: str = "cpu",
    opset: int | None = None,
    int8: bool | str | None = None,
    fp16: bool = False,
    calib: int = 256,
    calib_method: str = "minmax",
    calib_seed: int = 0,
) -> dict[str, Any]:
    """Export a run to a bundle folder (default ``<run>/export``); returns the manifest.

    ``int8="dynamic"`` (or ``True``, as before) adds ``<graph>_int8`` (onnxruntime dynamic int8 quantisation of
    the MatMul/Gemm/Conv weights); ``int8="static"`` adds ``<graph>_int8_static`` (QDQ, per-channel weights,
    activations calibrated on ``calib`` seeded train images preprocessed as at deploy, ``calib_method``);
    ``fp16`` adds ``<graph>_fp16`` (for CUDA). Each variant's report (``parity["int8"]``, ``["int8_static"]``,
    ``["fp16"]``) holds its latency vs fp32 at batch 1 and 8 and the task-metric change on the test split.

    Raises:
        ExportError: merging changed the outputs or onnxruntime disagrees with PyTorch beyond tolerance.
    """
    from vision_peft.quantize import check_options

    int8 = check_options(int8, fp16, calib, calib_method)
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "export"
    cfg, task, model, info = load_run(run_dir, "cpu")
    spec = task.export_spec(model)
    specs = [spec, *(spec.extra_graphs or [])]
    names = [s.graph_name for s in specs]
    if len(set(names)) != len(names):
        raise ExportError(f"task {cfg.task.name!r} exports graphs with repeated names {names}")
    for s in specs:
        s.module.eval()  # wrappers are fresh modules (train mode by default); export and parity run in eval
    before = [_outputs(s) for s in specs]
    model.adapter.merge()
    model.requires_grad_(False).eval()
    merge_diff = 0.0
    for s, b in zip(specs, before, strict=True):
        a = _outputs(s)
        d = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
        if d > 1e-4 * (1 + max(float(y.abs().max()) for y in b)):  # merging is exact up to float rounding
            raise ExportError(
                f"merging adapter {cfg.adapter.name} changed the outputs of graph {s.graph_name!r} "
                f"(max |Δ| {d:.3g}); not exporting"
            )
        merge_diff = max(merge_diff, d)
    with staged_folder(out_dir) as tmp:
        graphs: dict[str, dict[str, Any]] = {}
        reports: dict[str, dict[str, Any]] = {}
        for s in specs:
            graphs[s.graph_name], reports[s.graph_name] = _export_graph(
                s, tmp, run_dir, exporter, batch_sizes, atol, rtol, device, opset
            )
        # one graph: the report is flat (as bundles have always had it); several: one report per graph
        report = reports[spec.graph_name] if len(specs) == 1 else {"graphs": reports}
        report["merge_max_abs_diff"] = merge_diff
        report["max_abs_diff"] = max(r["max_abs_diff"] for r in reports.values())
        report["passed"] = all(r["passed"] for r in reports.values())
        for name, src in (spec.extra_files or {}).items():
            if Path(name).name != name or name in bundle.RESERVED_FILES:
                raise ExportError(f"extra bundle file name {name!r} must be a plain, unused file name")
            if not Path(src).is_file():
                raise ExportError(f"{src} (bundle file {name!r}) does not exist; it is needed at deploy time")
            shutil.copyfile(src, tmp / name)
        from vision_peft.quantize import SUFFIX

        base = graphs[spec.graph_name]
        for kind, key in (
            (int8, {"dynamic": "int8", "static": "int8_static"}.get(int8)),
            ("fp16" if fp16 else None, "fp16"),
        ):
            if kind:
                graphs[spec.graph_name + SUFFIX[kind]], report[key] = _variant(
                    kind, tmp, base, task, model, spec, calib, calib_method, calib_seed
                )
        (tmp / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "preprocess.json").write_text(json.dumps(spec.preprocess or {}, indent=2) + "\n")
        manifest = bundle.build_manifest(
            tmp,
            task=cfg.task.name,
            backbone=cfg.backbone.name,
            adapter=cfg.adapter.name,
            graphs=graphs,
            preprocess=spec.preprocess or {},
            labels=spec.labels or [],
            task_info=spec.task_info or {},
            parity=report,
            source_run=str(run_dir.resolve()),
        )
        bundle.write_manifest(tmp, manifest)
    return manifest


def _outputs(spec) -> list[torch.Tensor]:
    with torch.no_grad():
        out = spec.module(*spec.example_inputs.values())
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _export_graph(spec, folder: Path, run_dir: Path, exporter: str, batch_sizes, atol, rtol, device, opset):
    """Export one graph into ``folder`` and check it against PyTorch; returns (manifest graph entry, report)."""
    exporter = spec.exporter or exporter
    atol = spec.atol if spec.atol is not None else atol
    rtol = spec.atol if spec.atol is not None else rtol  # a graph's own tolerance serves as both atol and rtol
    onnx_path = folder / f"{spec.graph_name}.onnx"
    t0 = time.perf_counter()
    try:
        onnx_export(spec.module, spec.example_inputs, spec.output_names, onnx_path, exporter, spec.dynamic_batch, opset)
    except Exception as e:
        if _write_failure(e, folder) is not None:
            raise  # a full disk or a size limit: staged_folder names the bundle, the cause and the fix
        raise ExportError(
            f"the {exporter} exporter failed on graph {spec.graph_name!r} of {run_dir}: {type(e).__name__}: {e}"
            + (" (try --exporter torchscript)" if exporter == "dynamo" else "")
        ) from e
    export_s = time.perf_counter() - t0
    import onnx

    onnx.checker.check_model(str(onnx_path))
    report = parity_check(
        spec.module, spec.example_inputs, spec.output_names, onnx_path, batch_sizes, atol, rtol, device
    )
    report.update({"exporter": exporter, "export_seconds": export_s})
    if not report["passed"]:
        raise ExportError(
            f"onnxruntime disagrees with PyTorch on graph {spec.graph_name!r} of {run_dir}: max |Δ| "
            f"{report['max_abs_diff']:.3g} > atol {atol} (+ rtol {rtol}·|ref|); per batch: "
            f"{json.dumps(report['per_batch'])}. The model was not written"
        )
    sess = ort_session(onnx_path)
    graph = {
        "file": onnx_path.name,
        "inputs": {
            i.name: {"shape": [d if isinstance(d, int) else "batch" for d in i.shape], "dtype": dtype_name(i.type)}
            for i in sess.get_inputs()
        },
        "outputs": {
            o.name: {
                "shape": [d if isinstance(d, int) else "batch" for d in o.shape],
                "dtype": dtype_name(o.type),
                "meaning": (spec.outputs_meaning or {}).get(o.name, ""),
            }
            for o in sess.get_outputs()
        },
    }
    del sess
    return graph, report


def _variant(kind: str, folder: Path, graph: dict, task, model, spec, calib: int, calib_method: str, seed: int):
    """One reduced-precision variant of the base graph (vision_peft.quantize); returns (graph entry, report).

    The dynamic int8 report keeps the field names bundles have always had (``bytes_int8``, ``int8`` …); the
    others name their own (``bytes_int8_static`` / ``int8_static``, ``bytes_fp16`` / ``fp16``)."""
    from vision_peft import quantize as q

    onnx_path = folder / graph["file"]
    key = {"dynamic": "int8", "static": "int8_static", "fp16": "fp16"}[kind]
    out = folder / f"{onnx_path.stem}{q.SUFFIX[kind]}.onnx"
    t0 = time.perf_counter()
    names = list(spec.example_inputs)
    if kind == "dynamic":
        facts = q.quantize_dynamic_graph(onnx_path, out)
        note = "dynamic int8 (weights), fp32 activations"
    elif kind == "static":
        if len(names) != 1 or spec.preprocess is None or "image" not in (spec.preprocess or {}):
            raise q.QuantizeError(
                f"--int8 static calibrates one image input from the train split; graph {spec.graph_name!r} of task "
                f"{task.name!r} takes {names}: use --int8 dynamic"
            )
        x, files = q.calibration_images(task, model, calib, seed)
        facts = q.quantize_static_graph(onnx_path, out, names[0], x, calib_method)
        facts["calibration"].update(seed=seed, first_files=[Path(f).name for f in files[:5]])
        note = "static int8 QDQ (per-channel weights, calibrated activations), fp32 inputs/outputs"
    else:
        facts = q.fp16_graph(onnx_path, out)
        note = "fp16 weights and activations, fp32 inputs/outputs (for the CUDA provider)"
    rep: dict[str, Any] = {
        "quantize_seconds": time.perf_counter() - t0,
        **facts,
        "bytes_fp32": sum(p.stat().st_size for p in folder.glob(f"{onnx_path.stem}.onnx*")),
        f"bytes_{key}": out.stat().st_size,
    }
    if kind == "fp16" and len(names) == 1:
        x = _batched(spec.example_inputs, 4, seed=4321)[names[0]].numpy()
        rep["parity"] = q.fp16_parity(onnx_path, out, names[0], x)
        if not rep["parity"]["passed"]:
            raise ExportError(
                f"the fp16 graph of {spec.graph_name!r} disagrees with fp32 beyond max |Δ| <= {q.FP16_ATOL} + "
                f"{q.FP16_RTOL}·|ref| on the CPU provider ({rep['parity']}); export without --fp16"
            )
    rep.update(q.compare(task, model, spec, onnx_path, out, key))
    entry = {**graph, "file": out.name, "quantization": note, "variant_of": spec.graph_name}
    return entry, rep
