"""Hugging Face ``peft`` → vision_peft: a peft LoRA or AdaLoRA adapter folder as a run directory (:func:`import_peft`).

The reverse of :func:`vision_peft.peft_interop.export_peft`, whose docstring says what maps to what: peft LoRA
folders on Linear and fused-MHA targets (``use_rslora`` maps exactly: our alpha = lora_alpha · √r) become a run
directory (config.json, adapter.safetensors, model card) that ``predict`` / ``eval`` / ``export`` load like any
run, checked against ``PeftModel`` on random inputs before anything is written. AdaLoRA folders (peft_type ADALORA
on Linear targets) become an ``adalora`` run with the ``rank_pattern`` as its masks (``vision_peft.peft_adalora``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vision_peft
from vision_peft import checkpoint as ckpt
from vision_peft import rundir
from vision_peft.adapters.base import DeltaLinear
from vision_peft.config import ConfigError, RunConfig
from vision_peft.export import staged_folder
from vision_peft.peft_interop import (  # the layout and checks both directions share
    CONFIG_NAME,
    HEAD_NAME,
    MHA_OUT_PROJ_BUG,
    PARITY_ATOL,
    PEFT_TASKS,
    WEIGHTS_NAME,
    PeftInteropError,
    _Layout,
    _layout,
    _peft_version,
    _timm_classifier,
    compare,
    library_model,
)
from vision_peft.recipe import apply_overrides, build_run_config, find_recipe, parse_overrides
from vision_peft.rundir import BackboneInfo, RunInfo, StepsInfo
from vision_peft.tasks import TASKS


def _read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / CONFIG_NAME
    if not peft_dir.is_dir():
        raise PeftInteropError(f"{peft_dir} is not a folder; give the folder peft's save_pretrained wrote")
    if not path.is_file():
        raise PeftInteropError(
            f"{path} is missing: {peft_dir} is not a peft adapter folder (save one with "
            "peft_model.save_pretrained(<dir>))"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftInteropError(f"{path} is not valid JSON ({e}); save the adapter again with save_pretrained") from None
    if not isinstance(data, dict):
        raise PeftInteropError(f"{path} must hold a JSON object, got {type(data).__name__}")
    ptype = str(data.get("peft_type", "")).upper()
    if ptype not in ("LORA", "ADALORA"):
        raise PeftInteropError(
            f"{path}: peft_type {data.get('peft_type')!r} is not LORA or ADALORA; import-peft reads those only "
            "(other peft methods have no vision_peft counterpart to load into)"
        )
    for key, ok, why in _UNSUPPORTED_OPTIONS:
        value = data.get(key, ok)
        if value not in (ok, None, False, [], {}) or (ok is not None and value is None and key == "bias"):
            raise PeftInteropError(
                f"{path}: {key}={value!r} ({why}) is not reproduced by vision_peft's LoRA; save the adapter with "
                f"{key}={ok!r} (re-train it in peft), or keep using it with peft"
            )
    if data.get("layers_pattern"):
        raise PeftInteropError(f"{path}: layers_pattern={data['layers_pattern']!r} is not supported; list the modules")
    for key in ("r", "lora_alpha"):
        if not isinstance(data.get(key), (int, float)) or isinstance(data.get(key), bool) or data[key] <= 0:
            raise PeftInteropError(f"{path}: {key} must be a positive number, got {data.get(key)!r}")
    return data


def _read_tensors(peft_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = peft_dir / WEIGHTS_NAME
    if not path.is_file():
        bins = [p.name for p in peft_dir.glob("adapter_model.bin")]
        hint = (
            " (it holds adapter_model.bin, a pickle, which vision_peft never unpickles: save it again with "
            "save_pretrained(<dir>, safe_serialization=True))"
            if bins
            else ""
        )
        raise PeftInteropError(f"{path} is missing{hint}; peft's save_pretrained writes it")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except Exception as e:
        raise PeftInteropError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); save the adapter "
            "again with save_pretrained"
        ) from None
    return tensors, meta


def _base_matches(base: str | None, spec: str) -> bool:
    """peft's base_model_name_or_path names our backbone spec (accepted spellings: the spec itself, the timm name
    with or without ``timm/`` and a pretrained tag, the open_clip architecture)."""
    if not base:
        return True
    family, _, arg = spec.partition(":")
    b = base.strip()
    if b == spec:
        return True
    if family == "timm":
        bare = b.removeprefix("hf-hub:").removeprefix("timm/").removeprefix("timm:")
        return bare == arg or bare.split(".")[0] == arg.split(".")[0]
    if family == "open_clip":
        arch = arg.partition("@")[0]
        bare = b.removeprefix("open_clip:").partition("@")[0]
        return bare == arch or bare == arg
    return False


def _run_config(task_or_recipe: str, backbone: str, overrides: list[str] | dict | None) -> RunConfig:
    """The recipe (file or name in tasks/) or a bare task name, with ``--backbone`` and ``--set`` overrides."""
    extra = parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else dict(overrides or {})
    if task_or_recipe in TASKS.names():
        data: dict[str, Any] = {"task": {"name": task_or_recipe}, "adapter": {"name": "lora"}}
    else:
        import yaml

        path = find_recipe(task_or_recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    bb = dict(data.get("backbone") or {}) if isinstance(data.get("backbone"), dict) else {}
    if bb.get("name") != backbone:  # the recipe's other backbone fields belong to its own backbone
        bb = {"name": backbone}
    data["backbone"] = bb
    data["adapter"] = {"name": "lora"}
    return build_run_config(apply_overrides(data, extra))


# LoraConfig options our LoRA does not reproduce: (field, value that is fine, why)
_UNSUPPORTED_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("use_dora", False, "peft's DoRA (weight-decomposed LoRA of Liu et al.) is not our dora (dynamic rank)"),
    ("bias", "none", "peft trained bias terms of the base layers"),
    ("fan_in_fan_out", False, "transposed (Conv1D-style) base weights"),
    ("lora_bias", False, "a bias on lora_B"),
    ("layers_to_transform", None, "layer-index selection"),
    ("layer_replication", None, "replicated layers"),
    ("target_parameters", None, "LoRA on bare parameters"),
    ("trainable_token_indices", None, "trainable token embeddings"),
    ("use_qalora", False, "QA-LoRA pooling"),
    ("alora_invocation_tokens", None, "activated LoRA"),
    ("velora_config", None, "VeLoRA"),
    ("kasa_config", None, "KaSA"),
    ("monteclora_config", None, "MonteCLoRA"),
    ("arrow_config", None, "Arrow routing"),
    ("use_bdlora", None, "BD-LoRA"),
)


def _library_names(bb: nn.Module, layout: _Layout) -> dict[str, nn.Module]:
    """Library module name → module of our (unadapted) wrapper's library part."""
    out = {}
    for name, mod in bb.named_modules():
        if name and name.startswith(layout.prefix):
            out[name[len(layout.prefix) :]] = mod
    return out


