"""Hugging Face ``peft`` interop, both ways: a run's LoRA as a peft adapter folder, a peft LoRA folder as a run.

:func:`export_peft` writes peft's two files, ``adapter_config.json`` + ``adapter_model.safetensors``, such that
``peft.PeftModel.from_pretrained(model, folder)`` on the plain library model gives the run's outputs:

- timm (``timm:<name>``): ``model = timm.create_model(<name>, num_classes=<the run's class count>, …)``; the run's
  linear head is peft's ``modules_to_save`` on the model's own classifier (``pretrained_cfg["classifier"]``,
  ``head`` for ViTs), so ``PeftModel(x)`` are the run's logits.
- open_clip (``open_clip:<arch>@<tag>``): ``model = open_clip.create_model(<arch>, pretrained=<tag>)`` (the whole
  CLIP model; only ``visual.*`` modules are adapted), ``peft_model.encode_image(x)`` equals the run's image
  features. open_clip has no classifier module for ``modules_to_save``, so the head travels in a third file,
  ``vision_peft_head.safetensors`` (``weight``/``bias``; peft ignores it): logits = features @ weightᵀ + bias.

What maps to what (peft 0.21.2 ``LoraConfig``; ours keeps the same A (r × fan_in), B (fan_out × r) and scale):

- ``lora`` on ``nn.Linear``: ``lora_A`` / ``lora_B`` as they are, ``r``, ``lora_alpha = alpha`` (scale alpha / r).
  The asymmetric variant (``train_a: false``, A a frozen buffer) exports alike: peft stores A either way.
- ``lora`` on open_clip's fused ``nn.MultiheadAttention`` (``in_proj_weight``, the ``qkv`` group): peft's LoRA
  ``MultiheadAttention`` layer (target = the MHA module) adds s B A to ``in_proj_weight``, as ours does, and always
  carries a second LoRA on ``out_proj``, written with B = 0 (exactly nothing). An ``out_proj`` update of our own
  (``attn_out`` on open_clip) is refused both ways: peft 0.21.2 applies it twice (its forward merges B A into
  ``out_proj.weight`` and then ``out_proj.merge()`` adds it again; ``merge_and_unload`` too — measured, see
  ``MHA_OUT_PROJ_BUG``), so no faithful export exists.
- ``dora`` (dynamic-rank DoRA of Mao et al.: a LoRA whose rank-one components are gated by c and pruned): each
  layer's live components become a plain LoRA of that layer's rank (A rows of the live components, B columns
  times c); peft's ``rank_pattern`` / ``alpha_pattern`` hold the per-layer ranks with alpha = scale × rank, so the
  scale stays alpha / r. Layers pruned to rank 0 are left out (they change nothing). Not peft's ``use_dora``
  (Liu et al.'s weight decomposition), which is another method.

- ``pvera`` on ``nn.Linear`` layers: peft's ``PveraConfig`` with the same r, the shared frozen A (2r × max fan-in)
  and B (max fan-out × r) saved as peft's projections (``save_projection``), λ_d / λ_b per layer; exact at
  inference (both use z = μ; ``sample_at_inference`` false). PVeRA on 1×1 convs (hooked side path) or in weight
  space (k×k convs, fused MHA) is refused: peft's PVeRA adapts Linear layers only (``vision_peft.peft_pvera``).
- ``adalora`` on ``nn.Linear`` layers: peft's ``AdaLoraConfig`` (peft_type ADALORA), the masks as its
  ``rank_pattern`` (masked triplets are absent from the file), λ written with peft's +1e-5 in the scale compensated;
  weight-space AdaLoRA (convs, fused MHA) is refused (``vision_peft.peft_adalora`` says what maps to what).

Refused, with the reason and the fix (the merged ONNX bundle, ``export <run>``): adapters peft has no equivalent
of (vpt, prompt_map, pad_prompt, detris, sara, fish, kind, point adapters, full, linear), tasks other than
classification / multilabel, backbones other than timm / open_clip, convolution targets (peft's LoRA conv runs the
update as an activation-path conv with the base's padding, which differs from timm's TF-"same" dynamic padding and
grouped kernels), and an ``out_proj`` update inside open_clip's MHA (above).

:func:`vision_peft.peft_import.import_peft` reverses it for peft LoRA folders on Linear and fused-MHA targets (``use_rslora`` maps
exactly: our alpha = lora_alpha · √r) and AdaLoRA folders on Linear targets, writing a run directory (config.json, adapter.safetensors, model card)
that ``predict`` / ``eval`` / ``export`` load like any run. Both directions check themselves against
``PeftModel`` on random inputs before anything is written (``parity`` in the summary; the folder is assembled in a
temporary folder and renamed into place only when it passes).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.adapters.base import DeltaLinear, WeightDelta
from vision_peft.config import RunConfig
from vision_peft.export import staged_folder
from vision_peft.predict import load_run
from vision_peft.rundir import RunInfo

CONFIG_NAME = "adapter_config.json"  # peft's file names
WEIGHTS_NAME = "adapter_model.safetensors"
HEAD_NAME = "vision_peft_head.safetensors"  # open_clip only: the linear head (peft ignores the file)
PEFT_TASKS = ("classification", "multilabel")
PEFT_ADAPTERS = ("lora", "dora", "pvera", "adalora")
PEFT_FAMILIES = ("timm", "open_clip")
PARITY_ATOL = 1e-4


MHA_OUT_PROJ_BUG = (
    "its LoRA MultiheadAttention layer adds the out_proj update twice (forward merges B A into out_proj's weight, "
    "then out_proj.merge() adds it again; merge_and_unload does the same), so an out_proj update B A acts as 2 B A "
    "(huggingface/peft pull request #3774, open, fixes it)."
)


def _peft_version() -> str:
    import peft

    return peft.__version__


class PeftInteropError(ValueError):
    """A run or peft folder that cannot cross between the formats; the message names the file and the fix."""


# -- the plain library model and where our modules sit in it ----------------------------------------------------
@dataclass
class _Layout:
    """How our backbone wrapper maps onto the plain library model a peft user builds."""

    family: str  # timm | open_clip
    prefix: str  # our wrapper-relative name = prefix + library name ("model." for timm, "" for open_clip)
    classifier: str | None  # timm: the model's classifier module (modules_to_save); open_clip: None


def _layout(spec: str, where: str) -> _Layout:
    family = spec.partition(":")[0]
    if family == "timm":
        return _Layout("timm", "model.", None)
    if family == "open_clip":
        return _Layout("open_clip", "", None)
    raise PeftInteropError(
        f"{where}: backbone {spec!r} is not a timm or open_clip model, which are the ones a peft adapter can be "
        f"loaded onto here (timm:<name>, open_clip:<arch>@<tag>); deploy this run with the merged ONNX bundle "
        "instead: `python -m vision_peft export <run>`"
    )


def _timm_classifier(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier", "head") if isinstance(cfg, dict) else "head"
    return name[0] if isinstance(name, (list, tuple)) else name


def library_model(bb: nn.Module, cfg: RunConfig, num_classes: int) -> nn.Module:
    """The plain library model a peft user builds for our backbone ``bb``: timm's model with a ``num_classes``
    classifier (``timm.create_model(name, num_classes=…)``), or the whole open_clip CLIP model. Its frozen weights
    are the ones of ``cfg.backbone`` (our wrapper holds the same tensors)."""
    family = bb.spec.partition(":")[0]
    if family == "timm":
        from vision_peft.backbones.timm_models import create_timm

        model, _ = create_timm(bb.spec.partition(":")[2], cfg.backbone, num_classes=num_classes)
        missing, _ = model.load_state_dict(_plain_state(bb, "model."), strict=False)
        cls = _timm_classifier(model)
        if any(not k.startswith(cls + ".") for k in missing):
            raise PeftInteropError(f"{bb.spec}: the rebuilt timm model lacks tensors {missing[:4]}")
        return model.eval()
    from vision_peft.backbones.open_clip_models import create_clip

    model, _, _ = create_clip(bb.spec.partition(":")[2], cfg.backbone)
    model.visual.load_state_dict(_plain_state(bb, "visual."))
    return model.eval()


def _plain_state(bb: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The frozen weights of a backbone wrapper *without* an adapter (fresh from the builder), library names."""
    return {k[len(prefix) :]: v for k, v in bb.state_dict().items() if k.startswith(prefix)}


