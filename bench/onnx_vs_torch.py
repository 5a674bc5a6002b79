"""Exported ONNX on onnxruntime vs PyTorch eager: inference latency and output agreement of one classification run.

What it measures, in one run on one machine: for each batch size (default 1 and 8) the median latency of
``model.logits(x)`` in PyTorch eager under ``torch.inference_mode()`` with the adapter unmerged (LoRA
re-parameterised on the fly) and merged (``model.adapter.merge()``, what the exporter exports), and of the exported
bundle's graph through ``vision_peft.deploy.load_bundle(...).run(graph, image=x)`` on onnxruntime, on identical
random inputs. The three are timed in interleaved blocks: ``--rounds`` rounds (rotating order), each running every
variant for ``--warmup`` untimed then ``--iters / --rounds`` timed calls; the median over all timed calls is
reported. Blocks rather than alternating single calls because torch's OpenMP threads and onnxruntime's intra-op
threads spin-wait after each call and would steal cores from each other. Also the max |Δ| between the outputs.
PyTorch and onnxruntime get the same number of intra-op threads (``--threads``, default ``os.cpu_count()``).

The run: ``--run <run_dir>`` of a finished classification run, or by default a tiny run trained through the library
in a temporary folder: recipe ``classification-aid`` (EfficientNet-Lite0 at 160², LoRA r=8 on ``conv_pw``) with
``train.max_steps=2`` and a reduced split (8 train / 1 val / 1 test images per class) so that it takes seconds;
the adapter values do not matter for latency. Its data come from ``$VISION_PEFT_DATA`` (the ``aid`` folder).
The bundle is ``<run>/export``; it is exported with ``vision_peft.export.export_run`` when missing (or with
``--reexport``).

On CUDA (``--device cuda``), PyTorch runs on the GPU and onnxruntime uses its CUDA execution provider (strict: no
silent CPU fallback; ``--ort-device cpu`` compares against onnxruntime on the CPU on purpose). Both sides then
take a host numpy batch and return a host array, so host↔device copies are inside every timing.

Run (from the repository root, with the virtualenv active)::

    VISION_PEFT_DATA=/work/shared/data python bench/onnx_vs_torch.py                # tiny run, CPU
    python bench/onnx_vs_torch.py --run runs/<name> --batches 1,8,32 --iters 50
    VISION_PEFT_DATA=/work/shared/data python bench/onnx_vs_torch.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="onnxruntime vs PyTorch eager latency of an exported classification run.")
    p.add_argument("--run", type=Path, default=None, help="finished classification run (default: train a tiny one)")
    p.add_argument("--reexport", action="store_true", help="export again even when <run>/export exists")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=30, help="timed calls per variant and batch size, over all rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before each timed block")
    p.add_argument("--rounds", type=int, default=3, help="timed blocks per variant and batch size (rotating order)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for torch and onnxruntime")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device (and onnxruntime's)")
    p.add_argument("--ort-device", default=None, choices=["cpu", "cuda"], help="onnxruntime device (default: --device)")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folder (default run only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p.parse_args(argv)


def train_tiny_run(root: Path, device: str) -> Path:
    """Train the ``classification-aid`` recipe for 2 steps on a reduced split; returns the run directory."""
    from vision_peft.paths import data_root
    from vision_peft.recipe import load_recipe
    from vision_peft.train import run

    aid = data_root() / "aid"
    if not aid.is_dir():
        raise SystemExit(
            f"error: no AID data at {aid} (VISION_PEFT_DATA={os.environ.get('VISION_PEFT_DATA', 'unset')}); "
            "set VISION_PEFT_DATA to the folder holding aid/ (e.g. /work/shared/data) or pass --run <run_dir>"
        )
    overrides = {
        "task": {"split": {"train": 8, "val": 1, "test": 1}},
        "train": {"max_steps": 2, "device": device},
        "output": {"runs_root": str(root), "name": "bench"},
    }
    return run(load_recipe("classification-aid", overrides), progress=False)


def timed(fn: Callable[[], np.ndarray], times: list[float]) -> np.ndarray:
    """Call ``fn`` once, append its wall time (s) to ``times``, return its output."""
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status (0 on success).
    """
    args = parse_args(argv)
    ort_device = args.ort_device or args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    import onnxruntime as ort

    from vision_peft.deploy import load_bundle
    from vision_peft.export import export_run
    from vision_peft.predict import load_run

    tmp: Path | None = None
    if args.run is None:
        tmp = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
        t0 = time.perf_counter()
        run_dir = train_tiny_run(tmp, args.device)
        print(f"# trained a tiny run in {time.perf_counter() - t0:.1f} s: {run_dir}", flush=True)
    else:
        run_dir = args.run
    try:
        bundle_dir = run_dir / "export"
        if args.reexport or not (bundle_dir / "manifest.json").is_file():
            t0 = time.perf_counter()
            export_run(run_dir)
            print(f"# exported in {time.perf_counter() - t0:.1f} s: {bundle_dir}", flush=True)

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            bundle = load_bundle(bundle_dir, device=ort_device, strict=ort_device == "cuda", session_options=so)
        except RuntimeError as e:  # CUDA asked for but onnxruntime cannot use it: say so, never fall back silently
            print(f"error: {e}\n(--ort-device cpu compares against onnxruntime on the CPU on purpose)", file=sys.stderr)
            return 2
        graph = next(iter(bundle.manifest["graphs"]))
        (input_name,) = [i.name for i in bundle.sessions[graph].get_inputs()]
        output_name = bundle.sessions[graph].get_outputs()[0].name

        cfg, task, unmerged, _ = load_run(run_dir, args.device)
        _, _, merged, _ = load_run(run_dir, args.device)
        merged.adapter.merge()
        merged.requires_grad_(False).eval()
        h, w = unmerged.backbone.input_size
        dev = torch.device(args.device)

        def torch_fn(model: torch.nn.Module, x: np.ndarray) -> Callable[[], np.ndarray]:
            def call() -> np.ndarray:
                with torch.inference_mode():
                    out = model.logits(torch.from_numpy(x).to(dev)).float().cpu().numpy()
                return out

            return call

        def ort_fn(x: np.ndarray) -> Callable[[], np.ndarray]:
            return lambda: bundle.run(graph, **{input_name: x})[output_name]

        rows = []
        rng = np.random.default_rng(args.seed)
        for b in [int(s) for s in args.batches.split(",")]:
            x = rng.standard_normal((b, 3, h, w), dtype=np.float32)
            fns = {"unmerged": torch_fn(unmerged, x), "merged": torch_fn(merged, x), "ort": ort_fn(x)}
            times: dict[str, list[float]] = {k: [] for k in fns}
            outs: dict[str, np.ndarray] = {}
            keys = list(fns)
            # Blocks, not call-by-call alternation: torch's OpenMP and onnxruntime's thread pools both spin-wait
            # after a call, so alternating single calls makes each runtime compete with the other's spinning threads.
            per_round = [args.iters // args.rounds + (r < args.iters % args.rounds) for r in range(args.rounds)]
            for r, n in enumerate(per_round):
                for k in keys[r % 3 :] + keys[: r % 3]:  # rotate which runtime goes first
                    for _ in range(args.warmup):
                        outs[k] = fns[k]()
                    for _ in range(n):
                        outs[k] = timed(fns[k], times[k])
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append(
                {
                    "batch": b,
                    **med,
                    "ratio": med["ort"] / med["merged"],
                    "d_ort": float(np.abs(outs["ort"] - outs["merged"]).max()),
                    "d_ort_unmerged": float(np.abs(outs["ort"] - outs["unmerged"]).max()),
                    "d_merge": float(np.abs(outs["merged"] - outs["unmerged"]).max()),
                }
            )

        dev_name = f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "cpu"
        print(
            f"# run {run_dir} | {cfg.backbone.name} {h}x{w}, adapter {cfg.adapter.name} "
            f"targets {getattr(cfg.adapter, 'targets', '-')}, {len(task.classes)} classes, graph {graph!r}"
        )
        print(
            f"# torch {torch.__version__} on {dev_name}, {torch.get_num_threads()} threads | onnxruntime "
            f"{ort.__version__} providers {bundle.providers}, intra-op threads {args.threads} | "
            f"median of {args.iters} calls in {args.rounds} interleaved blocks, {args.warmup} warm-up calls before each"
        )
        print()
        header = (
            "batch",
            "torch unmerged ms",
            "torch merged ms",
            "onnxruntime ms",
            "ort / torch merged",
            "max |Δ| ort vs merged",
            "max |Δ| ort vs unmerged",
            "max |Δ| merged vs unmerged",
        )
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("-" * (len(c) + 2) for c in header) + "|")
        for r in rows:
            cells = (
                f"{r['batch']}",
                f"{r['unmerged']:.2f}",
                f"{r['merged']:.2f}",
                f"{r['ort']:.2f}",
                f"{r['ratio']:.3f}",
                f"{r['d_ort']:.2e}",
                f"{r['d_ort_unmerged']:.2e}",
                f"{r['d_merge']:.2e}",
            )
            print("| " + " | ".join(c.rjust(len(hd)) for c, hd in zip(cells, header)) + " |")
    finally:
        if tmp is not None:
            if args.keep:
                print(f"# kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
