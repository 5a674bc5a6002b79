"""Deploy-vs-torch parity per task, at the level of the task metric, on the shared data: one command, one table.

    export VISION_PEFT_DATA=/work/shared/data VISION_PEFT_WEIGHTS=/work/shared/weights
    python bench/deploy_parity.py            # the default runs below; --<task> RUN to use another run

For every task it exports the run to a bundle (``python -m vision_peft export``, with its own graph-level parity
gate), loads the bundle with the torch-free runtime (:mod:`vision_peft.deploy`: onnxruntime + numpy + Pillow +
tokenizers) and runs the *same raw inputs* through both paths, each with its own preprocessing (torch: the task's
predict path; deploy: the runtime's numpy/PIL path):

- fewshot: embeddings of every novel-class image, then 600 five-way one-shot episodes (episode seed 0, 15 queries
  per class) classified by the PMF head in both; accuracy ± 95 % CI in both and the prediction agreement;
- pointcloud: the run's full test split (ModelNet10, 708 shapes) → top-1 in both and agreement;
- refseg: the run's test split (coco128-seg, image-level split) → mIoU/oIoU against the ground truth in both and
  the IoU between the torch and the deploy mask per object;
- diffusion: the same initial noise through the torch DDIM sampler and the runtime's numpy DDIM → max |Δ| pixel
  and the mean |Δ|, every target class.

Also per task: bundle size (all files) and the wall time of both paths on this CPU (same thread count).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vision_peft.deploy import load_bundle  # noqa: E402
from vision_peft.export import export_run  # noqa: E402
from vision_peft.predict import load_run  # noqa: E402

DEFAULT_RUNS = {
    "fewshot": "runs/fewshot-bench/mvp-1shot-per",
    "pointcloud": "runs/deploy-bench/pointcloud-k16",
    "refseg": "runs/bench-refseg/detris",
    "diffusion": "runs/bench-diffusion-aid/adapt-sara",
}


def bundle_for(run_dir: Path, reexport: bool) -> tuple[Path, dict]:
    out = run_dir / "bundle-deploy-bench"
    if reexport or not (out / "manifest.json").is_file():
        export_run(run_dir, out)  # the default exporter (dynamo), as `python -m vision_peft export` does
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return out, {"bundle_dir": str(out), "bundle_bytes": size}


THREADS = {"n": 2}


def _so():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS["n"]  # the same thread count as torch, so the times compare
    so.inter_op_num_threads = 1
    return so


def ci95(x: np.ndarray) -> float:
    return float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def fewshot(run_dir: Path, bundle_dir: Path, episodes: int) -> dict:
    from vision_peft.data.episodes import EpisodeSampler, scan_class_split
    from vision_peft.paths import resolve_data_path
    from vision_peft.preprocess import load_image, preprocess_image

    cfg, task, model, _ = load_run(run_dir, "cpu")
    model.eval()
    files = scan_class_split(resolve_data_path(cfg.task.data_root), cfg.task.classes)["novel"]
    paths = [p for c in sorted(files) for p in files[c]]
    index = {p: i for i, p in enumerate(paths)}
    spec = task.image_spec(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        emb_t = torch.cat(
            [
                model.embed(
                    torch.stack([torch.from_numpy(preprocess_image(load_image(p), spec)) for p in paths[i : i + 32]])
                )
                for i in range(0, len(paths), 32)
            ]
        ).double()
    torch_s = time.perf_counter() - t0
    emb_t = (emb_t / emb_t.norm(dim=1, keepdim=True)).numpy()
    bundle = load_bundle(bundle_dir, device="cpu", session_options=_so())
    t0 = time.perf_counter()
    emb_d = bundle.embed(paths, batch_size=32)
    deploy_s = time.perf_counter() - t0
    s, b = float(model.head.scale.detach()), float(model.head.bias.detach())
    info = bundle.task_info
    sampler = EpisodeSampler(files, 5, 1, 15, seed=0)
    acc_t, acc_d, agree = [], [], []
    for i in range(episodes):
        ep = sampler.episode(i)
        si = np.array([index[p] for p, _ in ep.support])
        sl = np.array([lab for _, lab in ep.support])
        qi = np.array([index[p] for p, _ in ep.query])
        ql = np.array([lab for _, lab in ep.query])
        preds = []
        for emb, scale, bias in ((emb_t, s, b), (emb_d, float(info["scale"]), float(info["bias"]))):
            protos = np.stack([emb[si[sl == c]].mean(0) for c in range(len(ep.classes))])
            protos /= np.linalg.norm(protos, axis=1, keepdims=True)
            preds.append((scale * (emb[qi] @ protos.T + bias)).argmax(1))
        acc_t.append(float((preds[0] == ql).mean()))
        acc_d.append(float((preds[1] == ql).mean()))
        agree.append(float((preds[0] == preds[1]).mean()))
    a_t, a_d = np.array(acc_t), np.array(acc_d)
    return {
        "data": f"AID novel classes ({len(files)}), {len(paths)} images; {episodes} 5-way 1-shot episodes, seed 0",
        "torch": f"{100 * a_t.mean():.2f} ± {100 * ci95(a_t):.2f}",
        "deploy": f"{100 * a_d.mean():.2f} ± {100 * ci95(a_d):.2f}",
        "agreement": float(np.mean(agree)),
        "max_abs_diff": float(np.abs(emb_t - emb_d).max()),
        "torch_s": torch_s,
        "deploy_s": deploy_s,
        "items": len(paths),
    }


def pointcloud(run_dir: Path, bundle_dir: Path) -> dict:
    cfg, task, model, _ = load_run(run_dir, "cpu")
    files = json.loads((run_dir / "split.json").read_text())["test"]
    labels = [Path(f).parent.parent.name for f in files]
    t0 = time.perf_counter()
    ref = task.predict(model, files, torch.device("cpu"), top_k=1)
    torch_s = time.perf_counter() - t0
    bundle = load_bundle(bundle_dir, device="cpu", session_options=_so())
    t0 = time.perf_counter()
    got = bundle.classify_points(files, batch_size=32)
    deploy_s = time.perf_counter() - t0
    pt = np.array([r["label"] for r in ref])
    pd = np.array([r["label"] for r in got])
    y = np.array(labels)
    return {
        "data": f"ModelNet10 test split, {len(files)} shapes",
        "torch": f"{100 * (pt == y).mean():.2f}",
        "deploy": f"{100 * (pd == y).mean():.2f}",
        "agreement": float((pt == pd).mean()),
        "max_abs_diff": float(max(abs(a["prob"] - b["probs"][a["label"]]) for a, b in zip(ref, got, strict=True))),
        "torch_s": torch_s,
        "deploy_s": deploy_s,
        "items": len(files),
    }


def refseg(run_dir: Path, bundle_dir: Path) -> dict:
    from PIL import Image

    from vision_peft.tasks.refseg import seg_metrics

    cfg, task, model, _ = load_run(run_dir, "cpu")
    test = task.split_samples()["test"]
    bundle = load_bundle(bundle_dir, device="cpu", session_options=_so())
    inter = {"torch": [], "deploy": []}
    union = {"torch": [], "deploy": []}
    pair_iou, prob_diff, times = [], [], {"torch": 0.0, "deploy": 0.0}
    for s in test:
        img = Image.open(s.image).convert("RGB")
        gt = s.mask((img.height, img.width)).astype(bool)
        t0 = time.perf_counter()
        mt = task.predict_mask(model, img, s.phrases[0])
        times["torch"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        md = bundle.segment(img, s.phrases[0])
        times["deploy"] += time.perf_counter() - t0
        for k, m in (("torch", mt["mask"]), ("deploy", md["mask"])):
            inter[k].append(int((m & gt).sum()))
            union[k].append(int((m | gt).sum()))
        u = int((mt["mask"] | md["mask"]).sum())
        pair_iou.append(float((mt["mask"] & md["mask"]).sum() / u) if u else 1.0)
        prob_diff.append(float(np.abs(mt["prob"] - md["prob"]).max()))
    mt_, md_ = seg_metrics(inter["torch"], union["torch"]), seg_metrics(inter["deploy"], union["deploy"])
    return {
        "data": f"coco128-seg test split (image-level), {len(test)} objects",
        "torch": f"mIoU {100 * mt_['mIoU']:.2f} / oIoU {100 * mt_['oIoU']:.2f}",
        "deploy": f"mIoU {100 * md_['mIoU']:.2f} / oIoU {100 * md_['oIoU']:.2f}",
        "agreement": float(np.mean(pair_iou)),
        "agreement_meaning": "mean IoU between the torch and the deploy mask of the same object",
        "max_abs_diff": float(max(prob_diff)),
        "torch_s": times["torch"],
        "deploy_s": times["deploy"],
        "items": len(test),
    }


def diffusion(run_dir: Path, bundle_dir: Path, steps: int) -> dict:
    cfg, task, model, _ = load_run(run_dir, "cpu")
    bundle = load_bundle(bundle_dir, device="cpu", session_options=_so())
    classes = list(task.classes)
    g = cfg.task.image_size // 8
    noise = np.random.RandomState(0).standard_normal((len(classes), 32, g, g)).astype(np.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = model.sample(torch.arange(len(classes)), steps=steps, guidance=2.0, noise=torch.from_numpy(noise))
    torch_s = time.perf_counter() - t0
    ref = ref.clamp(0, 1).numpy()
    t0 = time.perf_counter()
    got = bundle.generate(classes, steps=steps, guidance=2.0, noise=noise)
    deploy_s = time.perf_counter() - t0
    d = np.abs(ref - got)
    return {
        "data": f"{len(classes)} classes × 1 sample, {cfg.task.image_size}px, DDIM {steps} steps, guidance 2, same noise",
        "torch": "-",
        "deploy": "-",
        "agreement": float(d.mean()),
        "agreement_meaning": "mean |Δ| pixel (images in [0, 1])",
        "max_abs_diff": float(d.max()),
        "torch_s": torch_s,
        "deploy_s": deploy_s,
        "items": len(classes),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for task, run in DEFAULT_RUNS.items():
        ap.add_argument(f"--{task}", default=str(ROOT / run), help=f"run directory (default {run}); 'skip' skips it")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--reexport", action="store_true", help="export again even if the bench bundle exists")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "deploy_parity.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    THREADS["n"] = args.threads
    results = {}
    for task in DEFAULT_RUNS:
        run = getattr(args, task)
        if run == "skip":
            continue
        run_dir = Path(run)
        t0 = time.perf_counter()
        bundle_dir, rec = bundle_for(run_dir, args.reexport)
        rec["export_s"] = time.perf_counter() - t0
        if task == "fewshot":
            rec.update(fewshot(run_dir, bundle_dir, args.episodes))
        elif task == "pointcloud":
            rec.update(pointcloud(run_dir, bundle_dir))
        elif task == "refseg":
            rec.update(refseg(run_dir, bundle_dir))
        else:
            rec.update(diffusion(run_dir, bundle_dir, args.sample_steps))
        rec["run"] = str(run_dir)
        results[task] = rec
        print(json.dumps({task: rec}), flush=True)
    print(f"\nDeploy (onnxruntime CPU, torch-free runtime) vs torch, same raw inputs; {args.threads} threads")
    print("| task | data | torch metric | deploy metric | agreement | max abs diff | bundle MB | torch s | deploy s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, r in results.items():
        print(
            f"| {task} | {r['data']} | {r['torch']} | {r['deploy']} | {r['agreement']:.4g} | {r['max_abs_diff']:.2e} "
            f"| {r['bundle_bytes'] / 2**20:.1f} | {r['torch_s']:.1f} | {r['deploy_s']:.1f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
