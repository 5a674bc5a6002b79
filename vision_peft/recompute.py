"""Activation recomputation (``train.recompute``) and ``torch.compile`` (``train.compile``) of the training model.

Recomputation: the blocks (transformer blocks) or stages (CNN stages) of the backbones are run under
``torch.utils.checkpoint(use_reentrant=False)``, so backward keeps only each checkpointed unit's input and runs
the unit's forward once more when its gradients are needed. Gradients are exact: the same kernels run on the same
inputs, Dropout replays its RNG (``preserve_rng_state``), and BatchNorm layers in training mode (full fine-tuning)
normalise the recomputation with the same batch statistics while their running statistics are restored afterwards,
so they are updated once per step as without recomputation.

``blocks`` checkpoints every unit. ``auto`` runs one probe forward of ``task.synthetic_batch(model, batch_size)``
(the training micro-batch size, in training mode, under the run's autocast) with
``torch.autograd.graph.saved_tensors_hooks``, attributes the bytes saved for backward (deduplicated by storage,
parameters and buffers excluded) to the unit running when they were saved, and checkpoints the fewest units, from
the input side, whose estimate falls under ``train.recompute_budget_mb``; a second probe with the choice installed
measures the result (and adds units while it is still over the budget). The probe leaves the model and every RNG
as it found them.

Units are found from the backbones' structure, not their names: ``token_blocks()`` (timm ViTs, open_clip image
towers), ``adapters.prompt_map.cnn_stages`` (timm EfficientNet / MobileNet stages, EfficientNet-Lite0), timm
``stages`` / ``layer1..4`` (ConvNeXt, ResNet), ``TextBackbone.blocks()`` (open_clip text towers, MiniLM) and a
``blocks`` ModuleList (DiT, PointBERT). We patch the units' ``forward`` instead of switching on timm's or
open_clip's own ``set_grad_checkpointing``: those cover only their ``forward_features`` path (our
``forward_from_grid`` and some intermediates paths call the blocks directly) and are
all-or-nothing, while ``auto`` needs single units. Forward hooks (VPT, prompt maps) keep running outside the
checkpoint, and state-dict names do not change. Not covered: PointNet (a shared per-point MLP and a max-pool, no
repeated blocks) and the TAEF2 autoencoder (always frozen, no backward through it).

Compile: ``torch.compile`` of the training module (the DDP wrapper when distributed) with the default inductor
backend. A missing backend (no C++ compiler for CPU inductor, no Triton for CUDA, a Python dynamo does not support)
or a compilation failure at the first call falls back to eager with one warning; the report says which. Evaluation,
checkpoints, resume and export use the uncompiled model, so state dicts never carry ``_orig_mod.`` prefixes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vision_peft.adapters.prompt_map import cnn_stages
from vision_peft.backbones.base import Backbone, TextBackbone
from vision_peft.config import TrainConfig

log = logging.getLogger("vision_peft")
MIB = 2**20
_ORIG = "_vision_peft_recompute_forward"  # attribute holding a checkpointed unit's original forward


# -- which units can be checkpointed ------------------------------------------------------------------------
def backbone_units(backbone: nn.Module) -> tuple[str, list[nn.Module]]:
    """(kind, units in input order) of one backbone: its transformer blocks or CNN stages; ``("none", [])``."""
    tb = backbone.token_blocks() if hasattr(backbone, "token_blocks") else None
    if tb is not None:
        return "blocks", list(tb[0])
    stages = cnn_stages(backbone)
    if stages is not None:
        return "stages", list(stages)
    inner = getattr(backbone, "model", None)
    if isinstance(getattr(inner, "stages", None), nn.Sequential):  # timm ConvNeXt, RegNet …
        return "stages", list(inner.stages)
    layers = [getattr(inner, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(m, nn.Module) for m in layers):  # timm ResNet
        return "stages", layers
    if isinstance(backbone, TextBackbone):
        return "blocks", list(backbone.blocks())
    blocks = getattr(backbone, "blocks", None)
    if isinstance(getattr(blocks, "blocks", None), nn.ModuleList):  # PointBERT's positional wrapper
        blocks = blocks.blocks
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 1:  # DiT
        return "blocks", list(blocks)
    return "none", []


def find_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, unit) of every backbone inside ``model`` (``model.backbone`` first), in input order."""
    names = {id(m): n for n, m in model.named_modules()}
    backbones = [m for m in model.modules() if isinstance(m, Backbone)]
    main = getattr(model, "backbone", None)
    if main in backbones:
        backbones.remove(main)
        backbones.insert(0, main)
    elif isinstance(model, Backbone):
        backbones = [model] + [b for b in backbones if b is not model]
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for bb in backbones:
        for unit in backbone_units(bb)[1]:
            if id(unit) not in seen:
                seen.add(id(unit))
                out.append((names.get(id(unit), type(unit).__name__), unit))
    return out


