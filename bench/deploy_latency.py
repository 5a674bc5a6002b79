"""Deployment latency of one EfficientNet-Lite0 LoRA AID run: torch eager vs onnxruntime fp32, dynamic and static
int8, with AID test top-1 of each and the achieved GFLOP/s of the fp32 graph vs this machine's matmul peak.

In one run on one machine: the run's merged model in torch eager (``model.logits`` under ``inference_mode``, as
bench/onnx_vs_torch.py measures), the exported fp32 graph, its dynamic int8 variant (``quantize_dynamic``) and its
static int8 variant (``quantize_static`` QDQ, per-channel, ``--calib`` seeded train images preprocessed as at
deploy) — all on the CPU with ``--threads`` intra-op threads, timed in interleaved blocks (rotating order), medians.
Top-1 on the run's test split (the recipe's split: 30 per class, 900 images) with Wilson 95 % intervals.
FLOPs: 2·MACs of every Conv, Gemm and MatMul node of the fp32 graph after onnx shape inference (per image; BN is
folded into the convs, activations/pooling/adds are not counted). Peak: the fastest of 10 calls (before and after the
latency blocks) of a 2048×2048 fp32 matmul in torch and in onnxruntime (MLAS), the faster of the two,
at the same thread count (2·2048³ FLOPs).

    OMP_NUM_THREADS=2 python -m vision_peft train classification-aid --output.runs_root=runs/int8 --output.name=aid_lora
    OMP_NUM_THREADS=2 python bench/deploy_latency.py --run runs/int8/aid_lora --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of k successes in n trials."""
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [c - h, c + h]


def graph_flops(path: Path) -> dict[str, float]:
    """2·MACs per image of Conv / Gemm / MatMul nodes, shapes from onnx shape inference (batch axis = 1)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    m = onnx.load(str(path))
    del m.graph.value_info[:]
    m = shape_inference.infer_shapes(m)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
    for t in m.graph.initializer:
        shapes[t.name] = list(numpy_helper.to_array(t).shape)
    out = {"Conv": 0.0, "Gemm": 0.0, "MatMul": 0.0}
    for n in m.graph.node:
        if n.op_type == "Conv":
            w, y = shapes[n.input[1]], shapes[n.output[0]]
            out["Conv"] += 2.0 * np.prod(y) * np.prod(w[1:])  # (B,Cout,H,W) · Cin/groups·kh·kw
        elif n.op_type in ("Gemm", "MatMul"):
            a, b = shapes[n.input[0]], shapes[n.input[1]]
            trans_b = any(at.name == "transB" and at.i for at in n.attribute)
            k, ncol = (b[-1], b[-2]) if trans_b else (b[-2], b[-1])
            out[n.op_type] += 2.0 * np.prod(a[:-1]) * k * ncol
    out["total"] = sum(out.values())
    return out


def matmul_peak(threads: int, iters: int = 10) -> float:
    """GFLOP/s of a 2048×2048 fp32 torch.matmul: the fastest of ``iters`` (a ceiling, so the best, not the median,
    call on a shared machine)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * 2048**3 / min(ts) / 1e9


