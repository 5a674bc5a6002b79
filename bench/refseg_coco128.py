"""Acceptance bench for referring segmentation (issues 4, 14): DETRIS vs a frozen-encoder head on coco128-seg.

One command, one table. Every row trains the same recipe (``tasks/refseg-coco128.yaml``: EfficientNet-Lite0 +
MiniLM, real weights, the same head, budget, seed and image-level split; no test image is seen in training;
letterbox + flip augmentation, so generated phrases stay true) in its own process (so the peak memory is the
row's own). Then the finished run is loaded and **every phrase of every test object** goes through it (each
phrase one sample, as the official DETRIS inference); the per-sentence intersections/unions are kept in
``<out>/<row>/sentences.json`` (their pooled metrics must equal the run's own final test metrics). Reported per
row: mIoU, oIoU, Prec@0.5…0.9 with a 95 % image-level bootstrap interval (test images resampled, an image's
phrases kept together), and the paired-bootstrap difference to the ``frozen`` row (same resampled images):

- ``frozen``       no adapters: frozen encoders, only the head trains (adapter ``linear``)
- ``detris``       visual Dense Aligners + text adapters (the released code's design: density inside adapters)
- ``dense_depth``  DETRIS with dense connections across depth (each aligner receives all earlier ones)
- ``visual_only``  visual Dense Aligners only (no text adapters)

    nice -n 10 python bench/refseg_coco128.py --out runs/bench-refseg --epochs 50 \
        --results bench/results/refseg_coco128_50ep_allphrases.json                # the full table
    python bench/refseg_coco128.py --epochs 1 --rows frozen,detris --out /tmp/b  # a quick smoke

Needs $VISION_PEFT_DATA (coco128-seg) and the EfficientNet-Lite0 / MiniLM PyPI weight packages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROWS = {
    "frozen": ["--adapter.name=linear"],
    "detris": [],
    "dense_depth": ["--adapter.dense_across_depth=true"],
    "visual_only": ["--adapter.text=false"],
}
DETRIS_SHARE = "0.85-1.81 %"
OLD_RESULTS = ("refseg_coco128_50ep_frozen_detris.json", "refseg_coco128_50ep_dense_visual.json")  # issue-4 table
REPORTED = ("mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "Prec@0.9")


def sentence_records(run_dir: Path) -> dict:
    """Every phrase of every test object through the finished run: per sentence image, object, phrase, I, U."""
    import torch

    sys.path.insert(0, str(REPO))
    from vision_peft.engine import eval_loader
    from vision_peft.predict import load_run

    cfg, task, model, _ = load_run(run_dir, "cpu")
    ds = task.datasets(model)["test"]
    r = task.sentence_results(model, eval_loader(task, ds, cfg.train, torch.device("cpu")), torch.device("cpu"))
    keys = ("image", "ref_id", "phrase", "split")
    return {**{k: r[k] for k in keys}, "inter": r["inter"].tolist(), "union": r["union"].tolist()}


def count_params(overrides: list[str]) -> dict[str, int]:
    """Adapter (visual / text), head and frozen-encoder parameter counts of a row's model (no training)."""
    sys.path.insert(0, str(REPO))
    from vision_peft.recipe import load_recipe
    from vision_peft.tasks import TASKS

    cfg = load_recipe(str(REPO / "tasks" / "refseg-coco128.yaml"), [o.lstrip("-") for o in overrides])
    task = TASKS.get("refseg").builder(cfg)
    model = task.build_model()
    cond = getattr(model.backbone, "text_conditioning", None)

    def n(params) -> int:
        return sum(p.numel() for p in params)

    visual = n(cond.visual.parameters()) if cond is not None else 0
    text = n(cond.text.parameters()) if cond is not None else 0
    cond_ids = {id(p) for p in cond.parameters()} if cond is not None else set()
    image_base = n(p for p in model.backbone.parameters() if id(p) not in cond_ids)
    return {
        "adapter_visual": visual,
        "adapter_text": text,
        "adapters": visual + text,
        "head": n(model.head.parameters()),
        "image_encoder": image_base,
        "text_encoder": n(model.text.parameters()),
    }


