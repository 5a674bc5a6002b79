"""Load a finished run directory and predict with it (PyTorch path).

``load_run`` rebuilds the backbone from the run's config, checks that its weights are the ones the run was
trained on (content hash), applies the adapter and loads ``adapter.safetensors`` strictly.

:class:`RunSwitcher` serves several finished runs from as few built models as possible: runs of one *layout*
(:func:`switch_layout`: same task, backbone spec and weight hash, adapter config up to the values that live in
the saved tensors, same model-building task options) share one built model, and choosing another run of that
layout only copies its ``adapter.safetensors`` into it (the head is rebuilt when the class count differs).
Runs of tasks or adapters not verified for that (:data:`SWITCH_TASKS`, :data:`SWITCH_ADAPTERS`) are loaded with
``load_run`` as before. ``predict_runs`` (the CLI's ``predict <run> <run> … <inputs>``) uses it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision_peft import checkpoint as ckpt
from vision_peft.config import ConfigError, RunConfig
from vision_peft.recipe import build_run_config
from vision_peft.rundir import ADAPTER_FILE, CONFIG_FILE, RunInfo
from vision_peft.tasks import TASKS, Task, TaskModel
from vision_peft.tasks.base import LinearHeadModel


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", adapter_file: str | Path | None = None
) -> tuple[RunConfig, Task, TaskModel, RunInfo]:
    """(config, task, model in eval mode, the run's config.json as :class:`RunInfo`) for a run directory.

    Raises:
        CheckpointError: the directory is not a finished run, or its backbone weights differ from the ones
            available now (another backbone or another weight file).
    """
    run_dir = Path(run_dir)
    info = RunInfo.read(run_dir)
    cfg, task = _run_task(run_dir, info)
    model = task.build_model()
    want, got = info.backbone.weights_id, model.backbone.weights_id
    if want != got:
        raise ckpt.CheckpointError(
            f"{run_dir} was trained on backbone {info.backbone.spec} with weights {want[:12]}… "
            f"({info.backbone.weights_source}), but the weights found now hash to {got[:12]}… "
            f"({model.backbone.weights_source}). Point backbone.weights at the original file"
        )
    _check_extra_encoders(run_dir, info, task)
    path = _adapter_path(run_dir, adapter_file)
    ckpt.load_adapter_into(model, ckpt.load_tensors(path), str(path))
    model.to(device).eval()
    return cfg, task, model, info


def _run_task(run_dir: Path, info: RunInfo) -> tuple[RunConfig, Task]:
    """The run's resolved config and its task, with the run's class list (no model built, no data read)."""
    try:
        cfg = build_run_config(info.config)
    except ConfigError as e:  # e.g. a task or adapter this installation does not register
        raise ConfigError(f"{run_dir / CONFIG_FILE}: {e}") from None
    task = TASKS.get(cfg.task.name).builder(cfg)
    if task.has_classes and "classes" in info.task_state:
        task.set_classes(info.task_state["classes"])
    return cfg, task


def _adapter_path(run_dir: Path, adapter_file: str | Path | None) -> Path:
    path = Path(adapter_file) if adapter_file else run_dir / ADAPTER_FILE
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path} is missing: the run has not finished (resume it with --resume {run_dir})")
    return path


def _check_extra_encoders(run_dir: Path, info: RunInfo, task: Task) -> None:
    """Frozen encoders a task builds besides the backbone (e.g. the text encoder of refseg/pointcloud) must have the
    weights the run was trained with: their hash is in config.json's task_state, the current one in state_info()."""
    saved, now = info.task_state, task.state_info()
    for key, rec in saved.items():
        if not (isinstance(rec, dict) and rec.get("weights_id")):
            continue
        cur = now.get(key) if isinstance(now.get(key), dict) else {}
        if cur.get("weights_id") != rec["weights_id"]:
            raise ckpt.CheckpointError(
                f"{run_dir} was trained with {key} {rec.get('spec')} weights {rec['weights_id'][:12]}… "
                f"({rec.get('weights_source')}), but the weights found now are {cur.get('spec')} "
                f"{str(cur.get('weights_id'))[:12]}… ({cur.get('weights_source')}); put the original weights back "
                f"(task.{key}.weights=<file>) or retrain"
            )


def predict_files(
    run_dir: str | Path, inputs: list[str | Path], device: str = "cpu", top_k: int = 5, mc_samples: int = 0
) -> list[dict[str, Any]]:
    """Predict input files with any finished run (images, point files … as the run's task reads them).

    ``mc_samples`` > 0: Monte Carlo prediction through a PVeRA adapter's sampled latent (classification runs)."""
    cfg, task, model, _ = load_run(run_dir, device)
    return _predict_loaded(run_dir, cfg, task, model, inputs, device, top_k, mc_samples)


def _predict_loaded(
    run_dir: str | Path, cfg: RunConfig, task: Task, model: TaskModel, inputs: list[str | Path], device: str,
    top_k: int, mc_samples: int,
) -> list[dict[str, Any]]:  # fmt: skip
    if not mc_samples:
        return task.predict(model, [str(p) for p in inputs], torch.device(device), top_k=top_k)
    if "mc_samples" not in task.predict_options:
        able = [n for n, e in TASKS.items() if "mc_samples" in e.builder.predict_options]
        raise ValueError(
            f"{run_dir}: --mc-samples is available for {', '.join(able)} runs; this is a {cfg.task.name} run"
        )
    return task.predict(model, [str(p) for p in inputs], torch.device(device), top_k=top_k, mc_samples=mc_samples)


# -- several runs, one built model per layout ---------------------------------------------------------------
# Tasks verified for switching, each with the config fields that only its data pipeline reads (folder scan, class
# selection from the data, split, augmentation): build_model reads the rest of the task config and the class
# count alone, stores nothing on the task, and predict reads the task's own config and class list — a task object
# per run (no model, no data) carries those. Both build a LinearHeadModel, whose head is rebuilt for another class
# count; every other model tensor that differs between runs (adapter, head, multilabel's threshold) is saved.
SWITCH_TASKS: dict[str, tuple[str, ...]] = {
    "classification": ("data_root", "classes", "split", "split_seed", "bad_files", "augment"),
    "multilabel": ("data_root", "classes", "min_images", "split", "split_seed", "augment"),
}
# Adapters verified for switching, each with the config fields that only initialise tensors saved in
# adapter.safetensors (LoRA's seed draws A, a parameter or a saved buffer; prompt init_std draws saved
# parameters). Every other field (LoRA's r and alpha, whose python float scale alpha / r is no tensor; dropout
# modules; prompt counts, sizes, stages) stays in the layout. Not listed, so loaded with load_run: DoRA (ranks
# pruned during training), PVeRA (shared random projections kept outside the state dict), KIND (class gates that
# follow the class list), SaRA / FISH (sparse index sets), DETRIS and the point-cloud adapters.
SWITCH_ADAPTERS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "full": (),
    "lora": ("seed",),
    "vpt": ("init_std",),
    "pad_prompt": ("init_std",),
    "prompt_map": ("init_std",),
}
# config sections that never reach the built model: the optimiser schedule, seeds of data order, output paths
_RUN_ONLY_SECTIONS = ("train", "output")
# backbone fields that only say where the weights are found: the content hash in config.json pins the weights
_WEIGHT_LOCATION_FIELDS = ("weights", "allow_download")


