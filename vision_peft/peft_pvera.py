"""PVeRA → Hugging Face ``peft``'s ``PveraConfig`` for :func:`vision_peft.peft_interop.export_peft` (the mapping is
described in that module's docstring): the shared frozen projections travel as peft's saved projections, λ_d / λ_b
per layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.adapters.base import DeltaLinear
from vision_peft.peft_interop import PeftInteropError, _Layout


def pvera_peft_model(model, base, layout: _Layout, cfg, mts, run_dir: str) -> tuple[nn.Module, int, dict]:
    """PVeRA → peft's PveraConfig: the shared A (2r × max fan-in) / B (max fan-out × r) as peft's saved projections
    (``save_projection``), λ_d / λ_b per layer. Exact at inference (z = μ; peft's ``sample_at_inference`` false)
    when every adapted layer is an ``nn.Linear`` on the activation path, which is all peft's PVeRA covers."""
    from peft import PveraConfig, get_peft_model

    bb = model.backbone
    layers = {n: m for n, m in bb.named_modules() if isinstance(m, DeltaLinear) and m.factors_attr == "pvera"}
    other = [n for n, m in bb.named_modules() if hasattr(m, "pvera") and n not in layers]
    other += [n for n, m in bb.named_modules() if parametrize.is_parametrized(m) and n not in layers]
    if other or not layers:
        raise PeftInteropError(
            f"{run_dir}: PVeRA on {other[:3] or 'no Linear layer'} (1×1 convs with a hooked side path, or weight-space "
            "k×k convs / fused MHA) has no peft form: peft's PVeRA adapts nn.Linear only. Train PVeRA on Linear "
            "targets (qkv, mlp on a timm ViT) to share it, or deploy the merged ONNX bundle "
            f"(`python -m vision_peft export {run_dir}`)"
        )
    shared = bb.pvera_shared
    names = sorted(n[len(layout.prefix) :] for n in layers)
    pcfg = PveraConfig(r=cfg.adapter.r, target_modules=names, d_initial=cfg.adapter.lambda_d_init, pvera_dropout=0.0,
                       projection_prng_key=cfg.adapter.seed, save_projection=True, modules_to_save=mts,
                       sample_at_inference=False, inference_mode=True)  # fmt: skip
    pm = get_peft_model(copy.deepcopy(base), pcfg)
    filled = 0
    with torch.no_grad():
        a, b = pm.base_model.pvera_A["default"], pm.base_model.pvera_B["default"]
        if a.shape != shared.A.shape or b.shape != shared.B.shape:
            raise PeftInteropError(
                f"{run_dir}: peft sized the shared PVeRA projections A{tuple(a.shape)} B{tuple(b.shape)}, the run has "
                f"A{tuple(shared.A.shape)} B{tuple(shared.B.shape)}"
            )
        a.copy_(shared.A)
        b.copy_(shared.B)
        filled += 2
        for n in names:
            ours, theirs = layers[layout.prefix + n].factors, pm.base_model.model.get_submodule(n)
            theirs.pvera_lambda_d["default"].copy_(ours.lambda_d)
            theirs.pvera_lambda_b["default"].copy_(ours.lambda_b)
            filled += 2
    return pm, filled, {"target_modules": len(names), "ranks": [cfg.adapter.r]}