def ort_matmul_peak(threads: int, iters: int = 10) -> float:
    """GFLOP/s of a 2048×2048 fp32 MatMul in onnxruntime (MLAS, the kernels the deployed graph runs on), best of
    ``iters``; torch's BLAS may take another code path on this CPU, so the ceiling is the faster of the two."""
    import onnx
    from onnx import TensorProto, helper

    from vision_peft import quantize as q

    n = 2048
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "mm.onnx"
        onnx.save(m, str(path))
        s = q.session(path, threads)
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    for _ in range(2):
        s.run(None, feed)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="finished classification run (EfficientNet-Lite0 LoRA AID)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--calib-method", default="minmax")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("bench/results/deploy_latency"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vision_peft import quantize as q
    from vision_peft.export import export_run
    from vision_peft.predict import load_run

    bundle = args.run / "export_bench"
    t0 = time.perf_counter()
    export_run(args.run, bundle)
    export_s = time.perf_counter() - t0
    cfg, task, model, _ = load_run(args.run, "cpu")
    model.adapter.merge()
    model.requires_grad_(False).eval()
    fp32 = bundle / "model.onnx"
    dyn, sta = bundle / "model_int8.onnx", bundle / "model_int8_static.onnx"
    q.quantize_dynamic_graph(fp32, dyn)
    t0 = time.perf_counter()
    x_cal, _ = q.calibration_images(task, model, args.calib, seed=0)
    q.quantize_static_graph(fp32, sta, "image", x_cal, args.calib_method)
    static_s = time.perf_counter() - t0
    sess = {"fp32": q.session(fp32, args.threads), "int8_dynamic": q.session(dyn, args.threads),
            "int8_static": q.session(sta, args.threads)}  # fmt: skip
    h, w = model.backbone.input_size

    def torch_call(x: np.ndarray):
        with torch.inference_mode():
            return model.logits(torch.from_numpy(x)).numpy()

    peak_before = {"torch": matmul_peak(args.threads), "onnxruntime": ort_matmul_peak(args.threads)}
    rng = np.random.default_rng(0)
    lat: dict[str, dict[str, float]] = {}
    for b in (1, 8):
        x = rng.standard_normal((b, 3, h, w), dtype=np.float32)
        fns = {"torch_eager": lambda x=x: torch_call(x)}
        fns.update({k: (lambda s=s, x=x: s.run(None, {"image": x})[0]) for k, s in sess.items()})
        keys, times = list(fns), {k: [] for k in fns}
        rounds = max(3, args.iters // 10)  # many short interleaved blocks: a burst of load hits every variant
        for r in range(rounds):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                for _ in range(3):
                    fns[k]()
                for _ in range(args.iters // rounds):
                    t = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t)
        lat[f"batch{b}"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    acc = {}
    preds = {}
    for k, s in sess.items():
        res = task.evaluate_onnx(lambda inp, s=s: s.run(None, {"image": inp["image"]})[0], model)
        preds[k] = np.asarray(res.pop("predictions"))
        kk = round(res["top1"] * res["n"])
        acc[k] = {**res, "correct": kk, "wilson95": wilson(kk, res["n"])}
    for k in ("int8_dynamic", "int8_static"):
        acc[k]["change_points"] = 100 * (acc[k]["top1"] - acc["fp32"]["top1"])
        acc[k]["agreement"] = float((preds[k] == preds["fp32"]).mean())
    flops = graph_flops(fp32)
    peaks = {
        "torch": max(peak_before["torch"], matmul_peak(args.threads)),
        "onnxruntime": max(peak_before["onnxruntime"], ort_matmul_peak(args.threads)),
    }  # before and after
    peak = max(peaks.values())
    ceiling = {b: flops["total"] * int(b[5:]) / (lat[b]["fp32"] / 1e3) / 1e9 for b in lat}
    res = {
        "run": str(args.run), "backbone": cfg.backbone.name, "image_size": [h, w], "adapter": cfg.adapter.name,
        "threads": args.threads, "split": "test (recipe split, seed 0)", "calibration": {"images": len(x_cal),
        "method": args.calib_method, "split": "train", "seed": 0, "seconds": static_s}, "export_seconds": export_s,
        "latency_ms": lat,
        "ratios": {b: {"ort_fp32/torch_eager": v["fp32"] / v["torch_eager"],
                       "int8_dynamic/fp32": v["int8_dynamic"] / v["fp32"],
                       "int8_static/fp32": v["int8_static"] / v["fp32"]} for b, v in lat.items()},
        "top1": acc, "flops_per_image": flops, "matmul_peak_gflops": peak, "matmul_peaks_gflops": peaks,
        "peak_source": "2048x2048 fp32 matmul, torch.matmul and onnxruntime MatMul, the fastest of 10 calls each, "
        "before and after the latency blocks; the faster of the two",
        "achieved_gflops_fp32": ceiling, "fraction_of_peak": {b: v / peak for b, v in ceiling.items()},
        "targets": {"ort/torch": 0.15, "int8/fp32": 0.5, "top1_loss_points": 1.0},
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, args.out.with_suffix(".json"))
    lines = [
        f"# deploy latency — {cfg.backbone.name} {h}×{w} + {cfg.adapter.name}, AID, {args.threads} threads, CPU",
        "",
        "| batch | torch eager ms | ort fp32 ms | int8 dynamic ms | int8 static ms | fp32/torch | dyn/fp32 | static/fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, v in lat.items():
        r = res["ratios"][b]
        lines.append(f"| {b[5:]} | {v['torch_eager']:.2f} | {v['fp32']:.2f} | {v['int8_dynamic']:.2f} | "
                     f"{v['int8_static']:.2f} | {r['ort_fp32/torch_eager']:.3f} | {r['int8_dynamic/fp32']:.3f} | "
                     f"{r['int8_static/fp32']:.3f} |")  # fmt: skip
    lines += ["", "| graph | test top-1 | Wilson 95 % | Δ points vs fp32 | agreement |", "|---|---|---|---|---|"]
    for k, a in acc.items():
        lo, hi = a["wilson95"]
        lines.append(f"| {k} | {a['top1']:.4f} ({a['correct']}/{a['n']}) | [{lo:.3f}, {hi:.3f}] | "
                     f"{a.get('change_points', 0):+.2f} | {a.get('agreement', 1.0):.4f} |")  # fmt: skip
    lines += ["", f"FLOPs/image (2·MACs Conv+Gemm+MatMul): {flops['total'] / 1e9:.3f} G; matmul peak {peak:.1f} GFLOP/s "
              f"(2048² fp32, best call, {args.threads} threads; torch {peaks['torch']:.1f}, onnxruntime "
              f"{peaks['onnxruntime']:.1f}); fp32 graph achieves "
              + ", ".join(f"{ceiling[b]:.1f} GFLOP/s ({ceiling[b] / peak:.1%}) at batch {b[5:]}" for b in ceiling)]  # fmt: skip
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
