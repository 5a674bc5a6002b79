"""Diffusion adaptation benchmark on AID (one command, CPU-sized by default).

1. pre-trains the latent DiT on the 16 AID base classes (plain, for full FT / LoRA / SaRA) and a KIND
   (integration-and-diversion) DiT of the same size — both **pre-trained by this project**, no public
   denoiser exists offline;
2. adapts each to the 7 AID novel classes with the same step budget: full fine-tuning · LoRA · SaRA ·
   KIND tailors;
3. measures the Fréchet distance in EfficientNet-Lite0 pooled-feature space (generated vs held-out real
   novel-class images, same sample counts for every method), the top-1 of a fixed classifier on the samples,
   trainable parameters, AdamW optimizer-state bytes (measured on the optimizer the engine builds, after one
   step) and the median step time; writes a PNG grid per method, ``results.json`` and ``results.md``.

    python bench/diffusion_aid.py --out runs/bench-diffusion          # defaults: CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vision_peft.adapters.sara import SparseLinear, optimizer_state_bytes  # noqa: E402
from vision_peft.diffusion_tools import sample_run, write_base_checkpoint  # noqa: E402
from vision_peft.engine import build_optimizer, count_parameters  # noqa: E402
from vision_peft.recipe import load_recipe  # noqa: E402
from vision_peft.tasks import TASKS  # noqa: E402
from vision_peft.train import run  # noqa: E402

METHODS = ["full", "lora", "sara", "kind"]


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
    sparse = [m for m in model.backbone.modules() if isinstance(m, SparseLinear)]
    if sparse:
        dense_w = [torch.nn.Parameter(m.weight.detach().clone()) for m in sparse]
        dense = torch.optim.AdamW(dense_w)
        for w in dense_w:
            w.grad = torch.randn_like(w)
        dense.step()
        dense_bytes = sum(v.numel() * v.element_size() for s in dense.state.values() for v in s.values() if v.dim() > 0)
        sparse_bytes = sum(
            v.numel() * v.element_size() for m in sparse for v in opt.state[m.sparse_values].values() if v.dim() > 0
        )
        sel = sum(m.sparse_idx.numel() for m in sparse)
        tot = sum(m.weight.numel() for m in sparse)
        out.update(
            {
                "sara_state_bytes": sparse_bytes,
                "dense_adamw_same_tensors_bytes": dense_bytes,
                "measured_state_fraction": sparse_bytes / dense_bytes,
                "selected_fraction": sel / tot,
                "selected": sel,
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
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
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
        if kind == "kind" and "kind" not in a.methods:
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
        print(f"[{time.time() - t0:.0f}s] pre-trained {kind}: {results['pretrain'][kind]}", flush=True)

    for m in a.methods:
        base = bases["kind" if m == "kind" else "plain"]
        over = common + [
            f"backbone.name=dit:{base}",
            f"train.max_steps={a.adapt_steps}",
            f"task.samples_per_class={a.samples_per_class}",
            f"task.sample_steps={a.sample_steps}",
            f"task.guidance={a.guidance}",
            f"output.name=adapt-{m}",
        ]
        if m == "sara":
            over.append(f"adapter.reselect_step={max(1, a.adapt_steps // 2)}")
        if m == "kind":
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
        results["methods"][m] = {
            **{k: fm["test"][k] for k in ("frechet_effnet_lite0", "sample_top1", "real_top1", "eps_mse")},
            "n_generated": fm["test"]["n_generated"],
            "n_real": fm["test"]["n_real"],
            "trainable": counts["trainable"],
            "trainable_no_head": counts["trainable_no_head"],
            "step_time_median_s": fm["timing"]["step_time_median"],
            "peak_memory_mb": fm["timing"]["peak_memory_mb"],
            "peak_memory_kind": fm["timing"]["peak_memory_kind"],
            "grid": str(grid),
            "steps": fm["step"],
            "adapter_touched": len(info.get("adapter_touched", [])),
            **mem,
        }
        print(f"[{time.time() - t0:.0f}s] {m}: {json.dumps(results['methods'][m], default=str)}", flush=True)

    results["wall_seconds"] = time.time() - t0
    results["torch_threads"] = torch.get_num_threads()
    results["host_cpus"] = os.cpu_count()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = [
        "| method | Fréchet dist. (EffNet-Lite0 feats) ↓ | classifier top-1 on samples ↑ | trainable (no head) | "
        "AdamW state bytes (no head) | step time s |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in results["methods"].items():
        lines.append(
            f"| {m} | {r['frechet_effnet_lite0']:.1f} | {r['sample_top1']:.3f} | {r['trainable']:,} "
            f"({r['trainable_no_head']:,}) | {r['opt_state_bytes']:,} ({r['opt_state_bytes_no_head']:,}) | "
            f"{r['step_time_median_s']:.3f} |"
        )
    if "sara" in results["methods"]:
        r = results["methods"]["sara"]
        lines.append(
            f"\nSaRA optimizer state {r['sara_state_bytes']:,} B vs dense AdamW on the same tensors "
            f"{r['dense_adamw_same_tensors_bytes']:,} B = {r['measured_state_fraction']:.4f}; selected fraction "
            f"{r['selected_fraction']:.4f} ({r['selected']:,} entries, τ = {r['selection_report']['threshold']:.3g})"
        )
    lines.append(
        f"\nreal held-out top-1 of the fixed classifier: {next(iter(results['methods'].values()))['real_top1']:.3f}"
    )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