def _peft_features(pm: nn.Module, layout: _Layout, x: torch.Tensor) -> torch.Tensor:
    """The PeftModel's output our run is compared with: timm logits, open_clip image features."""
    if layout.family == "timm":
        return pm(x)
    return pm.encode_image(x)


# -- ours → peft --------------------------------------------------------------------------------------------------
@dataclass
class _Update:
    """One adapted library module in peft's terms: A (r × fan_in), B (fan_out × r), scale (peft: alpha / r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def _factors_update(factors: nn.Module, name: str, run: str) -> _Update | None:
    """Our factors module → its LoRA update (None for a DoRA layer pruned to rank 0)."""
    kind = type(factors).__name__
    if kind == "LoRAFactors":
        return _Update(factors.lora_A.detach().float(), factors.lora_B.detach().float(), float(factors.scale))
    if kind == "DoRAComponents":
        live = factors.mask.detach() > 0
        if not bool(live.any()):
            return None
        c = factors.lora_c.detach().float()[live]
        return _Update(
            factors.lora_A.detach().float()[live], factors.lora_B.detach().float()[:, live] * c, float(factors.scale)
        )
    raise PeftInteropError(f"{run}: {name} holds {kind} factors, which have no peft LoRA equivalent")


def _run_updates(model: nn.Module, layout: _Layout, run: str) -> dict[str, dict[str, _Update | None]]:
    """Library module name → {"linear": …} | {"in_proj": …, "out_proj": …} (MHA) of every adapted module."""
    bb = model.backbone
    out: dict[str, dict[str, _Update | None]] = {}

    def lib(name: str) -> str:
        if not name.startswith(layout.prefix):
            raise PeftInteropError(f"{run}: adapted module {name} lies outside the library model")
        return name[len(layout.prefix) :]

    for name, mod in bb.named_modules():
        if isinstance(mod, DeltaLinear):
            out[lib(name)] = {"linear": _factors_update(mod.factors, name, run)}
            continue
        if not parametrize.is_parametrized(mod):
            continue
        for tensor, plist in mod.parametrizations.items():
            deltas = [p for p in plist if isinstance(p, WeightDelta)]
            if not deltas:
                continue
            upd = _factors_update(getattr(deltas[0], deltas[0].factors_name), name, run)
            parent_name = name.rpartition(".")[0]
            parent = bb.get_submodule(parent_name) if "." in name else None
            if isinstance(mod, nn.MultiheadAttention) and tensor == "in_proj_weight":
                out.setdefault(lib(name), {})["in_proj"] = upd
            elif isinstance(parent, nn.MultiheadAttention) and isinstance(mod, nn.Linear):
                out.setdefault(lib(parent_name), {})["out_proj"] = upd
            else:
                raise PeftInteropError(
                    f"{run}: {name} ({type(mod).__name__}.{tensor}) is adapted in weight space; peft's LoRA for "
                    "convolutions runs the update as an activation-path conv with the base layer's padding, which "
                    "does not reproduce it in general (timm's TF-'same' dynamic padding, grouped kernels). Export "
                    "the merged ONNX bundle instead (`python -m vision_peft export <run>`), or train LoRA on Linear "
                    "targets (adapter.targets=[qkv] …) to share it as a peft adapter"
                )
    for name, parts in out.items():  # a fused MHA: both parts of one peft layer share a rank and a scale
        if "linear" in parts:
            continue
        if parts.get("out_proj") is not None and bool((parts["out_proj"].b != 0).any()):
            raise PeftInteropError(
                f"{run}: {layout.prefix}{name}.out_proj (attn_out) is adapted, and peft {_peft_version()} cannot "
                f"represent that: {MHA_OUT_PROJ_BUG} Train with adapter.targets without attn_out (qkv, mlp: exported "
                "exactly), or deploy the merged ONNX bundle (`python -m vision_peft export <run>`)"
            )
        present = [u for u in parts.values() if u is not None]
        if not present:
            parts.clear()
            continue
        rank, scale = max(u.rank for u in present), present[0].scale
        for key in ("in_proj", "out_proj"):
            u = parts.get(key)
            fan_in, fan_out = _mha_shape(model.backbone, layout.prefix + name, key)
            if u is None:
                parts[key] = _Update(torch.zeros(rank, fan_in), torch.zeros(fan_out, rank), scale)
            else:
                b = u.b * (u.scale / scale)
                pad = rank - u.rank
                parts[key] = _Update(
                    torch.cat([u.a, torch.zeros(pad, fan_in)]), torch.cat([b, torch.zeros(fan_out, pad)], 1), scale
                )
    return {k: v for k, v in out.items() if v and all(u is not None for u in v.values())}


def _mha_shape(bb: nn.Module, name: str, part: str) -> tuple[int, int]:
    mha = bb.get_submodule(name)
    if part == "in_proj":
        w = mha.in_proj_weight
        return int(w.shape[1]), int(w.shape[0])
    return int(mha.out_proj.in_features), int(mha.out_proj.out_features)


def _peft_layer_tensors(pm: nn.Module, name: str) -> dict[str, tuple[nn.Module, Any]]:
    """peft's LoRA layer of library module ``name`` inside PeftModel ``pm``: {"linear"|"in_proj"|"out_proj": layer}."""
    layer = pm.base_model.model.get_submodule(name)
    if hasattr(layer, "base_layer") and isinstance(layer.get_base_layer(), nn.MultiheadAttention):
        return {"in_proj": layer, "out_proj": layer.base_layer.out_proj}
    return {"linear": layer}