def switch_layout(cfg: RunConfig, info: RunInfo) -> tuple[str | None, str]:
    """``(key, "")``: runs with equal keys build interchangeable models (they differ only in saved tensors and the
    class count), so one built model serves them all by loading each run's tensors. ``(None, why)`` for runs that
    must be loaded on their own (a task or adapter not verified for switching, no recorded weight hash)."""
    task, adapter = cfg.task.name, cfg.adapter.name
    if task not in SWITCH_TASKS:
        return None, f"task {task} is not verified for adapter switching"
    if adapter not in SWITCH_ADAPTERS:
        return None, f"adapter {adapter} is not verified for adapter switching"
    if not info.backbone.weights_id:
        return None, "its config.json records no backbone weight hash"
    data = cfg.to_dict()
    key: dict[str, Any] = {s: v for s, v in data.items() if s not in _RUN_ONLY_SECTIONS}
    key["task"] = {k: v for k, v in data["task"].items() if k not in SWITCH_TASKS[task]}
    key["adapter"] = {k: v for k, v in data["adapter"].items() if k not in SWITCH_ADAPTERS[adapter]}
    key["backbone"] = {k: v for k, v in data["backbone"].items() if k not in _WEIGHT_LOCATION_FIELDS}
    key["backbone_weights_id"] = info.backbone.weights_id
    key["frozen_encoders"] = {
        k: rec["weights_id"] for k, rec in info.task_state.items() if isinstance(rec, dict) and rec.get("weights_id")
    }
    return json.dumps(key, sort_keys=True, default=str), ""


def _fit_head(model: TaskModel, num_classes: int) -> None:
    """A fresh linear head for ``num_classes`` (its weights come from the run's tensors right after)."""
    head = getattr(model, "head", None)
    if isinstance(model, LinearHeadModel) and isinstance(head, nn.Linear) and head.out_features != num_classes:
        w = head.weight
        model.head = nn.Linear(
            head.in_features, num_classes, bias=head.bias is not None, device=w.device, dtype=w.dtype
        )


@dataclass
class _Slot:
    """One built model and the run whose tensors it holds; ``users`` are callers inside :meth:`RunSwitcher.use`."""

    loaded: tuple[RunConfig, Task, TaskModel, RunInfo] | None = None
    ident: tuple | None = None
    users: int = 0

    def __post_init__(self) -> None:
        self.cond = threading.Condition()


