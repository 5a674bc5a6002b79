"""FISH's Fisher, old vs new, on a small DiT with real AID latents (the issue-14 check; no trained base needed).

old: the squared gradient of a B-example *mean* loss, averaged over N/B batches (what ``fisher`` did before);
new: the mean of per-example squared gradients over the same N (latent, label, t, noise) examples.
Reports the Jaccard overlap of the global top-``fraction`` masks, the share of the mask per tensor kind, and the
time per sample of the per-example computation (vmap and loop). Two bases: a freshly initialised DiT whose
tensors get N(0, σ²) added (adaLN-Zero otherwise leaves every block gradient at exactly zero) and, optionally, a
stand-in base pre-trained for ``--pretrain-steps`` steps on the AID base classes (the real base is pre-trained by
bench/diffusion_aid.py).

    nice -n 10 python bench/sara_fisher_overlap.py --out bench/results/sara_fisher_overlap.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from vision_peft.adapters.sara import fisher_scores, select_entries  # noqa: E402
from vision_peft.diffusion_tools import fisher_inputs  # noqa: E402


def mean_loss_fisher(model, names, loss, examples, batch: int) -> dict[str, torch.Tensor]:
    """The old estimator: (∂ mean_B ℓ / ∂θ)² averaged over batches of ``batch`` examples."""
    flat = {k: torch.cat([e[k] for e in examples]) for k in examples[0]}
    n = len(flat["label"])
    params = {nm: model.backbone.get_parameter(nm) for nm in names}
    acc = {nm: torch.zeros_like(p) for nm, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    count = 0
    for i in range(0, n - batch + 1, batch):
        gs = torch.autograd.grad(loss({k: v[i : i + batch] for k, v in flat.items()}), list(params.values()),
                                 allow_unused=True)  # fmt: skip
        for nm, g in zip(params, gs, strict=True):
            if g is not None:
                acc[nm] += g**2
        count += 1
    for p in params.values():
        p.requires_grad_(False)
    return {nm: a / count for nm, a in acc.items()}


def kind(name: str) -> str:
    if name.endswith(".bias"):
        return "bias"
    if ".adaLN" in name or "final_adaLN" in name:
        return "adaLN weight"
    return "other weight"


def top_mask(sc: dict[str, torch.Tensor], fraction: float) -> dict[str, set[int]]:
    idx, _ = select_entries(sc, fraction, None, "global", largest=True)
    return {nm: set(i.tolist()) for nm, i in idx.items()}


def jaccard(a: dict[str, set[int]], b: dict[str, set[int]]) -> float:
    return sum(len(a[n] & b[n]) for n in a) / sum(len(a[n] | b[n]) for n in a)


def compare(model, names, loss, examples, fraction: float, batch: int) -> tuple[dict, dict, dict]:
    """(summary, new mask, old mask) for one set of N examples."""
    n = sum(len(e["label"]) for e in examples)
    t0 = time.perf_counter()
    new = fisher_scores(model.backbone, names, loss, examples, method="vmap", chunk=16)
    t_vmap = (time.perf_counter() - t0) / n
    few = examples[: max(1, 64 // len(examples[0]["label"]))]
    t0 = time.perf_counter()
    fisher_scores(model.backbone, names, loss, few, method="loop")
    t_loop = (time.perf_counter() - t0) / sum(len(e["label"]) for e in few)
    old = mean_loss_fisher(model, names, loss, examples, batch)
    masks = {"new": top_mask(new, fraction), "old": top_mask(old, fraction)}
    share = {}
    for label in ("new", "old"):
        tot = sum(len(v) for v in masks[label].values())
        share[label] = {}
        for nm, v in masks[label].items():
            share[label][kind(nm)] = share[label].get(kind(nm), 0) + len(v) / tot
    out = {"samples": n, "old_batch": batch, "jaccard_new_vs_old": jaccard(masks["new"], masks["old"]),
           "mask_share_by_kind": share, "sec_per_sample_vmap_chunk16": t_vmap, "sec_per_sample_loop": t_loop}  # fmt: skip
    return out, masks["new"], masks["old"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="diffusion-aid-fish")
    ap.add_argument("--arch", default="d4-w192-h4-c16")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="the old command's batch (mean loss)")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--sigma", type=float, default=0.02, help="perturbation of the fresh init")
    ap.add_argument("--pretrain-steps", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of the example draws")
    ap.add_argument("--work", default="/tmp/sara_fisher_overlap")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from vision_peft.backbones.dit import DiT, DiTArch, save_dit

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    bases = {}
    torch.manual_seed(0)
    fresh = DiT(DiTArch.parse(a.arch))
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(torch.randn_like(p) * a.sigma)
    save_dit(work / "fresh.safetensors", fresh, meta={"prediction": "v"})
    bases[f"fresh init + N(0,{a.sigma}^2)"] = work / "fresh.safetensors"
    if a.pretrain_steps:
        from vision_peft.diffusion_tools import write_base_checkpoint
        from vision_peft.recipe import load_recipe
        from vision_peft.train import run

        rd = work / "runs" / "pre"
        if not (rd / "base_dit.safetensors").is_file():
            cfg = load_recipe("diffusion-aid-pretrain", [f"backbone.name=dit:{a.arch}", "train.device=cpu",
                              f"train.max_steps={a.pretrain_steps}", "train.warmup_steps=20",
                              f"output.runs_root={work / 'runs'}", "output.name=pre", "task.eval_per_class=2"])  # fmt: skip
            write_base_checkpoint(run(cfg, progress=False))
        bases[f"pre-trained {a.pretrain_steps} steps (AID base classes)"] = rd / "base_dit.safetensors"
    res = {"recipe": a.recipe, "arch": a.arch, "fraction": a.fraction, "bases": {}}
    for label, path in bases.items():
        rows, news, olds = [], [], []
        for seed in a.seeds:
            over = [f"backbone.name=dit:{path}", "train.device=cpu", f"train.seed={seed}"]
            cfg, model, examples, names, loss = fisher_inputs(a.recipe, over, samples=a.samples, chunk=16)
            row, new, old = compare(model, names, loss, examples, a.fraction, a.batch)
            rows.append({"seed": seed, **row})
            news.append(new)
            olds.append(old)
            print(label, json.dumps(rows[-1], indent=1), flush=True)
        pairs = [(i, j) for i in range(len(a.seeds)) for j in range(i + 1, len(a.seeds))]
        res["bases"][label] = {
            "per_seed": rows,
            # the sampling-noise floor: the same estimator on two independent sets of N examples
            "jaccard_new_vs_new_other_seed": [jaccard(news[i], news[j]) for i, j in pairs],
            "jaccard_old_vs_old_other_seed": [jaccard(olds[i], olds[j]) for i, j in pairs],
        }
        print(label, json.dumps({k: v for k, v in res["bases"][label].items() if k != "per_seed"}), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