def _peft_config(updates: dict[str, dict[str, _Update]], modules_to_save: list[str] | None):
    """A LoraConfig holding ``updates``: the most common (rank, alpha) as r / lora_alpha, others as patterns."""
    from peft import LoraConfig

    ranks = {n: max(u.rank for u in parts.values()) for n, parts in updates.items()}
    alphas = {n: next(iter(parts.values())).scale * ranks[n] for n, parts in updates.items()}
    pairs = [(ranks[n], alphas[n]) for n in updates]
    r, alpha = max(set(pairs), key=pairs.count)
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    rank_pattern = {re.escape(n): ranks[n] for n in updates if ranks[n] != r}
    alpha_pattern = {re.escape(n): alphas[n] for n in updates if not math.isclose(alphas[n], alpha)}
    return LoraConfig(
        r=int(r), lora_alpha=alpha, target_modules=sorted(updates), lora_dropout=0.0, bias="none",
        modules_to_save=modules_to_save, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        inference_mode=True,
    )  # fmt: skip


def _check_exportable(run_dir: Path, info: RunInfo) -> _Layout:
    task, adapter = info.task_name, info.adapter_name
    bundle = f"deploy it with the merged ONNX bundle instead: `python -m vision_peft export {run_dir}`"
    if task not in PEFT_TASKS:
        raise PeftInteropError(
            f"{run_dir}: a {task} run has no peft counterpart (peft adapters here carry a backbone + a linear head: "
            f"tasks {', '.join(PEFT_TASKS)}); {bundle}"
        )
    if adapter not in PEFT_ADAPTERS:
        why = {
            "full": "full fine-tuning changes every weight (no adapter to share)",
            "linear": "a linear probe has no adapter (only a head)",
        }.get(adapter, f"peft has no {adapter} method")
        raise PeftInteropError(
            f"{run_dir}: adapter {adapter!r} cannot be written as a peft adapter ({why}); peft export covers "
            f"{', '.join(PEFT_ADAPTERS)}; {bundle}"
        )
    return _layout(info.backbone.spec, str(run_dir))


