"""LoRA vs full fine-tuning on EfficientNet-Lite0 (AID), with and without activation recomputation.

Four variants of one training step (forward + backward + AdamW step of :func:`vision_peft.engine.build_optimizer`)
of the real AID classification task (``tasks/classification-aid.yaml``: EfficientNet-Lite0 with its ImageNet
weights, 128², 30 classes): LoRA r=8 alpha 16 on ``conv_pw`` (the recipe's adapter) and ``adapter.name=full``, each
with ``train.recompute=none`` and ``blocks`` (every stage checkpointed, :func:`vision_peft.recompute.apply`). Every
model is built from the same weights with the same seed (same head init).

The batch is fixed: ``--batch`` AID images (the first images of the classes in sorted order, round robin over the
30 classes), squashed to 128² and normalised as the task does (no augmentation), with their labels.

Measured in one run: memory of one step as in ``bench/lora_vs_peft.py`` (CPU: bytes saved for backward, deduplicated
by storage, parameters/buffers excluded, + gradient bytes + AdamW state bytes), and the median step time over
``--steps`` timed steps after ``--warmup``, the variants interleaved with the order rotating every step (the CPU is
shared: contention hits every variant alike). Checks: recomputation gives bit-equal gradients of every trainable
tensor and, for full fine-tuning, equal BatchNorm running statistics after the step (updated once, not twice).

Run::

    OMP_NUM_THREADS=2 python bench/memory_vs_full.py --threads 2 --out bench/results/memory_vs_full
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_vs_peft import cpu_step_bytes  # noqa: E402  (the same memory accounting)

from vision_peft import recompute  # noqa: E402
from vision_peft.engine import build_optimizer  # noqa: E402
from vision_peft.paths import REPO_ROOT, data_root  # noqa: E402
from vision_peft.recipe import load_recipe  # noqa: E402
from vision_peft.tasks import TASKS  # noqa: E402

VARIANTS = {  # name -> (adapter overrides, train.recompute)
    "full": ({"name": "full"}, "none"),
    "full + recompute": ({"name": "full"}, "blocks"),
    "lora": (None, "none"),
    "lora + recompute": (None, "blocks"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA vs full fine-tuning on EfficientNet-Lite0: step memory and time.")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--image-size", type=int, default=128, help="square input size (the recipe's 128)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per variant")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the model builds (head init)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def build(variant: str, args: argparse.Namespace):
    """(task, model, recompute report) of one variant, from tasks/classification-aid.yaml."""
    adapter, mode = VARIANTS[variant]
    over = [f"backbone.image_size={args.image_size}", f"train.batch_size={args.batch}", "train.device=cpu"]
    over.append(f"train.recompute={mode}")
    if adapter is not None:
        over += [f"adapter.name={adapter['name']}"]
    cfg = load_recipe(REPO_ROOT / "tasks" / "classification-aid.yaml", over)
    task = TASKS.get(cfg.task.name).builder(cfg)
    torch.manual_seed(args.seed)
    model = task.build_model()
    report = recompute.apply(model, task, cfg.train, torch.device("cpu"), None)
    return cfg, task, model, report


def fixed_batch(task, model, n: int, size: int) -> dict[str, torch.Tensor]:
    """``n`` AID images, round robin over the sorted classes, squashed to size² and normalised; with labels."""
    root = data_root() / "aid"
    classes = task.classes
    files = {
        c: sorted(p for p in (root / c).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) for c in classes
    }
    mean = np.array(model.backbone.data_config["mean"], dtype=np.float32)
    std = np.array(model.backbone.data_config["std"], dtype=np.float32)
    images, labels = [], []
    for i in range(n):
        c = i % len(classes)
        path = files[classes[c]][i // len(classes)]
        im = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        images.append(torch.from_numpy(((im - mean) / std).transpose(2, 0, 1).copy()))  # (H,W,3)->(3,H,W)
        labels.append(c)
    return {"image": torch.stack(images), "label": torch.tensor(labels)}


def train_step(model, opt, batch):
    """One AdamW training step on the fixed batch, as a closure returning the loss (what every row measures)."""

    def step() -> float:
        model.set_train_mode()
        opt.zero_grad(set_to_none=True)
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models, steps, reports, opts, cfgs = {}, {}, {}, {}, {}
    for v in VARIANTS:
        cfgs[v], task, models[v], reports[v] = build(v, args)
    batch = fixed_batch(task, models["lora"], args.batch, args.image_size)
    failures: list[str] = []

    def make_step(model, opt):
        return train_step(model, opt, batch)

    # exactness: one backward of each recompute variant vs its plain twin (same weights), BN stats after the step
    parity = {}
    for base in ("full", "lora"):
        a, b = models[base], models[f"{base} + recompute"]
        b.load_state_dict(a.state_dict())
        grads = []
        for m in (a, b):
            m.set_train_mode()
            m.zero_grad(set_to_none=True)
            torch.manual_seed(args.seed + 1)
            m(batch)["loss"].backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
        diff = max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0])
        bn = [k for k in a.state_dict() if "running_" in k or "num_batches" in k]
        bn_diff = max(
            (float((a.state_dict()[k].float() - b.state_dict()[k].float()).abs().max()) for k in bn), default=0.0
        )
        parity[base] = {"grad_max_abs_diff": diff, "bn_stats_max_abs_diff": bn_diff, "trainable_tensors": len(grads[0])}
        if diff != 0.0 or bn_diff != 0.0:
            failures.append(f"{base}: recompute grads max |Δ| {diff:.3g}, BN stats max |Δ| {bn_diff:.3g}")
    for v, m in models.items():
        opts[v] = build_optimizer(m, cfgs[v])
        steps[v] = make_step(m, opts[v])
    keys = list(VARIANTS)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(args.warmup + args.steps):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:  # rotate the order every step
            t0 = time.perf_counter()
            steps[key]()
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    mem = {k: cpu_step_bytes(models[k], opts[k], steps[k]) for k in keys}
    mib = 2.0**20
    full = mem["full"]["total"]
    rows = []
    print(f"# EfficientNet-Lite0 ({models['lora'].backbone.weights_source}), AID, {args.image_size}², batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.warmup}+{args.steps} steps, rotating order")  # fmt: skip
    print(
        "| variant | trainable | ms/step | time / full | saved MiB | grads MiB | optim MiB | total MiB | mem / full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in keys:
        m = mem[k]
        n_train = sum(p.numel() for p in models[k].parameters() if p.requires_grad)
        row = {"variant": k, "trainable": n_train, "step_ms": med[k], "time_vs_full": med[k] / med["full"],
               "memory": m, "memory_mib": m["total"] / mib, "memory_vs_full": m["total"] / full,
               "recompute": reports[k]}  # fmt: skip
        rows.append(row)
        print(f"| {k} | {n_train:,} | {med[k]:.0f} | {row['time_vs_full']:.3f} | {m['saved'] / mib:.1f} | "
              f"{m['grads'] / mib:.1f} | {m['optimizer'] / mib:.1f} | {m['total'] / mib:.1f} | {row['memory_vs_full']:.3f} |")  # fmt: skip
    for base, p in parity.items():
        print(f"# {base}: recompute vs none, grad max |Δ| {p['grad_max_abs_diff']:.3g} over {p['trainable_tensors']} "
              f"tensors, BN running stats max |Δ| {p['bn_stats_max_abs_diff']:.3g}")  # fmt: skip
    if args.out:
        result = {
            "bench": "memory_vs_full", "backbone": "effnet_lite0", "weights": models["lora"].backbone.weights_source,
            "recipe": "tasks/classification-aid.yaml", "image_size": args.image_size, "batch": args.batch,
            "input": "fixed batch of AID images, round robin over the 30 sorted classes (first files), squash, no aug",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "warmup": args.warmup, "steps": args.steps,
            "memory_kind": "CPU: saved-activation + grad + optimizer bytes", "rows": rows, "parity": parity,
            "lora_recompute_vs_full": mem["lora + recompute"]["total"] / full, "failures": failures,
        }  # fmt: skip
        lines = [
            f"# LoRA vs full fine-tuning — EfficientNet-Lite0 (ImageNet weights), AID, {args.image_size}², batch {args.batch}",
            "",
            f"{result['threads']} CPU threads, torch {result['torch']}; {args.warmup} warm-up + {args.steps} timed steps per "
            f"variant, interleaved (order rotates every step). Input: {result['input']}. Memory: {result['memory_kind']}.",
            "",
            "| variant | trainable | ms/step | time / full | saved MiB | grads MiB | optim MiB | total MiB | memory / full |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in rows:
            m = r["memory"]
            lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['step_ms']:.0f} | {r['time_vs_full']:.3f} | "
                         f"{m['saved'] / mib:.1f} | {m['grads'] / mib:.1f} | {m['optimizer'] / mib:.1f} | "
                         f"{m['total'] / mib:.1f} | {r['memory_vs_full']:.3f} |")  # fmt: skip
        lines += ["", f"LoRA + recompute / full: **{result['lora_recompute_vs_full']:.3f}** (target ≤ 0.6).", ""]
        for base, p in parity.items():
            lines.append(f"- {base}: recompute vs none, gradient max |Δ| {p['grad_max_abs_diff']:.3g} over "
                         f"{p['trainable_tensors']} tensors; BN running stats max |Δ| {p['bn_stats_max_abs_diff']:.3g}")  # fmt: skip
        lines.append("")
        lines.append("Failures: " + ("; ".join(failures) if failures else "none") + ".")
        for suffix, text in ((".json", json.dumps(result, indent=2, default=str)), (".md", "\n".join(lines) + "\n")):
            tmp = args.out + suffix + ".tmp"
            Path(tmp).write_text(text)
            os.replace(tmp, args.out + suffix)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
