"""The task contract: :class:`Task` (data, model, loss, metrics, predict, export) and :class:`TaskModel`.

A task declares what it offers as class attributes (read by the app, the runtimes and the CLI instead of task
names): ``name``, ``runtime`` (its ``RUNTIMES`` name), ``upload_suffixes`` (file types a dataset zip may hold),
``preview`` (dataset preview kind), ``has_classes`` and ``predict_options`` (keyword options ``predict`` takes
besides the inputs). The base absorbs what every task used to repeat: the class list and its check against a
run directory's, the frozen extra encoders (built, frozen, never saved, their weight hashes in ``state_info``),
the image preprocessing spec, export wrappers and the one prediction-record shape; :class:`ClassFolderTask` adds
the class list read from class folders, :func:`check_split` the check of a recipe's split counts.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vision_peft.backbones.base import _AbstractModuleMeta
from vision_peft.config import ConfigError
from vision_peft.paths import resolve_data_path
from vision_peft.runtimes.base import ranked_record

PREVIEW_KINDS = ("class_folders", "point_folders", "refer", "none")


class TaskModel(nn.Module):
    """A frozen backbone + adapter + trainable head. ``forward(batch) -> {"loss", "output"}``.

    Frozen encoders besides the backbone (e.g. a text tower) are attached with :meth:`add_frozen_encoder`: they
    never train, stay in eval mode and are never saved.
    """

    def __init__(self, backbone: nn.Module, adapter) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter  # AdapterHandle (not a module)
        self._base_ids: set[int] = set()
        self._base_buffers: set[str] = set()
        self._frozen_encoders: list[str] = []

    def add_frozen_encoder(self, name: str, module: nn.Module) -> nn.Module:
        """Attach ``module`` as attribute ``name`` (state-dict prefix ``name.``), frozen and in eval mode."""
        setattr(self, name, module.requires_grad_(False).eval())
        self._frozen_encoders.append(name)
        return module

    def mark_base(self, base: tuple[set[int], set[str]]) -> None:
        """Record the pretrained backbone's parameters (by identity, stable under ``.to()``) and buffers (by
        name: ``.to()`` replaces buffer tensors) before the adapter, so they are never saved. Frozen encoders
        are pretrained too: their tensors are recorded alike."""
        self._base_ids, self._base_buffers = set(base[0]), {f"backbone.{n}" for n in base[1]}
        for name in self._frozen_encoders:
            enc = getattr(self, name)
            self._base_ids |= {id(p) for p in enc.parameters()}
            self._base_buffers |= {f"{name}.{n}" for n, _ in enc.named_buffers()}

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
        """train(), but frozen BatchNorm layers keep their pretrained statistics (eval mode) and frozen encoders
        stay in eval mode (no dropout)."""
        self.train()
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        for name in self._frozen_encoders:
            getattr(self, name).eval()

    def head_parameters(self) -> list[nn.Parameter]:
        head = getattr(self, "head", None)
        return [p for p in head.parameters() if p.requires_grad] if head is not None else []


class LinearHeadModel(TaskModel, metaclass=_AbstractModuleMeta):
    """backbone → pooled features → dropout → linear head (``head``: weights N(0, 0.01²), bias ``bias``); the
    training loss of (float) logits and ``batch["label"]`` is the subclass's :meth:`loss`."""

    def __init__(self, backbone: nn.Module, adapter, num_classes: int, dropout: float, bias: float = 0.0) -> None:
        super().__init__(backbone, adapter)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.constant_(self.head.bias, bias)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.backbone.forward_features(image)))

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The training loss of float32 logits (B, classes) against the batch's labels."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch["image"])
        out = {"output": logits}
        if "label" in batch:
            out["loss"] = self.loss(logits.float(), batch["label"])
        return out


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
    """One predict() record, the shape the deploy CLI and the server print too (see
    :func:`vision_peft.runtimes.base.ranked_record`)."""
    return ranked_record(file, probs, labels, top_k)


def check_split(split: dict[str, int]) -> None:
    """Refuses a ``task.split`` (counts per split; -1 = the rest) without a ``train`` count, with keys other than
    train/val/test, or with more than one split taking the rest.

    Raises:
        ConfigError: naming the bad key or count.
    """
    if "train" not in split:
        raise ConfigError(f"task.split needs a 'train' count, got {split}")
    unknown = set(split) - {"train", "val", "test"}
    if unknown:
        raise ConfigError(f"task.split keys must be train/val/test, got {sorted(unknown)}")
    if sum(1 for v in split.values() if v < 0) > 1:
        raise ConfigError("task.split: only one split may take the rest (-1)")


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