def export_peft(run_dir: str | Path, out_dir: str | Path, atol: float = PARITY_ATOL) -> dict[str, Any]:
    """Write a LoRA-family classification / multilabel run on a timm or open_clip backbone as a peft adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``; open_clip also ``vision_peft_head.safetensors``).

    The folder is loaded back with ``peft.PeftModel.from_pretrained`` on the plain library model and its outputs
    compared with the run's on random inputs before it is moved into place. Returns the summary (files, ranks,
    parity).

    Raises:
        PeftInteropError: the run's task, adapter, backbone or a layer layout has no peft form (the message names
            the run and the fix), or the reloaded PeftModel does not reproduce the run (nothing is written).
    """
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    layout = _check_exportable(run_dir, RunInfo.read(run_dir))
    cfg, task, model, info = load_run(run_dir, "cpu")
    own_config = cfg.adapter.name in ("pvera", "adalora")  # their own peft config class (peft_pvera, peft_adalora)
    updates = {} if own_config else _run_updates(model, layout, str(run_dir))
    if not own_config and not updates:
        raise PeftInteropError(f"{run_dir}: the adapter holds no non-zero-rank layer; nothing to export")
    classes = list(task.classes)
    from vision_peft.backbones import build_backbone

    plain = build_backbone(cfg.backbone).eval()
    base = library_model(plain, cfg, len(classes))
    head = model.head
    if layout.family == "timm":
        layout.classifier = _timm_classifier(base)
        clf = base.get_submodule(layout.classifier)
        if not isinstance(clf, nn.Linear) or clf.in_features != head.in_features:
            raise PeftInteropError(
                f"{run_dir}: the timm model's classifier {layout.classifier!r} is not one Linear on the pooled "
                f"features ({type(clf).__name__}), so the run's head cannot be peft's modules_to_save; "
                f"use the merged ONNX bundle: `python -m vision_peft export {run_dir}`"
            )
    mts = [layout.classifier] if layout.classifier else None
    if own_config:
        from vision_peft.peft_adalora import adalora_peft_model
        from vision_peft.peft_pvera import pvera_peft_model

        build = {"pvera": pvera_peft_model, "adalora": adalora_peft_model}[cfg.adapter.name]
        pm, filled, summary_extra = build(model, base, layout, cfg, mts, str(run_dir))
    else:
        pm = get_peft_model(copy.deepcopy(base), _peft_config(updates, mts))
        filled = _fill_lora(pm, updates, str(run_dir))
        summary_extra = {"target_modules": len(updates),
                         "ranks": sorted({max(u.rank for u in p.values()) for p in updates.values()})}  # fmt: skip
    pcfg = pm.peft_config["default"]
    with torch.no_grad():
        if layout.classifier:
            wrapped = pm.base_model.model.get_submodule(layout.classifier).modules_to_save["default"]
            wrapped.weight.copy_(head.weight)
            wrapped.bias.copy_(head.bias)
            filled += 2
    state = get_peft_model_state_dict(pm)
    if len(state) != filled:
        raise PeftInteropError(f"{run_dir}: peft's state dict has {len(state)} tensors, {filled} were filled")
    meta = {
        "format": "pt",
        "vision_peft.source_run": str(run_dir),
        "vision_peft.backbone": info.backbone.spec,
        "vision_peft.weights_id": info.backbone.weights_id,
        "vision_peft.task": cfg.task.name,
        "vision_peft.adapter": cfg.adapter.name,
        "vision_peft.classes": json.dumps(classes),
    }
    if isinstance(getattr(model, "threshold", None), torch.Tensor):  # multilabel's decision threshold (not a peft idea)
        meta["vision_peft.threshold"] = repr(float(model.threshold))
    pcfg.base_model_name_or_path = info.backbone.spec  # get_peft_model set the library model's own (none)
    with staged_folder(out_dir, prefix=".peft-") as tmp:
        pcfg.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_NAME), metadata=meta)
        if layout.family == "open_clip":
            save_file(
                {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
                str(tmp / HEAD_NAME), metadata={"classes": json.dumps(classes), "applies_to": "encode_image"},
            )  # fmt: skip
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp)).eval()
        parity = compare(model, loaded, layout, atol, str(run_dir), plain=plain)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    return {
        "peft_dir": str(out_dir),
        "run": str(run_dir),
        "peft_type": str(getattr(pcfg.peft_type, "value", pcfg.peft_type)),
        "base_model": info.backbone.spec,
        "load_with": _load_hint(layout, info.backbone.spec, len(classes)),
        **summary_extra,
        "modules_to_save": mts or [],
        "classes": classes,
        "parity": parity,
        "files": files,
    }


