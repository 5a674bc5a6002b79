"""Run configuration: stdlib dataclasses, YAML recipes, dotted overrides, strict validation.

A recipe is a YAML file with the sections of :class:`RunConfig`. The ``task`` and ``adapter`` sections
are polymorphic: their ``name`` picks the dataclass registered for that task or adapter, and every other
key must be a field of that class. Unknown keys are an error naming the valid fields.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vision_peft.paths import REPO_ROOT, data_root, resolve_data_path, weights_root  # noqa: F401  (re-exported)

AMP_MODES = ("auto", "none", "bf16", "fp16")


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
    amp: str = "auto"  # autocast: auto (bf16 on CUDA when supported, else fp16; none on CPU) | none | bf16 | fp16
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    seed: int = 0  # seeds python, numpy, torch, data order and augmentation
    eval_every: int = 0  # evaluate every N optimizer steps; 0 = at the end of each epoch
    ckpt_every: int = 0  # write checkpoint/ every N optimizer steps; 0 = at the end of each epoch
    log_every: int = 10  # write a metrics.jsonl line every N optimizer steps
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "ckpt_every", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be positive or null, got {self.max_steps}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(f"train.head_lr must be positive or null, got {self.head_lr}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate a RunConfig from plain data (a parsed recipe)."""
        from vision_peft.adapters import ADAPTERS
        from vision_peft.tasks import TASKS

        if not isinstance(data, dict):
            raise ConfigError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        _reject_unknown(data, known, "")
        out: dict[str, Any] = {}
        for section, registry in (("task", TASKS), ("adapter", ADAPTERS)):
            raw = data.get(section)
            if isinstance(raw, str):
                raw = {"name": raw}
            if not isinstance(raw, dict) or "name" not in raw:
                names = ", ".join(registry.names())
                raise ConfigError(f"recipe section {section!r} needs a 'name' (one of: {names})")
            try:
                entry = registry.get(raw["name"])
            except LookupError as e:
                raise ConfigError(f"{section}.name: {e}") from None
            out[section] = build_dataclass(entry.config_cls, raw, section)
        for section in ("backbone", "train", "output"):
            ftype = {f.name: f for f in dataclasses.fields(cls)}[section].default_factory
            out[section] = build_dataclass(ftype, data.get(section) or {}, section)
        from vision_peft.backbones import BACKBONES  # the family before ':' must be registered

        try:
            BACKBONES.get(out["backbone"].name.partition(":")[0])
        except LookupError as e:
            raise ConfigError(f"backbone.name={out['backbone'].name!r}: {e}") from None
        return cls(**out)


def _reject_unknown(data: dict[str, Any], valid: list[str], where: str) -> None:
    unknown = [k for k in data if k not in valid]
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hints.append(f"{where}{k}" + (f" (did you mean {where}{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown key(s) {', '.join(hints)}; valid keys here: {', '.join(valid)}")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
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
        return dict(value)
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-2" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def build_dataclass(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types by name."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"section {where!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(data, list(fields), f"{where}." if where else "")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=5e-4", "--adapter.r=4"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=5e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""  # `null` or `~` give None; `none` stays a string
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``extra`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge overrides into recipe data. An override that switches a polymorphic section to another
    ``name`` (e.g. ``--adapter.name=linear`` on a LoRA recipe) replaces that section instead of merging,
    because the old method's keys mean nothing to the new one."""
    data = copy.deepcopy(data)
    for section in ("task", "adapter"):
        new = overrides.get(section)
        old = data.get(section)
        old_name = old if isinstance(old, str) else (old or {}).get("name")
        if isinstance(new, dict) and "name" in new and new["name"] != old_name:
            data[section] = {}
    return deep_merge(data, overrides)


def recipe_dirs() -> list[Path]:
    """Folders searched for recipe names: ./tasks, then the repository's tasks/."""
    return [Path.cwd() / "tasks", REPO_ROOT / "tasks"]


def find_recipe(name_or_path: str) -> Path:
    """Resolve a recipe file from a path or a bare name like ``classification-aid``."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for d in recipe_dirs():
        for cand in (d / name_or_path, d / f"{name_or_path}.yaml", d / f"{name_or_path}.yml"):
            if cand.is_file():
                return cand
    known = sorted({f.stem for d in recipe_dirs() if d.is_dir() for f in d.glob("*.yaml")})
    raise ConfigError(
        f"recipe {name_or_path!r} not found (looked for the file and in tasks/); known: {', '.join(known)}"
    )


def load_recipe(name_or_path: str, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML recipe, apply dotted overrides, validate."""
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = apply_overrides(data, overrides or {})
    try:
        return RunConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_run_config(run_dir: str | Path) -> RunConfig:
    """Read ``config.json`` of a run directory back into a RunConfig."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {path} is missing")
    data = json.loads(path.read_text())
    return RunConfig.from_dict(data["config"])