def run_row(name: str, extra: list[str], args: argparse.Namespace) -> dict:
    out = Path(args.out)
    overrides = [
        f"--backbone.image_size={args.size}",
        f"--train.epochs={args.epochs}",
        f"--train.batch_size={args.batch}",
        f"--train.seed={args.seed}",
        *extra,
    ]
    run_dir = out / name
    if not (run_dir / "final_metrics.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "vision_peft",
            "train",
            str(REPO / "tasks" / "refseg-coco128.yaml"),
            f"--output.runs_root={out}",
            f"--output.name={name}",
            "--no-progress",
            *overrides,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.time()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"row {name} failed:\n{res.stderr[-3000:]}")
        print(f"[{name}] trained in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    info = json.loads((run_dir / "config.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    sent_file = run_dir / "sentences.json"
    if not sent_file.is_file():
        sent_file.write_text(json.dumps(sentence_records(run_dir)) + "\n")
    sentences = json.loads(sent_file.read_text())
    from vision_peft.tasks.refseg_metrics import seg_metrics

    again = seg_metrics(np.array(sentences["inter"]), np.array(sentences["union"]))
    if any(abs(again[m] - final["test"][m]) > 1e-9 for m in again):
        raise RuntimeError(f"row {name}: re-evaluated test metrics {again} differ from the run's {final['test']}")
    params = count_params(overrides)
    base = params["image_encoder"] + params["text_encoder"]
    return {
        "row": name,
        "test": final["test"],
        "sentences": sentences,
        "timing": final["timing"],
        "steps": info["steps"],
        "params": params,
        "adapter_share_of_encoders_pct": 100 * params["adapters"] / base,
        "split": {k: len(v) for k, v in split.items()},
        "split_images": {k: len({p.split("#")[0] for p in v}) for k, v in split.items()},
    }


def old_numbers() -> dict[str, dict]:
    """The issue-4 table (first phrase per object, Prec with >=, random-resized-crop augmentation), by row."""
    out = {}
    for name in OLD_RESULTS:
        f = REPO / "bench" / "results" / name
        if f.is_file():
            out.update({r["row"]: r["test"] for r in json.loads(f.read_text())})
    return out


def add_intervals(results: list[dict], n_boot: int, seed: int) -> None:
    """Per row: image-level bootstrap intervals, and the paired difference to the frozen row (same sentences)."""
    from vision_peft.tasks.refseg_metrics import bootstrap_metrics, paired_bootstrap

    base = next((r for r in results if r["row"] == "frozen"), None)
    for r in results:
        s = r["sentences"]
        r["ci"] = bootstrap_metrics(s["image"], s["inter"], s["union"], n_boot, seed)
        if base is not None and r is not base:
            b = base["sentences"]
            key = list(zip(s["ref_id"], s["phrase"]))
            if key != list(zip(b["ref_id"], b["phrase"])):
                raise RuntimeError(f"rows {r['row']} and frozen were evaluated on different sentences")
            r["vs_frozen"] = paired_bootstrap(s["image"], s["inter"], s["union"], b["inter"], b["union"], n_boot, seed)


def ci_table(results: list[dict]) -> str:
    """Metrics (%) with 95 % intervals, the paired difference to frozen, and the previous (issue-4) numbers."""
    old = old_numbers()
    head = "| row | " + " | ".join(REPORTED) + " | Δ vs frozen: " + ", ".join(REPORTED) + " | previous (issue 4) |"
    lines = [head, "|" + "---|" * (len(REPORTED) + 3)]
    for r in results:
        cells = []
        for m in REPORTED:
            c = r["ci"][m]
            cells.append(f"{100 * c['value']:.1f} [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]")
        if "vs_frozen" in r:
            d = r["vs_frozen"]
            diff = "; ".join(
                f"{100 * d[m]['diff']:+.1f} [{100 * d[m]['ci95'][0]:+.1f}, {100 * d[m]['ci95'][1]:+.1f}]"
                for m in REPORTED
            )
        else:
            diff = "(reference)"
        o = old.get(r["row"])
        prev = ", ".join(f"{100 * o[m]:.1f}" for m in REPORTED) + f" (n {o['n']})" if o else "–"
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {diff} | {prev} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    head = (
        "| row | mIoU | oIoU | Prec@0.5 | Prec@0.7 | adapters (visual + text) | head | adapter share of encoders "
        f"(DETRIS {DETRIS_SHARE}) | step time (s) | peak RSS (MiB) |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        t, p = r["test"], r["params"]
        lines.append(
            f"| {r['row']} | {100 * t['mIoU']:.1f} | {100 * t['oIoU']:.1f} | {100 * t['Prec@0.5']:.1f} | "
            f"{100 * t['Prec@0.7']:.1f} | {p['adapters']:,} ({p['adapter_visual']:,} + {p['adapter_text']:,}) | "
            f"{p['head']:,} | {r['adapter_share_of_encoders_pct']:.2f} % | {r['timing']['step_time_median']:.2f} | "
            f"{r['timing']['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-refseg", help="folder of the row runs and results.json")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--size", type=int, default=128, help="square input size (letterboxed)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples of the test images")
    ap.add_argument("--results", default="", help="also write the results (with intervals) to this JSON file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(1)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    for r in rows:
        results.append(run_row(r, ROWS[r], args))
        Path(args.out, "results.json").write_text(json.dumps(results, indent=2) + "\n")
    add_intervals(results, args.boot, args.seed)
    text = json.dumps(results, indent=2) + "\n"
    Path(args.out, "results.json").write_text(text)
    if args.results:
        Path(args.results).write_text(text)
    r0 = results[0]
    t0 = r0["test"]
    print(
        f"coco128-seg, image-level split (seed {args.seed}): train {r0['split'].get('train')} objects / "
        f"{r0['split_images'].get('train')} images, test {r0['split'].get('test')} objects / "
        f"{r0['split_images'].get('test')} images; EfficientNet-Lite0 + MiniLM at {args.size}², "
        f"{args.epochs} epochs × {r0['steps']['per_epoch']} steps (batch {args.batch}), same budget per row; "
        f"metrics on the test split at the original resolution (%), every phrase evaluated: {t0['n']} phrases of "
        f"{t0.get('n_objects', '?')} objects in {t0.get('n_images', '?')} images; 95 % intervals from {args.boot} "
        "image-level bootstrap resamples; Δ = paired bootstrap vs frozen."
    )
    print(ci_table(results))
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
