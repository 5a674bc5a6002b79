"""Switching finished runs on one built model vs loading each run: time and memory, on real AID runs.

Trains ``--runs`` short runs of ``tasks/classification-aid.yaml`` (EfficientNet-Lite0 + LoRA r=8 on the
pointwise convs, 128 px) in a temporary runs root — other train seeds, and the last run on a class subset so its
head has another class count — then measures, in this process (``--threads`` torch threads):

- ``load_run`` of each run (build backbone, weight hash check, adapter, strict load), ``--repeats`` times each;
- a switch between runs on one :class:`vision_peft.predict.RunSwitcher` model (read config.json, task object,
  strict tensor load, a new head when the class count differs), cycling over the runs ``--switches`` times;
- parity: logits of every switched run (cycled twice, so A → B → C → A) vs a fresh ``load_run`` of it on
  ``--images`` AID test-split images (max |Δ|, top-1 agreement);

and in child processes the peak RSS (``ru_maxrss``) of: one model with every run switched in turn
(``switch``), every run loaded side by side (``each``, what serving N runs without switching holds), one run
loaded at a time (``sequential``, the previous app cache) and one run only (``single``).

The runs train for ``--steps`` optimizer steps on a reduced split (the measured quantities do not depend on how
well they are trained). Writes ``--out`` (JSON) and prints the load/switch ratio.

    nice -n 10 python bench/adapter_switch.py --threads 1 > /work/coord/logs/adapter_switch.log 2>&1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "tasks" / "classification-aid.yaml"


def train_runs(runs_root: Path, n: int, steps: int, subset: int) -> list[Path]:
    from vision_peft.recipe import load_recipe
    from vision_peft.train import run

    out = []
    for i in range(n):
        over = [
            f"train.max_steps={steps}", f"train.seed={i}", "train.batch_size=16", "train.device=cpu",
            "train.amp=none", f"output.runs_root={runs_root}", f"output.name=run{i}",
            "task.split={train: 20, val: 2, test: 10}",
        ]  # fmt: skip
        if i == n - 1 and subset:  # the last run: a class subset (another head size, same layout)
            over.append("task.classes=[" + ", ".join(sorted(os.listdir(aid_root()))[:subset]) + "]")
        t = time.perf_counter()
        d = Path(run(load_recipe(RECIPE, over), progress=False))
        print(f"trained {d.name} in {time.perf_counter() - t:.1f} s", flush=True)
        out.append(d)
    return out


def aid_root() -> Path:
    from vision_peft.paths import resolve_data_path

    return resolve_data_path("aid")


def test_images(run_dir: Path, k: int) -> list[str]:
    """The first ``k`` test-split images of the run (split.json), spread over classes."""
    split = json.loads((run_dir / "split.json").read_text())["test"]
    step = max(1, len(split) // k)
    return [split[i] for i in range(0, len(split), step)][:k]


def logits(loaded, images: list[str]):
    import torch

    from vision_peft.preprocess import load_image, preprocess_image

    _, task, model, _ = loaded
    spec = task.image_spec(model)
    x = torch.stack([torch.from_numpy(preprocess_image(load_image(p), spec)) for p in images])
    with torch.no_grad():
        return model.logits(x)


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "n": len(s),
        "median_s": statistics.median(s),
        "p10_s": s[int(0.1 * (len(s) - 1))],
        "p90_s": s[int(0.9 * (len(s) - 1))],
        "min_s": s[0],
        "max_s": s[-1],
    }


def measure_times(runs: list[Path], repeats: int, switches: int, n_images: int) -> dict:
    import gc

    from vision_peft.predict import RunSwitcher, load_run

    load_run(runs[0], "cpu")  # warm-up: imports, file caches (not counted)
    gc.collect()
    loads: dict[str, list[float]] = {r.name: [] for r in runs}
    for _ in range(repeats):
        for r in runs:
            t = time.perf_counter()
            loaded = load_run(r, "cpu")
            loads[r.name].append(time.perf_counter() - t)
            del loaded
            gc.collect()
    sw = RunSwitcher("cpu", max_layouts=1)
    t = time.perf_counter()
    sw.load(runs[0])
    first_build = time.perf_counter() - t
    n_classes = {r: len(json.loads((r / "config.json").read_text())["task_state"]["classes"]) for r in runs}
    times, same_head, new_head = [], [], []
    for i in range(switches):
        prev, r = runs[i % len(runs)], runs[(i + 1) % len(runs)]
        t = time.perf_counter()
        sw.load(r)
        dt = time.perf_counter() - t
        times.append(dt)
        (same_head if n_classes[prev] == n_classes[r] else new_head).append(dt)  # new head: other class count
    assert sw.builds == 1 and sw.switches == switches, (sw.builds, sw.switches)
    # parity: every run switched to twice (A → B → C → A → B → C) vs a fresh load_run
    images = test_images(runs[0], n_images)
    fresh = {r.name: logits(load_run(r, "cpu"), images) for r in runs}
    parity = []
    for r in runs + runs:
        got = logits(sw.load(r), images)
        want = fresh[r.name]
        parity.append(
            {
                "run": r.name,
                "max_abs_diff": float((got - want).abs().max()),
                "top1_agreement": float((got.argmax(1) == want.argmax(1)).float().mean()),
                "classes": int(want.shape[1]),
            }
        )
    all_loads = [x for v in loads.values() for x in v]
    return {
        "load_run": {"per_run": {k: summary(v) for k, v in loads.items()}, "all": summary(all_loads)},
        "first_build_s": first_build,
        "switch": summary(times),
        "switch_same_class_count": summary(same_head) if same_head else None,
        "switch_other_class_count": summary(new_head) if new_head else None,
        "ratio_load_over_switch_median": statistics.median(all_loads) / statistics.median(times),
        "parity": parity,
        "parity_images": len(images),
    }


def proc_mem() -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of this process in MiB, from /proc/self/status. Not ``ru_maxrss``: that one
    survives fork + exec, so a child would report its parent's peak."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0]) / 1024
    return out


def child(mode: str, runs: list[str], cycles: int) -> None:
    """Peak and held RSS of one way of holding the runs (printed as JSON, MiB)."""
    import torch

    import vision_peft.predict  # noqa: F401  (every import happens before the baseline)
    from vision_peft.predict import RunSwitcher, load_run

    images = test_images(Path(runs[0]), 2)
    base = proc_mem()
    if mode == "switch":
        sw = RunSwitcher("cpu", max_layouts=1)
        for _ in range(cycles):
            for r in runs:
                logits(sw.load(r), images)
        built = sw.builds
    elif mode == "each":
        held = [load_run(r, "cpu") for r in runs]
        for _ in range(cycles):
            for h in held:
                logits(h, images)
        built = len(held)
    elif mode == "sequential":
        built = 0
        for _ in range(cycles):
            for r in runs:
                h = load_run(r, "cpu")  # the previous one is dropped once this one is built (the old app cache)
                logits(h, images)
                built += 1
    elif mode == "single":
        logits(load_run(runs[0], "cpu"), images)
        built = 1
    else:
        raise SystemExit(f"unknown mode {mode}")
    now = proc_mem()
    rec = {
        "mode": mode,
        "peak_rss_mib": now["VmHWM"],
        "rss_end_mib": now["VmRSS"],
        "rss_after_imports_mib": base["VmRSS"],
        "peak_over_imports_mib": now["VmHWM"] - base["VmRSS"],
        "models_built": built,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(rec))


def measure_rss(runs: list[Path], threads: int, cycles: int, repeats: int) -> dict:
    """Each mode in ``repeats`` fresh child processes (modes interleaved); per mode the median child and the
    range of ``peak_over_imports_mib`` (allocator noise is a few MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    modes = ("single", "switch", "each", "sequential")
    recs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", mode, "--threads", str(threads), "--cycles", str(cycles)]
            res = subprocess.run(cmd + ["--run-dirs", *map(str, runs)], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"child {mode} failed:\n{res.stderr[-2000:]}")
            recs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"rss {mode}: {json.dumps(recs[mode][-1])}", flush=True)
    out = {}
    for mode, rs in recs.items():
        rs = sorted(rs, key=lambda r: r["peak_over_imports_mib"])
        over = [r["peak_over_imports_mib"] for r in rs]
        out[mode] = {**rs[len(rs) // 2], "peak_over_imports_range_mib": [over[0], over[-1]], "children": len(rs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--subset", type=int, default=10, help="classes of the last run (0 = all 30)")
    ap.add_argument("--repeats", type=int, default=5, help="load_run timings per run")
    ap.add_argument("--switches", type=int, default=60)
    ap.add_argument("--images", type=int, default=8, help="test-split images of the parity check")
    ap.add_argument("--cycles", type=int, default=3, help="passes over the runs in the RSS children")
    ap.add_argument("--rss-repeats", type=int, default=3, help="child processes per RSS mode")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-root", help="train here (default: a temporary folder)")
    ap.add_argument("--run-dirs", nargs="*", help="use these finished runs instead of training")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "adapter_switch.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.run_dirs, args.cycles)
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dirs:
            runs = [Path(d) for d in args.run_dirs]
        else:
            runs = train_runs(Path(args.runs_root or tmp), args.runs, args.steps, args.subset)
        adapter_bytes = {r.name: (r / "adapter.safetensors").stat().st_size for r in runs}
        times = measure_times(runs, args.repeats, args.switches, args.images)
        rss = measure_rss(runs, args.threads, args.cycles, args.rss_repeats)
        info = json.loads((runs[0] / "config.json").read_text())
        run_classes = {r.name: len(json.loads((r / "config.json").read_text())["task_state"]["classes"]) for r in runs}
    result = {
        "what": "RunSwitcher adapter switch vs load_run per run (vision_peft.predict)",
        "command": "python bench/adapter_switch.py " + " ".join(sys.argv[1:]),
        "recipe": str(RECIPE.relative_to(ROOT)),
        "backbone": info["backbone"]["spec"],
        "adapter": info["config"]["adapter"],
        "runs": [{"name": name, "classes": n} for name, n in run_classes.items()],
        "train_steps": args.steps,
        "adapter_file_bytes": adapter_bytes,
        "threads": args.threads,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        **times,
        "peak_rss": rss,
        "wall_s": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from vision_peft.rundir import atomic_write_json

    atomic_write_json(args.out, result)
    lr, sw = result["load_run"]["all"]["median_s"], result["switch"]["median_s"]
    print(
        f"load_run median {lr * 1000:.1f} ms, switch median {sw * 1000:.2f} ms: ratio {lr / sw:.1f}×; "
        f"peak RSS over imports: switch {rss['switch']['peak_over_imports_mib']:.0f} MiB vs each "
        f"{rss['each']['peak_over_imports_mib']:.0f} MiB (single run {rss['single']['peak_over_imports_mib']:.0f} MiB, "
        f"sequential {rss['sequential']['peak_over_imports_mib']:.0f} MiB); parity max |Δ| "
        f"{max(p['max_abs_diff'] for p in result['parity']):.3g}, top-1 agreement "
        f"{min(p['top1_agreement'] for p in result['parity']):.3f}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