def _fill_lora(pm: nn.Module, updates: dict[str, dict[str, _Update]], run_dir: str) -> int:
    """Copy every update into PeftModel ``pm``'s LoRA layers (shapes and scales checked); returns tensors filled."""
    filled = 0
    with torch.no_grad():
        for name, parts in updates.items():
            layers = _peft_layer_tensors(pm, name)
            for part, upd in parts.items():
                layer = layers[part]
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                if tuple(a.shape) != tuple(upd.a.shape) or tuple(b.shape) != tuple(upd.b.shape):
                    raise PeftInteropError(
                        f"{run_dir}: {name} ({part}) has A{tuple(upd.a.shape)} B{tuple(upd.b.shape)}, peft built "
                        f"A{tuple(a.shape)} B{tuple(b.shape)}"
                    )
                if not math.isclose(layer.scaling["default"], upd.scale, rel_tol=1e-9):
                    raise PeftInteropError(f"{run_dir}: {name}: peft scale {layer.scaling['default']} != {upd.scale}")
                a.copy_(upd.a)
                b.copy_(upd.b)
                filled += 2
    return filled


def _load_hint(layout: _Layout, spec: str, n: int) -> str:
    arg = spec.partition(":")[2]
    if layout.family == "timm":
        return f"PeftModel.from_pretrained(timm.create_model({arg!r}, pretrained=True, num_classes={n}), <dir>)(x)"
    arch, _, tag = arg.partition("@")
    return (
        f"PeftModel.from_pretrained(open_clip.create_model({arch!r}, pretrained={tag or None!r}), <dir>)"
        f".encode_image(x) @ head['weight'].T + head['bias'] (head = {HEAD_NAME})"
    )


