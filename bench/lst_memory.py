"""LST (ladder side-tuning) vs full fine-tuning vs LoRA: training-step memory on EfficientNet-Lite0 (AID), one run.

Every variant trains the real AID classification task (``tasks/classification-aid.yaml``: EfficientNet-Lite0 with
its ImageNet weights, ``--image-size``², 30 classes) with only the adapter changed: ``full`` (everything trains),
``lora`` (the recipe's: r = 8, alpha 16 on ``conv_pw``), ``lst`` (reduction 8 on the five feature levels, the frozen
backbone under ``no_grad``) and ``linear`` (head only, the floor). Same weights, same seed, the same fixed batch
(the first AID images round robin over the sorted classes, squashed, normalised, no augmentation; see
``bench/memory_vs_full.py``), the optimizer of ``vision_peft.engine.build_optimizer``.

Two memory measures, both in this one run:

- step accounting as in ``bench/lora_vs_peft.py`` (CPU: bytes saved for backward, deduplicated by storage,
  parameters/buffers excluded, + gradient bytes + AdamW state bytes; CUDA: peak allocated during the step above
  the resident memory, + optimizer state), on the second step of each variant (the first allocates the state);
- peak RSS of one fresh subprocess per variant (``--child``): after building the model the peak is reset (Linux
  ``/proc/self/clear_refs``), then ``--steps`` training steps run; the increase of the peak (VmHWM) over the RSS
  after building is the training's own (weights, data and torch are the same in every variant).

The issue's target: LST ≤ 0.30 × full fine-tuning (the paper reports 0.31 on T5, Sung et al. 2022, Table 1).

``--backbone timm:<vit>`` runs the same on a timm ViT (random weights: memory does not depend on them; LoRA on
``qkv``; LST on every block, width / 8).

Run::

    nice -n 10 env OMP_NUM_THREADS=1 python bench/lst_memory.py --out bench/results/lst_memory
    nice -n 10 env OMP_NUM_THREADS=1 python bench/lst_memory.py --backbone timm:vit_small_patch16_224 \
        --image-size 128 --out bench/results/lst_memory_vit
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_vs_peft import cpu_step_bytes, cuda_step_bytes  # noqa: E402  (the same memory accounting)
from memory_vs_full import fixed_batch, train_step  # noqa: E402  (the same fixed AID batch and step)

from vision_peft.engine import build_optimizer  # noqa: E402
from vision_peft.paths import REPO_ROOT  # noqa: E402
from vision_peft.recipe import load_recipe  # noqa: E402
from vision_peft.rundir import atomic_write_json, atomic_write_text  # noqa: E402
from vision_peft.tasks import TASKS  # noqa: E402

VARIANTS = {  # name -> adapter overrides (None: the recipe's LoRA)
    "full": ["adapter.name=full"],
    "lora": None,
    "lst": ["adapter.name=lst", "adapter.reduction=8"],
    "linear": ["adapter.name=linear"],
}
MIB = 2.0**20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LST vs full fine-tuning vs LoRA: training-step memory, one run.")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--image-size", type=int, default=128, help="square input size (the recipe's 128)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (and per child process)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--backbone", default="effnet_lite0", help="effnet_lite0 (the recipe's) or timm:<vit> (random init)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the model builds (head and side-network init)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one variant's peak-RSS process
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def build(variant: str, args: argparse.Namespace):
    """(config, task, model on the device, optimizer, step function, batch) of one variant."""
    over = [f"backbone.image_size={args.image_size}", f"train.batch_size={args.batch}", f"train.device={args.device}"]
    over += ["train.amp=none"] + (VARIANTS[variant] or [])
    if args.backbone != "effnet_lite0":  # a ViT: random weights (memory does not depend on them), LoRA on qkv
        over += [f"backbone.name={args.backbone}", "backbone.pretrained=false", "task.resize=squash"]
        over += ["adapter.targets=[qkv]"] if VARIANTS[variant] is None else []
    cfg = load_recipe(REPO_ROOT / "tasks" / "classification-aid.yaml", over)
    task = TASKS.get(cfg.task.name).builder(cfg)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = task.build_model().to(device)
    batch = {k: v.to(device) for k, v in fixed_batch(task, model, args.batch, args.image_size).items()}
    opt = build_optimizer(model, cfg)

    return cfg, model, opt, train_step(model, opt, batch)


def _status_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args: argparse.Namespace) -> int:
    """One variant in a fresh process: the resident set after building (the peak reset there, Linux clear_refs 5),
    and the peak resident set over the training steps."""
    import gc

    torch.set_num_threads(args.threads)
    _, _, _, step = build(args.child, args)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the build's transient peaks do not count
    built = _status_mib("VmRSS")
    losses = [step() for _ in range(args.steps)]
    peak = _status_mib("VmHWM")
    print(json.dumps({"variant": args.child, "rss_built_mib": built, "rss_peak_mib": peak, "losses": losses}))
    return 0


def peak_rss(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--image-size",
           str(args.image_size), "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads),
           "--seed", str(args.seed), "--backbone", args.backbone]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {variant} failed:\n{out.stderr[-3000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["rss_step_mib"] = rec["rss_peak_mib"] - rec["rss_built_mib"]
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    keys = [v.strip() for v in args.variants.split(",")]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or "full" not in keys:
        raise SystemExit(f"--variants must include full and come from {', '.join(VARIANTS)}; got {keys}")
    rows, source = [], ""
    for key in keys:  # one variant at a time in this process (their models never coexist)
        cfg, model, opt, step = build(key, args)
        source = model.backbone.weights_source
        step()  # allocates the optimizer state
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        mem = cpu_step_bytes(model, opt, step) if device.type == "cpu" else cuda_step_bytes(model, opt, step, device)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_head = sum(p.numel() for p in model.head_parameters())
        rows.append({"variant": key, "trainable": n_train, "trainable_without_head": n_train - n_head,
                     "step_ms": statistics.median(times) * 1e3, "memory": mem, "memory_mib": mem["total"] / MIB,
                     "adapter_report": model.adapter.report})  # fmt: skip
        del model, opt, step
    for r in rows:
        r["rss"] = peak_rss(r["variant"], args)
    full = next(r for r in rows if r["variant"] == "full")
    for r in rows:
        r["memory_vs_full"] = r["memory"]["total"] / full["memory"]["total"]
        r["rss_step_vs_full"] = r["rss"]["rss_step_mib"] / full["rss"]["rss_step_mib"]
    kind = "saved-activation + grad + AdamW bytes" if device.type == "cpu" else "CUDA peak above resident + optimizer"
    head = (f"{args.backbone} ({source}), AID, {args.image_size}², batch {args.batch}, {args.device}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    lines = [
        "# LST vs full fine-tuning vs LoRA — training-step memory",
        "",
        f"{head}. Step memory: {kind} (one step after the first). Peak RSS: one fresh process per variant, "
        f"{args.steps} steps; 'step' = peak RSS − RSS after building the model.",
        "",
        "| variant | trainable (w/o head) | ms/step | step MiB | step / full | peak RSS MiB | RSS step MiB | RSS step / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        m, s = r["memory"], r["rss"]
        lines.append(f"| {r['variant']} | {r['trainable']:,} ({r['trainable_without_head']:,}) | {r['step_ms']:.0f} | "
                     f"{m['total'] / MIB:.1f} | {r['memory_vs_full']:.3f} | {s['rss_peak_mib']:.0f} | "
                     f"{s['rss_step_mib']:.0f} | {r['rss_step_vs_full']:.3f} |")  # fmt: skip
    lst = next((r for r in rows if r["variant"] == "lst"), None)
    if lst is not None:
        lines += ["", f"LST / full: step memory **{lst['memory_vs_full']:.3f}**, peak-RSS step "
                  f"**{lst['rss_step_vs_full']:.3f}** (target ≤ 0.30; the paper: 0.31 on T5)."]  # fmt: skip
    print("\n".join(lines))
    if args.out:
        result = {"bench": "lst_memory", "setup": head, "memory_kind": kind, "steps": args.steps, "rows": rows,
                  "recipe": "tasks/classification-aid.yaml", "command": " ".join(sys.argv)}  # fmt: skip
        atomic_write_json(args.out + ".json", result)
        atomic_write_text(args.out + ".md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
