"""What the app shows for each registered task and backbone, read from the registries in one place.

Every tab, upload rule, dataset preview and predict panel of the app is chosen from a :class:`TaskView`: the
task's declared capabilities (class attributes of its :class:`~vision_peft.tasks.base.Task`: ``runtime``,
``upload_suffixes``, ``preview``, ``predict_options``) and its runtime's declared ``panel`` kind
(:data:`vision_peft.runtimes.RUNTIMES`). No task name is written here or anywhere else in ``app/``: a newly
registered task gets its tab, upload rules, preview and panel without an edit to the app.

The registries are imported inside the functions, so importing this module (and ``app.uploads``) stays cheap.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from vision_peft.registry import satisfied

# Concrete backbone specs the backbone dropdown offers (a family name, or ``family:argument`` for the families
# that take one); each tab lists those whose family provides what its task requires (registry capability tags).
SUGGESTED_BACKBONES = (
    "effnet_lite0",
    "timm:test_vit",
    "timm:vit_small_patch16_224",
    "open_clip:ViT-B-32@openai",
    "pointnet",
    "pointbert",
)


@dataclass(frozen=True)
class TaskView:
    """One registered task as the app sees it.

    Attributes:
        name: registry name (API endpoint prefix, recipe ``task.name``, run ``config.json`` task name).
        title: the tab title (the registry help's first clause).
        help: the registry help line, shown at the top of the tab.
        upload_suffixes: file types a dataset zip may hold.
        preview: dataset preview kind (``app.previews.PREVIEWS``).
        panel: predict-panel kind of the task's runtime (``app.panels.PANELS``).
        predict_options: keyword options the task's ``predict`` takes (``top_k``, ``mc_samples`` …).
        requires: capability tags a backbone must provide for this task (empty: any backbone).
    """

    name: str
    title: str
    help: str
    upload_suffixes: tuple[str, ...]
    preview: str
    panel: str
    predict_options: tuple[str, ...]
    requires: tuple[str, ...]


def _title(name: str, help_line: str) -> str:
    """A short tab title: the help's first clause ("image classification, …" → "Image classification")."""
    head = help_line.split(":")[0].split(",")[0].split("(")[0].strip()
    return head[:1].upper() + head[1:] if head else name


def task_view(name: str) -> TaskView:
    """The app's view of the registered task ``name``.

    Raises:
        vision_peft.registry.UnknownNameError: ``name`` is not a registered task (the message lists them), or its
            ``runtime`` attribute names no registered runtime (fix the task class's ``runtime``).
    """
    from vision_peft.runtimes import RUNTIMES
    from vision_peft.tasks import TASKS

    entry = TASKS.get(name)
    task_cls = entry.builder
    try:
        runtime = RUNTIMES.get(task_cls.runtime).builder
    except LookupError as e:
        raise type(e)(
            f"task {name!r} ({task_cls.__module__}.{task_cls.__qualname__}) declares runtime {task_cls.runtime!r}: "
            f"{e}. Set the task class's `runtime` to its RUNTIMES name"
        ) from None
    return TaskView(
        name=name,
        title=_title(name, entry.help),
        help=entry.help,
        upload_suffixes=tuple(task_cls.upload_suffixes),
        preview=task_cls.preview,
        panel=runtime.panel,
        predict_options=tuple(task_cls.predict_options),
        requires=tuple(entry.requires),
    )


def task_views() -> list[TaskView]:
    """One view per registered task, in registry order (one app tab each)."""
    from vision_peft.tasks import TASKS

    return [task_view(name) for name in TASKS.names()]


def upload_suffixes(task: str) -> tuple[str, ...]:
    """File types a dataset zip for ``task`` may hold (the task's declared ``upload_suffixes``)."""
    return task_view(task).upload_suffixes


def _recipes(task: str) -> dict[str, dict]:
    """Recipe name (``tasks/*.yaml`` stem, first recipe folder wins) -> its data, for recipes of ``task``."""
    from vision_peft.recipe import recipe_dirs

    out: dict[str, dict] = {}
    for d in recipe_dirs():
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            try:
                data = yaml.safe_load(f.read_text()) or {}
            except yaml.YAMLError:
                continue
            t = data.get("task") if isinstance(data, dict) else None
            name = t if isinstance(t, str) else (t or {}).get("name")
            if name == task and f.stem not in out:
                out[f.stem] = data
    return out


def recipes_for(task: str) -> list[str]:
    """Recipe names (``tasks/*.yaml`` stems, first recipe folder wins) whose ``task.name`` is ``task``."""
    return list(_recipes(task))


def _recipe_families(task: str) -> list[str]:
    """Backbone families (the part of ``backbone.name`` before ':') that the recipes of ``task`` name."""
    out: list[str] = []
    for data in _recipes(task).values():
        section = data.get("backbone")
        family = str((section or {}).get("name") or "").partition(":")[0] if isinstance(section, dict) else ""
        if family and family not in out:
            out.append(family)
    return out


def backbone_needs(view: TaskView) -> set[str]:
    """Capabilities a backbone must provide for ``view``'s task: the task entry's ``requires``, else those that
    every registered backbone family named in the task's recipes provides (registry ``provides`` tags)."""
    from vision_peft.backbones import BACKBONES

    if view.requires:
        return set(view.requires)
    tags = [set(BACKBONES.get(f).provides) for f in _recipe_families(view.name) if f in BACKBONES]
    return set.intersection(*tags) if tags else set()


def backbone_specs(view: TaskView) -> list[str]:
    """The suggested backbone specs for ``view``'s tab: those whose family provides every capability the task
    needs (:func:`backbone_needs`); when nothing declares a need, those of the families the task's recipes use."""
    from vision_peft.backbones import BACKBONES

    need = backbone_needs(view)
    known = [s for s in SUGGESTED_BACKBONES if s.partition(":")[0] in BACKBONES]
    if not need:
        families = _recipe_families(view.name)
        return [s for s in known if s.partition(":")[0] in families]
    return [s for s in known if satisfied(need, BACKBONES.get(s.partition(":")[0]).provides)]


RANDOM_WEIGHTS = "random weights (tests)"  # the status of random-weight test backbones (backbones.weights_status)


@functools.lru_cache(maxsize=64)
def weights_status(spec: str) -> str:
    """The backbone family's own status for ``spec`` (``available``, ``random weights (tests)`` or where to put the
    weights; :func:`vision_peft.backbones.weights_status`), asked once per spec and process."""
    from vision_peft.backbones import weights_status as backbone_weights_status

    return backbone_weights_status(spec)


def is_test_backbone(spec: str) -> bool:
    """A random-weight test backbone (the app's recipe gets ``backbone.pretrained: false`` for it)."""
    return weights_status(spec) == RANDOM_WEIGHTS


def run_task(run_dir: Path) -> str | None:
    """The task a finished run directory was trained for; None when it is not a finished run, or its config.json
    cannot be read (such a folder is not offered for prediction; ``python -m vision_peft predict`` says why)."""
    from vision_peft.rundir import CheckpointError, RunInfo, is_finished

    if not is_finished(run_dir):
        return None
    try:
        return RunInfo.read(run_dir).task_name
    except (CheckpointError, KeyError):
        return None
