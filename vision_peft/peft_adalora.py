"""AdaLoRA ↔ Hugging Face ``peft``'s ``AdaLoraConfig`` (peft_type ``ADALORA``): :func:`adalora_peft_model` for
:func:`vision_peft.peft_interop.export_peft` (a faithful AdaLoRA export, not a LoRA with λ folded in), and
:func:`read_adalora` / :func:`fill_adalora` for :func:`vision_peft.peft_import.import_peft` (the reverse).

Ours (``vision_peft/adapters/adalora.py``) and peft 0.21.2's ``SVDLinear`` hold the same triplets: Q = ``lora_A``
(init_r × fan_in), λ = ``lora_E`` (ours (init_r,), peft's (init_r, 1)), P = ``lora_B`` (fan_out × init_r). What maps
to what, from peft's ``tuners/adalora`` (layer.py, model.py):

- ``rank_pattern`` = our masks: ``{"<library module>.lora_E": [live₁, …, live_init_r]}`` for every adapted layer.
  peft's ``get_peft_model_state_dict`` keeps only the live rows of A / λ and columns of B
  (``resize_state_dict_by_rank_pattern``), so a masked triplet is absent from ``adapter_model.safetensors``; on
  load ``resize_modules_by_rank_pattern`` rebuilds each layer at its live rank (0 is allowed: tensors of shape
  (0, fan_in) / (0, 1) / (fan_out, 0), which add exactly nothing) and restores ``ranknum`` = init_r.
- The scale: peft multiplies by ``lora_alpha / (ranknum + 1e-5)`` with ranknum = init_r after the resize, ours by
  alpha / init_r. ``lora_alpha`` = our alpha and the written λ = ours · (init_r + 1e-5) / init_r, so the loaded
  model computes our update (to float32 round-off) instead of one 1e-5 / init_r smaller.
- live = our ``mask`` or λ ≠ 0: the engine masks λ right after an optimizer step, so a run that ends between two
  allocations (deltaT > 1 and no tfinal) can hold masked triplets whose λ has moved again; the run's own model
  (predict, ONNX) uses them, so they are exported too and counted in the summary (``masked_but_nonzero``). With a
  final phase (tfinal > 0) the last step allocates and every masked λ is exactly 0.
- The schedule (init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight) is copied, and
  ``total_step`` is the run's total optimizer steps (peft requires it, it matters only for further training). The
  sensitivity averages (Ī, Ū) are not exported: peft does not save its ``RankAllocator``'s state either.

The reverse reads the same mapping backwards: init_r, lora_alpha, the schedule and ``rank_pattern`` become our
AdaLoRA config and masks; the triplets a pattern pruned are not in peft's file, so they come back as zeros (mask 0,
no effect on outputs; in further training they could not revive, as their P and Q are lost). Only ``nn.Linear``
targets import.

Loading warns twice, harmlessly (peft 0.21.2): its generic LoRA check says the ``rank_pattern`` keys "did not match
any targeted module" (they name ``<module>.lora_E``, the form peft's own ``RankAllocator`` writes and its AdaLoRA
resize reads), and rank-0 layers' zero-sized tensors are flagged as possibly unsharded (ZeRO-3 / FSDP).

Refused, with the reason and the fix: AdaLoRA in weight space (k×k / 1×1 convolutions, Conv1d, open_clip's fused
``nn.MultiheadAttention``): ours re-parameterises the weight, peft's ``SVDConv2d`` runs ``F.conv2d`` with a Δ
kernel and the base conv's stride / padding (timm's TF-"same" dynamic padding and grouped kernels differ, as for
LoRA), and peft's AdaLoRA has no MultiheadAttention layer at all. Train AdaLoRA on Linear targets (qkv, mlp of a
timm ViT; mlp of an open_clip tower) to share it as a peft adapter, or deploy the merged ONNX bundle.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.adapters.adalora import AdaLoRAConfig, AdaLoRATriplets
from vision_peft.adapters.base import DeltaLinear
from vision_peft.config import RunConfig
from vision_peft.peft_interop import PeftInteropError, _Layout
from vision_peft.rundir import RunInfo

PEFT_RANKNUM_EPS = 1e-5  # peft's SVDLinear divides by (ranknum + 1e-5)


def _triplets(bb: nn.Module, layout: _Layout, run_dir: str) -> dict[str, AdaLoRATriplets]:
    """Library module name → our triplets, for every AdaLoRA layer on the activation path; refuses the others."""
    linear = {n: m.factors for n, m in bb.named_modules() if isinstance(m, DeltaLinear)
              and isinstance(m.factors, AdaLoRATriplets)}  # fmt: skip
    weight_space = [
        f"{n} ({type(m).__name__}.{t})"
        for n, m in bb.named_modules()
        if parametrize.is_parametrized(m)
        for t, plist in m.parametrizations.items()
        if any(isinstance(x, AdaLoRATriplets) for p in plist for x in p.modules())
    ]
    if weight_space or not linear:
        raise PeftInteropError(
            f"{run_dir}: AdaLoRA on {weight_space[:3] or 'no Linear layer'} is adapted in weight space, which peft "
            "cannot reproduce: its SVDConv2d runs a Δ-kernel conv with the base layer's padding (timm's TF-'same' "
            "dynamic padding, grouped kernels differ) and its AdaLoRA has no nn.MultiheadAttention layer. Train "
            "AdaLoRA on Linear targets (adapter.targets=[qkv, mlp] on a timm ViT) to share it as a peft adapter, or "
            f"deploy the merged ONNX bundle (`python -m vision_peft export {run_dir}`)"
        )
    out = {}
    for name, t in linear.items():
        if not name.startswith(layout.prefix):
            raise PeftInteropError(f"{run_dir}: adapted module {name} lies outside the library model")
        out[name[len(layout.prefix) :]] = t
    return out


def live_triplets(t: AdaLoRATriplets) -> torch.Tensor:
    """The triplets that act on the run's outputs: the mask's, plus any masked one whose λ is not exactly 0."""
    return (t.mask.detach() > 0) | (t.lora_E.detach() != 0)


def adalora_peft_model(model: nn.Module, base: nn.Module, layout: _Layout, cfg: RunConfig, mts: list[str] | None,
                       run_dir: str) -> tuple[nn.Module, int, dict]:  # fmt: skip
    """A peft AdaLoRA PeftModel (inference mode) on ``base`` holding the run's triplets and masks.

    Returns (PeftModel, tensors filled, summary fields). ``peft_config["default"].rank_pattern`` is set, so
    ``get_peft_model_state_dict`` writes the live triplets only.

    Raises:
        PeftInteropError: a weight-space AdaLoRA layer (see the module docstring), or peft built a layer of another
            shape / scale than ours.
    """
    from peft import AdaLoraConfig, get_peft_model

    ac: AdaLoRAConfig = cfg.adapter  # type: ignore[assignment]
    layers = _triplets(model.backbone, layout, run_dir)
    names = sorted(layers)
    total = RunInfo.read(run_dir).steps.total
    if ac.tinit + ac.tfinal >= total:  # peft's AdaLoraConfig refuses it; our run could not have trained with it
        raise PeftInteropError(
            f"{run_dir}/config.json: tinit {ac.tinit} + tfinal {ac.tfinal} >= the run's {total} steps, which peft's "
            "AdaLoraConfig refuses (no budget phase); this run's config.json or its steps are inconsistent"
        )
    pcfg = AdaLoraConfig(
        init_r=ac.init_r, target_r=ac.target_r, lora_alpha=ac.alpha, target_modules=names, lora_dropout=0.0,
        bias="none", modules_to_save=mts, total_step=total, tinit=ac.tinit, tfinal=ac.tfinal, deltaT=ac.deltaT,
        beta1=ac.beta1, beta2=ac.beta2, orth_reg_weight=ac.orth_reg_weight, inference_mode=True,
    )  # fmt: skip
    pm = get_peft_model(copy.deepcopy(base), pcfg)
    filled, pattern, masked_nonzero = 0, {}, 0
    with torch.no_grad():
        for n in names:
            ours, theirs = layers[n], pm.base_model.model.get_submodule(n)
            a, e, b = theirs.lora_A["default"], theirs.lora_E["default"], theirs.lora_B["default"]
            if a.shape != ours.lora_A.shape or b.shape != ours.lora_B.shape or e.shape != (ours.lora_E.numel(), 1):
                raise PeftInteropError(
                    f"{run_dir}: {n}: peft built A{tuple(a.shape)} λ{tuple(e.shape)} B{tuple(b.shape)}, the run has "
                    f"A{tuple(ours.lora_A.shape)} λ{tuple(ours.lora_E.shape)} B{tuple(ours.lora_B.shape)}"
                )
            ranknum, alpha = float(theirs.ranknum["default"]), float(theirs.scaling["default"])
            if ranknum != ac.init_r or not math.isclose(alpha, ac.alpha):
                raise PeftInteropError(f"{run_dir}: {n}: peft's ranknum {ranknum} / lora_alpha {alpha} != "
                                       f"init_r {ac.init_r} / alpha {ac.alpha}")  # fmt: skip
            live = live_triplets(ours)
            masked_nonzero += int((live & (ours.mask == 0)).sum())
            # peft's scale lora_alpha / (init_r + 1e-5) → λ carries the ratio to ours
            lam = ours.lora_E.detach().float() * live * (float(ours.scale) * (ranknum + PEFT_RANKNUM_EPS) / alpha)
            a.copy_(ours.lora_A)
            e.copy_(lam[:, None])  # (init_r,) → peft's (init_r, 1)
            b.copy_(ours.lora_B)
            pattern[f"{n}.lora_E"] = [bool(v) for v in live.tolist()]
            filled += 3
    pm.peft_config["default"].rank_pattern = pattern
    ranks = [sum(pattern[f"{n}.lora_E"]) for n in names]
    return pm, filled, {"target_modules": len(names), "ranks": sorted(set(ranks)), "triplets": sum(ranks),
                        "rank_per_module": dict(zip(names, ranks)), "masked_but_nonzero": masked_nonzero,
                        "init_r": ac.init_r, "total_step": total}  # fmt: skip


# -- peft → ours (vision_peft.peft_import.import_peft on a peft_type ADALORA folder) ------------------------------
def read_adalora(data: dict, lib_tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module], matched: list[str],
                 layout: _Layout, cfg_path: Path, w_path: Path) -> tuple[dict[str, tuple], dict, set[str]]:  # fmt: skip
    """A peft ADALORA folder's tensors → (our module name → (A, λ, B, mask) at init_r, our adapter section, the
    tensor keys used). Triplets the ``rank_pattern`` pruned are absent from peft's file: they come back as zeros with
    mask 0 (no effect; such a run predicts / exports exactly, but those triplets cannot revive in further training).
    λ is rescaled from peft's lora_alpha / (init_r + 1e-5) to our alpha / init_r.

    Raises:
        PeftInteropError: a non-Linear target, a missing tensor, a rank_pattern entry that does not fit the tensors
            or names no target (each naming the file and the fix).
    """
    init_r, alpha = data.get("init_r"), data.get("lora_alpha")
    if not isinstance(init_r, int) or init_r < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise PeftInteropError(f"{cfg_path}: init_r ({init_r!r}) must be a positive int and lora_alpha ({alpha!r}) "
                               "positive; save the adapter again with peft's save_pretrained")  # fmt: skip
    pattern = dict(data.get("rank_pattern") or {})
    stray = sorted(set(pattern) - {f"{n}.lora_E" for n in matched})
    if stray:
        raise PeftInteropError(
            f"{cfg_path}: rank_pattern names {stray[:3]}, which are no target of this adapter on {layout.family} "
            "(keys are <module>.lora_E); save config and weights together"
        )
    ratio = (alpha / (init_r + PEFT_RANKNUM_EPS)) / (alpha / init_r)  # peft's scale / ours
    factors, used = {}, set()
    for n in matched:
        mod = modules[n]
        if not isinstance(mod, nn.Linear):
            raise PeftInteropError(f"{cfg_path}: target {n} is a {type(mod).__name__}; vision_peft imports AdaLoRA on "
                                   "nn.Linear modules only (peft's SVDConv2d is not reproduced); re-train with Linear "
                                   "targets")  # fmt: skip
        keys = [f"{n}.{t}" for t in ("lora_A", "lora_E", "lora_B")]
        missing = [k for k in keys if k not in lib_tensors]
        if missing:
            raise PeftInteropError(f"{w_path} lacks base_model.model.{missing[0]} for target {n}; save config and "
                                   "weights together with save_pretrained")  # fmt: skip
        a, e, b = (lib_tensors[k].float() for k in keys)
        used |= set(keys)
        live = pattern.get(f"{n}.lora_E", [True] * init_r)
        fan_out, fan_in = mod.weight.shape
        r = a.shape[0] if a.dim() == 2 else -1
        fits = isinstance(live, list) and len(live) == init_r and all(isinstance(v, bool) for v in live)
        if not fits or sum(live) != r or a.shape[1] != fan_in or e.shape != (r, 1) or b.shape != (fan_out, r):
            raise PeftInteropError(
                f"{w_path}: {n} holds lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)}, lora_B {tuple(b.shape)}; "
                f"{cfg_path} says init_r {init_r} with rank_pattern {live if isinstance(live, list) else '?'} and the "
                f"layer is {fan_out}×{fan_in}: they do not fit (another model size, or config and weights not saved "
                "together)"
            )
        keep = torch.tensor(live)
        full_a, full_e, full_b = torch.zeros(init_r, fan_in), torch.zeros(init_r), torch.zeros(fan_out, init_r)
        full_a[keep], full_e[keep], full_b[:, keep] = a, e[:, 0] * ratio, b
        factors[layout.prefix + n] = (full_a, full_e, full_b, keep.float())
    schedule = {k: data[k] for k in ("tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight") if k in data}
    section = {"name": "adalora", "init_r": init_r, "target_r": min(int(data.get("target_r") or init_r), init_r),
               "alpha": float(alpha), "targets": sorted(factors), "seed": 0, **schedule}  # fmt: skip
    return factors, section, used


@torch.no_grad()
def fill_adalora(model: nn.Module, factors: dict[str, tuple]) -> None:
    """Copy :func:`read_adalora`'s triplets and masks into a freshly built AdaLoRA model."""
    for name, (a, e, b, mask) in factors.items():
        t = model.backbone.get_submodule(name).factors
        t.lora_A.copy_(a)
        t.lora_E.copy_(e)
        t.lora_B.copy_(b)
        t.mask.copy_(mask)
