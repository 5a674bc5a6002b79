"""The training engine: ``run(cfg) -> run_dir``, one loop for every task.

AdamW (no decay on biases and norms, optional separate head lr), linear warm-up + cosine decay, gradient
accumulation, autocast (bf16/fp16 with a grad scaler for fp16), seeded data order and augmentation,
periodic evaluation, ``metrics.jsonl``, checkpoints every N steps and exact resume, and multi-process
data parallelism when launched with ``torchrun`` (NCCL on CUDA, gloo on CPU). The parts live in
:mod:`vision_peft.engine`; the run directory's files in :mod:`vision_peft.rundir`.

Resume is exact: the data order of each epoch is a permutation seeded by (seed, epoch), augmentation is
seeded per (seed, epoch, sample), DataLoaders own their generator (so they never draw from the global
RNG), and the checkpoint carries the optimizer, scheduler and RNG states. A run killed mid-way and resumed
reaches the same adapter tensors as an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import vision_peft
from vision_peft import checkpoint as ckpt
from vision_peft import prefix_cache, recompute, rundir, tb_log
from vision_peft.config import EXECUTION_KEYS, RunConfig
from vision_peft.engine import (
    EpochSampler,
    Schedule,
    amp_name,
    build_optimizer,
    build_scheduler,
    capture_rng,
    count_parameters,
    dist_info,
    eval_loader,
    make_loader,
    peak_memory_mb,
    resolve_amp,
    resolve_device,
    restore_rng,
    seed_everything,
    train_step,
)
from vision_peft.recipe import check_compatible
from vision_peft.rundir import BackboneInfo, CheckpointError, RunInfo, StepsInfo, WriteError, write_error
from vision_peft.tasks import TASKS, Task, TaskModel

log = logging.getLogger("vision_peft")


def run(cfg: RunConfig, resume: str | Path | None = None, progress: bool = True) -> Path:
    """Train ``cfg`` and return the run directory. ``resume`` continues an interrupted run in place."""
    # -- setup: processes, run directory, model, data, schedule, optimizer ---------------------------------
    check_compatible(cfg)  # e.g. Moment Probing on a task whose head does not read pooled features: refused here
    rank, world = dist_info()
    distributed = world > 1
    device = resolve_device(cfg.train.device)
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    amp_dtype = resolve_amp(cfg.train.amp, device)
    seed_everything(cfg.train.seed)
    run_dir = _open_run_dir(cfg, resume, rank, distributed)
    _setup_logging(run_dir, rank)

    task: Task = TASKS.get(cfg.task.name).builder(cfg)
    model = task.build_model().to(device)
    counts = count_parameters(model)
    log.info("%s", rundir.describe_counts(counts))
    data = task.datasets(model)
    if "train" not in data:
        raise RuntimeError(f"task {cfg.task.name} produced no training split")
    t = cfg.train
    # compute only what can change: the frozen prefix once per image, recomputation, compile
    cache = prefix_cache.prepare(cfg, task, model, data, device, amp_dtype, rank, world)
    data = cache.datasets
    recompute_report = recompute.apply(model, task, t, device, amp_dtype)
    train_ds = data["train"]
    sampler = EpochSampler(len(train_ds), t.seed, rank, world, shuffle=True)
    plan = Schedule.of(t, len(sampler))
    total = plan.total_steps
    info = _run_info(cfg, task, model, counts, device, amp_dtype, world, plan)
    if rank == 0:
        info.write(run_dir)
        rundir.write_recipe(run_dir, info.config, vision_peft.__version__)  # refreshed on resume: the same config
        splits = {k: [p for p, _ in v] for k, v in task.splits().items()}
        if splits:
            rundir.atomic_write_json(run_dir / rundir.SPLIT_FILE, splits)

    train_model: torch.nn.Module = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_model, compile_report = recompute.maybe_compile(train_model, t, device)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, t, total)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    step = 0
    if resume is not None:
        step = _restore(run_dir, model, opt, sched, scaler, device, rank, distributed)
        log.info("resumed %s at step %d / %d", run_dir, step, total)
    with _stop_on_write_error(run_dir, step):  # TensorBoard event files: rank 0, from the checkpoint step on
        tb = tb_log.open_log(run_dir if rank == 0 else None, t.tensorboard, step if resume is not None else None)
        if resume is None:
            tb.start(counts, (run_dir / rundir.RECIPE_FILE).read_text() if tb.enabled else "")

    def log_metrics(rec: dict[str, Any]) -> None:
        if rank == 0:
            with _stop_on_write_error(run_dir, step):
                rundir.append_metrics(run_dir, rec)
                tb.record(rec)

    def evaluate(split: str) -> dict[str, Any] | None:
        if split not in data or rank != 0:
            return None
        with cache.active(model):
            res = task.evaluate(model, eval_loader(task, data[split], t, device, t.num_workers), device, amp_dtype)
        model.set_train_mode()
        return res

    try:
        # -- the loop: one optimizer step, the adapter's step hook, metrics, evaluation, checkpoint ------------
        model.set_train_mode()
        bar = _progress_bar(cfg, total, step) if progress and rank == 0 else None
        step_delay = float(os.environ.get("VISION_PEFT_STEP_DELAY", "0"))  # debugging/tests: slow each step down
        t_start, step_times = time.perf_counter(), []
        while step < total:
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            sampler.set_epoch(epoch, skip=in_epoch * t.grad_accum * t.batch_size)
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            batches = iter(make_loader(task, train_ds, t.batch_size, sampler, t.num_workers, plan.drop_last, device))
            for _ in range(in_epoch, plan.steps_per_epoch):
                t0 = time.perf_counter()
                with cache.active(model):
                    losses = train_step(
                        model, train_model, batches, opt, sched, scaler, t, device, amp_dtype, distributed, step
                    )
                step += 1
                adapter_log = model.adapter.step_fn(step, total) if model.adapter.step_fn is not None else None
                if step_delay:
                    time.sleep(step_delay)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                lr = sched.get_last_lr()[0]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}")
                if step % t.log_every == 0 or step == total:
                    log_metrics(
                        {
                            "step": step,
                            "epoch": epoch,
                            **losses,
                            "lr": lr,
                            "step_time": dt,
                            "time": time.time(),
                            "total_steps": total,
                            **(adapter_log or {}),
                        }
                    )
                if step % plan.eval_every == 0 and step < total and "val" in data:
                    res = evaluate("val")
                    if res:
                        log_metrics({"step": step, "split": "val", **_scalars(res)})
                        log.info("step %d val %s", step, _fmt(res))
                if step % plan.ckpt_every == 0 or step == total:
                    if rank == 0:
                        with _stop_on_write_error(run_dir, step):
                            _save_checkpoint(run_dir, model, opt, sched, scaler, step, total, device)
                if step >= total:
                    break
            del batches
        if bar is not None:
            bar.close()

        # -- finish: final evaluation, adapter tensors, final metrics, model card ------------------------------
        final: dict[str, Any] = {"step": step}
        for split in ("val", "test") if t.final_test else ("val",):  # a sweep trial never touches test
            res = evaluate(split)
            if res is not None:
                final[split] = res
                log_metrics({"step": step, "split": split, **_scalars(res)})
                log.info("final %s %s", split, _fmt(res))
        final["compute"] = {"cache": cache.report, "recompute": recompute_report, "compile": compile_report}
        if rank == 0:
            with _stop_on_write_error(run_dir, step):
                tb.hparams(info.config, counts, final, step)
                tb.close()  # before the adapter: a run whose event file failed is not finished, and resumes
                _finish(run_dir, cfg, model, info, final, device, time.perf_counter() - t_start, step_times)
    finally:
        tb.abandon()  # a run stopped by an error: close the event file quietly
    if distributed:
        dist.barrier()
    return run_dir


# -- setup helpers ------------------------------------------------------------------------------------------
def new_run_dir(cfg: RunConfig) -> Path:
    """``<output.runs_root>/<output.name or task-adapter-timestamp>``, refusing one that already holds a run."""
    root = Path(cfg.output.runs_root)
    name = cfg.output.name or f"{cfg.task.name}-{cfg.adapter.name}-{datetime.now():%Y%m%d-%H%M%S}"
    d = root / name
    if (d / rundir.CONFIG_FILE).exists():
        raise FileExistsError(
            f"run directory {d} already exists; resume it with --resume {d} or pick another output.name"
        )
    d.mkdir(parents=True, exist_ok=True)
    return d


def _open_run_dir(cfg: RunConfig, resume: str | Path | None, rank: int, distributed: bool) -> Path:
    """The run directory (rank 0 creates it, or checks that ``resume`` holds a run of this very config)."""
    run_dir: Path | None = None
    if rank == 0:
        if resume is not None:
            run_dir = Path(resume)
            if not (run_dir / rundir.CONFIG_FILE).exists():
                raise CheckpointError(f"--resume {run_dir}: not a run directory (config.json missing)")
            diff = _config_diff(RunInfo.read(run_dir).config, cfg)
            if diff:
                raise CheckpointError(f"--resume {run_dir}: the config differs from the run's in section(s) {diff}")
        else:
            run_dir = new_run_dir(cfg)
    if distributed:
        box = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return run_dir


def _config_diff(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Sections in which ``cfg`` differs from a run's saved config. The saved config is read through today's
    dataclasses first (a run written before a key existed has that key's default), and the execution choices
    (``EXECUTION_KEYS``: cache, recompute, compile, workers) may differ: they do not change what is computed."""
    from vision_peft.recipe import build_run_config

    try:
        old = build_run_config(saved).to_dict()
    except Exception:  # a config today's code cannot read: compare as stored
        old = saved
    new = cfg.to_dict()
    for d in (old, new):
        d["train"] = {k: v for k, v in (d.get("train") or {}).items() if k not in EXECUTION_KEYS}
    return [k for k in new if new[k] != old.get(k)]


