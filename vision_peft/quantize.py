"""Reduced-precision variants of an exported fp32 graph: dynamic int8, static int8 (QDQ) and fp16.

``export.export_run`` orchestrates; this module builds each variant beside the fp32 graph and reports on it:

- **dynamic int8** (``<graph>_int8``, the name bundles have always used): onnxruntime ``quantize_dynamic``,
  int8 weights of MatMul/Gemm/Conv, activations quantised on the fly per call.
- **static int8** (``<graph>_int8_static``): onnxruntime ``quantize_static`` in the QDQ format, per-channel int8
  weights, uint8 activations with ranges calibrated on a seeded subset of the run's *train* images, each
  preprocessed exactly as at deploy (``vision_peft.preprocess`` with the manifest's spec: no augmentation).
  uint8 activations × int8 weights (U8S8) is the x86 fast path of onnxruntime's integer kernels: on this
  project's CPU (AMD EPYC, AVX-512 VNNI) the int8-activation (S8S8) QDQ graph of an EfficientNet-Lite0 ran at
  1.34-1.40x the fp32 latency at batch 1, the U8S8 one at 0.49-0.71x (bench/results/deploy_latency.md). On
  AVX2/AVX-512 CPUs *without* VNNI, U8S8 can saturate (onnxruntime's docs advise ``reduce_range`` there): check
  the test-split metric in the report on the machine that deploys.
- **fp16** (``<graph>_fp16``): every float tensor in fp16 (onnxruntime's ``convert_float_to_float16``) with
  fp32 graph inputs and outputs (``keep_io_types``), meant for the CUDA provider. Parity against fp32 is checked
  on the CPU provider (which runs fp16 Conv/MatMul, slowly): max |Δ| ≤ ``FP16_ATOL + FP16_RTOL·max|ref|``.

Every variant's report holds the onnxruntime latency vs the fp32 graph at batch 1 and 8 (same session options,
interleaved blocks, medians), the task metric of both graphs on the run's test split (``task.evaluate_onnx``),
their difference (variant − fp32) and the item-by-item prediction agreement.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

INT8_MODES = ("dynamic", "static")
CALIB_METHODS = ("minmax", "entropy", "percentile")
FP16_ATOL = 2e-2  # fp16 parity: |fp16 - fp32| <= FP16_ATOL + FP16_RTOL * max|fp32| (10-bit mantissa, ~1e-3 relative
FP16_RTOL = 2e-2  # per op, accumulating over a CNN's depth)
SUFFIX = {"dynamic": "_int8", "static": "_int8_static", "fp16": "_fp16"}  # graph name = base graph name + suffix


class QuantizeError(ValueError):
    """A quantisation option cannot be honoured (the message names the option and the fix)."""


def check_options(int8: Any, fp16: bool, calib: int, calib_method: str) -> str | None:
    """Validates the export's precision options; returns the int8 mode (``None``, ``dynamic`` or ``static``).

    ``int8=True`` means ``dynamic`` (what ``--int8`` has always done).

    Raises:
        QuantizeError: an unknown int8 mode or calibration method, or ``calib`` below 1.
    """
    if int8 is True:
        int8 = "dynamic"
    if int8 in (False, None, ""):
        int8 = None
    elif int8 not in INT8_MODES:
        raise QuantizeError(f"unknown --int8 mode {int8!r}; use one of {', '.join(INT8_MODES)} (bare --int8 = dynamic)")
    if int8 == "static" and (not isinstance(calib, int) or calib < 1):
        raise QuantizeError(f"--calib must be a positive number of train images for --int8 static, got {calib!r}")
    if calib_method not in CALIB_METHODS:
        raise QuantizeError(f"unknown calibration method {calib_method!r}; use one of {', '.join(CALIB_METHODS)}")
    del fp16
    return int8


def _clean_copy(onnx_path: Path, folder: Path, external: bool = True) -> Path:
    """A copy without value_info: the dynamo exporter's value_info can disagree with onnx's shape inference,
    and the quantisers re-infer shapes."""
    import onnx

    m = onnx.load(str(onnx_path))
    del m.graph.value_info[:]
    clean = folder / "clean.onnx"
    if external:
        onnx.save(m, str(clean), save_as_external_data=True, location="clean.onnx.data")
    else:  # quant_pre_process cannot follow external data through its own temporary folder (< 2 GB graphs)
        onnx.save(m, str(clean))
    return clean


def quantize_dynamic_graph(onnx_path: Path, out_path: Path) -> dict[str, Any]:
    """Dynamic int8 (weights QInt8, activations quantised per call); returns the method facts."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as td:
        quantize_dynamic(str(_clean_copy(onnx_path, Path(td))), str(out_path), weight_type=QuantType.QInt8)
    return {"method": "onnxruntime quantize_dynamic QInt8"}


