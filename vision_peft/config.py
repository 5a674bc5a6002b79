"""Run configuration: stdlib dataclasses and generic, strict, typed building from plain data.

A leaf of the layering: this module imports no registry (and nothing of the package but :mod:`vision_peft.paths`).
:func:`build_dataclass` checks every value against its field's annotation — ``int``, ``float``, ``bool``, ``str``,
lists, unions, nested dataclasses and ``Literal[...]`` choices — and rejects unknown keys naming the valid ones.
The polymorphic ``task`` and ``adapter`` sections of :class:`RunConfig` are resolved from the registries by
:mod:`vision_peft.recipe`, which also reads YAML recipes and dotted overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from vision_peft.paths import REPO_ROOT, data_root, resolve_data_path, weights_root  # noqa: F401  (re-exported)

AmpMode = Literal["auto", "none", "bf16", "fp16"]  # train.amp choices
CacheMode = Literal["auto", "off", "memory", "disk"]  # train.cache choices
RecomputeMode = Literal["none", "blocks", "auto"]  # train.recompute choices
# train keys that choose how a run executes, not what it computes: a resumed run may change them
EXECUTION_KEYS = (
    "cache", "cache_dir", "cache_memory_mb", "recompute", "recompute_budget_mb", "compile", "num_workers", "tensorboard"
)  # fmt: skip


class ConfigError(ValueError):
    """A recipe or override that does not fit the configuration schema."""


@dataclass
class BackboneConfig:
    """Which frozen backbone to build and where its weights come from."""

    name: str = "effnet_lite0"  # registry spec: effnet_lite0, timm:<model>, open_clip:<arch>@<tag>, minilm …
    weights: str | None = None  # explicit weight file; else weights root → library cache → download
    pretrained: bool = True  # False builds a randomly initialised network (tests, from-scratch baselines)
    allow_download: bool = False  # allow a hub download when no local weights are found
    image_size: int | None = None  # square input size override; None keeps the model's default

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("backbone.name must not be empty; see `python -m vision_peft list backbones`")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"backbone.image_size must be >= 8, got {self.image_size}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by every task."""

    epochs: int = 10  # passes over the training split
    max_steps: int | None = None  # stop after this many optimizer steps (caps epochs when set)
    batch_size: int = 32  # samples per forward pass (per process under torchrun)
    grad_accum: int = 1  # forward passes per optimizer step
    lr: float = 1e-3  # peak learning rate of adapter parameters
    head_lr: float | None = None  # learning rate of the task head; None = lr
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not applied to biases and norms)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2); PPT uses 0.98
    warmup_steps: int = 0  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    grad_clip: float | None = 1.0  # clip the global gradient norm; None disables
    amp: AmpMode = "auto"  # autocast: auto (bf16 on CUDA when supported, else fp16; none on CPU) | none | bf16 | fp16
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    seed: int = 0  # seeds python, numpy, torch, data order and augmentation
    eval_every: int = 0  # evaluate every N optimizer steps; 0 = at the end of each epoch
    ckpt_every: int = 0  # write checkpoint/ every N optimizer steps; 0 = at the end of each epoch
    log_every: int = 10  # write a metrics.jsonl line every N optimizer steps
    final_test: bool = True  # evaluate the test split at the end; false = never touch it (sweep trials)
    num_workers: int = 0  # DataLoader worker processes
    tensorboard: bool = True  # also write the metrics as TensorBoard event files in <run_dir>/tensorboard/
    # -- compute only what can change (execution choices: results equal within float noise; not compared on resume)
    cache: CacheMode = "auto"  # frozen-prefix cache: auto (memory if small, else disk) | off | memory | disk
    cache_dir: str | None = None  # disk cache folder; None = <output.runs_root>/.prefix_cache
    cache_memory_mb: int = 4096  # auto: the largest in-memory cache before it goes to disk
    recompute: RecomputeMode = "none"  # activation recomputation: none | blocks (checkpoint every block/stage) | auto
    recompute_budget_mb: int = 1024  # auto: checkpoint the fewest blocks that bring estimated activations under this
    compile: bool = False  # wrap the adapted model with torch.compile (falls back, with a warning, where it cannot)

    def __post_init__(self) -> None:
        check_choices(self, "train")
        for key in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        nonneg = ("warmup_steps", "eval_every", "ckpt_every", "num_workers", "cache_memory_mb", "recompute_budget_mb")
        for key in nonneg:
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be positive or null, got {self.max_steps}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(f"train.head_lr must be positive or null, got {self.head_lr}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1) (AdamW beta1, beta2), got {self.betas}")
        self.betas = [float(b) for b in self.betas]


