"""The adapter contract, in the spirit of HF peft: config + layer + one injection routine.

An adapter is a registered function ``apply(backbone, cfg) -> AdapterHandle`` that mutates the (already frozen)
backbone in place; the new parameters it creates are the trainable ones. This module holds what every method
shares, so a method file only says what is new about it:

- :func:`find_targets` — the one injection routine's first half: portable target names / module patterns →
  the adaptable leaf layers (``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` incl. timm's TF-"same" convs, and
  open_clip's fused ``nn.MultiheadAttention``), each with the tensor an update lands on and whether an
  activation-path side branch can reach it;
- :func:`inject` — its second half: one *factors* module per target (anything with ``delta()`` →
  (fan_out, fan_in) and ``side(x)`` for the activation path) wrapped as a :class:`DeltaLinear` (Linear) or
  registered as a :class:`WeightDelta` parametrization (convolutions, fused MHA, Linear layers inside an MHA);
  :func:`inject_seeded` runs both halves for methods whose factors are built from (fan_in, fan_out, cfg, seeded
  generator, frozen weight);
- :func:`merge_targets` — the generic merge: every wrapper / parametrization folded into plain frozen weights;
- :class:`AdapterHandle` — what the adapter touched plus the hooks the engine and the tasks call:
  ``step_fn`` (after each optimizer step), ``extra_losses(model)`` (extra training-loss terms, built from
  ``loss_fn``), ``on_classes(classes)`` (the task's class list changed), ``condition(y)`` (class ids for
  class-gated layers) and ``merge_and_unload()`` (plain backbone + the tensors that do not fold into it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.registry import Registry

ADAPTERS: Registry = Registry("adapter")


@dataclass
class AdapterHandle:
    """What an adapter touched, how to fold it into plain weights, and the hooks of its training-time behaviour."""

    name: str
    touched: list[str] = field(default_factory=list)  # module names changed or added; "" = the whole backbone trains
    merge_fn: Callable[[], None] | None = None  # folds re-parameterisations into the base weights
    report: dict = field(default_factory=dict)  # adapter-specific facts (selected entries, shared shapes …)
    # called by the training loop after every optimizer step with (step, total_steps); returns scalars to log
    # (e.g. DoRA's rank budget). Adapters that change their structure during training (pruning) use it.
    step_fn: Callable[[int, int], dict[str, float] | None] | None = None
    # extra training-loss terms, already weighted, by name (SaRA's nuclear norm): the engine adds their sum to the
    # task loss of every training forward and logs each as ``loss_<name>``
    loss_fn: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    # told the task's class names whenever the task (re)builds its class table (KIND's gates follow the count)
    classes_fn: Callable[[list[str]], None] | None = None
    # class ids (B,) of the batch a class-conditional backbone is about to process (KIND's tailor gates);
    # adapters that need it also install a forward pre-hook on the backbone that calls it
    condition_fn: Callable[[torch.Tensor], None] | None = None
    # adapters whose update does not fold into the base weights (KIND's class-gated tailors): rewrite the backbone
    # into plain modules in place and return the tensors that must travel next to it
    unload_fn: Callable[[], dict[str, torch.Tensor]] | None = None

    @property
    def mergeable(self) -> bool:
        return self.merge_fn is not None

    def merge(self) -> None:
        """Fold the update into plain weights (export); a no-op the second time and for non-mergeable adapters."""
        if self.merge_fn is not None:
            self.merge_fn()
            self.merge_fn = None

    def extra_losses(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Weighted extra loss terms of one training forward of ``model``, by name; empty when the adapter has none."""
        return self.loss_fn(model) if self.loss_fn is not None else {}

    def on_classes(self, classes: list[str]) -> None:
        """The task's class list (in label order) after it rebuilt its class table."""
        if self.classes_fn is not None:
            self.classes_fn(list(classes))

    def condition(self, y: torch.Tensor) -> None:
        """Class ids of the next forward, for class-gated layers (no-op for every other adapter)."""
        if self.condition_fn is not None:
            self.condition_fn(y)

    def merge_and_unload(self) -> dict[str, torch.Tensor]:
        """Leave a plain backbone (peft's ``merge_and_unload``): merged weights, and for adapters that cannot fold
        (``unload_fn``) the tensors to store beside it (e.g. KIND's pre-trained tailors as ``kind.*``)."""
        if self.unload_fn is not None:
            extra = self.unload_fn()
            self.unload_fn = self.merge_fn = None
            return extra
        self.merge()
        return {}


def cubic_remaining(step: float, t0: float, t1: float) -> float:
    """The share (1 − progress)³ of a cubic decay still left after ``step``: 1 up to ``t0``, 0 from ``t1`` on
    (AdaLoRA's budget schedule, which DoRA's dynamic rank reuses)."""
    if step <= t0:
        return 1.0
    if step >= t1:
        return 0.0
    return (1.0 - (step - t0) / (t1 - t0)) ** 3


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``blocks.0.attn.qkv``) with ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# -- the delta wrappers ------------------------------------------------------------------------------------------
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


