"""16-shot ModelNet10 on the frozen ModelNet40 PointNet, one adapter per row (issue 16: the methods of the wider PET
family that apply to a point backbone, next to LoRA, the linear probe and full tuning), 3 seeds.

Every run trains the recipe ``tasks/pointcloud-modelnet10.yaml`` (PPT prompts through MiniLM + the row's adapter,
K = 16 shapes per class) through ``python -m vision_peft train`` with only the adapter (and its lr) changed; seed s
sets both ``train.seed`` and ``task.shot_seed`` (a new draw of the 16 shapes per class), 25 epochs (125 steps), no
val split, and the final test evaluation on the full ModelNet10 test split (every hyper-parameter fixed in advance:
nothing is selected on it). Per row: mean test top-1 with a 95 % t-interval over the seeds, trainable parameters
with and without the head, median step time, peak RSS.

    OMP_NUM_THREADS=1 nice -n 10 python bench/pointcloud_methods.py --rows linear,lora,flora --seeds 0 1 2 \\
        --runs-root runs/bench/pointcloud_methods --out bench/results/pointcloud_methods.json

Finished runs under ``--runs-root`` are reused (a row can be added later without re-running the others), and an
existing ``--out`` file keeps its other rows: the rows run now replace theirs, the rest stay (only when its seeds
and epochs are the same; otherwise the script refuses to mix them).
Caveat: the PointNet weights were trained on ModelNet40, which contains the ten ModelNet10 classes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pointcloud_fewshot import t_interval

from vision_peft import rundir

ROWS = {  # PointNet's adaptable layers are its Conv1d convs (portable target `convs`)
    "linear": ["--adapter.name=linear", "--train.lr=3e-3"],
    "point_mlp": ["--adapter.name=point_mlp", "--adapter.hidden=256", "--train.lr=3e-3"],  # the recipe's PPT adapter
    "lora": ["--adapter.name=lora", "--adapter.r=4", "--adapter.targets=[convs]", "--train.lr=1e-3"],
    "flora": ["--adapter.name=flora", "--adapter.r=4", "--adapter.targets=[convs]", "--train.lr=1e-3"],
    "adalora": ["--adapter.name=adalora", "--adapter.init_r=6", "--adapter.target_r=4", "--adapter.tinit=10",
                "--adapter.tfinal=40", "--adapter.targets=[convs]", "--train.lr=1e-3"],  # ends at LoRA's rank 4
    "full": ["--adapter.name=full", "--train.lr=4e-4"],
    # LST: a side network at 1/8 width (the paper's r = 8) on PointNet's five conv stages, trained from scratch, so
    # the linear probe's lr. MP / MP+: 4 heads as the paper, hidden_dim 128 instead of its 512 (fixed in advance for
    # CPU cost: the projection runs on all 1,024 points of every cloud; 147 second-order dims), PSRP rank 16
    "lst": ["--adapter.name=lst", "--adapter.reduction=8", "--train.lr=3e-3"],
    "moment_probing": ["--adapter.name=moment_probing", "--adapter.hidden_dim=128", "--train.lr=3e-3"],
    "moment_probing_plus": ["--adapter.name=moment_probing_plus", "--adapter.hidden_dim=128", "--adapter.psrp_rank=16",
                            "--train.lr=3e-3"],
}


def run_one(root: Path, row: str, seed: int, epochs: int) -> dict:
    name = f"{row}-s{seed}"
    run = root / name
    if not (run / rundir.FINAL_FILE).is_file():
        cmd = [sys.executable, "-m", "vision_peft", "train", "pointcloud-modelnet10", *ROWS[row],
               f"--train.seed={seed}", f"--task.shot_seed={seed}", f"--train.epochs={epochs}", "--train.device=cpu",
               "--train.eval_every=100000", f"--output.runs_root={root}", f"--output.name={name}",
               "--no-progress"]  # fmt: skip
        t0 = time.time()
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
    final = json.loads((run / rundir.FINAL_FILE).read_text())
    info = rundir.RunInfo.read(run)
    return {"test": final["test"], "timing": final["timing"], "params": info.parameters}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="linear,lora,flora", help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--runs-root", default="runs/bench/pointcloud_methods")
    ap.add_argument("--out", default=None, help="also write the per-run results and the table as JSON here")
    args = ap.parse_args(argv)
    root = Path(args.runs_root)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    t0 = time.time()
    runs = {r: [run_one(root, r, s, args.epochs) for s in args.seeds] for r in rows}
    print(f"\nModelNet10, K = 16 shapes per class, {args.epochs} epochs, seeds {args.seeds} (train seed = shot seed), "
          f"test n = {runs[rows[0]][0]['test']['n']}, CPU; wall {time.time() - t0:.0f} s\n")  # fmt: skip
    print("| method | test top-1 %, mean ± 95 % t (per seed) | trainable no head (with head) | step s | peak MiB |")
    print("|---|---|---|---|---|")
    table = {}
    for r, rs in runs.items():
        mean, half = t_interval([x["test"]["top1"] for x in rs])
        p = rs[0]["params"]
        step = sorted(x["timing"]["step_time_median"] for x in rs)[len(rs) // 2]
        peak = max(x["timing"]["peak_memory_mb"] for x in rs)
        per = ", ".join(f"{100 * x['test']['top1']:.1f}" for x in rs)
        table[r] = {"mean": mean, "t95": half, "per_seed": [x["test"]["top1"] for x in rs], "step_s": step,
                    "peak_mb": peak, "trainable": p["trainable"], "trainable_no_head": p["trainable_no_head"]}  # fmt: skip
        print(f"| {r} | {mean:.1f} ± {half:.1f} ({per}) | {p['trainable_no_head']:,} ({p['trainable']:,}) "
              f"| {step:.3f} | {peak:.0f} |")  # fmt: skip
    if args.out:
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.is_file() else {"table": {}, "runs": {}}
        kept = [r for r in old.get("table", {}) if r not in table]
        if kept and (old.get("seeds") != args.seeds or old.get("epochs") != args.epochs):
            print(f"refusing to merge into {out}: its rows {kept} have seeds {old.get('seeds')}, epochs "
                  f"{old.get('epochs')}, not {args.seeds}, {args.epochs}; rerun them or pick another --out")  # fmt: skip
            return 1
        table = {**{r: old["table"][r] for r in kept}, **table}
        runs = {**{r: old["runs"][r] for r in kept if r in old.get("runs", {})}, **runs}
        rundir.atomic_write_json(out, {"table": table, "runs": runs, "seeds": args.seeds, "epochs": args.epochs})
        print(f"wrote {out}: rows {', '.join(table)} (kept from the file: {', '.join(kept) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
