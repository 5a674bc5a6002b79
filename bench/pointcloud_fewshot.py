"""Few-shot ModelNet10 with a frozen ModelNet40 PointNet: linear probe vs PPT (prompts only / + residual adapter /
+ last stage), K = 1/2/4/8/16 shots per class, several seeds, evaluated on the full test split. One table.

    VISION_PEFT_DATA=../shared/data VISION_PEFT_WEIGHTS=../shared/weights python bench/pointcloud_fewshot.py --seeds 0 1 2

What is shared with the library: the shots are drawn by ``vision_peft.data.points.few_shot_subset`` (the same
sampler the ``pointcloud`` task uses with ``task.shots``/``task.shot_seed``), every shape is preprocessed by
``preprocess_points`` (z-up → y-up swap, 1,024 points, unit sphere), and the PPT rows are the task's own
``PointCloudModel`` (PromptLearner + MiniLM text encoder + W_pc + logit scale, label smoothing 0.2) built from a
RunConfig. To fit a 2-core CPU, the frozen parts are computed once: the 1,024-d global features of every shape
(prompts-only, residual rows) and the 128-channel per-point features before ``conv5`` (last-stage row); so no
augmentation is used in any row (the linear probe gets none either). Optimiser: AdamW, lr 3e-3, betas (0.9, 0.98),
weight decay 0.1 on matrices, cosine schedule with warm-up, a fixed number of steps (PPT's published recipe).

Caveat printed with the table: the PointNet weights were trained on ModelNet40, which contains the ten ModelNet10
classes, so these are adaptation results on seen classes, not unseen-class few-shot results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vision_peft.data.points import eval_rng, few_shot_subset, load_sample, preprocess_points, scan_point_folder  # noqa: E402
from vision_peft.recipe import build_run_config  # noqa: E402
from vision_peft.tasks import TASKS  # noqa: E402
from vision_peft.tasks.pointcloud import trainable_summary  # noqa: E402

PPT_MN10 = {1: 72.0, 2: 87.4, 4: 88.4, 8: 88.6, 16: 92.4}  # PPT-FFN, ModelNet10 (ULIP PointBERT, paper plot data)
PPT_LP_MN40 = {1: 43.7, 2: 54.6, 4: 63.2, 8: 71.0, 16: 76.8}  # PPT's linear probe, ModelNet40
METHODS = ("linear_probe", "prompts_only", "residual_mlp", "last_stage")


def cache_features(root: Path, cache: Path, batch: int = 64) -> dict[str, np.ndarray]:
    """Preprocessed points' frozen PointNet features (train + test) and the test split's pre-conv5 features."""
    if cache.is_file():
        return dict(np.load(cache))
    from vision_peft.backbones import build_backbone
    from vision_peft.config import BackboneConfig

    scan = scan_point_folder(root)
    bb = build_backbone(BackboneConfig(name="pointnet")).eval()
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        samples = scan.splits[split]
        feats, stems, pts_all = [], [], []
        for s in range(0, len(samples), batch):
            chunk = samples[s : s + batch]
            pts = np.stack(
                [
                    preprocess_points(load_sample(x), 1024, "random", "swap_yz", eval_rng(s + j), x.path)
                    for j, x in enumerate(chunk)
                ]
            )
            with torch.no_grad():
                stem = bb.point_stem(torch.from_numpy(pts))  # (B, 128, N)
                feats.append(bb.last_stage(stem).numpy())
            if split == "test":
                stems.append(stem.half().numpy())  # float16 halves the cache (371 MB → 186 MB)
            pts_all.append(pts)
        out[f"{split}_feat"] = np.concatenate(feats)
        out[f"{split}_label"] = np.array([x.label for x in samples])
        out[f"{split}_points"] = np.concatenate(pts_all).astype(np.float32)
        if split == "test":
            out["test_stem"] = np.concatenate(stems)
    out["classes"] = np.array(scan.classes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def linear_probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, c: float = 1.0) -> float:
    """Multinomial logistic regression on L2-normalised (×10) frozen features, L-BFGS, sklearn's objective
    ½‖W‖² + C·Σ CE with C = 1 (no search: there is no validation data at K = 1)."""

    def nrm(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(10 * x / np.linalg.norm(x, axis=1, keepdims=True)).double()

    x, y = nrm(xtr), torch.from_numpy(ytr)
    w = torch.zeros(x.shape[1], int(max(ytr.max(), yte.max())) + 1, dtype=torch.double, requires_grad=True)
    b = torch.zeros(w.shape[1], dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w**2).sum() + c * F.cross_entropy(x @ w + b, y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((nrm(xte) @ w + b).argmax(1).numpy() == yte).mean())


def build_model(method: str, n_ctx: int, seed: int):
    cfg = build_run_config(
        {
            "task": {
                "name": "pointcloud",
                "n_ctx": n_ctx,
                "class_position": "end",
                "label_smoothing": 0.2,
            },
            "backbone": {"name": "pointnet"},
            "adapter": {"name": POINT_ADAPTER[method]},
            "train": {"device": "cpu", "seed": seed},
        }
    )
    task = TASKS.get("pointcloud").builder(cfg)
    task.set_classes(CLASSES)
    if "text" not in _TEXT:  # the frozen MiniLM is identical for every run: build it once
        _TEXT["text"] = task.build_text()
    task.build_text = lambda: _TEXT["text"]
    torch.manual_seed(seed)
    return task.build_model()


_TEXT: dict = {}
# the table's PointAdapter names (PPT's) -> the registered adapters (vision_peft/adapters/point_adapter.py)
POINT_ADAPTER = {"prompts_only": "linear", "residual_mlp": "point_mlp", "last_stage": "point_last_stage"}


def train_ppt(method: str, data: dict, idx: np.ndarray, seed: int, args) -> tuple[float, int]:
    model = build_model(method, args.n_ctx, seed)
    model.set_train_mode()
    ytr = torch.from_numpy(data["train_label"][idx])
    if method == "last_stage":
        bb = model.backbone
        with torch.no_grad():
            pts = torch.from_numpy(data["train_points"][idx])
            xtr = torch.cat([bb.point_stem(pts[i : i + 64]) for i in range(0, len(pts), 64)])  # (n, 128, N)
    else:
        xtr = torch.from_numpy(data["train_feat"][idx])
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))
        ),
    )
    g = torch.Generator().manual_seed(seed)
    n = len(idx)
    batch = min(n, args.batch if method == "last_stage" else args.full_batch)
    for _ in range(args.steps):
        b = torch.randperm(n, generator=g)[:batch]
        if method == "last_stage":
            f = model.backbone.last_stage(xtr[b])
        else:
            f = xtr[b]
        for a in model.backbone.feature_adapters:
            f = a(f)
        logits = model.scale() * model.project(f) @ model.class_features().t()
        loss = F.cross_entropy(logits, ytr[b], label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        tf = model.class_features()
        if method == "last_stage":
            stem = data["test_stem"]
            f = torch.cat(
                [model.backbone.last_stage(torch.from_numpy(stem[i : i + 64]).float()) for i in range(0, len(stem), 64)]
            )
        else:
            f = torch.from_numpy(data["test_feat"])
        for a in model.backbone.feature_adapters:
            f = a(f)
        pred = (model.project(f) @ tf.t()).argmax(1).numpy()
    return float((pred == data["test_label"]).mean()), trainable_summary(model)["total"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(os.environ.get("VISION_PEFT_DATA", "data"), "modelnet10"))
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per PPT run (every K)")
    ap.add_argument(
        "--batch",
        type=int,
        default=160,
        help="batch cap of the last-stage row (it runs conv5 per step): min(n, cap) like the cached rows. With 16, "
        "K >= 8 collapsed to chance: MiniLM's mean-pooled class prompts became parallel (cosine 0.995) under the "
        "noisy small-batch updates and never recovered in 100 steps; full batches recover by step 60",
    )
    ap.add_argument("--full-batch", type=int, default=160, help="batch cap of the cached-feature rows")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--n-ctx", type=int, default=8)
    ap.add_argument("--report-only", action="store_true", help="print the table from --results, run nothing")
    ap.add_argument(
        "--results",
        default=str(REPO / "runs" / "bench_cache" / "pointcloud_fewshot_results.jsonl"),
        help="per-run results (JSON lines); runs already there are reused, so seeds can run in parallel processes",
    )
    ap.add_argument("--cache", default=str(REPO / "runs" / "bench_cache" / "pointnet_modelnet10.npz"))
    args = ap.parse_args(argv)

    t0 = time.time()
    data = cache_features(Path(args.data), Path(args.cache))
    global CLASSES
    CLASSES = [str(c) for c in data["classes"]]
    print(
        f"features cached in {time.time() - t0:.0f} s: train {len(data['train_label'])}, test {len(data['test_label'])} "
        f"shapes, {len(CLASSES)} classes",
        flush=True,
    )
    from vision_peft.data.points import PointSample

    train = [PointSample(str(i), int(y)) for i, y in enumerate(data["train_label"])]
    res: dict[tuple[str, int], list[float]] = {}
    params: dict[str, int] = {"linear_probe": 1024 * len(CLASSES) + len(CLASSES)}
    times: dict[str, float] = {}
    done: dict[tuple[str, int, int], dict] = {}
    results = Path(args.results)
    if results.is_file():  # finished runs (also from other processes running other seeds) are not repeated
        for ln in results.read_text().splitlines():
            r = json.loads(ln)
            if r["method"] == "linear_probe" or (r["steps"] == args.steps and r["n_ctx"] == args.n_ctx):
                done[(r["method"], r["k"], r["seed"])] = r
    for k in args.shots:
        for seed in args.seeds:
            idx = np.array([int(s.path) for s in few_shot_subset(train, k, None, seed, len(CLASSES))])
            for m in args.methods:
                if (m, k, seed) not in done and args.report_only:
                    continue
                if (m, k, seed) not in done:
                    t = time.time()
                    if m == "linear_probe":
                        acc, n_par = (
                            linear_probe(
                                xtr=data["train_feat"][idx],
                                ytr=data["train_label"][idx],
                                xte=data["test_feat"],
                                yte=data["test_label"],
                            ),
                            params["linear_probe"],
                        )
                    else:
                        acc, n_par = train_ppt(m, data, idx, seed, args)
                    rec = {
                        "method": m,
                        "k": k,
                        "seed": seed,
                        "acc": acc,
                        "params": n_par,
                        "seconds": time.time() - t,
                        "steps": args.steps,
                        "n_ctx": args.n_ctx,
                    }
                    with open(results, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    done[(m, k, seed)] = rec
                    print(f"K={k:2d} seed={seed} {m:13s} {100 * acc:5.1f} % ({rec['seconds']:.0f} s)", flush=True)
                r = done[(m, k, seed)]
                params[m] = r["params"]
                times[m] = times.get(m, 0.0) + r["seconds"]
                res.setdefault((m, k), []).append(r["acc"])

    n_test = len(data["test_label"])
    print()
    print(
        f"ModelNet10 few-shot, full test split ({n_test} shapes), seeds {args.seeds}: mean ± half-range (min–max)/2, "
        f"top-1 %; PPT rows: {args.steps} steps, batch min(10K, {args.full_batch}) (last stage: {args.batch}), AdamW lr {args.lr}, n_ctx {args.n_ctx}, MiniLM text"
    )
    head = "| method | trainable params | " + " | ".join(f"K={k}" for k in args.shots) + " | CPU s (all runs) |"
    print(head)
    print("|" + "---|" * (len(args.shots) + 3))
    for m in args.methods:
        cells = []
        for k in args.shots:
            a = 100 * np.array(res.get((m, k), []))
            cells.append(f"{a.mean():.1f} ± {(a.max() - a.min()) / 2:.1f} (n={len(a)})" if len(a) else "not run")
        print(f"| {m} | {params.get(m, 0):,} | " + " | ".join(cells) + f" | {times.get(m, 0):.0f} |")
    print(
        "| PPT-FFN published, ModelNet10 (ULIP PointBERT + CLIP text) | ≈1.2 M | "
        + " | ".join(f"{PPT_MN10.get(k, float('nan')):.1f}" for k in args.shots)
        + " | |"
    )
    print(
        "| linear probe published by PPT, **ModelNet40** | | "
        + " | ".join(f"{PPT_LP_MN40.get(k, float('nan')):.1f}" for k in args.shots)
        + " | |"
    )
    print(
        "\nThe PointNet weights were trained on ModelNet40, which contains all ten ModelNet10 classes: these are "
        "adaptation results on classes the encoder has seen, not unseen-class few-shot results (its own 40-way head "
        "restricted to the ten classes scores ≈ 94 % here without any training)."
    )
    if any(m != "linear_probe" for m in args.methods):
        model = build_model("prompts_only", args.n_ctx, 0).eval()
        with torch.no_grad():
            tf = model.class_features()
            cos = (tf @ tf.t()).numpy()[~np.eye(len(CLASSES), dtype=bool)]
            pred = (model.project(torch.from_numpy(data["test_feat"])) @ tf.t()).argmax(1).numpy()
        print(
            f"Why PPT has no head start here: before training (random W_pc) it scores {100 * (pred == data['test_label']).mean():.1f} % "
            f"(chance {100 / len(CLASSES):.0f} %), and MiniLM's class-prompt features are nearly parallel (pairwise cosine "
            f"{cos.mean():.2f}, {cos.min():.2f}–{cos.max():.2f}): PointNet and MiniLM were never aligned, so the text side "
            "carries no prior about point features and W_pc (a 1024×384 linear map) is learned from the K shots alone, "
            "which makes PPT a re-parameterised linear classifier. PPT's low-K advantage comes from ULIP's aligned "
            "point–text space (pointbert + a ULIP checkpoint + its CLIP text tower), which is not available offline."
        )
    print(f"total wall time {time.time() - t0:.0f} s")
    return 0


CLASSES: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
