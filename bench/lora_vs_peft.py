"""Our LoRA / PVeRA vs Hugging Face ``peft``'s on the same timm ViT: correctness, train-step time and memory.

``--method lora`` (default) compares LoRA as described below; ``--method pvera`` compares PVeRA the same way:
ours gets ``apply_pvera(PVeRAConfig(r, targets=["qkv"]))``, the copy ``peft.PveraConfig(r, d_initial=0.1)``;
the shared A/B are copied from peft's ``pvera_A`` / ``pvera_B`` (the report says whether the same seed already
gave the same matrices), both λ_d get the same random values and both λ_b the same non-zero ones. The latent is
sampled in training, so the global RNG is re-seeded before each model's step: both draw ε in the same order
and shape, which makes the gradient check cover the sampling path too.

What it measures, all in one run on one machine:

1. Equivalence. The timm backbone is built once (random init, seed 0) and deep-copied before adapting; ours gets
   ``vision_peft.adapters.lora.apply_lora(LoRAConfig(r=8, alpha=16, targets=["qkv"]))``, the copy gets
   ``peft.inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=<the same qkv names>))`` (no
   ``PeftModel`` wrapper, so only the layers are compared). Our ``lora_A`` is copied from peft's
   ``lora_A.default.weight``; both ``lora_B`` get the same non-zero random values (zero B would make any LoRA
   "match"). Checks: eval-mode forward max |Δ| < 1e-5, gradients of every LoRA tensor after one backward (max |Δ|
   <= 1e-4 x the largest gradient; AdamW is scale-invariant, so the step check alone would miss a uniformly
   scaled gradient), and
   eval outputs after one identical AdamW step max |Δ| < 1e-4. Any failure (or unequal trainable parameter
   counts) exits with status 1 after printing the table.
2. Train-step time: forward + backward + AdamW step on a fixed random batch (loss: MSE of the pooled features to
   a fixed random target), ours and peft interleaved (alternating which goes first), median over ``--steps``
   after ``--warmup`` steps each.
3. Memory of one train step. CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the memory
   allocated before it (both models stay resident, so their weights are excluded), plus the optimizer state.
   CPU: bytes of tensors saved for backward (``torch.autograd.graph.saved_tensors_hooks``; deduplicated by
   storage, parameters excluded) + gradient bytes + optimizer-state bytes.

4. Execution levers of ours (LoRA only; ``--no-levers`` skips them): "ours + recompute" (a copy of ours with
   ``vision_peft.recompute.plan_auto``: the fewest blocks from the input side checkpointed so the saved activations
   fall under ``--recompute-budget-mb``) and "ours + compile" (a copy under ``torch.compile``, inductor). Both start
   from ours' weights: their train-mode outputs and LoRA gradients after one backward are checked against ours
   (recompute: bit-exact expected; compile: within the gradient tolerance), then they join the interleaved timing
   (the order of all variants rotates every step) and the memory accounting. Peak RSS is not reported: every
   variant lives in one process, so it cannot be isolated per variant. ``--out PREFIX`` writes PREFIX.json/.md.

Run (from the repository root, with the virtualenv active)::

    python bench/lora_vs_peft.py --model test_vit                     # quick check (seconds)
    python bench/lora_vs_peft.py                                      # vit_small_patch16_224, 224², batch 8
    python bench/lora_vs_peft.py --device cuda --amp --batch 64       # GPU, bf16 autocast
    python bench/lora_vs_peft.py --method pvera --rank 256            # PVeRA, the paper's r
    OMP_NUM_THREADS=2 python bench/lora_vs_peft.py --threads 2 --out bench/results/lora_vs_peft_compute
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters import DeltaLinear
from vision_peft.adapters.lora import LoRAConfig, apply_lora
from vision_peft.adapters.pvera import PVeRAConfig, apply_pvera
from vision_peft.backbones import build_backbone
from vision_peft.config import BackboneConfig
from vision_peft.recompute import find_units, plan_auto

FORWARD_TOL = 1e-5  # eval-mode forward, equal weights
AFTER_STEP_TOL = 1e-4  # eval-mode forward after one identical AdamW step
GRAD_RTOL = 1e-4  # LoRA gradients after one backward, relative to the largest gradient


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="Our LoRA/PVeRA vs HF peft's on a timm model: parity, step time, memory.")
    p.add_argument("--method", choices=["lora", "pvera"], default="lora", help="which adapter to compare")
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name (test_vit for a fast check)")
    p.add_argument("--image-size", type=int, default=224, help="square input size")
    p.add_argument("--batch", type=int, default=8, help="batch size of the train steps")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r / PVeRA latent width r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in the timed/measured train steps")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and of the shared random lora_B")
    p.add_argument("--recompute-budget-mb", type=float, default=150.0, help="ours + recompute: saved-activation budget")
    p.add_argument("--no-levers", action="store_true", help="skip the ours + recompute / ours + compile rows")
    p.add_argument("--out", default=None, help="write the results to OUT.json and OUT.md")
    return p.parse_args(argv)


# -- building the two models -------------------------------------------------------------------------------
def build_pair(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, list[str], torch.Tensor, dict]:
    """(ours, peft's, adapted module names, the frozen backbone's output on the check batch, facts to report).

    Both start from one random-init timm backbone; LoRA factors are made identical and B non-zero.
    """
    import peft

    if args.method == "pvera":
        return build_pvera_pair(args)

    bb = build_backbone(BackboneConfig(name=f"timm:{args.model}", pretrained=False, image_size=args.image_size))
    bb.requires_grad_(False).eval()
    other = copy.deepcopy(bb)

    ours_cfg = LoRAConfig(r=args.rank, alpha=args.alpha, targets=["qkv"])
    handle = apply_lora(bb, ours_cfg)
    names = list(handle.touched)
    peft_cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=names, lora_dropout=0.0, bias="none")
    other = peft.inject_adapter_in_model(peft_cfg, other)

    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name in names:
            mine, theirs = bb.get_submodule(name), other.get_submodule(name)
            if not (isinstance(mine, DeltaLinear) and mine.factors_attr == "lora"):
                raise TypeError(f"{name}: expected our LoRA DeltaLinear, got {type(mine).__name__}")
            a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight  # (r, in), (out, r)
            if a.shape != mine.lora.lora_A.shape or b.shape != mine.lora.lora_B.shape:
                raise ValueError(
                    f"{name}: LoRA shapes differ: ours A{tuple(mine.lora.lora_A.shape)} "
                    f"B{tuple(mine.lora.lora_B.shape)}, peft A{tuple(a.shape)} B{tuple(b.shape)}"
                )
            if abs(mine.lora.scale - theirs.scaling["default"]) > 1e-12:
                raise ValueError(f"{name}: scale differs: ours {mine.lora.scale}, peft {theirs.scaling['default']}")
            mine.lora.lora_A.copy_(a)
            # B = 0 would make every forward "match"; both get the same non-zero B.
            b_rand = torch.randn(b.shape, generator=gen) * 0.1
            b.copy_(b_rand)
            mine.lora.lora_B.zero_()  # keep B = 0 for a moment: the frozen output is the reference below
    x = check_batch(args, bb)
    with torch.no_grad():
        frozen_out = bb(x)
        for name in names:
            bb.get_submodule(name).lora.lora_B.copy_(other.get_submodule(name).lora_B["default"].weight)
    return bb, other, names, frozen_out, {}


def build_pvera_pair(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, list[str], torch.Tensor, dict]:
    """As :func:`build_pair`, for PVeRA: shared A/B copied from peft, λ_d random, λ_b random and non-zero."""
    import peft

    bb = build_backbone(BackboneConfig(name=f"timm:{args.model}", pretrained=False, image_size=args.image_size))
    bb.requires_grad_(False).eval()
    other = copy.deepcopy(bb)
    handle = apply_pvera(bb, PVeRAConfig(r=args.rank, targets=["qkv"], seed=args.seed))
    names = list(handle.touched)
    peft_cfg = peft.PveraConfig(
        r=args.rank, target_modules=names, d_initial=0.1, pvera_dropout=0.0, projection_prng_key=args.seed
    )
    # PVeRA's shared A/B live on the tuner, so peft refuses inject_adapter_in_model; get_peft_model adapts
    # ``other`` in place, and the plain module is what runs below (same call signature as ours)
    peft.get_peft_model(other, peft_cfg)
    first = other.get_submodule(names[0])
    a, b = first.pvera_A["default"], first.pvera_B["default"]
    if a.shape != bb.pvera_shared.A.shape or b.shape != bb.pvera_shared.B.shape:
        raise ValueError(
            f"shared projections differ in shape: ours A{tuple(bb.pvera_shared.A.shape)} "
            f"B{tuple(bb.pvera_shared.B.shape)}, peft A{tuple(a.shape)} B{tuple(b.shape)}"
        )
    same_seed_same_ab = bool(torch.equal(a, bb.pvera_shared.A) and torch.equal(b, bb.pvera_shared.B))
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        bb.pvera_shared.A.copy_(a)
        bb.pvera_shared.B.copy_(b)
        for name in names:
            mine, theirs = bb.get_submodule(name), other.get_submodule(name)
            if not (isinstance(mine, DeltaLinear) and mine.factors_attr == "pvera"):
                raise TypeError(f"{name}: expected our PVeRA DeltaLinear, got {type(mine).__name__}")
            ld, lb = theirs.pvera_lambda_d["default"], theirs.pvera_lambda_b["default"]
            if ld.shape != mine.pvera.lambda_d.shape or lb.shape != mine.pvera.lambda_b.shape:
                raise ValueError(
                    f"{name}: λ shapes differ: ours {tuple(mine.pvera.lambda_d.shape)}, peft {tuple(ld.shape)}"
                )
            ld.copy_(0.1 + 0.05 * torch.randn(ld.shape, generator=gen))
            mine.pvera.lambda_d.copy_(ld)
            lb.copy_(torch.randn(lb.shape, generator=gen))  # λ_b = 0 would make any PVeRA "match"
    x = check_batch(args, bb)
    with torch.no_grad():
        ref = copy.deepcopy(bb)
        for name in names:
            ref.get_submodule(name).pvera.lambda_b.zero_()
        frozen_out = ref(x)
        for name in names:
            bb.get_submodule(name).pvera.lambda_b.copy_(other.get_submodule(name).pvera_lambda_b["default"])
    return bb, other, names, frozen_out, {"same seed gave the same shared A/B as peft": same_seed_same_ab}


def check_batch(args: argparse.Namespace, model: nn.Module) -> torch.Tensor:
    """A fixed random batch (B, 3, H, W) at the model's input size."""
    g = torch.Generator().manual_seed(args.seed + 1)
    h, w = model.input_size
    return torch.randn(args.batch, 3, h, w, generator=g)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with ``requires_grad``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_grads(model: nn.Module, names: list[str], ours: bool, method: str = "lora") -> list[torch.Tensor]:
    """Gradients of the trained tensors of every adapted module (LoRA: A, B; PVeRA: λ_d, λ_b), in a fixed order."""
    out = []
    for name in names:
        mod = model.get_submodule(name)
        if method == "pvera":
            out += (
                [mod.pvera.lambda_d.grad, mod.pvera.lambda_b.grad]
                if ours
                else [mod.pvera_lambda_d["default"].grad, mod.pvera_lambda_b["default"].grad]
            )
        elif ours:
            out += [mod.lora.lora_A.grad, mod.lora.lora_B.grad]
        else:
            out += [mod.lora_A["default"].weight.grad, mod.lora_B["default"].weight.grad]
    return out