def import_peft(
    peft_dir: str | Path, backbone: str, task_or_recipe: str, out_dir: str | Path,
    classes: list[str] | None = None, overrides: list[str] | dict | None = None, atol: float = PARITY_ATOL,
) -> dict[str, Any]:  # fmt: skip
    """Build a run directory from a peft LoRA adapter folder for ``backbone`` (``timm:<name>`` or
    ``open_clip:<arch>@<tag>``) and ``task_or_recipe`` (a recipe file / name, or a task name), predicting like
    ``PeftModel.from_pretrained(<library model>, peft_dir)``. ``classes``: the class names in logit order (default:
    the class list our own ``export --peft`` recorded in the weights' metadata, else the recipe's data folder). ``overrides``: dotted
    ``section.key=value`` settings (e.g. ``backbone.pretrained=false``, ``task.data_root=…``).

    Raises:
        PeftInteropError: a missing/corrupt file, a non-LoRA or unsupported peft option, another base model,
            targets that match nothing or non-Linear/MHA modules, shape or class-count mismatches — each naming
            the file and the fix. FileExistsError: ``out_dir`` already holds a run.
    """
    from peft import LoraConfig, PeftModel
    from peft.tuners.tuners_utils import check_target_module_exists

    from vision_peft.engine import count_parameters

    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    cfg_path, w_path = peft_dir / CONFIG_NAME, peft_dir / WEIGHTS_NAME
    data = _read_config(peft_dir)
    tensors, meta = _read_tensors(peft_dir)
    if (out_dir / rundir.CONFIG_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a run (config.json); pick another --out")
    base_name = data.get("base_model_name_or_path")
    layout = _layout(backbone, "--backbone")
    if not _base_matches(base_name, backbone):
        raise PeftInteropError(
            f"{cfg_path}: base_model_name_or_path is {base_name!r}, but --backbone is {backbone!r}; the adapter was "
            f"trained on another base model. Pass the backbone it was trained on (e.g. --backbone "
            f"{'timm:' + str(base_name).removeprefix('timm/').split('.')[0] if layout.family == 'timm' else base_name})"
        )
    cfg = _run_config(task_or_recipe, backbone, overrides)
    if cfg.task.name not in PEFT_TASKS:
        raise PeftInteropError(
            f"{task_or_recipe}: task {cfg.task.name!r} cannot be built from a peft adapter (a backbone + linear "
            f"head); import-peft builds {', '.join(PEFT_TASKS)} runs"
        )
    task = TASKS.get(cfg.task.name).builder(cfg)
    from vision_peft.backbones import build_backbone

    plain = build_backbone(cfg.backbone)
    weights_id = meta.get("vision_peft.weights_id")
    if weights_id and weights_id != plain.weights_id:
        raise PeftInteropError(
            f"{w_path} was exported from a run on {meta.get('vision_peft.backbone')} with weights {weights_id[:12]}…, "
            f"but {backbone} loads weights {plain.weights_id[:12]}… ({plain.weights_source}); point "
            "backbone.weights at the original file (--set backbone.weights=<file>)"
        )
    # which library modules the adapter targets, by peft's own matching rules
    pcfg = LoraConfig(
        r=int(data["r"]), lora_alpha=data["lora_alpha"], target_modules=data.get("target_modules"),
        exclude_modules=data.get("exclude_modules"), modules_to_save=data.get("modules_to_save"),
    )  # fmt: skip
    names = _library_names(plain, layout)
    mha_children = {f"{n}.out_proj" for n, m in names.items() if isinstance(m, nn.MultiheadAttention)}
    matched = [n for n in names if n not in mha_children and check_target_module_exists(pcfg, n)]
    prefix = "base_model.model."
    lib_tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    ignored: list[str] = []
    if layout.family == "open_clip":  # the CLIP text tower's layers: encode_image never runs them
        ignored = sorted({k.split(".lora_")[0] for k in lib_tensors if not k.startswith("visual.")})
        lib_tensors = {k: v for k, v in lib_tensors.items() if k.startswith("visual.")}
    if not matched:
        raise PeftInteropError(
            f"{cfg_path}: target_modules {data.get('target_modules')!r} match no module of {backbone}"
            + (f"'s image tower (only text-tower modules {ignored[:3]})" if ignored else "")
            + "; is --backbone the model the adapter was trained on?"
        )
    bad = [f"{n} ({type(names[n]).__name__})" for n in matched
           if not isinstance(names[n], (nn.Linear, nn.MultiheadAttention))]  # fmt: skip
    adalora = str(data["peft_type"]).upper() == "ADALORA"  # its own tensors and config (vision_peft.peft_adalora)
    if adalora:
        from vision_peft.peft_adalora import read_adalora

        factors, adapter_section, used = read_adalora(data, lib_tensors, names, matched, layout, cfg_path, w_path)
    elif bad:
        raise PeftInteropError(
            f"{cfg_path}: target_modules match {', '.join(bad[:4])}: vision_peft imports LoRA on nn.Linear and fused "
            "nn.MultiheadAttention modules only; re-train the adapter with Linear / attention targets"
        )
    if not adalora:  # LoRA: A, B per module (fused MHA: + out_proj), one rank and scale
        # the tensors, per module: peft saves <base_model.model.><name>.lora_A.weight (MHA: + base_layer.out_proj.…)
        parts_of: dict[str, dict[str, str]] = {}
        for n in matched:
            if isinstance(names[n], nn.MultiheadAttention):
                parts_of[n] = {"in_proj": n, "out_proj": f"{n}.base_layer.out_proj"}
            else:
                parts_of[n] = {"linear": n}
        used: set[str] = set()
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # our wrapper-relative module name -> (A, B)
        ranks: dict[str, int] = {}
        for n, parts in parts_of.items():
            for part, key in parts.items():
                ka, kb = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
                missing = [k for k in (ka, kb) if k not in lib_tensors]
                if missing:
                    raise PeftInteropError(
                        f"{w_path} lacks {prefix}{missing[0]} for target {n}: the weights do not belong to "
                        f"{cfg_path} (or to {backbone}); save config and weights together with save_pretrained"
                    )
                a, b = lib_tensors[ka].float(), lib_tensors[kb].float()
                used |= {ka, kb}
                if part == "out_proj":
                    if bool((b != 0).any()):
                        raise PeftInteropError(
                            f"{w_path}: {n}.out_proj has a non-zero LoRA update; peft {_peft_version()} "
                            f"{MHA_OUT_PROJ_BUG} vision_peft applies an update once, so it does not import this layout "
                            "(an in_proj-only update, out_proj lora_B = 0, imports exactly)"
                        )
                    continue  # B = 0: no update at all
                ours = layout.prefix + (n if part in ("linear", "in_proj") else f"{n}.out_proj")
                w = names[n].in_proj_weight if part == "in_proj" else (
                    names[n].out_proj.weight if part == "out_proj" else names[n].weight)  # fmt: skip
                fan_out, fan_in = int(w.shape[0]), int(w.shape[1])
                if (
                    a.dim() != 2
                    or b.dim() != 2
                    or a.shape[1] != fan_in
                    or b.shape[0] != fan_out
                    or b.shape[1] != a.shape[0]
                ):
                    raise PeftInteropError(
                        f"{w_path}: {n} ({part}) has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, but {backbone}'s "
                        f"layer is {fan_out}×{fan_in} (expects A (r, {fan_in}), B ({fan_out}, r)); the adapter was "
                        "trained on another model size"
                    )
                factors[ours] = (a, b)
                ranks[n] = int(a.shape[0])
        # the rank and scale of each peft layer (patterns are regex suffixes, as peft reads them)
        from peft.utils.other import get_pattern_key

        rank_pattern, alpha_pattern = data.get("rank_pattern") or {}, data.get("alpha_pattern") or {}
        scales: dict[str, float] = {}
        for n in parts_of:
            r = rank_pattern.get(get_pattern_key(list(rank_pattern), n), data["r"])
            alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), n), data["lora_alpha"])
            if ranks[n] != r:
                raise PeftInteropError(
                    f"{w_path}: {n} has rank {ranks[n]} but {cfg_path} says r={r}; save config and weights together"
                )
            scales[n] = alpha / math.sqrt(r) if data.get("use_rslora") else alpha / r
        if len(set(ranks.values())) > 1 or len({round(s, 12) for s in scales.values()}) > 1:
            raise PeftInteropError(
                f"{cfg_path}: the layers have different ranks or scales (rank_pattern / alpha_pattern: ranks "
                f"{sorted(set(ranks.values()))}, scales {sorted(set(scales.values()))}); vision_peft's LoRA has one rank "
                "and one alpha per adapter. Save the adapter with a single r and lora_alpha"
            )
        r = next(iter(ranks.values()))
        scale = next(iter(scales.values()))
    # the head: peft's modules_to_save on the timm classifier, or our own head file (open_clip)
    mts = list(data.get("modules_to_save") or [])
    head_w = head_b = None
    classifier = _timm_classifier(plain.model) if layout.family == "timm" else None
    if mts:
        if layout.family != "timm" or mts not in ([classifier], [classifier.rpartition(".")[2]]):
            raise PeftInteropError(
                f"{cfg_path}: modules_to_save={mts} — vision_peft keeps a linear head only (timm's classifier "
                f"{classifier!r}); other trained modules are not reproduced. Save the adapter with "
                f"modules_to_save=[{classifier!r}] (or none and a {HEAD_NAME})"
            )
        kw, kb = f"{classifier}.weight", f"{classifier}.bias"
        if kw not in lib_tensors:
            raise PeftInteropError(f"{w_path} lacks {prefix}{kw} although {cfg_path} lists modules_to_save={mts}")
        head_w, head_b = lib_tensors[kw].float(), lib_tensors.get(kb)
        used |= {kw, kb}
    elif (peft_dir / HEAD_NAME).is_file():
        head = ckpt.load_tensors(peft_dir / HEAD_NAME)
        head_w, head_b = head.get("weight"), head.get("bias")
        if head_w is None:
            raise PeftInteropError(f"{peft_dir / HEAD_NAME} holds no 'weight' tensor")
    else:
        raise PeftInteropError(
            f"{cfg_path}: the adapter has no classification head (modules_to_save is empty and there is no "
            f"{HEAD_NAME}); a run needs one. Save the peft model built with num_classes=<your classes> and "
            f"modules_to_save=[{classifier or 'head'!r}], or train a run instead (`python -m vision_peft train`)"
        )
    extra = sorted(set(lib_tensors) - used)
    if extra:
        raise PeftInteropError(
            f"{w_path} holds tensors no target of {cfg_path} explains: {extra[:4]}; save config and weights together"
        )
    # the class list
    where = "--classes"
    if classes is None and "vision_peft.classes" in meta:  # the run's own list, recorded by export --peft
        classes, where = json.loads(meta["vision_peft.classes"]), f"{w_path} metadata"
    if classes is None:
        try:
            classes, where = list(task.classes), f"task.data_root {cfg.task.data_root}"
        except Exception as e:
            raise PeftInteropError(
                f"no class list for the imported run: the recipe's data is not readable ({e}) and {w_path} records "
                "none; pass --classes a,b,c (in the head's logit order) or --set task.data_root=<folder>"
            ) from None
    task.set_classes(list(classes))
    if head_w.dim() != 2 or head_w.shape[0] != len(classes) or head_w.shape[1] != plain.embed_dim:
        raise PeftInteropError(
            f"{w_path}: the head is {tuple(head_w.shape)}, but the run has {len(classes)} classes (from {where}) on "
            f"{plain.embed_dim}-d features; give the classes the adapter was trained on (--classes, in logit order)"
        )
    # our run: the recipe with a LoRA of this rank/scale on exactly these modules
    targets = sorted(factors)
    cfg_dict = cfg.to_dict()
    cfg_dict["adapter"] = adapter_section if adalora else {
        "name": "lora", "r": r, "alpha": scale * r, "dropout": float(data.get("lora_dropout") or 0.0),
        "targets": targets, "train_a": True, "seed": 0}  # fmt: skip
    cfg_dict["output"]["name"] = out_dir.name
    cfg_dict["output"]["runs_root"] = str(out_dir.parent)
    cfg = build_run_config(cfg_dict)
    task = TASKS.get(cfg.task.name).builder(cfg)
    task.set_classes(list(classes))
    model = task.build_model()
    if adalora:
        from vision_peft.peft_adalora import fill_adalora

        fill_adalora(model, factors)
    with torch.no_grad():
        for name, (a, b) in ({} if adalora else factors).items():
            mod = model.backbone.get_submodule(name)
            if isinstance(mod, DeltaLinear):
                f = mod.factors
            else:
                tensor = "in_proj_weight" if isinstance(mod, nn.MultiheadAttention) else "weight"
                wd = getattr(mod.parametrizations, tensor)[0]
                f = getattr(wd, wd.factors_name)
            f.lora_A.copy_(a)
            f.lora_B.copy_(b)
        threshold = None
        if isinstance(getattr(model, "threshold", None), torch.Tensor) and "vision_peft.threshold" in meta:
            threshold = float(meta["vision_peft.threshold"])  # recorded by our export --peft
            model.threshold.fill_(threshold)
        model.head.weight.copy_(head_w)
        if head_b is not None:
            model.head.bias.copy_(head_b.float())
        else:
            model.head.bias.zero_()
    model.eval()
    # check against peft itself, then write the run directory in one rename
    base = library_model(plain, cfg, len(classes))
    pm = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    parity = compare(model, pm, layout, atol, str(peft_dir), plain=plain)
    counts = count_parameters(model)
    bb = model.backbone
    info = RunInfo(
        vision_peft_version=vision_peft.__version__,
        config=cfg.to_dict(),
        backbone=BackboneInfo(bb.spec, bb.weights_id, bb.weights_source, bb.data_config, bb.embed_dim),
        task_state=task.state_info(),
        parameters=counts,
        adapter_touched=list(model.adapter.touched[:50]),
        device="cpu",
        steps=StepsInfo(total=0, per_epoch=0),
        torch=torch.__version__,
    )
    source = {"peft_dir": str(peft_dir.resolve()), "peft_version": data.get("peft_version"),
              "base_model_name_or_path": base_name, "classes_from": where}  # fmt: skip
    final = {"step": 0, "imported_from_peft": source, "parity_vs_peft": parity}
    with staged_folder(out_dir, prefix=".import-peft-") as tmp:
        info.write(tmp)
        ckpt.save_tensors(
            tmp / rundir.ADAPTER_FILE, model.adapter_state_dict(),
            metadata={"backbone": bb.spec, "weights_id": bb.weights_id, "adapter": cfg.adapter.name,
                      "task": cfg.task.name,
                      "imported_from_peft": str(peft_dir.resolve())},
        )  # fmt: skip
        rundir.atomic_write_json(tmp / rundir.FINAL_FILE, final)
        _write_card(tmp, out_dir.name, info, source, parity, len(targets), ignored)
    return {
        "run": str(out_dir),
        "peft_dir": str(peft_dir),
        "backbone": backbone,
        "task": cfg.task.name,
        "adapter": cfg.adapter.name,
        **(
            {"init_r": cfg.adapter.init_r, "ranks": sorted({int(f[3].sum()) for f in factors.values()})}
            if adalora
            else {"rank": r}
        ),
        "alpha": cfg.adapter.alpha,
        "targets": len(targets),
        "classes": list(classes),
        "classes_from": where,
        "ignored_text_tower_modules": ignored,
        **({"threshold": threshold} if threshold is not None else {}),
        "parity": parity,
    }


