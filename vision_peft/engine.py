"""The training engine's parts: device and autocast, seeded data order, AdamW + warm-up/cosine, parameter counts,
RNG capture for exact resume, and one optimizer step (accumulation, autocast, the adapter's extra losses, clipping).

:func:`vision_peft.train.run` composes these into setup, one loop and finish; evaluation (``eval``) and the
benches reuse the loader and device helpers.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vision_peft.config import RunConfig, TrainConfig
from vision_peft.tasks import Task, TaskModel


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


def amp_name(dtype: torch.dtype | None) -> str:
    """``bfloat16`` / ``float16`` / ``none``, as config.json records it."""
    return str(dtype).replace("torch.", "") if dtype else "none"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# -- data order ---------------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation, sharded over ranks, that can start part-way (for resume)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use epoch ``epoch``'s permutation and leave out its first ``skip`` indices of this rank."""
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch (before ``skip``)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = math.ceil(self.n / self.world)
        order += order[: per_rank * self.world - self.n]  # pad so every rank gets the same count
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.world) - self.skip)


def make_loader(
    task: Task,
    ds: torch.utils.data.Dataset,
    batch_size: int,
    sampler: torch.utils.data.Sampler,
    num_workers: int,
    drop_last: bool,
    device: torch.device,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``ds`` in ``sampler``'s order with the task's collate; it never draws from the global RNG."""
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


def eval_loader(task: Task, ds: torch.utils.data.Dataset, t: TrainConfig, device: torch.device, workers: int = 0):
    """In-order, complete batches of ``ds`` for evaluation."""
    return make_loader(task, ds, t.batch_size, EpochSampler(len(ds), 0, shuffle=False), workers, False, device)


@dataclass
class Schedule:
    """How many optimizer steps a run takes and when it evaluates and checkpoints."""

    steps_per_epoch: int  # optimizer steps per epoch on this rank
    total_steps: int  # optimizer steps of the run (epochs × steps_per_epoch, capped by max_steps)
    eval_every: int  # evaluate on val every N steps
    ckpt_every: int  # write checkpoint/ every N steps
    drop_last: bool  # drop the last incomplete batch (False only when the split is smaller than one batch)

    @classmethod
    def of(cls, t: TrainConfig, samples_per_rank: int) -> Schedule:
        """The schedule of ``t`` over ``samples_per_rank`` training samples."""
        drop_last = samples_per_rank >= t.batch_size
        batches = samples_per_rank // t.batch_size if drop_last else 1
        per_epoch = max(1, batches // t.grad_accum)
        total = per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, per_epoch * t.epochs)
        return cls(per_epoch, total, t.eval_every or per_epoch, t.ckpt_every or per_epoch, drop_last)


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


def lr_lambda(total: int, warmup: int, floor: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` × the peak lr at ``total``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(opt: torch.optim.Optimizer, t: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule of ``t`` over ``total`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, t.warmup_steps, t.min_lr_ratio))


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


# -- exact resume -------------------------------------------------------------------------------------------
def capture_rng(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor part, JSON part) of the torch / CUDA / python / numpy RNG states, for checkpoint/."""
    tensors = {"rng_torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng_cuda"] = torch.cuda.get_rng_state(device)
    py = random.getstate()
    npst = np.random.get_state()
    meta = {
        "rng_python": [py[0], list(py[1]), py[2]],
        "rng_numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    return tensors, meta


def restore_rng(state: dict[str, Any], meta: dict[str, Any], device: torch.device) -> None:
    """Undo :func:`capture_rng`: the RNG streams continue exactly where the checkpoint left them."""
    torch.set_rng_state(state["rng_torch"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    py = meta["rng_python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = meta["rng_numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


# -- one optimizer step -------------------------------------------------------------------------------------
def train_step(
    model: TaskModel,
    train_model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    t: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    distributed: bool,
    step: int,
) -> dict[str, float]:
    """Optimizer step ``step + 1`` over ``t.grad_accum`` micro-batches; returns ``{"loss", "loss_<extra>" …}``.

    ``train_model`` is ``model`` or its DistributedDataParallel wrapper (gradients sync on the last micro-batch).
    The loss is the task's loss plus the sum of the adapter's extra losses, each logged as ``loss_<name>``.
    """
    opt.zero_grad(set_to_none=True)
    logged: dict[str, float] = {"loss": 0.0}
    for micro in range(t.grad_accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        sync = micro == t.grad_accum - 1 or not distributed
        ctx = train_model.no_sync() if (distributed and not sync) else contextlib.nullcontext()
        with ctx, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = train_model(batch)["loss"]
            for name, extra in model.adapter.extra_losses(model).items():  # e.g. SaRA's nuclear norm
                loss = loss + extra
                logged[f"loss_{name}"] = logged.get(f"loss_{name}", 0.0) + float(extra.detach()) / t.grad_accum
            loss = loss / t.grad_accum
        scaler.scale(loss).backward()
        logged["loss"] += float(loss.detach())
    if not math.isfinite(logged["loss"]):
        raise FloatingPointError(f"loss became {logged['loss']} at step {step}; lower train.lr or use amp=none")
    if t.grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t.grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    return logged