# -- one train step and its measurements -------------------------------------------------------------------
def make_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor, amp: bool
) -> Callable[[], float]:
    """A closure running forward + backward + optimizer step; returns the loss."""

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model(x)  # (B, embed_dim) pooled features
        loss = F.mse_loss(feats.float(), target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (exp_avg, exp_avg_sq, step)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def grad_bytes(model: nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for _, p in trainable(model) if p.grad is not None)


def cpu_step_bytes(model: nn.Module, opt: torch.optim.Optimizer, step: Callable[[], float]) -> dict[str, int]:
    """Saved-for-backward bytes (deduplicated by storage, parameters/buffers excluded), grads, optimizer state."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    saved, grads, state = sum(seen.values()), grad_bytes(model), optimizer_bytes(opt)
    return {"saved": saved, "grads": grads, "optimizer": state, "total": saved + grads + state}


def cuda_step_bytes(
    model: nn.Module, opt: torch.optim.Optimizer, step: Callable[[], float], device: torch.device
) -> dict[str, int]:
    """Peak allocated during one step above the memory allocated before it, plus the optimizer state."""
    opt.zero_grad(set_to_none=True)
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    state = optimizer_bytes(opt)
    return {
        "peak_above_resident": peak,
        "grads": grad_bytes(model),
        "optimizer": state,
        "total": peak + state,
        "max_allocated": torch.cuda.max_memory_allocated(device),
    }


# -- report ------------------------------------------------------------------------------------------------
def write_results(prefix: str, result: dict) -> None:
    """PREFIX.json (everything) and PREFIX.md (the levers table), each written atomically."""
    lines = [
        f"# LoRA levers vs peft — {result['model']} {result['image_size']}², batch {result['batch']}, r={result['rank']}",
        "",
        f"device {result['device']}, {result['threads']} threads, torch {result['torch']}, peft {result['peft']}, "
        f"{result['warmup']} warm-up + {result['steps']} timed steps per variant, interleaved (order rotates every "
        f"step); memory: {result['memory_kind']}. Input: {result['input']}.",
        "",
        "| variant | ms/step | time / peft | MiB | memory / peft | output max Δ vs ours | grad max Δ vs ours |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mem_s = f"{r['memory_mib']:.1f}" if r["memory_mib"] is not None else "n/a"
        mr = f"{r['memory_vs_peft']:.3f}" if r["memory_vs_peft"] is not None else "n/a"
        od = f"{r['output_max_abs_diff']:.3g}" if "output_max_abs_diff" in r else "-"
        gd = f"{r['grad_max_abs_diff']:.3g}" if "grad_max_abs_diff" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.1f} | {r['time_vs_peft']:.3f} | {mem_s} | {mr} | {od} | {gd} |"
        )
    rc = result.get("recompute")
    if rc:
        lines += ["", f"recompute: checkpointed {', '.join(rc['checkpointed']) or 'nothing'} (budget "
                  f"{rc['budget_mb']:g} MiB; saved activations {rc['saved_mb_without']:.1f} MiB -> estimated "
                  f"{rc['saved_mb_estimated']:.1f}, measured {rc['saved_mb_measured']:.1f} MiB)."]  # fmt: skip
    lines += ["", "Failures: " + ("; ".join(result["failures"]) if result["failures"] else "none") + "."]
    for suffix, text in ((".json", json.dumps(result, indent=2, default=str)), (".md", "\n".join(lines) + "\n")):
        path = prefix + suffix
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def fmt_row(label: str, ours: str, theirs: str, ratio: str) -> str:
    return f"| {label:<58} | {ours:>12} | {theirs:>12} | {ratio:>10} |"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 when outputs, gradients and parameter counts match; 1 otherwise.
    """
    import peft
    import timm

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} but CUDA is not available here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    ours, theirs, names, frozen_out, facts = build_pair(args)
    label = "LoRA" if args.method == "lora" else "PVeRA"
    ours.to(device)
    theirs.to(device)
    x = check_batch(args, ours).to(device)
    frozen_out = frozen_out.to(device)
    target = torch.randn(frozen_out.shape, generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    n_ours = sum(p.numel() for _, p in trainable(ours))
    n_peft = sum(p.numel() for _, p in trainable(theirs))
    n_total = sum(p.numel() for p in ours.parameters())
    failures: list[str] = []
    if n_ours != n_peft:
        failures.append(f"trainable parameter counts differ: ours {n_ours:,}, peft {n_peft:,}")

    # 1a. forward parity in eval mode, fp32.
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        out_ours, out_peft = ours(x), theirs(x)
    fwd_diff = float((out_ours - out_peft).abs().max())
    lora_effect = float((out_ours - frozen_out).abs().max())
    if not fwd_diff < FORWARD_TOL:
        failures.append(f"forward max |Δ| {fwd_diff:.3g} >= {FORWARD_TOL}")

    # 4 (set-up). the execution levers start from ours' weights, before the AdamW step below changes them
    levers: dict[str, nn.Module] = {}
    lever_facts: dict[str, object] = {}
    if args.method == "lora" and not args.no_levers:
        rc = copy.deepcopy(ours).train()
        lever_facts["recompute"] = plan_auto(
            rc, lambda: rc(x), find_units(rc), int(args.recompute_budget_mb * 2**20), device
        )
        levers["ours + recompute"] = rc
        levers["ours + compile"] = torch.compile(copy.deepcopy(ours).train())

    # 1b. gradients and one identical AdamW step, fp32, train mode (test_vit/vit_small have no dropout by default).
    ours.train()
    theirs.train()
    with torch.no_grad():
        train_out = ours(x)  # ours' train-mode output at the weights the levers copied (before the step below)
    opt_ours = torch.optim.AdamW([p for _, p in trainable(ours)], lr=args.lr)
    opt_peft = torch.optim.AdamW([p for _, p in trainable(theirs)], lr=args.lr)
    torch.manual_seed(args.seed + 3)  # PVeRA samples ε in training: the same draws for both
    make_step(ours, opt_ours, x, target, amp=False)()
    torch.manual_seed(args.seed + 3)
    make_step(theirs, opt_peft, x, target, amp=False)()
    g_ours = adapter_grads(ours, names, True, args.method)
    g_peft = adapter_grads(theirs, names, False, args.method)
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(g_ours, g_peft))
    grad_scale = max(float(b.abs().max()) for b in g_peft)
    if not grad_diff <= GRAD_RTOL * grad_scale:
        failures.append(f"{label} gradient max |Δ| {grad_diff:.3g} > {GRAD_RTOL:g} x max |grad| {grad_scale:.3g}")
    lever_opts: dict[str, torch.optim.Optimizer] = {}
    lever_parity: dict[str, dict[str, float]] = {}
    for key, mod in levers.items():
        lever_opts[key] = torch.optim.AdamW([p for _, p in trainable(mod)], lr=args.lr)
        lever_opts[key].zero_grad(set_to_none=True)
        out = mod(x)
        F.mse_loss(out.float(), target).backward()
        grads = adapter_grads(getattr(mod, "_orig_mod", mod), names, True)
        d_out = float((out.detach() - train_out).abs().max())
        d_grad = max(float((a - b).abs().max()) for a, b in zip(grads, g_ours))
        lever_parity[key] = {"output_max_abs_diff": d_out, "grad_max_abs_diff": d_grad}
        tol = 0.0 if key == "ours + recompute" else GRAD_RTOL * grad_scale
        if not d_grad <= tol:
            failures.append(f"{key}: LoRA gradient max |Δ| vs ours {d_grad:.3g} > {tol:.3g}")
        if not d_out <= (0.0 if key == "ours + recompute" else FORWARD_TOL * 10):
            failures.append(f"{key}: train-mode output max |Δ| vs ours {d_out:.3g}")
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        step_diff = float((ours(x) - theirs(x)).abs().max())
    if not step_diff < AFTER_STEP_TOL:
        failures.append(f"after one AdamW step, max |Δ| {step_diff:.3g} >= {AFTER_STEP_TOL}")
    ours.train()
    theirs.train()

    # 2. interleaved timing.
    steps = {
        "ours": make_step(ours, opt_ours, x, target, args.amp),
        "peft": make_step(theirs, opt_peft, x, target, args.amp),
        **{key: make_step(mod, lever_opts[key], x, target, args.amp) for key, mod in levers.items()},
    }
    keys = list(steps)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(args.warmup + args.steps):
        order = keys[i % len(keys) :] + keys[: i % len(keys)]  # rotate: contention hits every variant alike
        if len(keys) == 2 and i % 2:
            order = ["peft", "ours"]
        for key in order:
            sync(device)
            t0 = time.perf_counter()
            steps[key]()
            sync(device)
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    # 3. memory of one step.
    if device.type == "cuda":
        mem = {
            "ours": cuda_step_bytes(ours, opt_ours, steps["ours"], device),
            "peft": cuda_step_bytes(theirs, opt_peft, steps["peft"], device),
        }
        mem_label = "CUDA: step peak above resident + optimizer state (MiB)"
    else:
        mem = {
            "ours": cpu_step_bytes(ours, opt_ours, steps["ours"]),
            "peft": cpu_step_bytes(theirs, opt_peft, steps["peft"]),
        }
        mem_label = "CPU: saved-activation + grad + optimizer bytes (MiB)"
    for key, mod in levers.items():
        try:
            if device.type == "cuda":
                mem[key] = cuda_step_bytes(mod, lever_opts[key], steps[key], device)
            else:
                mem[key] = cpu_step_bytes(mod, lever_opts[key], steps[key])
        except Exception as e:  # noqa: BLE001 - e.g. saved-tensor hooks refused inside a compiled graph
            mem[key] = {"error": f"{type(e).__name__}: {e}"[:200]}

    mib = 2.0**20
    h, w = ours.input_size
    print(
        f"# our {label} vs peft {peft.__version__} {label} | timm:{args.model} {h}x{w}, batch {args.batch}, "
        f"r={args.rank}{f', alpha={args.alpha:g}' if args.method == 'lora' else ''}, targets qkv ({len(names)} modules)"
    )
    print(
        f"# device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
        f"amp {'bf16' if args.amp else 'off'}, {args.warmup} warm-up + {args.steps} timed steps each, interleaved"
    )
    print(
        f"# forward max |Δ| (eval, fp32, {'B' if args.method == 'lora' else 'λ_b'}≠0): {fwd_diff:.3g} "
        f"(tol {FORWARD_TOL:g}); {label} effect on output vs frozen: {lora_effect:.3g}"
    )
    print(
        f"# {label} grad max |Δ| after one backward (train mode): {grad_diff:.3g} (tol {GRAD_RTOL:g} x max |grad| {grad_scale:.3g}); "
        f"output max |Δ| after one AdamW step: {step_diff:.3g} (tol {AFTER_STEP_TOL:g})"
    )
    for fact, value in facts.items():
        print(f"# {fact}: {value}")
    print()
    print(fmt_row("metric", "ours", "peft", "ours/peft"))
    print(f"|{'-' * 60}|{'-' * 14}|{'-' * 14}|{'-' * 12}|")
    print(
        fmt_row(
            f"train step ms (median of {args.steps})",
            f"{med['ours']:.1f}",
            f"{med['peft']:.1f}",
            f"{med['ours'] / med['peft']:.3f}",
        )
    )
    print(
        fmt_row(
            mem_label,
            f"{mem['ours']['total'] / mib:.1f}",
            f"{mem['peft']['total'] / mib:.1f}",
            f"{mem['ours']['total'] / mem['peft']['total']:.3f}",
        )
    )
    if device.type == "cuda":
        parts = {
            "peak_above_resident": "  of which step peak (activations, grads, workspace)",
            "grads": "    (grads alone)",
            "optimizer": "  of which optimizer state",
        }
    else:
        parts = {
            "saved": "  of which saved activations",
            "grads": "  of which grads",
            "optimizer": "  of which optimizer",
        }
    for part, label in parts.items():
        a, b = mem["ours"][part], mem["peft"][part]
        print(fmt_row(f"{label} (MiB)", f"{a / mib:.2f}", f"{b / mib:.2f}", f"{a / b:.3f}" if b else "-"))
    if device.type == "cuda":
        a, b = mem["ours"]["max_allocated"], mem["peft"]["max_allocated"]
        print(
            fmt_row(
                "  max_memory_allocated, both models resident (MiB)", f"{a / mib:.1f}", f"{b / mib:.1f}", f"{a / b:.3f}"
            )
        )
    print(fmt_row(f"trainable params (of {n_total:,})", f"{n_ours:,}", f"{n_peft:,}", f"{n_ours / n_peft:.3f}"))
    lever_rows = []
    if levers:
        print()
        print(fmt_row("execution lever (LoRA), vs peft default", "ms/step", "MiB", "time, mem/peft"))
        print(f"|{'-' * 60}|{'-' * 14}|{'-' * 14}|{'-' * 12}|")
        for key in ["peft", "ours", *levers]:
            m = mem[key]
            tot = m.get("total")
            t_ratio = med[key] / med["peft"]
            m_ratio = tot / mem["peft"]["total"] if tot is not None else None
            lever_rows.append(
                {"variant": key, "step_ms": med[key], "time_vs_peft": t_ratio, "memory_mib": tot / mib if tot else None,
                 "memory_vs_peft": m_ratio, "memory": m, **lever_parity.get(key, {})}
            )  # fmt: skip
            mem_s = f"{tot / mib:.1f}" if tot is not None else "n/a"
            ratio_s = f"{t_ratio:.3f}, {m_ratio:.3f}" if m_ratio is not None else f"{t_ratio:.3f}, n/a"
            print(fmt_row(key, f"{med[key]:.1f}", mem_s, ratio_s))
        rc = lever_facts["recompute"]
        print(
            f"# recompute: {len(rc['checkpointed'])} of {len(find_units(levers['ours + recompute']))} blocks "
            f"checkpointed (budget {rc['budget_mb']:g} MiB; saved {rc['saved_mb_without']:.1f} -> estimated "
            f"{rc['saved_mb_estimated']:.1f}, measured {rc['saved_mb_measured']:.1f} MiB)"
        )
        for key, par in lever_parity.items():
            print(f"# {key}: train-mode output max |Δ| vs ours {par['output_max_abs_diff']:.3g}, "
                  f"LoRA grad max |Δ| {par['grad_max_abs_diff']:.3g}")  # fmt: skip
    if args.out:
        result = {
            "bench": "lora_vs_peft", "method": args.method, "model": f"timm:{args.model}", "image_size": h,
            "batch": args.batch, "rank": args.rank, "alpha": args.alpha, "device": str(device),
            "threads": torch.get_num_threads(), "amp": args.amp, "torch": torch.__version__,
            "peft": peft.__version__, "timm": timm.__version__, "warmup": args.warmup, "steps": args.steps,
            "seed": args.seed, "input": "fixed random batch (seed + 1), MSE to a fixed random target (seed + 2)",
            "memory_kind": mem_label, "step_ms": med, "memory": mem, "parity": {
                "forward_max_abs_diff": fwd_diff, "grad_max_abs_diff": grad_diff, "after_step_max_abs_diff": step_diff,
                "levers": lever_parity},
            "recompute": lever_facts.get("recompute"), "rows": lever_rows, "failures": failures,
        }  # fmt: skip
        write_results(args.out, result)
    if failures:
        print("\nFAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("\nparity OK: forward, gradients (see above) and one optimizer step match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