# -- installing and removing checkpoints --------------------------------------------------------------------
@contextlib.contextmanager
def _restored_bn_stats(bns: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Runs the body (a recomputation) and puts the running statistics back as they were before it."""
    saved = [
        [b.detach().clone() if b is not None else None for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
        for m in bns
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, vals in zip(bns, saved):
                for buf, val in zip((m.running_mean, m.running_var, m.num_batches_tracked), vals):
                    if buf is not None:
                        buf.copy_(val)


def install(unit: nn.Module) -> None:
    """Make ``unit``'s forward a non-reentrant checkpoint whenever autograd records (no-op when already done)."""
    if hasattr(unit, _ORIG):
        return
    orig = unit.forward
    bns = [m for m in unit.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        updating = [m for m in bns if m.training and m.track_running_stats and m.running_mean is not None]
        if updating:  # full fine-tuning: the recomputation must not update the running statistics a second time
            ctx = lambda: (contextlib.nullcontext(), _restored_bn_stats(updating))  # noqa: E731
            return checkpoint(orig, *args, use_reentrant=False, preserve_rng_state=True, context_fn=ctx, **kwargs)
        return checkpoint(orig, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    setattr(unit, _ORIG, orig)
    unit.forward = forward


def uninstall(unit: nn.Module) -> None:
    """Undo :func:`install`."""
    if hasattr(unit, _ORIG):
        del unit.forward  # the instance attribute; the class's forward shows again
        delattr(unit, _ORIG)


def installed(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that run checkpointed."""
    return [n for n, m in model.named_modules() if hasattr(m, _ORIG)]


# -- measuring saved activations ----------------------------------------------------------------------------
def saved_bytes(
    model: nn.Module, forward: Callable[[], Any], units: list[tuple[str, nn.Module]] | None = None
) -> dict[str, Any]:
    """Bytes autograd saves for backward during ``forward()`` (deduplicated by storage, parameters and buffers
    excluded), split by the unit running when each storage was first saved.

    Returns:
        ``{"total", "outside", "per_unit": {name: {storage: bytes}}, "inputs": {name: (storage, bytes)}}``;
        the graph (and the saved tensors) is freed when ``forward()``'s result is.
    """
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    owner: dict[int, tuple[str, int]] = {}  # storage -> (unit name or "", bytes)
    stack: list[str] = []
    inputs: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, unit in units or []:

        def pre(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            stack.append(name)
            first = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
            if first is not None:
                s = first.untyped_storage()
                inputs[name] = (s.data_ptr(), s.nbytes())

        def post(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            stack.pop()

        hooks.append(unit.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(unit.register_forward_hook(post, with_kwargs=True))

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr != 0 and ptr not in skip:
            prev = owner.get(ptr)
            owner[ptr] = (prev[0] if prev else (stack[-1] if stack else ""), max(s.nbytes(), prev[1] if prev else 0))
        return t  # kept alive until the forward's graph is freed, so a storage address is never reused meanwhile

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in hooks:
            h.remove()
    per_unit: dict[str, dict[int, int]] = {name: {} for name, _ in units or []}
    outside: dict[int, int] = {}
    for ptr, (name, n) in owner.items():
        (per_unit[name] if name else outside)[ptr] = n
    return {
        "total": sum(n for _, n in owner.values()),
        "outside": outside,
        "per_unit": per_unit,
        "inputs": inputs,
    }


def estimate(probe: dict[str, Any], checkpointed: set[str]) -> int:
    """Saved bytes when the units in ``checkpointed`` run under checkpoint: their own saves are replaced by their
    input (which the checkpoint keeps), every other unit's saves and those outside the units stay."""
    kept: dict[int, int] = dict(probe["outside"])
    for name, stor in probe["per_unit"].items():
        if name in checkpointed:
            if name in probe["inputs"]:
                ptr, n = probe["inputs"][name]
                kept[ptr] = max(kept.get(ptr, 0), n)
        else:
            kept.update(stor)
    return sum(kept.values())


def choose(probe: dict[str, Any], order: list[str], budget: int) -> list[str]:
    """The fewest units, from the input side, that bring :func:`estimate` to at most ``budget`` bytes (units that
    save nothing are skipped: checkpointing them saves nothing); every saving unit when no prefix is enough."""
    saving = [n for n in order if probe["per_unit"].get(n)]
    for k in range(len(saving) + 1):
        if estimate(probe, set(saving[:k])) <= budget:
            return saving[:k]
    return saving


@contextlib.contextmanager
def _untouched(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Runs a probe and leaves ``model``'s buffers (BatchNorm statistics …), its modes and every RNG as before."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)
            for m, mode in modes:
                m.training = mode


def plan_auto(
    model: nn.Module,
    forward: Callable[[], Any],
    units: list[tuple[str, nn.Module]],
    budget_bytes: int,
    device: torch.device,
) -> dict[str, Any]:
    """Probe ``forward`` (a training forward of ``model``), checkpoint the fewest units from the input side that
    bring the saved activations under ``budget_bytes``, and measure the result; returns the report."""
    by_name = dict(units)
    order = [n for n, _ in units]
    with _untouched(model, device):
        probe = saved_bytes(model, forward, units)
    chosen = choose(probe, order, budget_bytes)
    est = estimate(probe, set(chosen))
    for name in chosen:
        install(by_name[name])
    with _untouched(model, device):
        measured = saved_bytes(model, forward)["total"]
    saving = [n for n in order if probe["per_unit"].get(n)]
    while measured > budget_bytes and len(chosen) < len(saving):  # the estimate was optimistic: add units
        chosen.append(saving[len(chosen)])
        install(by_name[chosen[-1]])
        with _untouched(model, device):
            measured = saved_bytes(model, forward)["total"]
    return {
        "budget_mb": budget_bytes / MIB,
        "saved_mb_without": probe["total"] / MIB,
        "saved_mb_estimated": est / MIB,
        "saved_mb_measured": measured / MIB,
        "under_budget": measured <= budget_bytes,
        "per_unit_mb": {n: sum(probe["per_unit"][n].values()) / MIB for n in order},
        "checkpointed": chosen,
    }


# -- the train.py hooks -------------------------------------------------------------------------------------
def apply(model: nn.Module, task: Any, t: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """Install ``train.recompute`` on ``model``; returns a JSON-able report for final_metrics.json.

    Raises:
        ValueError: ``train.recompute=blocks`` on a model without blocks or stages to checkpoint (``auto`` logs
            "nothing to checkpoint" instead: it only recomputes where that helps).
    """
    if t.recompute == "none":
        return {"mode": "none"}
    units = find_units(model)
    spec = getattr(getattr(model, "backbone", model), "spec", type(model).__name__)
    if not units:
        msg = (
            f"train.recompute={t.recompute}: backbone {spec!r} has no transformer blocks or CNN stages to "
            "checkpoint (PointNet and autoencoders are not covered)"
        )
        if t.recompute == "blocks":
            raise ValueError(msg + "; set train.recompute=none")
        log.info("%s: nothing to checkpoint", msg)
        return {"mode": "auto", "checkpointed": [], "reason": "no blocks or stages"}
    kinds = sorted({backbone_units(b)[0] for b in model.modules() if isinstance(b, Backbone)} - {"none"})
    if t.recompute == "blocks":
        for _, unit in units:
            install(unit)
        report = {"mode": "blocks", "unit_kind": kinds, "units": len(units), "checkpointed": [n for n, _ in units]}
        log.info("recompute: %d %s checkpointed (%s)", len(units), "/".join(kinds), spec)
        return report
    with torch.random.fork_rng(devices=[]):  # the probe batch must not draw from the run's RNG stream
        batch = {k: v.to(device) for k, v in task.synthetic_batch(model, t.batch_size).items()}

    def forward() -> Any:
        model.set_train_mode() if hasattr(model, "set_train_mode") else model.train()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(batch)

    report = {
        "mode": "auto",
        "unit_kind": kinds,
        "units": len(units),
        "probe": f"task.synthetic_batch(model, {t.batch_size}), one training forward",
        **plan_auto(model, forward, units, t.recompute_budget_mb * MIB, device),
    }
    log.info(
        "recompute auto: saved activations %.1f MiB > budget %d MiB? checkpointed %d of %d units -> %.1f MiB "
        "(estimated %.1f)",
        report["saved_mb_without"],
        t.recompute_budget_mb,
        len(report["checkpointed"]),
        len(units),
        report["saved_mb_measured"],
        report["saved_mb_estimated"],
    )
    if not report["under_budget"]:
        log.warning(
            "recompute auto: %.1f MiB saved even with every unit checkpointed, above train.recompute_budget_mb=%d",
            report["saved_mb_measured"],
            t.recompute_budget_mb,
        )
    return report


def backend_missing(device: torch.device) -> str | None:
    """Why torch.compile's default backend cannot run here, or None."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} with torch {torch.__version__}"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "CUDA inductor needs Triton, which is not installed (pip install triton)"
        return None
    cxx = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"]):
        return "CPU inductor needs a C++ compiler (g++/clang++; set CXX) and none is on PATH"
    return None


class CompiledTrainModule(nn.Module):
    """The training module compiled, falling back to the eager module (with one warning) when compilation fails
    at the first call. Its state dict, ``train()`` and ``no_sync()`` are the eager module's (no ``_orig_mod.``)."""

    def __init__(self, eager: nn.Module, compiled: Callable, report: dict[str, Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_eager", eager)  # not registered: no prefixed copy in state_dict()
        object.__setattr__(self, "_compiled", compiled)
        self.report = report
        self._called = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self._eager(*args, **kwargs)
        if self._called:
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any backend failure: the eager module computes the same
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            log.warning("train.compile: compilation failed at the first call, training eager instead (%s)", reason)
            object.__setattr__(self, "_compiled", None)
            self.report.update(status="eager (fallback)", fallback=reason)
            return self._eager(*args, **kwargs)
        self._called = True
        self.report["status"] = "compiled"
        return out

    def no_sync(self):
        return self._eager.no_sync()

    def train(self, mode: bool = True) -> CompiledTrainModule:
        self._eager.train(mode)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._eager.state_dict(*args, **kwargs)


def maybe_compile(train_model: nn.Module, t: TrainConfig, device: torch.device) -> tuple[nn.Module, dict]:
    """``torch.compile(train_model)`` when ``train.compile`` (else unchanged), with the eager fallback; the report
    (JSON-able, updated at the first call) says what ran."""
    if not t.compile:
        return train_model, {"enabled": False}
    report: dict[str, Any] = {"enabled": True, "backend": "inductor", "device": device.type}
    reason = backend_missing(device)
    if reason is not None:
        log.warning("train.compile: %s; training eager instead", reason)
        report.update(status="eager (fallback)", fallback=reason)
        return train_model, report
    try:
        compiled = torch.compile(train_model)
    except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {e}"[:300]
        log.warning("train.compile: torch.compile failed (%s); training eager instead", reason)
        report.update(status="eager (fallback)", fallback=reason)
        return train_model, report
    report["status"] = "pending first call"
    log.info("train.compile: torch.compile (inductor, %s); the first step compiles", device.type)
    return CompiledTrainModule(train_model, compiled, report), report