@dataclass
class OutputConfig:
    """Where the run directory goes."""

    runs_root: str = "runs"  # parent folder of run directories (relative to the working directory)
    name: str | None = None  # run directory name; None = <task>-<adapter>-<timestamp>


@dataclass
class RunConfig:
    """Everything one training run needs; ``config.json`` in a run directory is this, resolved."""

    task: Any = None  # the task's config dataclass (its ``name`` picks the task)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: Any = None  # the adapter's config dataclass (its ``name`` picks the adapter)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what ``config.json`` stores); :func:`vision_peft.recipe.build_run_config` reverses it."""
        return dataclasses.asdict(self)


def reject_unknown(data: dict[str, Any], valid: list[str], where: str) -> None:
    """Raise a ConfigError naming every key of ``data`` not in ``valid`` (with a close match when there is one)."""
    unknown = [k for k in data if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hints.append(f"{where}{k}" + (f" (did you mean {where}{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown key(s) {', '.join(hints)}; valid keys here: {', '.join(valid)}")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return plain_data(value, where)
    if origin is Literal:
        return _check_choice(value, typing.get_args(tp), where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(plain_data(value, where))
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond the float range
                raise ConfigError(f"{where} must be a finite number, got {value!r}") from None
        elif isinstance(value, str):  # YAML 1.1 reads "1e-2" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(number):  # nan/inf pass every `> 0` check and are not valid JSON in config.json
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return _unicode(value, where)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _unicode(value: str, where: str) -> str:
    """``value`` when it is valid Unicode; a YAML escape like "\\ud800" gives a lone surrogate, which no file name,
    log line or ``config.json`` can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{where} holds a character that is not valid Unicode (a lone surrogate): {value!r}"
        ) from None
    return value


def plain_data(value: Any, where: str, _depth: int = 0) -> Any:
    """``value`` when it is plain JSON data (None, bool, int, finite float, str, lists, str-keyed mappings, at most
    32 levels deep), else a ConfigError naming ``where``: a config must survive ``config.json`` unchanged."""
    if _depth > 32:
        raise ConfigError(f"{where} nests deeper than 32 levels (or refers to itself)")
    if isinstance(value, str):
        return _unicode(value, where)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]", _depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{where} has a key {bad[0]!r} that is not a string")
        return {k: plain_data(v, f"{where}.{k}", _depth + 1) for k, v in value.items()}
    raise ConfigError(f"{where} must be plain data (numbers, strings, lists, mappings), got {type(value).__name__}")


def build_dataclass(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"section {where!r} must be a mapping, got {data!r}")
    data = dict(data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(data, list(fields), f"{where}." if where else "")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError) as e:  # a __post_init__ check
        raise ConfigError(f"{where}: {e}") from None


def _check_choice(value: Any, choices: tuple[Any, ...], where: str) -> Any:
    if any(value == c and type(value) is type(c) for c in choices):
        return value
    if isinstance(value, bool):  # YAML 1.1 reads off/no/on/yes as booleans: map them back onto a string choice
        words = ("on", "yes", "true") if value else ("off", "no", "false")
        spelled = [c for c in choices if isinstance(c, str) and c in words]
        if len(spelled) == 1:
            return spelled[0]
    raise ConfigError(f"{where} must be one of {', '.join(str(c) for c in choices)}, got {value!r}")


def check_choices(obj: Any, where: str) -> None:
    """Check every ``Literal[...]``-annotated field of dataclass instance ``obj`` (for direct construction,
    which does not pass through :func:`build_dataclass`); call it from ``__post_init__``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if _has_literal(hints[f.name]):
            _check_type(getattr(obj, f.name), hints[f.name], f"{where}.{f.name}")


def _has_literal(tp: Any) -> bool:
    """``Literal[...]`` itself, or a union holding one (e.g. ``Literal["a", "b"] | None``)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return True
    return origin in (typing.Union, types.UnionType) and any(_has_literal(a) for a in typing.get_args(tp))
