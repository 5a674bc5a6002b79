"""Task registry; the contract every task follows lives in :mod:`vision_peft.tasks.base`.

A task owns its data reading, model head, loss, metrics, prediction and export wrapper. The training
engine (``vision_peft.train``) only sees :class:`Task` and :class:`TaskModel`.
"""

from __future__ import annotations

from vision_peft.registry import Registry
from vision_peft.tasks.base import (  # noqa: F401  (the public contract, re-exported)
    ExportSpec,
    GraphWrapper,
    ImageGraph,
    Task,
    TaskModel,
    build_adapted_backbone,
    ranked_prediction,
    top1_onnx,
)

TASKS: Registry = Registry("task")

from vision_peft.tasks import (  # noqa: E402,F401
    classification,
    diffusion,  # noqa: E402,F401
    fewshot,
    multilabel,
    pointcloud,  # noqa: E402,F401
    refseg,  # noqa: E402,F401
)

__all__ = ["TASKS", "Task", "TaskModel", "ExportSpec", "build_adapted_backbone"]
