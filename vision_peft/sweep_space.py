"""Sweep space files: which config keys a sweep searches, per method, under which constraints.

A space file is YAML. Top-level keys are dotted config keys (``train.lr``), the reserved sections below, or the
name of an adapter listed in ``adapter.name`` (its conditional sub-space)::

    adapter.name: [linear, lora, dora, pvera]          # the methods compared (read from the adapter registry)
    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range (log scale)
    lora: {adapter.r: [4, 8, 16], adapter.train_a: [true, false]}   # only for trials of that method
    dora: {adapter.r: {low: 4, high: 16, step: 4}}     # an int range (ints at both ends)
    fixed: {train.epochs: 1}                           # the same override for every trial
    constraints: {max_trainable_params: 500000, max_step_time: 2.0}   # with head; seconds per optimizer step
    objective: {metric: top1, direction: maximize}     # default: the task's headline val metric, maximized
    pruner: median                                     # median | successive_halving | none, or
                                                       # {name: median, startup_trials: 2, warmup_steps: 0}
    methods: round_robin                               # round_robin (each method in turn) | sample (TPE picks)

A value is a list of choices or a range ``{low, high, log?, step?}``. Everything is checked before any trial starts
(:func:`load_space`): unknown keys against the real config dataclasses (every choice and both ends of every range
are built into a :class:`~vision_peft.config.RunConfig` through the recipe resolution), empty choices, ``low > high``,
adapters unknown to the registry or incompatible with the recipe's backbone and task (registry capability tags), and
a trainable-parameter limit no configuration of a method can meet (each method's model is built once, with random
weights, at every combination of its structural choices, or at each choice alone when there are more than 16).
Errors are :class:`SpaceError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vision_peft.adapters import ADAPTERS
from vision_peft.config import ConfigError, RunConfig
from vision_peft.recipe import apply_overrides, build_run_config, find_recipe, incompatibility
from vision_peft.tasks import TASKS

RESERVED = ("fixed", "constraints", "objective", "pruner", "methods")  # top-level sections that are not config keys
CONSTRAINTS = ("max_trainable_params", "max_trainable_params_no_head", "max_step_time")  # known constraint names
PRUNERS = ("median", "successive_halving", "none")
METHOD_ORDERS = ("round_robin", "sample")
OWNED_KEYS = ("train.seed", "output.runs_root", "output.name")  # the sweep sets these itself for every trial
MAX_PREFLIGHT = 16  # structural combinations built per method before falling back to one choice at a time


class SpaceError(ValueError):
    """A space file that cannot be swept; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Param:
    """One searched key: categorical ``choices`` or a numeric range."""

    key: str  # dotted config key, e.g. "adapter.r"
    choices: tuple[Any, ...] | None = None  # categorical values (None for a range)
    low: float | int | None = None  # range lower end (inclusive)
    high: float | int | None = None  # range upper end (inclusive)
    log: bool = False  # sample the range on a log scale
    step: float | int | None = None  # range step (ints: default 1)
    is_int: bool = False  # the range holds ints

    def values_to_check(self) -> list[Any]:
        """The values that stand for this parameter in validation: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask an optuna trial for this parameter under the optuna name ``name``."""
        if self.choices is not None:
            if all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices):
                return trial.suggest_categorical(name, list(self.choices))
            # optuna stores only scalar choices: lists (e.g. adapter.targets) travel as their JSON text
            picked = trial.suggest_categorical(name, [json.dumps(list(c) if isinstance(c, tuple) else c)
                                                      for c in self.choices])  # fmt: skip
            return json.loads(picked)
        if self.is_int:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass
class Space:
    """A validated space file."""

    path: Path  # the file it came from
    text: str  # its contents (stored with the study, so extra workers sweep the very same space)
    methods: list[str]  # adapter names compared (the recipe's adapter when the file names none)
    common: list[Param] = field(default_factory=list)  # searched for every trial
    conditional: dict[str, list[Param]] = field(default_factory=dict)  # method -> its sub-space
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted key -> value for every trial
    constraints: dict[str, float] = field(default_factory=dict)  # name -> limit
    metric: str | None = None  # val metric ranked on; None = the task's headline (first) metric
    direction: str = "maximize"  # maximize | minimize
    pruner: str = "median"  # median | successive_halving | none
    pruner_startup: int = 2  # median: trials completed before it prunes
    pruner_warmup: int = 0  # median: steps of a trial before it may be pruned
    method_order: str = "round_robin"  # round_robin | sample
    min_params: dict[str, int] = field(default_factory=dict)  # method -> fewest trainable params found in preflight

    @property
    def sha256(self) -> str:
        """Hash of the file's text (a study remembers the space it was made with)."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Dotted overrides of one trial: the method (fixed by the queue or sampled), then its parameters.

        Optuna names: ``adapter.name``, common keys as they are, conditional keys as ``<method>:<key>`` (one
        distribution per name, so the same key may have other choices under another method)."""
        out = dict(self.fixed)
        method = trial.suggest_categorical("adapter.name", list(self.methods))
        out["adapter.name"] = method
        for p in self.common:
            out[p.key] = p.suggest(trial, p.key)
        for p in self.conditional.get(method, []):
            out[p.key] = p.suggest(trial, f"{method}:{p.key}")
        return out


