"""A real sweep on ModelNet10 point clouds (issue 19, the smaller second sweep): which method for 16-shot ModelNet10
on the frozen ModelNet40 PointNet, chosen on val only.

Recipe ``tasks/pointcloud-modelnet10.yaml`` (PPT prompts through MiniLM + the adapter, 16 shapes per class, shot seed
0), space ``tasks/sweeps/modelnet-methods.yaml`` (six methods the point backbone offers, each with a small search;
25 epochs = 125 steps per trial; 10 further train shapes per class held out as val). Trials never evaluate the
test split (the sweep sets ``train.final_test=false``); ``report`` evaluates it once for the selected best and —
post hoc, not used for selection — for each method's best:

    OMP_NUM_THREADS=1 nice -n 10 timeout 60m python bench/sweep_modelnet.py run --trials 12 --timeout-min 45
    OMP_NUM_THREADS=1 timeout 10m python bench/sweep_modelnet.py report

Writes ``bench/results/sweep_modelnet.{json,md,png}`` (the same report as ``bench/sweep_aid.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sweep_aid import ROOT, report

from vision_peft.sweep import run_sweep

RECIPE, SPACE = "pointcloud-modelnet10", ROOT / "tasks" / "sweeps" / "modelnet-methods.yaml"
SWEEP_DIR = ROOT / "runs" / "sweeps" / "modelnet-methods"
STUDY = "pointcloud-modelnet10-modelnet-methods"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["run", "report"])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--timeout-min", type=float, default=None, help="no new trial after this many minutes")
    p.add_argument("--out", default=str(SWEEP_DIR))
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.phase == "run":
        res = run_sweep(RECIPE, SPACE, args.trials, out=out, timeout_min=args.timeout_min, device="cpu", select=False)
        print(json.dumps(res, indent=2, default=str))
    else:
        report(out, STUDY, name="sweep_modelnet", recipe="tasks/pointcloud-modelnet10.yaml",
               space="tasks/sweeps/modelnet-methods.yaml",
               title="Sweep on ModelNet10 (16-shot): frozen PointNet + PPT, six methods, selection on val "
                     "(bench/sweep_modelnet.py)",
               budget="25 epochs (125 steps) each, CPU, OMP_NUM_THREADS=1.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