def _setup_logging(run_dir: Path | None, rank: int) -> None:
    """stderr + ``train.log`` handlers on the ``vision_peft`` logger (rank 0 only), replacing earlier runs' ones."""
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        if getattr(h, "_vision_peft", False):
            log.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
        if run_dir is not None:
            handlers.append(logging.FileHandler(run_dir / rundir.LOG_FILE))
    for h in handlers:
        h.setFormatter(fmt)
        h._vision_peft = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.propagate = False


def _run_info(
    cfg: RunConfig,
    task: Task,
    model: TaskModel,
    counts: dict[str, int],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    world: int,
    plan: Schedule,
) -> RunInfo:
    """What ``config.json`` records about this run."""
    bb = model.backbone
    return RunInfo(
        vision_peft_version=vision_peft.__version__,
        config=cfg.to_dict(),
        backbone=BackboneInfo(bb.spec, bb.weights_id, bb.weights_source, bb.data_config, bb.embed_dim),
        task_state=task.state_info(),
        parameters=counts,
        adapter_touched=model.adapter.touched[:50],
        device=str(device),
        amp=amp_name(amp_dtype),
        world_size=world,
        steps=StepsInfo(total=plan.total_steps, per_epoch=plan.steps_per_epoch),
        torch=torch.__version__,
    )


