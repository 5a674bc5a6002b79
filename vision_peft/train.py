"""The training engine: ``run(cfg) -> run_dir``, one loop for every task.

AdamW (no decay on biases and norms, optional separate head lr), linear warm-up + cosine decay, gradient
accumulation, autocast (bf16/fp16 with a grad scaler for fp16), seeded data order and augmentation,
periodic evaluation, ``metrics.jsonl``, checkpoints every N steps and exact resume, and multi-process
data parallelism when launched with ``torchrun`` (NCCL on CUDA, gloo on CPU).

Resume is exact: the data order of each epoch is a permutation seeded by (seed, epoch), augmentation is
seeded per (seed, epoch, sample), DataLoaders own their generator (so they never draw from the global
RNG), and the checkpoint carries the optimizer, scheduler and RNG states. A run killed mid-way and resumed
reaches the same adapter tensors as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import vision_peft
from vision_peft import checkpoint as ckpt
from vision_peft.config import RunConfig
from vision_peft.tasks import TASKS, Task, TaskModel

log = logging.getLogger("vision_peft")


# -- environment --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; a requested cuda that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None = full precision)."""
    if mode == "none":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type == "cpu":
        raise RuntimeError("train.amp=fp16 needs CUDA; use bf16 or none on CPU")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# -- data order ---------------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation, sharded over ranks, that can start part-way (for resume)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = math.ceil(self.n / self.world)
        order += order[: per_rank * self.world - self.n]  # pad so every rank gets the same count
        return order[self.rank :: self.world]

    def __iter__(self):
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.world) - self.skip)


def make_loader(task: Task, ds, batch_size: int, sampler, num_workers: int, drop_last: bool, device: torch.device):
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=task.collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # never draw from the global RNG (exact resume)
        persistent_workers=False,
    )


# -- optimisation -------------------------------------------------------------------------------------------
def build_optimizer(model: TaskModel, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with no weight decay on 1-D tensors (biases, norms, prompts' scales) and an optional head lr."""
    head_ids = {id(p) for p in model.head_parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((id(p) in head_ids, p.ndim <= 1), []).append(p)
    t = cfg.train
    param_groups = []
    for (is_head, no_decay), params in sorted(groups.items()):
        lr = (t.head_lr or t.lr) if is_head else t.lr
        param_groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else t.weight_decay})
    if not param_groups:
        raise RuntimeError("nothing to train: the adapter and head have no trainable parameters")
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups, betas=(t.betas[0], t.betas[1]), fused=fused)


