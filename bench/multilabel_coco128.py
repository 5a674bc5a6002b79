"""Multi-label classification on coco128-seg: linear probe vs LoRA vs full fine-tuning of EfficientNet-Lite0.

Every row trains the recipe ``tasks/multilabel-coco128.yaml`` (43 COCO categories present in 3+ of the 100 images;
image-level split 50 train / 20 val / 30 test, seed 0) with only the adapter (and its learning rates) changed. The
decision threshold is chosen on val (max micro-F1) by the training run itself. Reported per row: test mAP with a
95 % Bayesian-bootstrap interval over the test images (``--boot`` resamples, see :func:`bootstrap_maps`; the classic
with-replacement interval alongside), the paired difference of every row to the first, micro/macro F1 at the val
threshold, val mAP, trainable parameters and timing. The bench recomputes the test probabilities from the saved run and checks that its mAP equals the run's own.

Then the LoRA run is exported and its bundle is run through the deploy runtime (onnxruntime, no torch) on the
test images, from the image files: max |Δ| of the probabilities against torch, and how often the predicted label
sets agree (per image, and per (image, category) decision).

    VISION_PEFT_DATA=../shared/data VISION_PEFT_WEIGHTS=../shared/weights OMP_NUM_THREADS=1 \\
        python bench/multilabel_coco128.py --epochs 20 --image-size 128 --out bench/results/multilabel_coco128.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = {  # learning rates as in bench/aid_classification.py (head-only probes larger; full fine-tuning smaller)
    "linear": ["--adapter.name=linear", "--train.lr=1e-2", "--train.head_lr=1e-2"],
    "lora": ["--adapter.name=lora", "--adapter.r=8", "--adapter.targets=[conv_pw]", "--train.lr=2e-3"],
    "full": ["--adapter.name=full", "--train.lr=3e-4", "--train.head_lr=1e-2"],
}


def bootstrap_maps(probs: np.ndarray, targets: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, np.ndarray]:
    """mAP of ``n_boot`` resamples of the test images, two ways (the same resamples for every row, so rows can be
    compared pairwise):

    - ``bayesian``: the Bayesian bootstrap (Rubin 1981): flat-Dirichlet image weights (mean 1), weighted AP. Every
      image keeps a positive weight, so no category drops out and no image ties with a copy of itself.
    - ``classic``: images drawn with replacement; a resample's mAP averages the categories with a positive in it.
      AP is a ratio of counts and a drawn-twice image ties with its own copy, so on a set this small it runs high
      (its median lies well above the estimate); it is reported for comparison.
    """
    from vision_peft.tasks.multilabel import mean_ap

    rng = np.random.RandomState(seed)
    n = len(targets)
    classic, bayes = [], []
    for _ in range(n_boot):
        idx = rng.randint(0, n, n)
        classic.append(mean_ap(probs[idx], targets[idx]))
        bayes.append(mean_ap(probs, targets, rng.dirichlet(np.ones(n)) * n))
    return {"bayesian": np.array(bayes), "classic": np.array(classic)}


def interval(values: np.ndarray) -> dict[str, float]:
    """95 % percentile interval and median of bootstrap values."""
    lo, med, hi = np.percentile(values[np.isfinite(values)], [2.5, 50, 97.5])
    return {"lo": float(lo), "hi": float(hi), "median": float(med)}


def test_probs(run_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str], float, list[str]]:
    """(probs (N, C), targets (N, C), test files, threshold, classes) of a finished run, computed with torch."""
    import torch

    from vision_peft.predict import load_run

    _, task, model, _ = load_run(run_dir, "cpu")
    ds = task.datasets(model)["test"]
    with torch.no_grad():
        x = torch.stack([ds[i]["image"] for i in range(len(ds))])  # (N, 3, H, W)
        probs = torch.sigmoid(model.logits(x).float()).numpy()
    y = np.stack([ds[i]["label"].numpy() for i in range(len(ds))])
    return probs, y, [p for p, _ in ds.samples], float(model.threshold), list(task.classes)


def deploy_agreement(run_dir: Path, files: list[str], torch_probs: np.ndarray, threshold: float) -> dict:
    """Export the run, load the bundle with the deploy runtime and compare its probabilities with torch's."""
    from vision_peft.deploy import load_bundle
    from vision_peft.export import export_run
    from vision_peft.runtimes import multilabel as rt

    t0 = time.perf_counter()
    manifest = export_run(run_dir)
    export_s = time.perf_counter() - t0
    bundle = load_bundle(run_dir / "export")
    res = bundle.multilabel(files)
    labels = bundle.labels
    probs = np.array([[r["probs"][c] for c in labels] for r in res])
    on_t, on_d = rt.present(torch_probs, threshold), rt.present(probs, bundle.task_info["threshold"])
    return {
        "export_seconds": export_s,
        "bundle_threshold": bundle.task_info["threshold"],
        "graph_parity_max_abs_diff": manifest["parity"]["max_abs_diff"],
        "prob_max_abs_diff": float(np.abs(probs - torch_probs).max()),
        "label_set_agreement": float(np.mean((on_t == on_d).all(1))),
        "decision_agreement": float(np.mean(on_t == on_d)),
        "n_images": len(files),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="linear,lora,full", help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples of the test images")
    ap.add_argument("--runs-root", default=None, help="keep the run directories here (default: a temp folder)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    root = Path(args.runs_root or tempfile.mkdtemp(prefix="multilabel-bench-"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results: dict = {"setup": vars(args) | {"runs_root": str(root)}, "rows": {}}
    boot: dict[str, dict[str, np.ndarray]] = {}
    for name in args.rows.split(","):
        cmd = [
            sys.executable,
            "-m",
            "vision_peft",
            "train",
            "multilabel-coco128",
            *ROWS[name],
            f"--train.epochs={args.epochs}",
            f"--backbone.image_size={args.image_size}",
            f"--train.batch_size={args.batch_size}",
            f"--train.device={args.device}",
            "--train.num_workers=0",
            f"--output.runs_root={root}",
            f"--output.name={name}",
            "--train.eval_every=100000",
            "--no-progress",
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env=env)
        run = root / name
        final = json.loads((run / "final_metrics.json").read_text())
        info = json.loads((run / "config.json").read_text())
        probs, y, files, thr, classes = test_probs(run)
        from vision_peft.tasks.multilabel import f1_scores, mean_ap

        test_map = mean_ap(probs, y)
        if abs(test_map - final["test"]["map"]) > 1e-4:
            raise SystemExit(f"{name}: recomputed test mAP {test_map} differs from the run's {final['test']['map']}")
        boot[name] = bootstrap_maps(probs, y, args.boot)
        results["rows"][name] = {
            "test_map": test_map,
            "test_map_ci95": interval(boot[name]["bayesian"]),
            "test_map_ci95_classic_bootstrap": interval(boot[name]["classic"]),
            **{f"test_{k}": v for k, v in f1_scores(probs, y, thr).items()},
            "threshold": thr,
            "val_map": final["val"]["map"],
            "val_micro_f1": final["val"]["micro_f1"],
            "test_classes_evaluated": final["test"]["classes_evaluated"],
            "n_test": len(y),
            "params": info["parameters"],
            "timing": final["timing"],
            "lr": info["config"]["train"]["lr"],
            "head_lr": info["config"]["train"]["head_lr"],
        }
        if name == "lora":
            results["lora_deploy"] = deploy_agreement(run, files, probs, thr)
        results["classes"] = classes
    ref = next(iter(results["rows"]))
    for name in list(results["rows"])[1:]:  # paired: the same resamples for both rows
        est = results["rows"][name]["test_map"] - results["rows"][ref]["test_map"]
        d = boot[name]["bayesian"] - boot[ref]["bayesian"]
        results["rows"][name][f"test_map_minus_{ref}"] = {"estimate": est, **interval(d)}
    print(f"\ncoco128-seg multilabel, {len(results['classes'])} categories, {args.epochs} epochs at {args.image_size}²")
    print(
        f"| method | test mAP (95 % CI) | Δ vs {ref} (paired 95 % CI) | micro-F1 | macro-F1 | threshold "
        "| val mAP | trainable | step time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results["rows"].items():
        lo, hi = r["test_map_ci95"]["lo"], r["test_map_ci95"]["hi"]
        d = r.get(f"test_map_minus_{ref}")
        diff = f"{100 * d['estimate']:+.1f} ({100 * d['lo']:+.1f}…{100 * d['hi']:+.1f})" if d else "—"
        print(
            f"| {name} | {100 * r['test_map']:.1f} ({100 * lo:.1f}–{100 * hi:.1f}) | {diff} | {100 * r['test_micro_f1']:.1f} "
            f"| {100 * r['test_macro_f1']:.1f} | {r['threshold']:.2f} | {100 * r['val_map']:.1f} "
            f"| {r['params']['trainable']:,} | {r['timing']['step_time_median']:.3f} |"
        )
    if "lora_deploy" in results:
        print("LoRA bundle vs torch:", json.dumps(results["lora_deploy"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
