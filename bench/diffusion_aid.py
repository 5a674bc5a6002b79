"""Diffusion adaptation benchmark on AID (one command, CPU-sized by default).

1. pre-trains the latent DiT on the 16 AID base classes (plain, for full FT / LoRA / SaRA) and a KIND
   (integration-and-diversion) DiT of the same size — both **pre-trained by this project**, no public
   denoiser exists offline;
2. computes FISH's Fisher scores of the plain base (``python -m vision_peft.diffusion_tools fisher``);
3. adapts to the 7 AID novel classes with the same step budget: full fine-tuning · LoRA · SaRA · FISH (plain
   base) · KIND tailors and the old KIND transfer as an ablation (KIND base);
4. measures, over ``--sample-seeds`` independent sample sets (the same noise for every method), KID in
   EfficientNet-Lite0 pooled-feature space (generated vs held-out real novel-class images), the top-1 of a fixed
   classifier on the samples, a Fréchet distance on a PCA projection only (n ≪ 1280), each per seed, as seed mean
   ± 95 % t half-width and pooled with a bootstrap (KID) / Wilson (top-1) interval; trainable parameters, AdamW
   optimizer-state bytes (measured on the optimizer the engine builds, after one step) and the median step time;
   writes a PNG grid per method, ``results.json`` and ``results.md``.

    python bench/diffusion_aid.py --out runs/bench-diffusion          # defaults: CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vision_peft.adapters.sara import optimizer_state_bytes, sparse_holders  # noqa: E402
from vision_peft.diffusion_tools import sample_run, write_base_checkpoint  # noqa: E402
from vision_peft.engine import build_optimizer, count_parameters  # noqa: E402
from vision_peft.recipe import load_recipe  # noqa: E402
from vision_peft.tasks import TASKS  # noqa: E402
from vision_peft.train import run  # noqa: E402

METHODS = ["full", "lora", "sara", "fish", "kind", "kind-mod"]


def measure_optimizer(cfg) -> dict:
    """Build the model and optimizer exactly as the engine does, take one step, count optimizer-state bytes.
    For SaRA also a dense AdamW over the same targeted weight tensors (the reference for the fraction)."""
    torch.manual_seed(0)
    if hasattr(cfg.adapter, "reselect_step"):
        cfg.adapter.reselect_step = 0  # measure the state of the selected set (re-selection would reset it)
    task = TASKS.get(cfg.task.name).builder(cfg)
    model = task.build_model()
    opt = build_optimizer(model, cfg)
    model.set_train_mode()
    batch = task.synthetic_batch(model, 4)
    model(batch)["loss"].backward()
    opt.step()
    head = {id(p) for p in model.head_parameters()}
    adapter_bytes = sum(
        v.numel() * v.element_size()
        for p, s in opt.state.items()
        if id(p) not in head
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    out = {"opt_state_bytes": optimizer_state_bytes(opt), "opt_state_bytes_no_head": adapter_bytes}
    # every sparse tensor (SparseLinear weights and, with eligible: all, the parametrized biases / norms / adaLN)
    holders = sparse_holders(model.backbone, model.adapter.touched)
    if holders:
        dense_w = [torch.nn.Parameter(fn().detach().clone()) for _, fn in holders]
        dense = torch.optim.AdamW(dense_w)
        for w in dense_w:
            w.grad = torch.randn_like(w)
        dense.step()
        dense_bytes = sum(v.numel() * v.element_size() for s in dense.state.values() for v in s.values() if v.dim() > 0)
        sparse_bytes = sum(
            v.numel() * v.element_size() for h, _ in holders for v in opt.state[h.sparse_values].values() if v.dim() > 0
        )
        sel = sum(h.sparse_idx.numel() for h, _ in holders)
        tot = sum(w.numel() for w in dense_w)
        out.update(
            {
                "sara_state_bytes": sparse_bytes,
                "dense_adamw_same_tensors_bytes": dense_bytes,
                "measured_state_fraction": sparse_bytes / dense_bytes,
                "selected_fraction": sel / tot,
                "selected": sel,
                "sparse_tensors": len(holders),
                "selection_report": {
                    k: v for k, v in model.adapter.report.items() if k in ("threshold", "selected", "total", "fraction")
                },
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-diffusion")
    ap.add_argument("--arch", default="d4-w96-h4-c16", help="DiT architecture (depth, width, heads, classes)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--adapt-steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-per-class", type=int, default=40)
    ap.add_argument("--eval-per-class", type=int, default=20)
    ap.add_argument("--samples-per-class", type=int, default=10)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--sample-seeds", type=int, default=3, help="independent sample sets (same noise per method)")
    ap.add_argument("--fisher-samples", type=int, default=1024, help="FISH: examples of the per-example Fisher")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pretrain-only", action="store_true", help="only pre-train the bases (reused by a later run)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    common = [
        f"task.image_size={a.image_size}",
        f"task.train_per_class={a.train_per_class}",
        f"task.eval_per_class={a.eval_per_class}",
        f"train.batch_size={a.batch}",
        f"train.device={a.device}",
        f"output.runs_root={out}",
        "train.log_every=25",
    ]
    results: dict = {"config": vars(a), "methods": {}, "pretrain": {}}
    bases = {}
    for kind, recipe in (("plain", "diffusion-aid-pretrain"), ("kind", "diffusion-aid-kind-pretrain")):
        if kind == "kind" and not any(m.startswith("kind") for m in a.methods):
            continue
        name = f"pretrain-{kind}"
        cfg = load_recipe(
            recipe,
            common
            + [
                f"backbone.name=dit:{a.arch}",
                f"train.max_steps={a.pretrain_steps}",
                "train.ckpt_every=0",
                "task.eval_per_class=5",
                "train.warmup_steps=20",
                f"output.name={name}",
            ],
        )
        if kind == "kind":  # ranks must fit the width: learngenes = half, tailors = 8 groups × width/16
            w = cfg.backbone and int(a.arch.split("-w")[1].split("-")[0])
            cfg.adapter.learngene_rank, cfg.adapter.tailor_rank = w // 2, max(1, w // 16)
            if cfg.adapter.assignment == "similarity":  # group the classes once their embeddings have trained
                cfg.adapter.regroup_step = max(1, a.pretrain_steps // 4)
        run_dir = out / name
        if not (run_dir / "adapter.safetensors").is_file():
            run(cfg, progress=False)
        bases[kind] = write_base_checkpoint(run_dir)
        fm = json.loads((run_dir / "final_metrics.json").read_text())
        results["pretrain"][kind] = {
            "steps": fm["step"],
            "heldout_eps_mse": fm["test"]["eps_mse"],
            "step_time_median_s": fm["timing"]["step_time_median"],
            "train_seconds": fm["timing"]["train_seconds"],
            "checkpoint": str(bases[kind]),
        }
        if kind == "kind":
            results["pretrain"][kind]["gate"] = kind_gate(run_dir, cfg)
        print(f"[{time.time() - t0:.0f}s] pre-trained {kind}: {results['pretrain'][kind]}", flush=True)
    if a.pretrain_only:
        return

    if "fish" in a.methods:  # FISH's Fisher scores of the plain pre-trained base, on the adapt recipe's data
        fisher = out / "fisher-plain.safetensors"
        if not fisher.is_file():
            cmd = [sys.executable, "-m", "vision_peft.diffusion_tools", "fisher", "diffusion-aid-fish",
                   *common, f"backbone.name=dit:{bases['plain']}",
                   "--out", str(fisher), "--samples", str(a.fisher_samples)]  # fmt: skip
            tf = time.time()
            subprocess.run(cmd, check=True)
            results["fisher"] = {"file": str(fisher), "seconds": time.time() - tf, "samples": a.fisher_samples}
            print(f"[{time.time() - t0:.0f}s] fisher: {results['fisher']}", flush=True)

    for m in a.methods:
        base_kind = "kind" if m.startswith("kind") else "plain"
        base = bases[base_kind]
        over = common + [
            f"backbone.name=dit:{base}",
            f"train.max_steps={a.adapt_steps}",
            f"task.samples_per_class={a.samples_per_class}",
            f"task.sample_seeds={a.sample_seeds}",
            f"task.sample_steps={a.sample_steps}",
            f"task.guidance={a.guidance}",
            f"output.name=adapt-{m}",
        ]
        if m == "sara":
            over.append(f"adapter.reselect_step={max(1, a.adapt_steps // 2)}")
        if m == "fish":
            over.append(f"adapter.fisher_file={out / 'fisher-plain.safetensors'}")
        if m.startswith("kind"):
            w = int(a.arch.split("-w")[1].split("-")[0])
            over.append(f"adapter.tailor_rank={max(1, w // 16)}")
        cfg = load_recipe(f"diffusion-aid-{m}", over)
        run_dir = out / f"adapt-{m}"
        if not (run_dir / "final_metrics.json").is_file():
            run(cfg, progress=False)
        fm = json.loads((run_dir / "final_metrics.json").read_text())
        info = json.loads((run_dir / "config.json").read_text())
        task = TASKS.get(cfg.task.name).builder(cfg)
        counts = count_parameters(task.build_model())
        mem = measure_optimizer(cfg)
        grid = sample_run(run_dir, None, 8, run_dir / "samples.png", a.sample_steps, a.guidance, seed=0)
        te = fm["test"]
        k = te["pca_dim"]
        results["methods"][m] = {
            "base": f"{base_kind} pre-trained DiT ({base})",
            **{key: te[key] for key in te if key.startswith(("kid", "sample_top1", f"frechet_pca{k}"))},
            **{key: te[key] for key in ("real_top1", "eps_mse", "pca_dim", "per_seed", "sample_seeds")},
            "n_generated": te["n_generated"],
            "n_generated_per_seed": te["n_generated_per_seed"],
            "n_real": te["n_real"],
            "trainable": counts["trainable"],
            "trainable_no_head": counts["trainable_no_head"],
            "step_time_median_s": fm["timing"]["step_time_median"],
            "train_seconds": fm["timing"]["train_seconds"],
            "peak_memory_mb": fm["timing"]["peak_memory_mb"],
            "peak_memory_kind": fm["timing"]["peak_memory_kind"],
            "grid": str(grid),
            "steps": fm["step"],
            "adapter_touched": len(info.get("adapter_touched", [])),
            **mem,
        }
        if m.startswith("kind"):  # how the target classes use the tailor blocks
            results["methods"][m]["gate"] = kind_gate(run_dir, cfg)
        print(f"[{time.time() - t0:.0f}s] {m}: {json.dumps(results['methods'][m], default=str)}", flush=True)

    results["wall_seconds"] = time.time() - t0
    results["torch_threads"] = torch.get_num_threads()
    results["host_cpus"] = os.cpu_count()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(table(results) + "\n")
    print(table(results))


def kind_gate(run_dir: Path, cfg) -> dict:
    """KIND's class → tailor-block gate of a finished run: the similarity grouping (``kind_gate.assign``), the
    learned soft gate (softmax of ``kind_gate.logits`` / temperature), or the old y mod groups."""
    from vision_peft.checkpoint import load_tensors

    st = load_tensors(run_dir / "adapter.safetensors")
    ad = cfg.adapter
    if "backbone.kind_gate.logits" in st:
        w = torch.softmax(st["backbone.kind_gate.logits"] / ad.gate_temperature, 1)
        return {"assignment": "learned", "weights": [[round(float(v), 3) for v in row] for row in w],
                "argmax": w.argmax(1).tolist(), "max_weight": [round(float(v), 3) for v in w.max(1).values]}  # fmt: skip
    if "backbone.kind_gate.assign" in st:
        return {"assignment": "similarity", "groups_of_classes": st["backbone.kind_gate.assign"].tolist()}
    return {"assignment": "mod", "groups": ad.groups}


LABELS = {"full": "full FT", "lora": "LoRA r8", "sara": "SaRA 10 %", "fish": "FISH 10 %",
          "kind": "KIND tailors (similarity pre-train, blocks init, learned gate)",
          "kind-mod": "KIND tailors, old transfer (mean init, y mod 7)"}  # fmt: skip


def table(results: dict) -> str:
    """The README table: KID ×10³ (seed mean ± 95 % t half-width, pooled with bootstrap interval), classifier top-1
    (seed mean ± t half-width, pooled with Wilson interval), PCA Fréchet distance, sizes."""
    ms = results["methods"]
    if not ms:
        return ""
    k = next(iter(ms.values()))["pca_dim"]
    lines = [
        "| method | adapts | KID ×10³ ↓ seeds mean ± 95 % CI | KID ×10³ pooled [bootstrap 95 %] | "
        "classifier top-1 ↑ seeds mean ± 95 % CI | top-1 pooled [Wilson 95 %] | "
        f"Fréchet dist. on PCA-{k} ↓ (seed mean) | trainable (no head) | AdamW state bytes (no head) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in ms.items():
        lo, hi = r["kid_ci95"]
        tlo, thi = r["sample_top1_ci95"]
        base = "KIND base" if r["base"].startswith("kind") else "plain base"
        lines.append(
            f"| {LABELS.get(m, m)} | {base} | {1e3 * r['kid_seed_mean']:.2f} ± {1e3 * r['kid_seed_ci95_halfwidth']:.2f} "
            f"| {1e3 * r['kid_effnet_lite0']:.2f} [{1e3 * lo:.2f}, {1e3 * hi:.2f}] "
            f"| {r['sample_top1_seed_mean']:.3f} ± {r['sample_top1_seed_ci95_halfwidth']:.3f} "
            f"| {r['sample_top1']:.3f} [{tlo:.3f}, {thi:.3f}] | {r[f'frechet_pca{k}_seed_mean']:.2f} "
            f"| {r['trainable']:,} ({r['trainable_no_head']:,}) "
            f"| {r['opt_state_bytes']:,} ({r['opt_state_bytes_no_head']:,}) |"
        )
    r0 = next(iter(ms.values()))
    lines.append(
        f"\n{r0['n_generated_per_seed']} generated images per seed × {r0['sample_seeds']} seeds vs {r0['n_real']} "
        f"held-out real; real held-out top-1 of the fixed classifier: {r0['real_top1']:.3f}"
    )
    for m in ("sara", "fish"):
        if m in ms and "sara_state_bytes" in ms[m]:
            r = ms[m]
            lines.append(
                f"\n{LABELS[m]} optimizer state {r['sara_state_bytes']:,} B vs dense AdamW on the same tensors "
                f"{r['dense_adamw_same_tensors_bytes']:,} B = {r['measured_state_fraction']:.4f}; selected fraction "
                f"{r['selected_fraction']:.4f} ({r['selected']:,} entries)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
