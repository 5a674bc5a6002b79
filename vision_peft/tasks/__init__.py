"""Task registry and the contract every task follows.

A task owns its data reading, model head, loss, metrics, prediction and export wrapper. The training
engine (``vision_peft.train``) only sees :class:`Task` and :class:`TaskModel`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vision_peft.registry import Registry

TASKS: Registry = Registry("task")


class TaskModel(nn.Module):
    """A frozen backbone + adapter + trainable head. ``forward(batch) -> {"loss", "output"}``."""

    def __init__(self, backbone: nn.Module, adapter) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter  # AdapterHandle (not a module)
        self._base_ids: set[int] = set()
        self._base_buffers: set[str] = set()

    def mark_base(self, base: tuple[set[int], set[str]]) -> None:
        """Record the pretrained backbone's parameters (by identity, stable under ``.to()``) and buffers (by
        name: ``.to()`` replaces buffer tensors) before the adapter, so they are never saved."""
        self._base_ids, self._base_buffers = set(base[0]), {f"backbone.{n}" for n in base[1]}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changed: trainable parameters, tensors the adapter created, and the running
        statistics of normalisation layers that train (full fine-tuning)."""
        sd = self.state_dict(keep_vars=True)
        keep: dict[str, torch.Tensor] = {}
        trainable_modules = {
            name for name, m in self.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))
        }
        for key, t in sd.items():
            owner = key.rsplit(".", 1)[0] if "." in key else ""
            if isinstance(t, nn.Parameter):
                new = id(t) not in self._base_ids
                keep_it = t.requires_grad or new
            else:
                keep_it = key not in self._base_buffers or owner in trainable_modules
            if keep_it:
                keep[key] = t.detach()
        return keep

    def set_train_mode(self) -> None:
        """train(), but frozen BatchNorm layers keep their pretrained statistics (eval mode)."""
        self.train()
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()

    def head_parameters(self) -> list[nn.Parameter]:
        head = getattr(self, "head", None)
        return [p for p in head.parameters() if p.requires_grad] if head is not None else []


def build_adapted_backbone(cfg) -> tuple[nn.Module, Any, tuple[set[int], set[str]]]:
    """Backbone from ``cfg.backbone``, frozen, with ``cfg.adapter`` applied; returns (backbone, handle, base).

    ``base`` = (ids of the pretrained parameters, names of the pretrained buffers), for ``TaskModel.mark_base``.
    """
    from vision_peft.adapters import apply_adapter
    from vision_peft.backbones import build_backbone

    backbone = build_backbone(cfg.backbone)
    base = ({id(p) for p in backbone.parameters()}, {n for n, _ in backbone.named_buffers()})
    handle = apply_adapter(backbone, cfg.adapter)
    return backbone, handle, base


def ranked_prediction(file: str, probs, labels: list[str], top_k: int) -> dict[str, Any]:
    """One predict() record: the top class, its probability and the top-k (label, prob) list."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))[:top_k]
    return {
        "file": str(file),
        "label": labels[order[0]],
        "prob": float(probs[order[0]]),
        "top": [{"label": labels[i], "prob": float(probs[i])} for i in order],
    }


def top1_onnx(ds, run_fn, input_key: str, batch: int = 32) -> dict[str, Any] | None:
    """Top-1 of an exported classifier graph on a dataset split (``run_fn(inputs) -> logits``); the predictions are
    returned too, so fp32 and int8 graphs can be compared item by item. None when there is no such split."""
    import numpy as np

    if ds is None:
        return None
    correct, n, preds = 0, 0, []
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
        x = np.stack([it[input_key].numpy() for it in items])
        y = np.array([int(it["label"]) for it in items])
        pred = run_fn({input_key: x}).argmax(1)
        preds.append(pred)
        correct += int((pred == y).sum())
        n += len(y)
    return {"top1": correct / n, "n": n, "predictions": np.concatenate(preds).tolist()}


@dataclass
class ExportSpec:
    """Everything the exporter needs: a module with fixed tensor inputs/outputs and how to feed it."""

    module: nn.Module  # forward(*inputs) -> outputs, in the order of output_names
    example_inputs: dict[str, torch.Tensor]  # name -> example (batch dim first)
    output_names: list[str]
    dynamic_batch: bool = True
    outputs_meaning: dict[str, str] | None = None
    preprocess: dict[str, Any] | None = None  # the bundle manifest's preprocess section
    labels: list[str] | None = None
    graph_name: str = "model"
    # structured facts the torch-free runtime needs (manifest["task_info"]): PMF scale/bias, the diffusion
    # schedule, mask threshold … — JSON-able values only
    task_info: dict[str, Any] | None = None
    # bundle file name -> source file copied into the bundle and hashed (e.g. the text tokenizer's tokenizer.json)
    extra_files: dict[str, str] | None = None
    # further graphs of the same bundle (e.g. the diffusion decoder), each exported and parity-checked alike
    extra_graphs: list[ExportSpec] | None = None
    exporter: str | None = None  # force an exporter for this graph ("torchscript" where dynamo cannot trace it)
    atol: float | None = None  # parity tolerance for this graph (default: the exporter's)


class Task(abc.ABC):
    """One task: data, model, loss, metrics, predict, export."""

    name: str = ""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def build_model(self) -> TaskModel:
        """The adapted backbone plus this task's head."""

    @abc.abstractmethod
    def datasets(self, model: TaskModel) -> dict[str, torch.utils.data.Dataset]:
        """Splits by name; ``train`` is required, ``val`` and ``test`` are evaluated when present."""

    @abc.abstractmethod
    def evaluate(self, model: TaskModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        """Task metrics on a loader; the headline metric comes first."""

    @abc.abstractmethod
    def export_spec(self, model: TaskModel) -> ExportSpec:
        """The module and example inputs that ONNX export traces."""

    @abc.abstractmethod
    def synthetic_batch(self, model: TaskModel, n: int = 2) -> dict[str, torch.Tensor]:
        """A tiny valid batch for tests."""

    def predict(
        self, model: TaskModel, inputs: list[str], device: torch.device, top_k: int = 5
    ) -> list[dict[str, Any]]:
        """Predictions for input files (the CLI's ``predict``): one JSON-able dict per input."""
        raise ValueError(f"task {self.name!r} has no file-based predict; use its Python API")

    def evaluate_onnx(self, run_fn, model: TaskModel) -> dict[str, Any] | None:
        """Task metrics of an exported graph on the test split; ``run_fn(inputs) -> first output``.
        None when the task has no such evaluation."""
        return None

    def state_info(self) -> dict[str, Any]:
        """Task facts that must travel with the run (class names …) into config.json."""
        return {}

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate(items)


from vision_peft.tasks import (  # noqa: E402,F401
    classification,
    diffusion,  # noqa: E402,F401
    fewshot,
    pointcloud,  # noqa: E402,F401
    refseg,  # noqa: E402,F401
)

__all__ = ["TASKS", "Task", "TaskModel", "ExportSpec", "build_adapted_backbone"]
