"""Is PVeRA's sampled latent useful at inference? One PVeRA classification run, on its own *test* split:
deterministic predictions (z = μ, what the exported graph computes) vs Monte Carlo predictions (the mean of
``--samples`` forwards with z sampled, ``predict --mc-samples``).

Reported per mode: top-1 (95 % Wilson interval), negative log-likelihood, expected calibration error (15
equal-width confidence bins) and the AUROC of the confidence for telling right from wrong predictions (higher =
the confidence ranks its own errors better). The MC − deterministic differences of NLL and ECE get a 95 %
paired-bootstrap interval over the test images (1,000 resamples). ``--compare`` adds other runs (e.g. the LoRA
row of ``bench/aid_classification.py``) in deterministic mode on the same split.

    python bench/aid_classification.py --rows pvera,lora --runs-root runs/aid-bench
    python bench/pvera_calibration.py runs/aid-bench/pvera --samples 16 --compare runs/aid-bench/lora
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vision_peft.adapters import mc_sampling  # noqa: E402
from vision_peft.predict import load_run  # noqa: E402


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: Σ_bins |bin| / n · |accuracy − mean confidence|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (Mann–Whitney U with average ranks for ties)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return centre - half, centre + half


@torch.no_grad()
def probabilities(run_dir: Path, samples: int, batch: int, device: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{mode: (n, C) probabilities} and the (n,) labels of the run's test split."""
    _, task, model, _ = load_run(run_dir, device)
    ds = task.datasets(model).get("test")
    if ds is None:
        raise SystemExit(f"{run_dir}: the run has no test split")
    out: dict[str, list[np.ndarray]] = {"deterministic": []}
    if samples:
        out["mc"] = []
    labels = []
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
        x = torch.stack([it["image"] for it in items]).to(device)
        labels.append(np.array([int(it["label"]) for it in items]))
        out["deterministic"].append(torch.softmax(model.logits(x).float(), 1).cpu().numpy())
        if samples:
            with mc_sampling(model):  # S copies of the batch in one forward: every row draws its own latent
                rep = x.repeat(samples, 1, 1, 1)
                p = torch.softmax(model.logits(rep).float(), 1).view(samples, len(items), -1)
            out["mc"].append(p.mean(0).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(labels)


def metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred = probs.argmax(1)
    conf = probs.max(1)
    correct = pred == y
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))
    lo, hi = wilson(float(correct.mean()), len(y))
    return {
        "top1": float(correct.mean()),
        "top1_ci95": [lo, hi],
        "nll": float(nll.mean()),
        "ece": ece(conf, correct),
        "auroc_right_vs_wrong": auroc(conf, correct),
        "n": int(len(y)),
    }


def paired_bootstrap(a: np.ndarray, b: np.ndarray, y: np.ndarray, fn, reps: int = 1000, seed: int = 0):
    """95 % interval of fn(b) − fn(a) over resamples of the test images (same resample for both)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(reps):
        i = rng.integers(0, len(y), len(y))
        diffs.append(fn(b[i], y[i]) - fn(a[i], y[i]))
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished PVeRA classification run")
    ap.add_argument("--samples", type=int, default=16, help="Monte Carlo forwards per image")
    ap.add_argument("--compare", nargs="*", default=[], help="other runs, deterministic, same test split")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    probs, y = probabilities(Path(args.run), args.samples, args.batch, args.device)
    seconds = time.perf_counter() - t0
    result: dict = {"run": args.run, "samples": args.samples, "seconds": seconds, "modes": {}}
    for mode, p in probs.items():
        result["modes"][f"pvera {mode}"] = metrics(p, y)
    if "mc" in probs:
        det, mc = probs["deterministic"], probs["mc"]

        def nll(p, t):
            return float(-np.log(np.clip(p[np.arange(len(t)), t], 1e-12, None)).mean())

        def ece_of(p, t):
            return ece(p.max(1), p.argmax(1) == t)

        result["mc_minus_deterministic"] = {
            "nll": nll(mc, y) - nll(det, y),
            "nll_ci95": paired_bootstrap(det, mc, y, nll),
            "ece": ece_of(mc, y) - ece_of(det, y),
            "ece_ci95": paired_bootstrap(det, mc, y, ece_of),
            "predictions_changed": int((mc.argmax(1) != det.argmax(1)).sum()),
        }
    for other in args.compare:
        p, y2 = probabilities(Path(other), 0, args.batch, args.device)
        if not np.array_equal(y, y2):
            raise SystemExit(f"{other}: its test split differs from {args.run}'s; compare runs of one recipe")
        result["modes"][f"{Path(other).name} deterministic"] = metrics(p["deterministic"], y)
    print(f"test split of {args.run}: n={len(y)}, MC samples {args.samples} ({seconds:.0f} s for both modes)\n")
    print("| model / mode | top-1 % (95 % CI) | NLL | ECE (15 bins) | AUROC conf. right vs wrong |")
    print("|---|---|---|---|---|")
    for name, m in result["modes"].items():
        lo, hi = m["top1_ci95"]
        print(
            f"| {name} | {100 * m['top1']:.1f} ({100 * lo:.1f}–{100 * hi:.1f}) | {m['nll']:.3f} | "
            f"{100 * m['ece']:.2f} % | {m['auroc_right_vs_wrong']:.3f} |"
        )
    if "mc_minus_deterministic" in result:
        d = result["mc_minus_deterministic"]
        print(
            f"\nMC − deterministic: NLL {d['nll']:+.4f} (95 % CI {d['nll_ci95'][0]:+.4f} … {d['nll_ci95'][1]:+.4f}), "
            f"ECE {100 * d['ece']:+.2f} pts (95 % CI {100 * d['ece_ci95'][0]:+.2f} … {100 * d['ece_ci95'][1]:+.2f}); "
            f"{d['predictions_changed']} of {len(y)} predicted labels changed"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