def _restore(
    run_dir: Path,
    model: TaskModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    rank: int,
    distributed: bool,
) -> int:
    """Load checkpoint/ into the model, optimizer, scheduler, scaler and RNGs; returns the step it was taken at."""
    point = ckpt.load_resume_checkpoint(run_dir) if rank == 0 else None  # the previous one if the latest is bad
    state, meta = (point.state, point.meta) if point is not None else (None, None)
    if distributed:
        box = [state, meta]
        dist.broadcast_object_list(box, src=0)
        state, meta = box
    ckpt.load_adapter_into(model, state["model"], str(point.path) if point else f"{run_dir}/{rundir.CKPT_DIR}")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state, meta, device)
    step = int(meta["step"])
    if rank == 0:
        rundir.truncate_metrics(run_dir, step)
    return step


@contextmanager
def _stop_on_write_error(run_dir: Path, step: int) -> Iterator[None]:
    """A write that fails (full disk, size limit) stops the run with a :class:`WriteError` naming the file, the
    cause, the step reached, the last intact checkpoint and how to resume once there is space again."""
    try:
        yield
    except WriteError as e:
        at = ckpt.checkpoint_step(run_dir)
        where = f"the last intact checkpoint is step {at}" if at is not None else "no checkpoint was written yet"
        how = (
            f"`python -m vision_peft train --resume {run_dir}`"
            if at is not None
            else "the same `python -m vision_peft train` command with another output.name"
        )
        raise write_error(e.filename, e, f"the run stopped at step {step} ({where}); once there is space, continue "
                          f"with {how}") from e  # fmt: skip


def _progress_bar(cfg: RunConfig, total: int, step: int):
    from tqdm.auto import tqdm

    desc = f"train {cfg.task.name}/{cfg.adapter.name}"
    return tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


# -- loop and finish helpers --------------------------------------------------------------------------------
def _save_checkpoint(
    run_dir: Path,
    model: TaskModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    step: int,
    total: int,
    device: torch.device,
) -> None:
    """checkpoint/: adapter tensors, optimizer, scheduler, scaler and RNG states at ``step``."""
    rng_tensors, rng_meta = capture_rng(device)
    state = {
        "model": model.adapter_state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        **rng_tensors,
    }
    meta = {"step": step, "total_steps": total, "time": time.time(), **rng_meta}
    ckpt.save_checkpoint(run_dir, state, meta)


def _finish(
    run_dir: Path,
    cfg: RunConfig,
    model: TaskModel,
    info: RunInfo,
    final: dict[str, Any],
    device: torch.device,
    seconds: float,
    step_times: list[float],
) -> None:
    """adapter.safetensors (only what was trained), final_metrics.json (with timing) and the model card."""
    ckpt.save_tensors(
        run_dir / rundir.ADAPTER_FILE,
        model.adapter_state_dict(),
        metadata={
            "backbone": model.backbone.spec,
            "weights_id": model.backbone.weights_id,
            "adapter": cfg.adapter.name,
            "task": cfg.task.name,
        },
    )
    final["timing"] = {
        "train_seconds": seconds,
        "step_time_median": float(np.median(step_times)) if step_times else None,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    rundir.atomic_write_json(run_dir / rundir.FINAL_FILE, final)
    rundir.write_model_card(run_dir, info, final)
    log.info("run directory: %s", run_dir)


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def _fmt(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in _scalars(d).items())