class DeltaLinear(nn.Linear):
    """``nn.Linear`` plus an adapter's activation-path side branch: h = W0 x + b + factors.side(x).

    Keeps the base ``weight``/``bias`` keys and registers the factors under the adapter's own attribute name
    (``lora``, ``dora``, ``pvera``), so checkpoint keys read ``<layer>.<attr>.<tensor>``."""

    def __init__(self, base: nn.Linear, attr: str, factors: nn.Module) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.factors_attr = attr
        self.add_module(attr, factors)
        self.train(base.training)

    @property
    def factors(self) -> nn.Module:
        return getattr(self, self.factors_attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.factors.side(x)

    def merged(self) -> nn.Linear:
        """The plain frozen Linear with W0 + ΔW (ΔW = ``factors.delta()`` at inference)."""
        return merged_linear(self, self.factors.delta())


# -- the injection routine ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One adaptable layer: its dotted name, the module, the tensor an update lands on, and whether the update can
    run as an activation-path side branch (``activation``: a plain ``nn.Linear`` outside any fused MHA)."""

    name: str
    module: nn.Module
    tensor: str  # "weight" | "in_proj_weight"
    activation: bool

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.tensor)

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()  # a conv kernel's (in/groups · k…) counts as its fan-in

    @property
    def fan_out(self) -> int:
        return self.weight.shape[0]


def find_targets(backbone: nn.Module, patterns: list[str], method: str, mha_children: bool = True) -> list[Target]:
    """Resolve ``patterns`` (portable groups such as ``qkv`` / ``mlp`` / ``conv_pw`` or module-name patterns) on
    ``backbone`` into the adaptable leaf layers not adapted yet.

    A pattern may also match containers (``blocks.*``): only leaf layers are kept. A Linear inside an
    ``nn.MultiheadAttention`` (its ``out_proj``) is read directly by MHA's fused forward, so a side branch would
    be bypassed: it is re-parameterised in weight space, or skipped when ``mha_children`` is false (methods that
    adapt the MHA module itself). Raises naming the method when nothing is adaptable."""
    found: list[Target] = []
    for name in backbone.resolve_targets(patterns):
        mod = backbone.get_submodule(name)
        parent = backbone.get_submodule(name.rpartition(".")[0]) if "." in name else backbone
        if isinstance(parent, nn.MultiheadAttention) and isinstance(mod, nn.Linear):
            if not mha_children:
                continue
            target = Target(name, mod, "weight", activation=False)
        elif isinstance(mod, nn.Linear):
            target = Target(name, mod, "weight", activation=not isinstance(mod, DeltaLinear))
            if not target.activation:
                continue  # already adapted
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            target = Target(name, mod, "weight", activation=False)
        elif isinstance(mod, nn.MultiheadAttention):
            if mod.in_proj_weight is None:
                raise ValueError(f"{name}: MultiheadAttention with separate q/k/v weights; target them directly")
            target = Target(name, mod, "in_proj_weight", activation=False)
        else:
            continue
        if not target.activation and parametrize.is_parametrized(mod, target.tensor):
            continue  # already re-parameterised
        found.append(target)
    if not found:
        raise ValueError(
            f"{method} targets {patterns} matched no Linear, Conv or fused MultiheadAttention in "
            f"{getattr(backbone, 'spec', type(backbone).__name__)}"
        )
    return found


def inject(backbone: nn.Module, targets: list[Target], attr: str, factors_for: Callable[[Target], nn.Module]) -> None:
    """Attach ``factors_for(target)`` to every target: a :class:`DeltaLinear` side branch where the activation path
    reaches, a :class:`WeightDelta` parametrization of ``target.tensor`` elsewhere (the frozen weight stays)."""
    for t in targets:
        factors = factors_for(t)
        if t.activation:
            set_module(backbone, t.name, DeltaLinear(t.module, attr, factors))
        else:
            add_weight_delta(t.module, t.tensor, attr, factors)


def inject_seeded(
    backbone: nn.Module, cfg, attr: str, method: str, factors_cls: Callable[..., nn.Module]
) -> list[Target]:
    """:func:`find_targets` on ``cfg.targets``, then :func:`inject` with one ``factors_cls(fan_in, fan_out, cfg,
    generator, weight)`` per target: every factor initialisation draws from one generator seeded with ``cfg.seed``,
    in target order (so a method's tensors depend on its seed alone). Returns the targets."""
    gen = torch.Generator().manual_seed(cfg.seed)
    targets = find_targets(backbone, cfg.targets, method)
    inject(backbone, targets, attr, lambda t: factors_cls(t.fan_in, t.fan_out, cfg, gen, t.weight))
    return targets


def merge_targets(backbone: nn.Module, names: list[str]) -> None:
    """The generic merge: every :class:`DeltaLinear` becomes a plain Linear, every :class:`WeightDelta` is folded."""
    for name in names:
        mod = backbone.get_submodule(name)
        if isinstance(mod, DeltaLinear):
            set_module(backbone, name, mod.merged())
        else:
            fold_weight_delta(mod)


def delta_handle(name: str, backbone: nn.Module, targets: list[Target], **hooks) -> AdapterHandle:
    """The handle of a re-parameterising adapter injected with :func:`inject` (generic merge; ``hooks`` as in
    :class:`AdapterHandle`)."""
    touched = [t.name for t in targets]
    return AdapterHandle(name, touched=touched, merge_fn=lambda: merge_targets(backbone, touched), **hooks)


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