def _fail(path: Path, key: str, msg: str) -> SpaceError:
    return SpaceError(f"{path}: {key}: {msg}")


def _parse_param(path: Path, key: str, raw: Any) -> Param:
    """A list of choices or a ``{low, high, log, step}`` range."""
    if isinstance(raw, list):
        if not raw:
            raise _fail(path, key, "empty list of choices; give at least one value")
        for v in raw:
            if isinstance(v, dict):
                raise _fail(path, key, f"choice {v!r} is a mapping; choices are values (a list of lists is allowed)")
        if len({yaml.safe_dump(v) for v in raw}) != len(raw):
            raise _fail(path, key, f"duplicate choices in {raw}")
        return Param(key, choices=tuple(tuple(v) if isinstance(v, list) else v for v in raw))
    if isinstance(raw, dict):
        unknown = set(raw) - {"low", "high", "log", "step"}
        if unknown or "low" not in raw or "high" not in raw:
            raise _fail(
                path, key, f"a range is {{low: …, high: …, log: false, step: null}}, got {raw}"
                + (f" (unknown {sorted(unknown)})" if unknown else "")
            )  # fmt: skip
        low, high, step = (_number(path, key, n, raw.get(n)) for n in ("low", "high", "step"))
        log = raw.get("log", False)
        if low is None or high is None:
            raise _fail(path, key, f"a range needs numbers for low and high, got {raw}")
        if not isinstance(log, bool):
            raise _fail(path, key, f"log must be true or false, got {log!r}")
        if not (math.isfinite(low) and math.isfinite(high)):
            raise _fail(path, key, f"range ends must be finite, got low={low}, high={high}")
        if low > high:
            raise _fail(path, key, f"low={low} > high={high}; swap them")
        if log and low <= 0:
            raise _fail(path, key, f"a log range needs low > 0, got low={low}")
        if step is not None and step <= 0:
            raise _fail(path, key, f"step must be positive, got {step}")
        if log and step is not None:
            raise _fail(path, key, "a range is either log or stepped, not both")
        is_int = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
        return Param(key, low=low, high=high, log=log, step=step, is_int=is_int)
    raise _fail(
        path, key, f"expected a list of choices or a range {{low, high}}, got {raw!r}; a single value belongs in fixed:"
    )


def _number(path: Path, key: str, name: str, v: Any) -> int | float | None:
    """A range end or step: an int or float (YAML 1.1 reads ``1e-4`` without a dot as a string)."""
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise _fail(path, key, f"{name} must be a number, got {v!r}")


def _check_key(path: Path, key: str) -> None:
    if not isinstance(key, str) or "." not in key:
        raise _fail(path, str(key), "not a dotted config key (section.field, e.g. train.lr)")
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    if key.split(".")[0] not in sections:
        raise _fail(path, key, f"unknown section {key.split('.')[0]!r}; sections: {', '.join(sections)}")
    if key in OWNED_KEYS:
        raise _fail(path, key, "the sweep sets this for every trial (seed via --seed, run folders under the sweep)")
    if key == "backbone.name":
        raise _fail(path, key, "a sweep compares methods on one backbone; run one sweep per backbone")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return out


def recipe_data(recipe: str | Path) -> tuple[Path, dict[str, Any]]:
    """The recipe file and its parsed YAML (raises ConfigError naming it)."""
    path = find_recipe(str(recipe))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    return path, data


