"""Adapter merging on AID: each task's LoRA alone vs task arithmetic vs TIES vs PCB, and the merged run deployed.

One command, one table. The 30 AID classes (sorted, permuted with numpy ``RandomState(0)``) are cut into
``--tasks`` disjoint subsets of ``--classes-per-task`` classes; every subset is its own task: the recipe
``tasks/classification-aid.yaml`` (the issue-2 split: per class 60 train / 10 val / 30 test, seed 0) restricted to
those classes, with the LoRA row of ``bench/aid_classification.py`` (EfficientNet-Lite0 at 128², r = 8 on the
pointwise convs), the same epochs and seed for every task. Then, for every method, ``python -m vision_peft merge``
folds the task vectors into one shared backbone (each task keeps its head) over a tiny grid of λ (TIES's k and
PCB's r fixed at the papers' defaults, the merge module's ``DEFAULTS``); the grid point with the best mean
**val** top-1 over the tasks is chosen and its **test** top-1 reported per task with a 95 % Wilson interval.
Every grid point's val and test numbers go into the JSON; only val chooses. A control column, λ = 0 (each
task's own head on the frozen backbone, no update), shows how much of each adapter's accuracy is its backbone
update — the part a merge has to keep.

Finally one merged sub-run (the chosen PCB merge, first task) is exported (``python -m vision_peft export``, with
its graph-level parity gate) and run through the torch-free runtime (:func:`vision_peft.deploy.load_bundle`, what
``python -m vision_peft.deploy BUNDLE images…`` runs) on its test images: top-1 in torch and in onnxruntime and
their agreement.

    export VISION_PEFT_DATA=../shared/data VISION_PEFT_WEIGHTS=../shared/weights OMP_NUM_THREADS=1
    nice -n 10 python bench/merge_aid.py --epochs 3 --runs-root runs/merge-aid --out bench/results/merge_aid.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.aid_classification import ROWS  # noqa: E402  (one LoRA recipe for both benches)
from vision_peft.leaderboard import wilson  # noqa: E402
from vision_peft.paths import data_root  # noqa: E402

# λ grids (chosen on val); k and r stay at the papers' values (TIES k = 0.2, PCB r = 0.1)
GRID = {
    "task_arithmetic": [{"lam": 0.3}, {"lam": 0.5}, {"lam": 1.0}],
    "ties": [{"k": 0.2, "lam": 0.5}, {"k": 0.2, "lam": 1.0}],
    "pcb": [{"r": 0.1, "lam": 0.5}, {"r": 0.1, "lam": 1.0}],
}
# the control: no backbone update at all (λ = 0), each task's own head on the frozen backbone — how much of an
# adapter's accuracy comes from its backbone update, i.e. what a merge has to keep
CONTROL = ("task_arithmetic", {"lam": 0.0})
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def task_classes(data_root: Path, tasks: int, per_task: int) -> list[list[str]]:
    names = sorted(p.name for p in data_root.iterdir() if p.is_dir())
    if tasks * per_task > len(names):
        raise SystemExit(f"--tasks {tasks} × --classes-per-task {per_task} > the {len(names)} classes in {data_root}")
    order = [names[i] for i in np.random.RandomState(0).permutation(len(names))]
    return [order[t * per_task : (t + 1) * per_task] for t in range(tasks)]


def vp(*args: str) -> str:
    """``python -m vision_peft ARGS`` (echoed); its stdout."""
    cmd = [sys.executable, "-m", "vision_peft", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def train(root: Path, name: str, classes: list[str], args: argparse.Namespace) -> dict:
    run = root / name
    if not (run / "final_metrics.json").is_file():
        vp("train", "classification-aid", *ROWS["lora"], f"--task.classes=[{','.join(classes)}]",
           f"--train.epochs={args.epochs}", f"--backbone.image_size={args.image_size}",
           f"--train.batch_size={args.batch_size}", f"--train.device={args.device}",
           f"--train.num_workers={args.workers}", f"--output.runs_root={root}", f"--output.name={name}",
           "--train.eval_every=100000", "--no-progress")  # fmt: skip
    final = json.loads((run / "final_metrics.json").read_text())
    return {"run": str(run), "classes": classes, "val": _top1(final["val"]), "test": _top1(final["test"])}


def _top1(m: dict) -> dict:
    return {"top1": m["top1"], "n": m["n"]}


def merge(root: Path, runs: list[str], method: str, opts: dict, device: str) -> dict:
    tag = "-".join(f"{k}{v:g}" for k, v in opts.items())
    out = root / f"merged-{method}-{tag}"
    if not (out / "merge.json").is_file():
        flags = [x for k, v in opts.items() for x in (f"--{k}", f"{v:g}")]
        vp("merge", *runs, "--method", method, *flags, "--out", str(out), "--device", device, "--no-progress")
    man = json.loads((out / "merge.json").read_text())
    res = {s["sub_run"]: {sp: _top1(m) for sp, m in man["results"][s["sub_run"]].items()} for s in man["sources"]}
    return {"out": str(out), "options": man["options"], "results": res,
            "mean_val": float(np.mean([r["val"]["top1"] for r in res.values()]))}  # fmt: skip


def deploy_check(sub: Path, device: str) -> dict:
    """Export ``sub`` and compare torch vs the onnxruntime bundle on its test images."""
    import torch

    from vision_peft.deploy import load_bundle
    from vision_peft.predict import load_run

    bundle_dir = sub.parent / f"bundle-{sub.name}"
    if not (bundle_dir / "manifest.json").is_file():
        rep = json.loads(vp("export", str(sub), "--bundle", str(bundle_dir)))
    else:
        rep = json.loads((bundle_dir / "parity.json").read_text())
    files = json.loads((sub / "split.json").read_text())["test"]
    truth = np.array([Path(f).parent.name for f in files])
    _, task, model, _ = load_run(sub, torch.device(device))
    t0 = time.perf_counter()
    pt = np.array([r["label"] for r in task.predict(model, files, torch.device(device), top_k=1)])
    torch_s = time.perf_counter() - t0
    bundle = load_bundle(bundle_dir, device="cpu")
    t0 = time.perf_counter()
    pd = np.array([r["label"] for r in bundle.classify(files, batch_size=32)])
    deploy_s = time.perf_counter() - t0
    n = len(files)
    return {"sub_run": str(sub), "bundle": str(bundle_dir), "export_parity": rep, "n": n,
            "torch_top1": float((pt == truth).mean()), "deploy_top1": float((pd == truth).mean()),
            "agreement": float((pt == pd).mean()), "torch_s": torch_s, "deploy_s": deploy_s}  # fmt: skip


def ci(r: dict) -> str:
    k = round(r["top1"] * r["n"])
    lo, hi = wilson(k, r["n"])
    return f"{100 * r['top1']:.1f} ({100 * lo:.1f}–{100 * hi:.1f})"


def table(out: dict) -> str:
    heads = [f"{m} ({_opts(out['chosen'][m]['options'])})" for m in GRID]
    lines = ["| task (classes) | n | adapter alone | heads only (λ=0) | " + " | ".join(heads) + " |",
             "|---|---|---|---" + "|---" * len(GRID) + "|"]  # fmt: skip
    cols = [out["control"], *(out["chosen"][m] for m in GRID)]
    for name, t in out["tasks"].items():
        cells = [ci(c["results"][name]["test"]) for c in cols]
        lines.append(f"| {name} ({', '.join(t['classes'])}) | {t['test']['n']} | {ci(t['test'])} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    mean = [np.mean([c["results"][n]["test"]["top1"] for n in out["tasks"]]) for c in cols]
    alone = np.mean([t["test"]["top1"] for t in out["tasks"].values()])
    lines.append(f"| mean | | {100 * alone:.1f} | " + " | ".join(f"{100 * v:.1f}" for v in mean) + " |")
    grid = "; ".join(f"{m} " + ", ".join(f"{_opts(r['options'])} → {100 * r['mean_val']:.1f}" for r in rs)
                     for m, rs in out["grid"].items())  # fmt: skip
    val = np.mean([t["val"]["top1"] for t in out["tasks"].values()])
    lines += ["", f"mean val top-1 per grid point (the selection): {grid}; adapters alone {100 * val:.1f}"]
    return "\n".join(lines)


def _opts(opts: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in opts.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3, help="number of disjoint AID class subsets (tasks)")
    ap.add_argument("--classes-per-task", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs-root", default="runs/merge-aid", help="run and merge folders (reused when complete)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    data = data_root() / "aid"
    root = Path(args.runs_root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict = {"setup": {**vars(args), "recipe": "classification-aid", "adapter": ROWS["lora"], "grid": GRID}}
    out["tasks"] = {}
    for i, classes in enumerate(task_classes(data, args.tasks, args.classes_per_task)):
        say(f"task t{i}: training LoRA on {len(classes)} classes")
        t = out["tasks"][f"t{i}"] = train(root, f"t{i}", classes, args)
        say(f"task t{i}: val top-1 {t['val']['top1']:.3f}, test top-1 {t['test']['top1']:.3f}")
    runs = [t["run"] for t in out["tasks"].values()]
    out["grid"], out["chosen"] = {}, {}
    for method, points in GRID.items():
        out["grid"][method] = []
        for opts in points:
            say(f"merge {method} {opts}")
            res = merge(root, runs, method, opts, args.device)
            out["grid"][method].append(res)
            say(f"merge {method} {opts}: mean val top-1 {res['mean_val']:.3f}")
        out["chosen"][method] = max(out["grid"][method], key=lambda r: r["mean_val"])  # val only; first on ties
    say(f"control: {CONTROL[0]} {CONTROL[1]} (heads only, frozen backbone)")
    out["control"] = merge(root, runs, *CONTROL, args.device)
    say("export + deploy of the chosen PCB merge, task t0")
    out["deploy"] = deploy_check(Path(out["chosen"]["pcb"]["out"]) / "t0", args.device)
    out["wall_s"] = time.perf_counter() - T0
    d = out["deploy"]
    text = (
        f"AID, {args.tasks} tasks × {args.classes_per_task} classes, split 60/10/30 per class (seed 0), LoRA r=8 "
        f"conv_pw, EfficientNet-Lite0 {args.image_size}², {args.epochs} epochs; test top-1 % (95 % Wilson), λ "
        "chosen on mean val top-1\n\n" + table(out) + "\n\n"
        f"deploy ({d['sub_run']} → onnxruntime, {d['n']} test images): torch top-1 {100 * d['torch_top1']:.1f}, "
        f"deploy top-1 {100 * d['deploy_top1']:.1f}, prediction agreement {100 * d['agreement']:.1f} %, export "
        f"parity max |Δ| {d['export_parity'].get('max_abs_diff', float('nan')):.2e}; wall {out['wall_s']:.0f} s"
    )
    print("\n" + text)
    if args.out:
        from vision_peft.rundir import atomic_write_json

        atomic_write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
