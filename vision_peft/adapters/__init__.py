"""Adapter registry. An adapter is a registered function ``apply(backbone, cfg) -> AdapterHandle`` that
mutates the (already frozen) backbone in place; new parameters it creates are the trainable ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.registry import Registry

ADAPTERS: Registry = Registry("adapter")


@dataclass
class AdapterHandle:
    """What an adapter touched, and how to fold it into plain weights for export."""

    name: str
    touched: list[str] = field(default_factory=list)  # module names changed or added
    merge_fn: Callable[[], None] | None = None  # folds re-parameterisations into the base weights
    report: dict = field(default_factory=dict)  # adapter-specific facts (selected entries, shared shapes …)
    # called by the training loop after every optimizer step with (step, total_steps); returns scalars to log
    # (e.g. DoRA's rank budget). Adapters that change their structure during training (pruning) use it.
    step_fn: Callable[[int, int], dict[str, float] | None] | None = None

    @property
    def mergeable(self) -> bool:
        return self.merge_fn is not None

    def merge(self) -> None:
        if self.merge_fn is not None:
            self.merge_fn()
            self.merge_fn = None


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``blocks.0.attn.qkv``) with ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class WeightDelta(nn.Module):
    """Parametrization W0 → W0 + ΔW for tensors an activation-path wrapper cannot reach (convolutions, open_clip's
    fused MHA ``in_proj_weight``). ``factors`` is the adapter's module with a ``delta()`` of shape
    (fan_out, fan_in); it is registered under ``name`` so checkpoint keys read ``…parametrizations.weight.0.<name>.…``.
    """

    def __init__(self, name: str, factors: nn.Module) -> None:
        super().__init__()
        self.factors_name = name
        self.add_module(name, factors)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta = getattr(self, self.factors_name).delta()
        return w + delta.view_as(w).to(w.dtype)  # (out, fan_in) -> the weight's own shape


def add_weight_delta(mod: nn.Module, tensor: str, name: str, factors: nn.Module) -> None:
    """Register :class:`WeightDelta` on ``mod.<tensor>`` and keep the original weight frozen."""
    parametrize.register_parametrization(mod, tensor, WeightDelta(name, factors))
    getattr(mod.parametrizations, tensor).original.requires_grad_(False)


def fold_weight_delta(mod: nn.Module) -> None:
    """Undo :func:`add_weight_delta` keeping its value: W0 + ΔW becomes the plain, frozen weight of ``mod``."""
    tensor = "in_proj_weight" if isinstance(mod, nn.MultiheadAttention) else "weight"
    parametrize.remove_parametrizations(mod, tensor, leave_parametrized=True)
    getattr(mod, tensor).requires_grad_(False)


def merged_linear(base: nn.Linear, delta: torch.Tensor) -> nn.Linear:
    """A plain, frozen ``nn.Linear`` with weight W0 + ``delta`` (fan_out, fan_in) and the base bias: what a
    re-parameterising adapter's Linear wrapper becomes on ``merge()``."""
    lin = nn.Linear(
        base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device,
        dtype=base.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        lin.weight.copy_(base.weight + delta.to(base.weight.dtype))
        if base.bias is not None:
            lin.bias.copy_(base.bias)
    return lin.requires_grad_(False)


@contextmanager
def mc_sampling(model: nn.Module) -> Iterator[int]:
    """Monte Carlo inference: inside this block, every adapter module with a stochastic latent (a module whose
    ``supports_mc`` is true, e.g. PVeRA's) samples it at inference as well, so repeated forwards give samples of
    the prediction. Yields the number of such modules; raises ValueError when the model has none."""
    layers = [m for m in model.modules() if getattr(m, "supports_mc", False)]
    if not layers:
        raise ValueError(
            "Monte Carlo prediction needs an adapter trained with a sampled latent (adapter.name=pvera with "
            "adapter.sample=true, on Linear or 1×1 conv targets); this model has none. Predict without "
            "--mc-samples, or train such an adapter"
        )
    for m in layers:
        m.mc = True
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.mc = False


def apply_adapter(backbone: nn.Module, cfg) -> AdapterHandle:
    """Freeze ``backbone`` and apply the adapter named by ``cfg.name``."""
    entry = ADAPTERS.get(cfg.name)
    backbone.requires_grad_(False)
    return entry.builder(backbone, cfg)


from vision_peft.adapters import (  # noqa: E402,F401
    baselines,
    detris,
    dora,
    kind,
    lora,
    pad_prompt,
    prompt_map,
    pvera,
    sara,
    vpt,
)

__all__ = [
    "ADAPTERS", "AdapterHandle", "WeightDelta", "add_weight_delta", "apply_adapter", "fold_weight_delta",
    "mc_sampling", "merged_linear", "set_module",
]  # fmt: skip