def trial_config(recipe: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """The RunConfig a trial with these dotted overrides trains (what the child's ``train`` resolves)."""
    return build_run_config(apply_overrides(recipe, _nest(overrides)))


def compatible(adapter: str, backbone_name: str, task_name: str) -> bool:
    """The backbone family plus the task offer every capability tag the adapter requires (registry tags)."""
    return incompatibility(adapter, backbone_name, task_name) is None


def load_space(space_file: str | Path, recipe: str | Path, preflight: bool = True) -> Space:
    """Read and validate a space file against a recipe; nothing runs.

    Args:
        space_file: the YAML space file.
        recipe: a recipe path or a name in tasks/.
        preflight: build each method's model (random weights) to check a trainable-parameter constraint.

    Raises:
        SpaceError: naming the file and the key (unknown key, empty choices, low > high, an unknown or incompatible
            adapter, a constraint no trial can meet …).
    """
    path = Path(space_file)
    if not path.is_file():
        raise SpaceError(f"space file {path} not found; write one like tasks/sweeps/aid-methods.yaml")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpaceError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{path}: a space file is a mapping of dotted config keys (e.g. train.lr: [1e-3, 3e-3])")
    recipe_path, rdata = recipe_data(recipe)
    base = build_run_config(rdata)  # the recipe itself must resolve

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(path, "fixed", f"must be a mapping of dotted keys to values, got {fixed!r}")
    for k, v in fixed.items():
        _check_key(path, k)
        if k == "adapter.name":
            raise _fail(path, "fixed.adapter.name", "put the methods in adapter.name: [ … ] (one is fine)")
        if isinstance(v, dict):
            raise _fail(path, f"fixed.{k}", "a fixed value is a single value; write nested keys dotted")

    methods_raw = raw.get("adapter.name")
    if methods_raw is None:
        methods = [base.adapter.name]
    else:
        if isinstance(methods_raw, str):
            methods_raw = [methods_raw]
        if not isinstance(methods_raw, list) or not methods_raw:
            raise _fail(path, "adapter.name", "needs a non-empty list of adapter names")
        methods = []
        for m in methods_raw:
            if not isinstance(m, str) or m not in ADAPTERS:
                raise _fail(path, "adapter.name", f"unknown adapter {m!r}; known: {', '.join(ADAPTERS.names())}")
            if m in methods:
                raise _fail(path, "adapter.name", f"{m!r} is listed twice")
            methods.append(m)
    backbone = trial_config(rdata, fixed).backbone.name if fixed else base.backbone.name
    for m in methods:
        why = incompatibility(m, backbone, base.task.name)
        if why is not None:
            raise _fail(path, "adapter.name", why)

    common: list[Param] = []
    conditional: dict[str, list[Param]] = {m: [] for m in methods}
    for key, value in raw.items():
        if key in RESERVED or key == "adapter.name":
            continue
        if isinstance(key, str) and key in methods:
            if not isinstance(value, dict) or not value:
                raise _fail(path, key, "a method's sub-space is a non-empty mapping of dotted keys to choices/ranges")
            for sub, sv in value.items():
                _check_key(path, f"{key}.{sub}" if not isinstance(sub, str) else sub)
                if sub == "adapter.name":
                    raise _fail(path, f"{key}.{sub}", "a method's sub-space cannot change the method")
                param = _parse_param(path, f"{key}: {sub}", sv)
                conditional[key].append(dataclasses.replace(param, key=sub))
            continue
        if isinstance(key, str) and key in ADAPTERS:
            raise _fail(path, key, f"a sub-space for {key!r}, which adapter.name does not list ({', '.join(methods)})")
        if isinstance(key, str) and "." not in key:
            raise _fail(
                path, key,
                f"unknown key: not a dotted config key, not a method of adapter.name ({', '.join(methods)}), "
                f"nor one of {', '.join(RESERVED)}",
            )  # fmt: skip
        _check_key(path, key)
        common.append(_parse_param(path, key, value))

    # every choice and both range ends must resolve, for every method they apply to
    for m in methods:
        start = {**fixed, "adapter.name": m}
        try:
            trial_config(rdata, start)
        except ConfigError as e:
            raise _fail(path, f"fixed (with adapter.name={m})", str(e)) from None
        for p in common + conditional[m]:
            where = p.key if p in common else f"{m}: {p.key}"
            for v in p.values_to_check():
                try:
                    trial_config(rdata, {**start, p.key: v})
                except ConfigError as e:
                    hint = " (a key only some methods have belongs in their sub-space)" if p in common else ""
                    raise _fail(path, where, f"{p.key}={v!r} with adapter.name={m}: {e}{hint}") from None

    constraints = raw.get("constraints") or {}
    if not isinstance(constraints, dict):
        raise _fail(
            path, "constraints", f"must be a mapping, e.g. {{max_trainable_params: 500000}}, got {constraints!r}"
        )
    for k, v in constraints.items():
        if k not in CONSTRAINTS:
            raise _fail(path, f"constraints.{k}", f"unknown constraint; known: {', '.join(CONSTRAINTS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise _fail(path, f"constraints.{k}", f"must be a positive number, got {v!r}")

    objective = raw.get("objective") or {}
    if not isinstance(objective, dict) or set(objective) - {"metric", "direction"}:
        raise _fail(path, "objective", f"is {{metric: <val metric>, direction: maximize|minimize}}, got {objective!r}")
    direction = objective.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise _fail(path, "objective.direction", f"must be maximize or minimize, got {direction!r}")
    metric = objective.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise _fail(path, "objective.metric", f"must be a metric name such as top1, got {metric!r}")
    pruner = raw.get("pruner", "median")
    pruner_raw = pruner if isinstance(pruner, dict) else {"name": pruner}
    pruner = pruner_raw.get("name", "median")
    if pruner not in PRUNERS or set(pruner_raw) - {"name", "startup_trials", "warmup_steps"}:
        raise _fail(
            path, "pruner",
            f"is one of {', '.join(PRUNERS)} or {{name: median, startup_trials: 2, warmup_steps: 0}}, got {pruner_raw!r}",
        )  # fmt: skip
    for k in ("startup_trials", "warmup_steps"):
        v = pruner_raw.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _fail(path, f"pruner.{k}", f"must be an integer >= 0, got {v!r}")
    order = raw.get("methods", "round_robin")
    if order not in METHOD_ORDERS:
        raise _fail(path, "methods", f"must be one of {', '.join(METHOD_ORDERS)}, got {order!r}")

    space = Space(
        path=path, text=text, methods=methods, common=common, conditional=conditional, fixed=dict(fixed),
        constraints={k: float(v) for k, v in constraints.items()}, metric=metric, direction=direction,
        pruner=pruner, pruner_startup=pruner_raw.get("startup_trials", 2), pruner_warmup=pruner_raw.get("warmup_steps", 0),
        method_order=order,
    )  # fmt: skip
    if preflight and any(k.startswith("max_trainable") for k in constraints):
        _preflight_params(space, rdata, recipe_path)
    return space


def _structural(params: list[Param]) -> list[Param]:
    """Parameters that can change the parameter count (everything outside ``train.``)."""
    return [p for p in params if not p.key.startswith("train.")]


def _combos(params: list[Param]) -> list[dict[str, Any]]:
    """Every combination of the structural values, or each value alone when there are more than MAX_PREFLIGHT."""
    values = [[(p.key, v) for v in p.values_to_check()] for p in params]
    n = math.prod(len(v) for v in values) if values else 1
    if n <= MAX_PREFLIGHT:
        return [dict(c) for c in itertools.product(*values)] if values else [{}]
    return [{k: v} for vals in values for k, v in vals]


def count_trainable(cfg: RunConfig) -> dict[str, int]:
    """Trainable parameter counts of the model a config builds (with random backbone weights: counts only)."""
    from vision_peft.engine import count_parameters  # torch: only when a constraint needs it

    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=False, weights=None))
    task = TASKS.get(cfg.task.name).builder(cfg)
    return count_parameters(task.build_model())


def _preflight_params(space: Space, rdata: dict[str, Any], recipe_path: Path) -> None:
    """Fail when a method cannot meet a trainable-parameter constraint at any of its structural combinations."""
    limits = {k: v for k, v in space.constraints.items() if k.startswith("max_trainable")}
    for m in space.methods:
        best: dict[str, int] = {}
        for combo in _combos(_structural(space.common + space.conditional[m])):
            counts = count_trainable(trial_config(rdata, {**space.fixed, "adapter.name": m, **combo}))
            for name in limits:
                k = "trainable_no_head" if name.endswith("no_head") else "trainable"
                best[name] = min(best.get(name, counts[k]), counts[k])
        for name, limit in limits.items():
            if best[name] > limit:
                raise _fail(
                    space.path, f"constraints.{name}",
                    f"no trial of {m!r} can meet {name}={limit:g} with recipe {recipe_path}: its smallest "
                    f"configuration trains {best[name]:,} parameters; raise the limit or drop {m!r} from adapter.name",
                )  # fmt: skip
        space.min_params[m] = best.get("max_trainable_params", best.get("max_trainable_params_no_head", 0))
