"""A real sweep on AID (issue 19): which PEFT method for a frozen EfficientNet-Lite0, chosen on val only.

Recipe ``tasks/classification-aid.yaml`` (all 30 classes, the issue-2 split: 60 train / 10 val / 30 test per class,
seed 0, 128² input), space ``tasks/sweeps/aid-methods.yaml`` (seven methods from the adapter registry, each with its own
small search, one epoch per trial). Two phases, so a CPU budget can bound each with ``timeout``:

    OMP_NUM_THREADS=1 timeout 62m python bench/sweep_aid.py run --trials 14 --timeout-min 52   # took 29 min
    OMP_NUM_THREADS=1 timeout 10m python bench/sweep_aid.py report                             # took 2 min

``--space`` sweeps another space file on the same recipe (its folder ``runs/sweeps/<stem>/``, its results
``bench/results/sweep_aid_<stem without aid->.*``), e.g. the PET family (issue 16)::

    OMP_NUM_THREADS=1 python bench/sweep_aid.py run --space tasks/sweeps/aid-pet-family.yaml --trials 9
    OMP_NUM_THREADS=1 python bench/sweep_aid.py report --space tasks/sweeps/aid-pet-family.yaml   # sweep_aid_pet_family

``run`` trains the trials (their run directories under ``runs/sweeps/aid-methods/trials/``; they never see the
test split: trials train with ``task.split.test=0``); ``report`` selects the best on val, evaluates the test split
once for it and — post hoc, not used for selection — for each method's best, and writes
``bench/results/sweep_aid.{json,md,png}``: the leaderboard, the selected best's test top-1 with a 95 % Wilson
interval, and the Spearman correlation of val rank vs test rank over the per-method bests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from vision_peft import rundir
from vision_peft.leaderboard import select_best, write_leaderboard
from vision_peft.sweep import load_study, run_sweep, storage_url

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "classification-aid"
DEFAULT_SPACE = "tasks/sweeps/aid-methods.yaml"
RESULTS = ROOT / "bench" / "results"


def _ranks(values: list[float]) -> list[int]:
    """1 = best (highest); ties share the better rank."""
    return [1 + sum(1 for w in values if w > v) for v in values]


def report(sweep_dir: Path, study: str, name: str = "sweep_aid", recipe: str = "tasks/classification-aid.yaml",
           space: str = "tasks/sweeps/aid-methods.yaml",
           title: str = "Sweep on AID: EfficientNet-Lite0, seven methods, selection on val (bench/sweep_aid.py)",
           budget: str = "one epoch each, CPU, OMP_NUM_THREADS=1.") -> dict:  # fmt: skip
    """Select on val, evaluate test once (and post hoc per method), write ``bench/results/<name>.{json,md,png}``."""
    st = load_study(storage_url(sweep_dir, None), study)
    best = select_best(st, sweep_dir, posthoc=True)
    lb = write_leaderboard(st, sweep_dir)
    shutil.copyfile(lb["png"], RESULTS / f"{name}.png")
    sel = best["selected"]
    per = best["post_hoc"]["per_method"]
    methods = sorted(per, key=lambda m: -per[m]["val"])
    vals = [per[m]["val"] for m in methods]
    tests = [per[m]["test"]["top1"] for m in methods]
    vr, tr = _ranks(vals), _ranks(tests)
    states: dict[str, int] = {}
    for r in lb["rows"]:
        states[r["state"]] = states.get(r["state"], 0) + 1
    out = {
        "recipe": recipe, "space": space, "study": study,
        "trials": len(lb["rows"]), "states": states,
        "selected": sel, "post_hoc": best["post_hoc"], "test_evaluations": best["test_evaluations"],
        "val_rank": dict(zip(methods, vr, strict=True)), "test_rank": dict(zip(methods, tr, strict=True)),
        "leaderboard": lb["rows"], "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    rundir.atomic_write_json(RESULTS / f"{name}.json", out)
    t = sel["test"]
    lo, hi = t["top1_ci95"]
    lines = [
        f"# {title}", "",
        f"Trials: {len(lb['rows'])} ({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}); {budget}", "",
        f"**Selected on val:** trial {sel['trial']} ({sel['method']}, {sel['params']}), val top-1 {sel['val']:.4f}; "
        f"**test top-1 {t['top1']:.4f}** (95 % Wilson [{lo:.4f}, {hi:.4f}], n = {t['n']}), evaluated once.", "",
        "## Leaderboard (ranked on val top-1)", "", lb["table"], "",
        "## Per-method bests — post hoc (test NOT used for selection)", "",
        "| method | trial | val top-1 | val rank | test top-1 (95 % Wilson) | test rank |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for m, a, b in zip(methods, vr, tr, strict=True):
        p = per[m]
        c = p["test"]["top1_ci95"]
        lines.append(f"| {m} | {p['trial']} | {p['val']:.4f} | {a} | {p['test']['top1']:.4f} [{c[0]:.3f}, {c[1]:.3f}]"
                     f" | {b} |")  # fmt: skip
    rho = best["post_hoc"]["val_test_spearman"]
    lines += ["", f"Spearman(val rank, test rank) over the {len(methods)} per-method bests: "
              + (f"{rho:.3f}" if rho is not None else "n/a"), ""]  # fmt: skip
    rundir.atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines))
    print("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["run", "report"])
    p.add_argument("--trials", type=int, default=14)
    p.add_argument("--timeout-min", type=float, default=None, help="no new trial after this many minutes")
    p.add_argument("--space", default=DEFAULT_SPACE, help="space file (repo-relative); default: the seven-method one")
    p.add_argument("--out", default=None, help="sweep folder; default runs/sweeps/<space stem>")
    p.add_argument("--name", default=None, help="results prefix under bench/results; default sweep_aid for the "
                   "default space, else sweep_aid_<space stem without aid->")  # fmt: skip
    p.add_argument("--title", default=None, help="heading of the .md (report)")
    args = p.parse_args(argv)
    space = Path(args.space)
    space_file = space if space.is_absolute() else ROOT / space
    if not space_file.is_file():
        p.error(f"--space {args.space}: no such file; give a space file such as {DEFAULT_SPACE}")
    stem = space_file.stem
    out = Path(args.out) if args.out else ROOT / "runs" / "sweeps" / stem
    if args.phase == "run":
        res = run_sweep(RECIPE, space_file, args.trials, out=out, timeout_min=args.timeout_min, device="cpu",
                        select=False)  # fmt: skip
        print(json.dumps(res, indent=2, default=str))
    elif args.space == DEFAULT_SPACE and args.name is None and args.title is None:
        report(out, f"{RECIPE}-{stem}")  # the committed sweep_aid results
    else:
        name = args.name or "sweep_aid_" + stem.removeprefix("aid-").replace("-", "_")
        title = args.title or f"Sweep on AID: EfficientNet-Lite0, {args.space}, selection on val (bench/sweep_aid.py)"
        report(out, f"{RECIPE}-{stem}", name=name, space=args.space, title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