def _write_card(d: Path, name: str, info: RunInfo, source: dict, parity: dict, n: int, ignored: list[str]) -> None:
    lines = [
        f"# {name}",
        "",
        f"Imported from the peft {'AdaLoRA' if info.adapter_name == 'adalora' else 'LoRA'} adapter folder "
        f"`{source['peft_dir']}` "
        f"(peft {source['peft_version']}, "
        f"base model {source['base_model_name_or_path']!r}) with `python -m vision_peft import-peft`; not trained "
        "here (no metrics, no split).",
        "",
        f"- task: `{info.task_name}`; backbone: `{info.backbone.spec}` ({info.backbone.weights_source}); adapter: "
        f"`{info.adapter_name}` r={info.config['adapter'].get('r', info.config['adapter'].get('init_r'))} "
        f"alpha={info.config['adapter']['alpha']:g} on {n} modules",
        f"- classes ({len(info.classes)}, from {source['classes_from']}): {', '.join(info.classes)}",
        f"- parity vs peft.PeftModel ({parity['compared']}, {parity['inputs']}): max |Δ| "
        f"{parity['max_abs_diff']:.3g}, top-1 agreement {parity['top1_agreement']:.3f}",
    ]
    if ignored:
        lines.append(f"- ignored {len(ignored)} text-tower module(s) the image tower never runs: {ignored[:4]}")
    lines += ["", f"Predict: `python -m vision_peft predict {name} <images>`", ""]
    rundir.atomic_write_text(d / rundir.CARD_FILE, "\n".join(lines))
