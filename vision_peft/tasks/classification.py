"""Image classification on folder-per-class data: the skeleton the product tasks follow.

Frozen backbone (+ adapter) → pooled features → linear head; cross-entropy (optional label smoothing);
metrics: top-1 accuracy, mean per-class accuracy and the confusion matrix. The split is stratified per
class with counts and seed written in the recipe, and the file lists land in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.config import ConfigError, check_choices
from vision_peft.preprocess import IMAGE_SUFFIXES
from vision_peft.tasks import TASKS
from vision_peft.tasks.base import (
    ClassFolderTask,
    ExportSpec,
    LinearHeadModel,
    TaskModel,
    check_split,
    ranked_prediction,
    top1_onnx,
)


@dataclass
class ClassificationConfig:
    """Folder-per-class image classification."""

    name: str = "classification"  # registry name
    data_root: str = "aid"  # folder of class sub-folders (relative paths resolve under $VISION_PEFT_DATA)
    classes: list[str] | None = None  # classes to use, in label order; None = every sub-folder, sorted
    split: dict[str, int] = field(
        default_factory=lambda: {"train": 60, "val": 10, "test": 30}
    )  # images per class; -1 = the rest
    split_seed: int = 0  # seed of the stratified split
    bad_files: Literal["skip", "fail"] = "skip"  # corrupt / non-image files: skip (with a warning) | fail
    augment: str = "standard"  # none | light | standard | aerial (see vision_peft.augment)
    resize: str = "shorter_then_center_crop"  # eval-time resize: shorter_then_center_crop | squash | letterbox
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    head_dropout: float = 0.0  # dropout before the linear head

    def __post_init__(self) -> None:
        check_choices(self, "task")
        check_split(self.split)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing must lie in [0, 1), got {self.label_smoothing}")


class ClassifierModel(LinearHeadModel):
    """backbone → pooled features → dropout → linear head; cross-entropy with label smoothing."""

    def __init__(self, backbone: nn.Module, adapter, num_classes: int, dropout: float, smoothing: float) -> None:
        super().__init__(backbone, adapter, num_classes, dropout)
        self.smoothing = smoothing

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, label, label_smoothing=self.smoothing)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (target, pred), 1)  # rows = true class, columns = predicted
    return cm


@TASKS.register(
    "classification",
    config_cls=ClassificationConfig,
    help="image classification, folder-per-class data",
    requires=("image",), provides=("pooled",),  # the head reads the pooled feature vector
    spec={"classes": ["a", "b", "c"], "augment": "none"},  # tiny offline config: set_classes(spec classes), no data
)
class ClassificationTask(ClassFolderTask):
    """Folder-per-class image classification with a linear head."""

    name = "classification"
    runtime = "classification"
    upload_suffixes = IMAGE_SUFFIXES
    preview = "class_folders"
    has_classes = True
    predict_options = ("top_k", "mc_samples")
    # the batch key that reaches the model only through backbone.forward_features (LinearHeadModel.logits), so a
    # frozen prefix of the backbone can be computed once per image (vision_peft.prefix_cache)
    prefix_input = "image"

    # -- data -------------------------------------------------------------------------------------------
    def read_scan(self, root: Path, classes: list[str] | None) -> Any:
        from vision_peft.data.folder import scan_image_folder

        return scan_image_folder(root, classes, self.cfg.task.bad_files)

    def splits(self) -> dict[str, list[tuple[str, int]]]:
        from vision_peft.data.folder import stratified_split

        scan = self.scan()
        return stratified_split(scan.samples, scan.classes, dict(self.cfg.task.split), self.cfg.task.split_seed)

    def datasets(self, model: TaskModel) -> dict[str, torch.utils.data.Dataset]:
        from vision_peft.data.folder import ImageClassificationDataset

        spec = self.image_spec(model)
        aug = self.train_augment(spec)
        out = {}
        for split, samples in self.splits().items():
            if samples:
                out[split] = ImageClassificationDataset(
                    samples, spec, augment=aug if split == "train" else None, seed=self.cfg.train.seed
                )
        return out

    # -- model ------------------------------------------------------------------------------------------
    def build_model(self) -> ClassifierModel:
        t = self.cfg.task
        return self.build_head_model(
            lambda backbone, handle: ClassifierModel(
                backbone, handle, len(self.classes), t.head_dropout, t.label_smoothing
            )
        )

    # -- metrics ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: TaskModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        model.eval()
        preds, targets, losses = [], [], []
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(batch)
            losses.append(float(out["loss"]) * len(batch["label"]))
            preds.append(out["output"].float().argmax(1).cpu().numpy())
            targets.append(batch["label"].cpu().numpy())
        pred, target = np.concatenate(preds), np.concatenate(targets)
        n = len(self.classes)
        cm = confusion_matrix(pred, target, n)
        per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
        return {
            "top1": float((pred == target).mean()),
            "mean_class_acc": float(per_class[cm.sum(1) > 0].mean()),
            "loss": float(sum(losses) / len(target)),
            "n": int(len(target)),
            "confusion_matrix": cm.tolist(),
        }

    @torch.no_grad()
    def predict(
        self, model: TaskModel, inputs: list[str], device: torch.device, top_k: int = 5, mc_samples: int = 0
    ) -> list[dict[str, Any]]:
        """Ranked classes per image. ``mc_samples`` > 0 (PVeRA runs): probabilities are the mean over that many
        forwards with the adapter's latent sampled, and each record gets an ``mc`` block with their spread."""
        from vision_peft.adapters import mc_sampling
        from vision_peft.preprocess import load_image, preprocess_image

        if mc_samples < 0:
            raise ValueError(f"mc_samples must be >= 0, got {mc_samples}")
        model.eval()
        spec = self.image_spec(model)
        out = []
        for path in inputs:
            x = torch.from_numpy(preprocess_image(load_image(path), spec))[None].to(device)  # (1, 3, H, W)
            if not mc_samples:
                probs = torch.softmax(model.logits(x).float(), dim=1)[0].cpu().numpy()
                out.append(ranked_prediction(path, probs, self.classes, top_k))
                continue
            with mc_sampling(model):  # one batch of S copies: every row draws its own latent
                samples = torch.softmax(model.logits(x.expand(mc_samples, -1, -1, -1)).float(), dim=1).cpu()
            probs = samples.mean(0)
            rec = ranked_prediction(path, probs.numpy(), self.classes, top_k)
            std = samples.std(0) if mc_samples > 1 else torch.zeros_like(probs)
            for entry in rec["top"]:
                entry["prob_std"] = float(std[self.classes.index(entry["label"])])
            top = self.classes.index(rec["label"])
            rec["mc"] = {
                "samples": mc_samples,
                "top1_agreement": float((samples.argmax(1) == top).float().mean()),  # share of samples voting for it
                "entropy": float(-(probs * probs.clamp_min(1e-12).log()).sum()),  # of the mean prediction, nats
            }
            out.append(rec)
        return out

    def evaluate_onnx(self, run_fn, model: TaskModel) -> dict[str, Any] | None:
        return top1_onnx(self.datasets(model).get("test"), run_fn, "image")

    # -- export / tests ---------------------------------------------------------------------------------
    def export_spec(self, model: TaskModel) -> ExportSpec:
        meaning = "class logits in labels order (softmax for probabilities)"
        return self.image_export_spec(model, "logits", "logits", meaning, labels=list(self.classes))

    def synthetic_batch(self, model: TaskModel, n: int = 2) -> dict[str, torch.Tensor]:
        h, w = model.backbone.input_size
        return {"image": torch.randn(n, 3, h, w), "label": torch.randint(0, len(self.classes), (n,))}
