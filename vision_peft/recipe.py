"""Recipes: YAML files in ``tasks/``, dotted overrides, and the sections resolved from the registries.

A recipe is a YAML mapping with the sections of :class:`~vision_peft.config.RunConfig`. The ``task`` and
``adapter`` sections are polymorphic: their ``name`` picks the config dataclass registered for that task or
adapter, and every other key must be a field of that class. Unknown keys are an error naming the valid fields.

This module sits above the registries (it imports tasks, adapters and backbones) and below train/predict/cli;
:mod:`vision_peft.config` stays a leaf that knows nothing of them.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from vision_peft.adapters import ADAPTERS
from vision_peft.backbones import BACKBONES
from vision_peft.config import ConfigError, RunConfig, build_dataclass, reject_unknown
from vision_peft.paths import REPO_ROOT
from vision_peft.registry import Registry, unmet
from vision_peft.rundir import CONFIG_FILE, RunInfo
from vision_peft.tasks import TASKS

POLYMORPHIC: dict[str, Registry] = {"task": TASKS, "adapter": ADAPTERS}  # section → registry of its config class


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from plain data (a parsed recipe, or ``config.json``'s ``config``).

    Raises:
        ConfigError: an unknown section, key, task/adapter/backbone name, or a value of the wrong type; the
            message names it and lists the valid choices.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    reject_unknown(data, list(fields), "")
    out: dict[str, Any] = {}
    for section, registry in POLYMORPHIC.items():
        raw = data.get(section)
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"recipe section {section!r} needs a 'name' (one of: {', '.join(registry.names())})")
        if not isinstance(raw["name"], str):
            raise ConfigError(
                f"{section}.name must be a string (one of: {', '.join(registry.names())}), got {raw['name']!r}"
            )
        try:
            entry = registry.get(raw["name"])
        except LookupError as e:
            raise ConfigError(f"{section}.name: {e}") from None
        out[section] = build_dataclass(entry.config_cls, raw, section)
    for section in ("backbone", "train", "output"):
        out[section] = build_dataclass(fields[section].default_factory, data.get(section) or {}, section)
    try:  # the family before ':' must be registered
        BACKBONES.get(out["backbone"].name.partition(":")[0])
    except LookupError as e:
        raise ConfigError(f"backbone.name={out['backbone'].name!r}: {e}") from None
    return RunConfig(**out)


def offered_tags(backbone_name: str, task_name: str) -> set[str]:
    """The capability tags a backbone spec's family and a task offer an adapter (registry ``provides``)."""
    return set(BACKBONES.get(backbone_name.partition(":")[0]).provides) | set(TASKS.get(task_name).provides)


def compatible_adapters(backbone_name: str, task_name: str) -> list[str]:
    """Every registered adapter this backbone and task can take (what a sweep or the app may offer)."""
    offered = offered_tags(backbone_name, task_name)
    return [a for a, e in ADAPTERS.items() if not unmet(e.requires, offered)]


def incompatibility(adapter: str, backbone_name: str, task_name: str) -> str | None:
    """Why ``adapter`` cannot go with this backbone and task (its unmet capability tags and the adapters that can),
    or None when it can. E.g. Moment Probing needs a task whose head reads pooled features ("pooled"), DETRIS a
    task that binds a text encoder ("text_encoder")."""
    missing = unmet(ADAPTERS.get(adapter).requires, offered_tags(backbone_name, task_name))
    if not missing:
        return None
    ok = ", ".join(compatible_adapters(backbone_name, task_name))
    return (
        f"adapter {adapter!r} needs {' and '.join(repr(t) for t in missing)}, which backbone {backbone_name!r} with "
        f"task {task_name!r} does not offer; compatible adapters: {ok}"
    )


def check_compatible(cfg: RunConfig) -> None:
    """Refuse a config whose adapter the backbone family and task cannot take (:func:`incompatibility`)."""
    why = incompatibility(cfg.adapter.name, cfg.backbone.name, cfg.task.name)
    if why is not None:
        raise ConfigError(f"adapter.name={cfg.adapter.name!r}: {why}")


# what yaml.safe_load raises for malformed text: YAMLError, and (PyYAML's scalar constructors on bad tagged values
# such as `!!float nope` or a bare `!!float`) ValueError / IndexError / TypeError …; deep nesting: RecursionError
YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, LookupError, AttributeError, ArithmeticError, RecursionError)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=5e-4", "--adapter.r=4"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=5e-4)")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"override {item!r}: the key {key!r} has an empty part; write section.key=value")
        try:  # safe_load builds plain data only: a tag like !!python/object is an error here, never code
            value = yaml.safe_load(raw) if raw != "" else ""  # `null` or `~` give None; `none` stays a string
        except YAML_ERRORS as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise ConfigError(f"override {key}: the value {raw[:60]!r} is not a YAML scalar or list ({msg})") from None
        node = out
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
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    data = copy.deepcopy(data)
    for section in POLYMORPHIC:
        new = overrides.get(section)
        old = data.get(section)
        old_name = old if isinstance(old, str) else old.get("name") if isinstance(old, dict) else None
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
    """Read a YAML recipe, apply dotted overrides (``["train.lr=5e-4"]`` or a nested dict), validate."""
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path} is not UTF-8 text ({e}); save it as UTF-8") from None
    except YAML_ERRORS as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e or type(e).__name__}") from None
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    try:
        return build_run_config(apply_overrides(data, overrides or {}))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved RunConfig of a run directory (its ``config.json``, read through :class:`RunInfo`)."""
    info = RunInfo.read(run_dir)
    try:
        return build_run_config(info.config)
    except ConfigError as e:
        raise ConfigError(f"{Path(run_dir) / CONFIG_FILE}: {e}") from None