class GraphWrapper(nn.Module):
    """Base of the export wrappers: a model and the name of the method the graph runs. Subclasses give
    ``forward`` the graph's fixed tensor inputs by name (the exporters need an explicit signature).

    With ``inference_only`` the wrapper never leaves eval mode: the TorchScript exporter restores the wrapper's
    training flag afterwards, which would otherwise switch the wrapped model's BatchNorm layers to batch
    statistics before the parity check.
    """

    def __init__(self, model: nn.Module, method: str, inference_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.inference_only = inference_only
        if inference_only:
            self.train(False)

    def train(self, mode: bool = True) -> GraphWrapper:
        return super().train(False if self.inference_only else mode)


class ImageGraph(GraphWrapper):
    """Export wrapper: ``image (B, 3, H, W) -> model.<method>(image)`` (logits, an embedding …)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(image)


class Task(abc.ABC):
    """One task: data, model, loss, metrics, predict, export — and its declared capabilities."""

    name: ClassVar[str] = ""  # registry name
    runtime: ClassVar[str] = ""  # RUNTIMES name of the torch-free half (vision_peft/runtimes/)
    upload_suffixes: ClassVar[tuple[str, ...]] = ()  # file types (lower-case, with the dot) a dataset zip may hold
    preview: ClassVar[str] = "none"  # dataset preview kind: class_folders | point_folders | refer | none
    has_classes: ClassVar[bool] = False  # a fixed class list travels with the run (task_state["classes"])
    predict_options: ClassVar[tuple[str, ...]] = ()  # keyword options of predict(), e.g. ("top_k", "mc_samples")
    frozen_encoders: ClassVar[tuple[str, ...]] = ()  # task config fields holding extra frozen encoders

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._classes: list[str] | None = None
        self._run_classes: list[str] | None = None  # the class list of the run directory being loaded, if any
        self._encoder_info: dict[str, dict[str, Any]] = {}

    # -- classes -------------------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Class names in label order: the run directory's (after :meth:`set_classes`), else found in the data."""
        if self._classes is None:
            self.found_classes(self.discover_classes(), "the data")
        return self._classes

    def discover_classes(self) -> list[str]:
        """The class list read from the data or the recipe (tasks with ``has_classes`` override this)."""
        raise AttributeError(f"task {self.name!r} has no fixed class list (has_classes is False)")

    def recipe_classes(self) -> list[str] | None:
        """The class list the recipe names explicitly (checked against a run's), or None."""
        return None

    def set_classes(self, classes: list[str]) -> None:
        """Use the class list of a run directory without reading data (checked against the recipe's, if any).

        Raises:
            ConfigError: the recipe names other classes (or another order) than the checkpoint.
        """
        given = self.recipe_classes()
        if given is not None and list(given) != list(classes):
            raise ConfigError(
                f"task.classes {list(given)} does not match the checkpoint's class list {list(classes)} "
                "(names and order must agree)"
            )
        self._classes = self._run_classes = list(classes)

    def found_classes(self, classes: list[str], where: str) -> None:
        """Record the classes a data scan found (in ``where``); they must equal a loaded run's, if any.

        Raises:
            ConfigError: the data holds other classes than the checkpoint was trained on.
        """
        if self._run_classes is not None and list(classes) != self._run_classes:
            raise ConfigError(
                f"the classes found in {where} ({', '.join(classes)}) do not match the checkpoint's "
                f"({', '.join(self._run_classes)}); evaluate on data with the same class folders"
            )
        self._classes = list(classes)

    def state_info(self) -> dict[str, Any]:
        """Task facts that must travel with the run into config.json: the class list, the frozen encoders'
        weights (spec, hash, source; checked when the run is loaded) and what :meth:`extra_state` adds."""
        out: dict[str, Any] = {"classes": self.classes} if self.has_classes else {}
        for key in self.frozen_encoders:
            out[key] = self._encoder_info.get(key, {})
        out.update(self.extra_state())
        return out

    def extra_state(self) -> dict[str, Any]:
        """Further task facts for ``task_state`` (JSON-able)."""
        return {}

    def splits(self) -> dict[str, list[tuple[str, Any]]]:
        """Split name -> (file, target) pairs, written to the run's ``split.json``; empty for tasks without
        file-level splits (few-shot draws episodes)."""
        return {}

    # -- shared building blocks ---------------------------------------------------------------------------
    def build_backbone(self, kind: str = "image") -> tuple[nn.Module, Any, tuple[set[int], set[str]]]:
        """:func:`build_adapted_backbone` for the run's config, checked to be a ``kind`` encoder."""
        backbone, handle, base = build_adapted_backbone(self.cfg)
        if getattr(backbone, "kind", "") != kind:
            raise ConfigError(
                f"{self.name} needs an {kind} backbone; {self.cfg.backbone.name!r} is a {backbone.kind} encoder"
            )
        return backbone, handle, base

    def build_head_model(self, head: Callable[[nn.Module, Any], TaskModel], kind: str = "image") -> TaskModel:
        """``head(backbone, handle)`` around the adapted ``kind`` backbone (:meth:`build_backbone`), with the
        backbone's frozen tensors marked as its base (so only the adapter and the head are saved)."""
        backbone, handle, base = self.build_backbone(kind)
        model = head(backbone, handle)
        model.mark_base(base)
        return model

    def build_frozen_encoder(self, key: str, kind: str = "text") -> nn.Module:
        """Build the frozen encoder configured in ``task.<key>`` (a BackboneConfig), check its kind, freeze it
        and record its weights for ``state_info``."""
        from vision_peft.backbones import build_backbone

        cfg = getattr(self.cfg.task, key)
        enc = build_backbone(cfg)
        if getattr(enc, "kind", "") != kind:
            hint = " (minilm, open_clip_text:…)" if kind == "text" else ""
            raise ConfigError(f"task.{key} must be a {kind} encoder{hint}, got {cfg.name!r}")
        enc.requires_grad_(False)
        self._encoder_info[key] = {"spec": enc.spec, "weights_id": enc.weights_id, "weights_source": enc.weights_source}
        return enc

    def resize_mode(self) -> str:
        """How images are resized to the backbone's input (``task.resize`` by default)."""
        return self.cfg.task.resize

    def image_spec(self, model: TaskModel) -> dict:
        """The image preprocessing spec (training, predict and the bundle manifest use the same one)."""
        from vision_peft.preprocess import image_spec

        return image_spec(model.backbone.data_config, resize=self.resize_mode())

    def train_augment(self, spec: dict) -> Any:
        """The training augmentation ``task.augment`` names, at the size and resize filter of the image ``spec``."""
        from vision_peft.augment import build_augment

        return build_augment(self.cfg.task.augment, tuple(spec["size"]), spec.get("interpolation", "bilinear"))

    def image_export_spec(self, model: TaskModel, method: str, output: str, meaning: str, **extra: Any) -> ExportSpec:
        """The ExportSpec of a one-image graph: ``image (B, 3, H, W) -> model.<method>(image)`` named ``output``,
        with the image preprocessing in the manifest; ``extra`` sets the other ExportSpec fields."""
        h, w = model.backbone.input_size
        return ExportSpec(
            module=ImageGraph(model, method),
            example_inputs={"image": torch.randn(2, 3, h, w)},
            output_names=[output],
            outputs_meaning={output: meaning},
            preprocess={"image": self.image_spec(model)},
            **extra,
        )

    # -- the contract -------------------------------------------------------------------------------------
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

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate(items)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.preview not in PREVIEW_KINDS:
            raise TypeError(f"{cls.__name__}.preview must be one of {', '.join(PREVIEW_KINDS)}, got {cls.preview!r}")


class ClassFolderTask(Task):
    """A task whose classes are the class folders of ``task.data_root`` (``task.classes`` picks and orders them):
    the folder is scanned once (:meth:`scan`), with the loaded run's classes when there is one, and the classes
    found are checked against the run's."""

    has_classes = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._scan: Any = None

    @abc.abstractmethod
    def read_scan(self, root: Path, classes: list[str] | None) -> Any:
        """Scan the data folder ``root`` (``classes``: the ones to read, in label order; None = every class
        folder); the result has ``classes`` and ``root``."""

    def scan(self) -> Any:
        """The data folder's scan (the run's classes when a run directory was loaded, else ``task.classes``)."""
        if self._scan is None:
            t = self.cfg.task
            self._scan = self.read_scan(resolve_data_path(t.data_root), t.classes or self._run_classes)
            self.found_classes(self._scan.classes, str(self._scan.root))
        return self._scan

    def discover_classes(self) -> list[str]:
        return self.scan().classes

    def recipe_classes(self) -> list[str] | None:
        """``task.classes`` (names and order must match a checkpoint's)."""
        return self.cfg.task.classes
