"""Load a finished run directory and predict with it (PyTorch path).

``load_run`` rebuilds the backbone from the run's config, checks that its weights are the ones the run was
trained on (content hash), applies the adapter and loads ``adapter.safetensors`` strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vision_peft import checkpoint as ckpt
from vision_peft.config import ConfigError, RunConfig
from vision_peft.recipe import build_run_config
from vision_peft.rundir import ADAPTER_FILE, CONFIG_FILE, RunInfo
from vision_peft.tasks import TASKS, Task, TaskModel


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
    try:
        cfg = build_run_config(info.config)
    except ConfigError as e:  # e.g. a task or adapter this installation does not register
        raise ConfigError(f"{run_dir / CONFIG_FILE}: {e}") from None
    task = TASKS.get(cfg.task.name).builder(cfg)
    if task.has_classes and "classes" in info.task_state:
        task.set_classes(info.task_state["classes"])
    model = task.build_model()
    want, got = info.backbone.weights_id, model.backbone.weights_id
    if want != got:
        raise ckpt.CheckpointError(
            f"{run_dir} was trained on backbone {info.backbone.spec} with weights {want[:12]}… "
            f"({info.backbone.weights_source}), but the weights found now hash to {got[:12]}… "
            f"({model.backbone.weights_source}). Point backbone.weights at the original file"
        )
    _check_extra_encoders(run_dir, info, task)
    path = Path(adapter_file) if adapter_file else run_dir / ADAPTER_FILE
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path} is missing: the run has not finished (resume it with --resume {run_dir})")
    ckpt.load_adapter_into(model, ckpt.load_tensors(path), str(path))
    model.to(device).eval()
    return cfg, task, model, info


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
    if not mc_samples:
        return task.predict(model, [str(p) for p in inputs], torch.device(device), top_k=top_k)
    if "mc_samples" not in task.predict_options:
        able = [n for n, e in TASKS.items() if "mc_samples" in e.builder.predict_options]
        raise ValueError(
            f"{run_dir}: --mc-samples is available for {', '.join(able)} runs; this is a {cfg.task.name} run"
        )
    return task.predict(model, [str(p) for p in inputs], torch.device(device), top_k=top_k, mc_samples=mc_samples)