class RunSwitcher:
    """Finished runs on as few built models as possible, for a server, the app or ``predict`` with several runs.

    One built model per layout (:func:`switch_layout`): the first run of a layout is loaded with :func:`load_run`;
    another run of it is switched to by loading its adapter tensors strictly into that model (a new linear head
    when its class count differs) and giving it its own task object (config, class list). Runs that cannot share
    a model get a slot of their own. At most ``max_layouts`` models stay built (least recently used goes first).

    Thread-safe through :meth:`use`: callers of one slot holding the same run run concurrently, a switch waits
    until they are done. ``builds`` / ``switches`` count full loads and tensor switches.
    """

    def __init__(self, device: str | torch.device = "cpu", max_layouts: int = 2) -> None:
        if max_layouts < 1:
            raise ValueError(f"max_layouts must be >= 1, got {max_layouts}")
        self.device = torch.device(device)
        self.max_layouts = max_layouts
        self.builds = 0
        self.switches = 0
        self.reasons: dict[str, str] = {}  # run dir -> why it could not share a model (for logs)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def layouts(self) -> int:
        """Models built and kept now."""
        return sum(1 for s in self._slots.values() if s.loaded is not None)

    def load(self, run_dir: str | Path, adapter_file: str | Path | None = None):
        """``load_run``'s (config, task, model, info) for ``run_dir``. The model may be shared with other runs of
        its layout: it holds this run's tensors until another run of the layout is loaded (use :meth:`use` when
        several threads predict)."""
        with self.use(run_dir, adapter_file) as loaded:
            return loaded

    @contextmanager
    def use(self, run_dir: str | Path, adapter_file: str | Path | None = None) -> Iterator[tuple]:
        """``with switcher.use(run) as (cfg, task, model, info):`` — the model holds ``run``'s tensors for the whole
        block (a switch to another run of its layout waits until every such block has ended)."""
        slot = self._acquire(Path(run_dir), adapter_file)
        try:
            yield slot.loaded
        finally:
            with slot.cond:
                slot.users -= 1
                slot.cond.notify_all()

    def _acquire(self, run_dir: Path, adapter_file: str | Path | None) -> _Slot:
        info = RunInfo.read(run_dir)
        cfg, task = _run_task(run_dir, info)
        path = _adapter_path(run_dir, adapter_file)
        st = path.stat()
        ident = (str(run_dir.resolve()), str(path.resolve()), st.st_mtime_ns, st.st_size)
        key, why = switch_layout(cfg, info)
        if key is None:
            self.reasons[str(run_dir)] = why
            key = "run:" + json.dumps(ident)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot()
                while len(self._slots) > self.max_layouts:  # in-flight users keep an evicted model until they finish
                    self._slots.popitem(last=False)
            self._slots.move_to_end(key)
        with slot.cond:
            while slot.users and slot.ident != ident:
                slot.cond.wait()
            if slot.ident != ident:
                try:
                    if slot.loaded is None or key.startswith("run:"):
                        slot.loaded = None  # the previous model can go before the new one is built
                        slot.loaded = load_run(run_dir, self.device, adapter_file)
                        self.builds += 1
                    else:
                        model = slot.loaded[2]
                        if task.has_classes:
                            _fit_head(model, len(task.classes))
                        ckpt.load_adapter_into(model, ckpt.load_tensors(path), str(path))
                        model.to(self.device).eval()
                        slot.loaded = (cfg, task, model, info)
                        self.switches += 1
                    slot.ident = ident
                except BaseException:
                    slot.loaded = slot.ident = None  # never leave a half-switched model behind
                    raise
            slot.users += 1
        return slot


def predict_runs(
    run_dirs: list[str | Path], inputs: list[str | Path], device: str = "cpu", top_k: int = 5, mc_samples: int = 0,
    switcher: RunSwitcher | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """``predict_files`` for several runs on the same inputs, through one :class:`RunSwitcher` (one backbone load
    per layout). Each record gets a ``run`` field (the run directory as given) before the task's fields."""
    sw = switcher or RunSwitcher(device, max_layouts=1)
    layout: dict[int, str] = {}
    for i, run_dir in enumerate(run_dirs):  # runs of one layout back to back: one build each, whatever the order
        info = RunInfo.read(run_dir)
        key, _ = switch_layout(_run_task(Path(run_dir), info)[0], info)
        layout[i] = key or f"run:{i}"
    first = {k: i for i, k in reversed(layout.items())}
    order = sorted(range(len(run_dirs)), key=lambda i: (first[layout[i]], i))
    per_run: dict[int, list[dict[str, Any]]] = {}
    for i in order:
        with sw.use(run_dirs[i]) as (cfg, task, model, _):
            recs = _predict_loaded(run_dirs[i], cfg, task, model, inputs, device, top_k, mc_samples)
        per_run[i] = [{"run": str(run_dirs[i]), **rec} for rec in recs]
    return [rec for i in range(len(run_dirs)) for rec in per_run[i]]


def is_run_dir(path: str | Path) -> bool:
    """A directory holding ``config.json`` (how ``predict`` tells run directories from inputs)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()