@torch.no_grad()
def compare(model: nn.Module, pm: nn.Module, layout: _Layout, atol: float, where: str, n: int = 4,
            seed: int = 0, plain: nn.Module | None = None) -> dict[str, Any]:  # fmt: skip
    """Max |Δ| of our model's outputs (timm: logits; open_clip: image features) vs PeftModel ``pm``'s on ``n``
    random inputs, and the top-1 agreement of the logits; with ``plain`` (the backbone without the adapter) also
    ``adapter_effect``: max |Δ| of the same outputs with and without the adapter (0 would make any mapping "match").
    Raises when max |Δ| > ``atol`` × max(1, max |ours|)."""
    model.eval()
    pm.eval()
    h, w = model.backbone.input_size
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    feats = model.backbone.forward_features(x)
    logits = model.head(feats)
    ours = logits if layout.family == "timm" else feats
    theirs = _peft_features(pm, layout, x)
    diff = float((ours - theirs).abs().max())
    scale = max(1.0, float(ours.abs().max()))
    their_logits = theirs if layout.family == "timm" else model.head(theirs)
    out = {
        "max_abs_diff": diff,
        "compared": "logits" if layout.family == "timm" else "image features (encode_image)",
        "max_abs_output": float(ours.abs().max()),
        "top1_agreement": float((logits.argmax(1) == their_logits.argmax(1)).float().mean()),
        "inputs": f"{n} random images {h}x{w} (seed {seed})",
        "atol": atol,
    }
    if plain is not None:
        pf = plain.eval().forward_features(x)
        out["adapter_effect"] = float((ours - (model.head(pf) if layout.family == "timm" else pf)).abs().max())
    if not diff <= atol * scale:
        raise PeftInteropError(
            f"{where}: peft.PeftModel does not reproduce the run (max |Δ| {diff:.3g} > {atol:g}); nothing was "
            "written. This is a bug in the mapping: report it with the run's config.json"
        )
    return out