def calibration_images(task, model, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` train images (seeded choice), preprocessed as at deploy: (n, 3, H, W) float32 and their files.

    Raises:
        QuantizeError: the task has no train images to calibrate on.
    """
    from vision_peft.preprocess import load_image, preprocess_image

    try:
        train = task.splits().get("train") or []
    except (AttributeError, NotImplementedError, FileNotFoundError, ValueError) as e:
        raise QuantizeError(
            f"--int8 static needs calibration images from the run's train split, but task {task.name!r} has none "
            f"({type(e).__name__}: {e}); use --int8 dynamic, or export a run whose data are reachable"
        ) from e
    files = [s[0] for s in train if isinstance(s, (tuple, list)) and isinstance(s[0], (str, Path))]
    if not files:
        raise QuantizeError(
            f"--int8 static needs calibration images from the run's train split, but task {task.name!r} lists no "
            "train image files; use --int8 dynamic instead"
        )
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(files), size=min(n, len(files)), replace=False).tolist())
    spec = task.image_spec(model)
    chosen = [str(files[i]) for i in pick]
    x = np.stack([preprocess_image(load_image(f), spec) for f in chosen]).astype(np.float32)  # (n,3,H,W)
    return x, chosen


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images, ``batch`` at a time."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 8) -> None:
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        chunk = self.x[self.i : self.i + self.batch]
        self.i += self.batch
        return {self.name: np.ascontiguousarray(chunk)}

    def rewind(self) -> None:
        self.i = 0


def quantize_static_graph(
    onnx_path: Path, out_path: Path, input_name: str, calib_x: np.ndarray, method: str = "minmax"
) -> dict[str, Any]:
    """Static int8 in the QDQ format: per-channel QInt8 weights, QUInt8 activations calibrated on ``calib_x``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]  # fmt: skip

    class Reader(_Reader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as td:
        clean = _clean_copy(onnx_path, Path(td), external=False)
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(clean), str(pre), skip_symbolic_shape=True)  # folds BN/constants, infers shapes
        quantize_static(
            str(pre), str(out_path), Reader(input_name, calib_x), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, calibrate_method=cm,
        )  # fmt: skip
    return {
        "method": "onnxruntime quantize_static QDQ, per-channel QInt8 weights, QUInt8 activations (U8S8)",
        "calibration": {"method": method, "images": int(len(calib_x)), "split": "train"},
    }


def fp16_graph(onnx_path: Path, out_path: Path) -> dict[str, Any]:
    """Every float tensor in fp16 with fp32 inputs/outputs (``keep_io_types``)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(onnx_path))
    del m.graph.value_info[:]
    m16 = convert_float_to_float16(m, keep_io_types=True)
    onnx.save(m16, str(out_path))
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)",
            "atol": FP16_ATOL, "rtol": FP16_RTOL}  # fmt: skip


def session(path: Path, threads: int | None = None):
    """A CPU session with the options every variant and its fp32 reference share."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def latency(sessions: dict[str, Any], input_name: str, shape: tuple[int, ...], batches=(1, 8), iters: int = 12,
            rounds: int = 3, warmup: int = 2, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Median latency (ms) per session and batch size, interleaved blocks in rotating order."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    keys = list(sessions)
    for b in batches:
        x = rng.standard_normal((b, *shape), dtype=np.float32)
        times: dict[str, list[float]] = {k: [] for k in keys}
        per = max(1, iters // rounds)
        for r in range(rounds):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                s = sessions[k]
                for _ in range(warmup):
                    s.run(None, {input_name: x})
                for _ in range(per):
                    t0 = time.perf_counter()
                    s.run(None, {input_name: x})
                    times[k].append(time.perf_counter() - t0)
        out[f"batch{b}"] = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}
    return out


def compare(task, model, spec, fp32_path: Path, q_path: Path, key: str, threads: int | None = None) -> dict[str, Any]:
    """Latency vs fp32 at batch 1 and 8, the test-split metric of both graphs, their change and agreement."""
    names = list(spec.example_inputs)
    sess = {"fp32": session(fp32_path, threads), key: session(q_path, threads)}
    rep: dict[str, Any] = {}
    if len(names) == 1:
        shape = tuple(spec.example_inputs[names[0]].shape[1:])
        lat = latency(sess, names[0], shape)
        for b in lat.values():
            b["ratio"] = b[f"{key}_ms"] / b["fp32_ms"]
        rep["latency"] = lat
    for k, s in sess.items():

        def run_fn(inputs: dict[str, np.ndarray], s=s) -> np.ndarray:
            return s.run([spec.output_names[0]], {n: inputs[n] for n in names})[0]

        rep[k] = task.evaluate_onnx(run_fn, model)
    if rep["fp32"] and rep[key]:
        p32, pq = rep["fp32"].pop("predictions", None), rep[key].pop("predictions", None)
        if p32 is not None and pq is not None:
            rep["prediction_agreement"] = float(np.mean(np.asarray(p32) == np.asarray(pq)))
        rep["metric_change"] = {
            k: rep[key][k] - rep["fp32"][k] for k in rep["fp32"] if isinstance(rep["fp32"][k], float)
        }
    return rep


def fp16_parity(fp32_path: Path, fp16_path: Path, input_name: str, x: np.ndarray) -> dict[str, Any]:
    """max |Δ| fp16 vs fp32 on the CPU provider, against FP16_ATOL + FP16_RTOL·max|ref|."""
    ref = session(fp32_path).run(None, {input_name: x})[0]
    got = session(fp16_path).run(None, {input_name: x})[0]
    d, scale = float(np.abs(ref - got).max()), float(np.abs(ref).max())
    rep = {"max_abs_diff": d, "max_abs_ref": scale, "provider": "CPUExecutionProvider", "batch": int(len(x)),
           "passed": bool(d <= FP16_ATOL + FP16_RTOL * scale)}  # fmt: skip
    if ref.ndim == 2 and ref.shape[1] > 1:
        rep["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
    return rep