def lr_lambda(total: int, warmup: int, floor: float):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def count_parameters(model: TaskModel) -> dict[str, int]:
    """Trainable parameters with and without the head, and the frozen backbone's total."""
    head = {id(p) for p in model.head_parameters()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head_n = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) in head)
    backbone_total = sum(p.numel() for p in model.backbone.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {
        "trainable": trainable,
        "trainable_no_head": trainable - head_n,
        "head": head_n,
        "backbone_total": backbone_total,
        "total": total,
    }


def describe_counts(c: dict[str, int]) -> str:
    return (
        f"trainable {c['trainable']:,} / {c['total']:,} ({100 * c['trainable'] / c['total']:.2f} %) with head; "
        f"{c['trainable_no_head']:,} / {c['backbone_total']:,} "
        f"({100 * c['trainable_no_head'] / max(1, c['backbone_total']):.2f} %) of the backbone without head"
    )


# -- run directory ------------------------------------------------------------------------------------------
def new_run_dir(cfg: RunConfig) -> Path:
    root = Path(cfg.output.runs_root)
    name = cfg.output.name or f"{cfg.task.name}-{cfg.adapter.name}-{datetime.now():%Y%m%d-%H%M%S}"
    d = root / name
    if (d / ckpt.CONFIG_FILE).exists():
        raise FileExistsError(
            f"run directory {d} already exists; resume it with --resume {d} or pick another output.name"
        )
    d.mkdir(parents=True, exist_ok=True)
    return d


def _setup_logging(run_dir: Path | None, rank: int) -> None:
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
            handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._vision_peft = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.propagate = False


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def write_model_card(run_dir: Path, cfg: RunConfig, info: dict[str, Any], final: dict[str, Any]) -> None:
    lines = [
        f"# {run_dir.name}",
        "",
        f"- task: `{cfg.task.name}`; backbone: `{cfg.backbone.name}` ({info['backbone']['weights_source']}); "
        f"adapter: `{cfg.adapter.name}`",
        f"- {describe_counts(info['parameters'])}",
        f"- steps: {final.get('step')}, device: {info['device']}, amp: {info['amp']}, vision_peft {vision_peft.__version__}",
        "",
        "| split | metric | value |",
        "|---|---|---|",
    ]
    for split in ("val", "test"):
        for k, v in (final.get(split) or {}).items():
            if isinstance(v, (int, float)):
                lines.append(f"| {split} | {k} | {v:.4f} |" if isinstance(v, float) else f"| {split} | {k} | {v} |")
    lines += ["", f"Reproduce: `python -m vision_peft train {run_dir / 'config.json'}`", ""]
    ckpt.atomic_write_text(run_dir / "README.md", "\n".join(lines))


# -- the loop -----------------------------------------------------------------------------------------------
def run(cfg: RunConfig, resume: str | Path | None = None, progress: bool = True) -> Path:
    """Train ``cfg`` and return the run directory. ``resume`` continues an interrupted run in place."""
    rank, world = _dist_info()
    distributed = world > 1
    device = resolve_device(cfg.train.device)
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    amp_dtype = resolve_amp(cfg.train.amp, device)
    seed_everything(cfg.train.seed)

    run_dir: Path | None = None
    if rank == 0:
        if resume is not None:
            run_dir = Path(resume)
            saved = (
                json.loads((run_dir / ckpt.CONFIG_FILE).read_text()) if (run_dir / ckpt.CONFIG_FILE).exists() else None
            )
            if saved is None:
                raise ckpt.CheckpointError(f"--resume {run_dir}: not a run directory (config.json missing)")
            if saved["config"] != cfg.to_dict():
                diff = [k for k in cfg.to_dict() if cfg.to_dict()[k] != saved["config"].get(k)]
                raise ckpt.CheckpointError(
                    f"--resume {run_dir}: the config differs from the run's in section(s) {diff}"
                )
        else:
            run_dir = new_run_dir(cfg)
    if distributed:
        box = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    _setup_logging(run_dir, rank)

    task: Task = TASKS.get(cfg.task.name).builder(cfg)
    model = task.build_model().to(device)
    counts = count_parameters(model)
    log.info("%s", describe_counts(counts))
    data = task.datasets(model)
    if "train" not in data:
        raise RuntimeError(f"task {cfg.task.name} produced no training split")
    t = cfg.train
    train_ds = data["train"]
    sampler = EpochSampler(len(train_ds), t.seed, rank, world, shuffle=True)
    batches_per_epoch = len(sampler) // t.batch_size if len(sampler) >= t.batch_size else 1
    drop_last = len(sampler) >= t.batch_size
    steps_per_epoch = max(1, batches_per_epoch // t.grad_accum)
    total_steps = steps_per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, steps_per_epoch * t.epochs)
    eval_every = t.eval_every or steps_per_epoch
    ckpt_every = t.ckpt_every or steps_per_epoch

    info = {
        "vision_peft_version": vision_peft.__version__,
        "config": cfg.to_dict(),
        "backbone": {
            "spec": model.backbone.spec,
            "weights_id": model.backbone.weights_id,
            "weights_source": model.backbone.weights_source,
            "data_config": model.backbone.data_config,
            "embed_dim": model.backbone.embed_dim,
        },
        "task_state": task.state_info(),
        "parameters": counts,
        "adapter_touched": model.adapter.touched[:50],
        "device": str(device),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
        "world_size": world,
        "steps": {"total": total_steps, "per_epoch": steps_per_epoch},
        "torch": torch.__version__,
    }
    if rank == 0:
        ckpt.atomic_write_json(run_dir / ckpt.CONFIG_FILE, info)
        if hasattr(task, "splits"):
            ckpt.atomic_write_json(run_dir / "split.json", {k: [p for p, _ in v] for k, v in task.splits().items()})

    train_model: torch.nn.Module = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, t.warmup_steps, t.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step = 0
    if resume is not None:
        state, meta = ckpt.load_checkpoint(run_dir) if rank == 0 else (None, None)
        if distributed:
            box = [state, meta]
            dist.broadcast_object_list(box, src=0)
            state, meta = box
        ckpt.load_adapter_into(model, state["model"], f"{run_dir}/checkpoint/state.pt")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        random.setstate(tuple(meta["rng_python"][0:1]) + (tuple(meta["rng_python"][1]),) + (meta["rng_python"][2],))
        np_state = meta["rng_numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        step = int(meta["step"])
        if rank == 0:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
        log.info("resumed %s at step %d / %d", run_dir, step, total_steps)

    def log_metrics(rec: dict[str, Any]) -> None:
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def evaluate(split: str) -> dict[str, Any] | None:
        if split not in data or rank != 0:
            return None
        ds = data[split]
        loader = make_loader(
            task, ds, t.batch_size, EpochSampler(len(ds), 0, shuffle=False), t.num_workers, False, device
        )
        res = task.evaluate(model, loader, device, amp_dtype)
        model.set_train_mode()
        return res

    def save_ckpt() -> None:
        if rank != 0:
            return
        state = {
            "model": model.adapter_state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_torch": torch.get_rng_state(),
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        py = random.getstate()
        npst = np.random.get_state()
        meta = {
            "step": step,
            "total_steps": total_steps,
            "time": time.time(),
            "rng_python": [py[0], list(py[1]), py[2]],
            "rng_numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        }
        ckpt.save_checkpoint(run_dir, state, meta)

    model.set_train_mode()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=step,
            desc=f"train {cfg.task.name}/{cfg.adapter.name}",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    adapter_step = getattr(getattr(model, "adapter", None), "step_fn", None)  # e.g. DoRA's rank pruning
    step_delay = float(os.environ.get("VISION_PEFT_STEP_DELAY", "0"))  # debugging/tests: slow each step down
    t_start, step_times = time.perf_counter(), []
    last_eval: dict[str, Any] = {}
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, skip=in_epoch * t.grad_accum * t.batch_size)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        loader = make_loader(task, train_ds, t.batch_size, sampler, t.num_workers, drop_last, device)
        it = iter(loader)
        for _ in range(in_epoch, steps_per_epoch):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(t.grad_accum):
                batch = next(it)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = micro == t.grad_accum - 1 or not distributed
                ctx = train_model.no_sync() if (distributed and not sync) else _null()
                with ctx, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = train_model(batch)
                    loss = out["loss"] / t.grad_accum
                scaler.scale(loss).backward()
                loss_sum += float(loss.detach())
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss became {loss_sum} at step {step}; lower train.lr or use amp=none")
            if t.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            adapter_log = adapter_step(step, total_steps) if adapter_step is not None else None
            if step_delay:
                time.sleep(step_delay)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if step % t.log_every == 0 or step == total_steps:
                log_metrics(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_sum,
                        "lr": sched.get_last_lr()[0],
                        "step_time": dt,
                        "time": time.time(),
                        "total_steps": total_steps,
                        **(adapter_log or {}),
                    }
                )
            if step % eval_every == 0 and step < total_steps and "val" in data:
                last_eval = evaluate("val") or {}
                if last_eval:
                    log_metrics({"step": step, "split": "val", **_scalars(last_eval)})
                    log.info("step %d val %s", step, _fmt(last_eval))
            if step % ckpt_every == 0 or step == total_steps:
                save_ckpt()
            if step >= total_steps:
                break
        del it, loader
    if bar is not None:
        bar.close()

    final: dict[str, Any] = {"step": step}
    for split in ("val", "test"):
        res = evaluate(split)
        if res is not None:
            final[split] = res
            log_metrics({"step": step, "split": split, **_scalars(res)})
            log.info("final %s %s", split, _fmt(res))
    if rank == 0:
        ckpt.save_tensors(
            run_dir / ckpt.ADAPTER_FILE,
            model.adapter_state_dict(),
            metadata={
                "backbone": model.backbone.spec,
                "weights_id": model.backbone.weights_id,
                "adapter": cfg.adapter.name,
                "task": cfg.task.name,
            },
        )
        timing = {
            "train_seconds": time.perf_counter() - t_start,
            "step_time_median": float(np.median(step_times)) if step_times else None,
            "peak_memory_mb": peak_memory_mb(device),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        }
        final["timing"] = timing
        ckpt.atomic_write_json(run_dir / "final_metrics.json", final)
        write_model_card(run_dir, cfg, info, final)
        log.info("run directory: %s", run_dir)
    if distributed:
        dist.barrier()
    return run_dir


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def _fmt(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in _scalars(d).items())
