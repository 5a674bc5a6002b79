"""Frozen-prefix cache (train.cache): cached vs uncached runs on real AID with real EfficientNet-Lite0 weights.

    export VISION_PEFT_DATA=/work/shared/data VISION_PEFT_WEIGHTS=/work/shared/weights
    OMP_NUM_THREADS=2 python bench/prefix_cache.py            # writes bench/results/prefix_cache.{json,md}

(a) MVP meta-training, recipe fewshot-aid-1shot (300 episodes of the 16 base classes, 50 val episodes), with
``train.cache=off`` (every episode recomputes its stage-4 grids) and ``train.cache=memory``; (b) a linear probe, recipe
classification-aid with ``adapter.name=linear task.augment=none`` (60/10/30 per class, 4 epochs), off vs memory.
Per run: the training loop's time (sum of the step times: the meta-training / training proper), the loop with its
evaluations (final_metrics timing.train_seconds), the cache build (reported separately), the whole wall time and the
validation metrics. Ratios are uncached / cached, measured in this one run (seed 0 everywhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vision_peft.recipe import load_recipe  # noqa: E402
from vision_peft.rundir import atomic_write_json, atomic_write_text  # noqa: E402
from vision_peft.train import run  # noqa: E402

CASES = {
    "mvp_1shot": ("fewshot-aid-1shot", [], "acc"),
    "linear_probe": ("classification-aid", ["adapter={name: linear}", "task.augment=none"], "top1"),
}


def one(recipe: str, overrides: list[str], cache: str, runs: Path, name: str) -> dict:
    cfg = load_recipe(recipe, [*overrides, f"train.cache='{cache}'", "train.log_every=1",
                               f"output.runs_root={runs}", f"output.name={name}"])  # fmt: skip
    t0 = time.perf_counter()
    d = Path(run(cfg, progress=False))
    wall = time.perf_counter() - t0
    final = json.loads((d / "final_metrics.json").read_text())
    steps = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    loop = sum(r["step_time"] for r in steps if "split" not in r and "step_time" in r)
    rep = final["compute"]["cache"]
    return {"cache": cache, "wall_seconds": wall, "loop_seconds": loop,
            "loop_with_eval_seconds": final["timing"]["train_seconds"],
            "build_seconds": rep.get("build_seconds", 0.0), "report": rep, "val": final.get("val")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench_prefix_cache"))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument(
        "--override", action="append", default=[], help="CASE:key=value, e.g. mvp_1shot:task.train_episodes=60"
    )
    args = ap.parse_args(argv)
    import shutil

    runs = Path(args.runs)
    shutil.rmtree(runs, ignore_errors=True)
    res = ROOT / "bench" / "results"
    out: dict = {"threads": __import__("torch").get_num_threads(), "cases": {}}
    if (res / "prefix_cache.json").is_file():  # cases not run this time keep their last measured rows
        out["cases"] = {k: v for k, v in json.loads((res / "prefix_cache.json").read_text())["cases"].items()
                        if k in CASES and k not in args.cases}  # fmt: skip
    for case in args.cases:
        recipe, overrides, metric = CASES[case]
        overrides = [*overrides, *(o.split(":", 1)[1] for o in args.override if o.startswith(f"{case}:"))]
        off = one(recipe, overrides, "off", runs, f"{case}-off")
        on = one(recipe, overrides, "memory", runs, f"{case}-memory")
        out["cases"][case] = {
            "recipe": recipe, "overrides": overrides, "metric": metric, "off": off, "memory": on,
            "speedup_loop": off["loop_seconds"] / on["loop_seconds"],
            "speedup_loop_with_eval": off["loop_with_eval_seconds"] / on["loop_with_eval_seconds"],
            "speedup_wall_incl_build": off["wall_seconds"] / on["wall_seconds"],
            "val_off": off["val"][metric], "val_memory": on["val"][metric],
        }  # fmt: skip
        print(json.dumps({k: v for k, v in out["cases"][case].items() if k not in ("off", "memory")}), flush=True)
    atomic_write_json(res / "prefix_cache.json", out)
    lines = [f"# Frozen-prefix cache (train.cache), CPU, {out['threads']} threads (shared machine)", "",
             "| case | loop off s | loop cached s | speedup loop | loop+eval speedup | build s | wall speedup (incl. build) "
             "| val off | val cached |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for case, c in out["cases"].items():
        lines.append(
            f"| {case} | {c['off']['loop_seconds']:.1f} | {c['memory']['loop_seconds']:.1f} | {c['speedup_loop']:.2f}x "
            f"| {c['speedup_loop_with_eval']:.2f}x | {c['memory']['build_seconds']:.1f} | "
            f"{c['speedup_wall_incl_build']:.2f}x | {c['val_off']:.4f} | {c['val_memory']:.4f} |"
        )
    atomic_write_text(res / "prefix_cache.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
