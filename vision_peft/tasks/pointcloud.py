"""Point-cloud classification with PPT: Parameter-efficient Prompt Learning for 3D Point Cloud Understanding
(Sun et al., ICRA 2024, https://arxiv.org/abs/2402.15823).

The idea: instead of hand-written prompts ("a point cloud of a chair"), learn M context vectors in the text
encoder's token-embedding space (CoOp-style PromptLearner), shared by all classes, with the class name placed at
the front, middle or end of the prompt. Every forward encodes all class prompts with the frozen text encoder;
class text features are L2-normalised (the projected point features too, unless ``normalize_points: false``) and
logits = exp(logit_scale) · f_pc W_pc · t_kᵀ, trained with cross-entropy and label smoothing 0.2. The frozen point
encoder gets a light PointAdapter — the registered adapters of ``vision_peft/adapters/point_adapter.py``:
``adapter.name=linear`` (prompts only; PPT-Base when W_pc is frozen too), ``point_ffn`` (PPT-FFN: the last block's
FFN), ``point_mlp`` (residual bottleneck MLP on the pooled feature) or ``point_last_stage`` (the encoder's last stage
re-trained); any other adapter (``lora`` on ``conv5`` …) works as well. Run directories and recipes written before
(v1: ``task.point_adapter`` / ``adapter_hidden`` / ``last_stage_reinit``) load through :func:`upgrade_point_adapter`;
runs written before the W_pc / temperature options load with their defaults (learned W_pc, cosine logits, learnable
temperature), which is exactly what those runs trained.

What is frozen, and the two scoring choices (official code ``auniquesun/PPT``, ``models/ULIP_models.py``): PPT loads
and freezes everything but the prompt tokens and the adapter's modules, including ULIP's point projection
``pc_projection`` (our W_pc) and ``logit_scale``; text features are L2-normalised, point features are **not**
(logits = exp(logit_scale) · f_pc W_pc · t_kᵀ with ‖t_k‖ = 1). Here both are explicit task options:

- ``train_head`` (default true, the v1 behaviour): W_pc (``head``, embed_dim → text width, no bias) is learned.
  ``false`` = PPT-Base: W_pc frozen, which needs a *defined* projection: ``head_init: identity`` (equal widths; with
  a ULIP checkpoint the backbone already applies ULIP's ``pc_projection``, so identity + frozen is exactly PPT) or
  ``head_init: orthogonal`` (a fixed random projection with orthonormal rows, drawn from ``head_seed``). The offline
  pair here (PointNet on ModelNet40 + MiniLM) was never aligned, so its frozen W_pc is that seeded orthogonal
  projection: it carries no point–text alignment, and "prompts only" must do all the work. A frozen W_pc is still
  saved in ``adapter.safetensors`` (it is not a pretrained tensor), so a run reloads bit-exactly.
- ``normalize_points`` (default true, v1): cosine logits (‖f_pc W_pc‖ = 1). ``false`` = PPT/ULIP's raw point
  embedding. ``learn_logit_scale`` (default true, v1) / ``logit_scale_init``: PPT keeps the checkpoint's value
  frozen (set ``logit_scale_init`` to it with a ULIP checkpoint; ln(1/0.07), ULIP's initial value, otherwise).

Recipes: ``pointcloud-modelnet10-ppt-base`` (the paper's PPT-Base: 32 contexts, class name in the middle, frozen W_pc
and temperature, raw point features) and ``pointcloud-modelnet10-ppt-ffn`` (the same + the ``point_ffn`` adapter).
Few-shot training draws K shots per class (``shots``) or a stratified fraction (``data_ratio``) from the train split
with ``shot_seed``; the full test split is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters import ADAPTERS
from vision_peft.adapters.point_adapter import PointLastStageConfig, PointMLPConfig
from vision_peft.config import BackboneConfig, ConfigError
from vision_peft.tasks import TASKS
from vision_peft.tasks.base import (
    ClassFolderTask,
    ExportSpec,
    TaskModel,
    build_adapted_backbone,
    ranked_prediction,
    top1_onnx,
)
from vision_peft.tasks.classification import confusion_matrix
from vision_peft.tasks.ppt import POSITIONS, PromptLearner

POINT_ADAPTERS = ("prompts_only", "residual_mlp", "last_stage")  # v1 task.point_adapter values (deprecated)
HEAD_INITS = ("random", "orthogonal", "identity")  # how W_pc starts (task.head_init)
POINT_SUFFIXES = (".pcd", ".off", ".ply", ".npy", ".npz", ".h5", ".hdf5", ".txt")  # what a dataset zip may hold


@dataclass
class PointCloudConfig:
    """Point-cloud classification with learnable prompts (PPT)."""

    name: str = "pointcloud"  # registry name
    data_root: str = "modelnet10"  # <class>/{train,test}/*.pcd|off|ply|npy|npz, or HDF5 + shape_names.txt
    classes: list[str] | None = None  # classes in label order; None = every class folder, sorted
    text_backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="minilm"))  # frozen text encoder
    n_ctx: int = 16  # M learnable context vectors (PPT uses 32)
    ctx_init: str | None = None  # template initialising the first contexts, e.g. "a point cloud of a"; None = random
    class_position: str = "end"  # where the class name goes: front | middle | end
    learn_logit_scale: bool = True  # learn the temperature (else fixed at logit_scale_init)
    logit_scale_init: float = 2.6592600  # log(1 / 0.07), CLIP's initial temperature
    # deprecated (v1, before PointAdapter became registered adapters; see upgrade_point_adapter): None = unset
    point_adapter: str | None = None  # v1 PointAdapter: prompts_only | residual_mlp | last_stage
    adapter_hidden: int | None = None  # v1 residual_mlp width → adapter point_mlp.hidden
    last_stage_reinit: bool | None = None  # v1 last_stage re-init → adapter point_last_stage.reinit
    train_head: bool = True  # learn W_pc; false = PPT-Base's frozen projection (head_init orthogonal | identity)
    head_init: str = "random"  # W_pc start: random | orthogonal (seeded, orthonormal rows) | identity (equal widths)
    head_seed: int = 0  # seed of head_init=orthogonal
    normalize_points: bool = True  # L2-normalise f_pc W_pc (cosine logits); false = PPT/ULIP's raw point embedding
    label_smoothing: float = 0.2  # cross-entropy label smoothing (PPT: 0.2)
    shots: int | None = None  # K training shapes per class (few-shot); None = all (or data_ratio)
    data_ratio: float | None = None  # fraction of each class's training shapes; None = all
    shot_seed: int = 0  # seed that draws the shots / the data-ratio subset
    val_per_class: int = 0  # held-out shapes per class from the rest of the train split (0 = no val split)
    num_points: int | None = None  # points per shape; None = the backbone's data_config num_points
    sampling: str = "random"  # files with more points: random subset | fps (farthest-point sampling)
    up_axis: str = "swap_yz"  # swap_yz: z-up files (ModelNet) → y-up model | none: files are already y-up
    extra_columns: str = "take_xyz"  # files with xyzrgb / normals: take_xyz (warn) | error
    off_points: int = 0  # OFF meshes: sample this many surface points (0 = use the vertices)
    aug_scale: list[float] = field(default_factory=lambda: [0.8, 1.25])  # per-axis scale range ([1, 1] disables)
    aug_jitter: float = 0.01  # Gaussian jitter sigma, clipped at 5 sigma (0 disables)
    aug_rotate: float = 0.0  # max rotation about the up axis in degrees (0 disables, 180 = any)
    aug_dropout: float = 0.0  # max fraction of points dropped per sample (0 disables)

    def __post_init__(self) -> None:
        from vision_peft.data.points import SAMPLING_RULES, UP_AXIS_RULES

        if self.class_position not in POSITIONS:
            raise ConfigError(f"task.class_position must be one of {', '.join(POSITIONS)}, got {self.class_position!r}")
        if self.n_ctx < 1:
            raise ConfigError(f"task.n_ctx must be positive, got {self.n_ctx}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"task.shots must be positive or null, got {self.shots}")
        if self.data_ratio is not None and not 0.0 < self.data_ratio <= 1.0:
            raise ConfigError(f"task.data_ratio must lie in (0, 1], got {self.data_ratio}")
        if self.shots is not None and self.data_ratio is not None:
            raise ConfigError("set task.shots or task.data_ratio, not both")
        if self.sampling not in SAMPLING_RULES:
            raise ConfigError(f"task.sampling must be one of {', '.join(SAMPLING_RULES)}, got {self.sampling!r}")
        if self.up_axis not in UP_AXIS_RULES:
            raise ConfigError(f"task.up_axis must be one of {', '.join(UP_AXIS_RULES)}, got {self.up_axis!r}")
        if self.extra_columns not in ("take_xyz", "error"):
            raise ConfigError(f"task.extra_columns must be take_xyz or error, got {self.extra_columns!r}")
        if self.point_adapter is not None and self.point_adapter not in POINT_ADAPTERS:
            raise ConfigError(
                f"task.point_adapter must be one of {', '.join(POINT_ADAPTERS)}, got {self.point_adapter!r} "
                "(deprecated: use adapter.name=linear | point_mlp | point_last_stage)"
            )
        if self.adapter_hidden is not None and self.adapter_hidden < 1:
            raise ConfigError(f"task.adapter_hidden must be positive, got {self.adapter_hidden}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"task.head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if not self.train_head and self.head_init == "random":
            raise ConfigError(
                "task.train_head=false freezes W_pc, so it must be a defined projection: set task.head_init=orthogonal "
                "(a fixed projection drawn from task.head_seed) or identity (equal widths, e.g. over ULIP's "
                "pc_projection)"
            )
        if len(self.aug_scale) != 2 or not 0 < self.aug_scale[0] <= self.aug_scale[1]:
            raise ConfigError(f"task.aug_scale must be [low, high] with 0 < low <= high, got {self.aug_scale}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.aug_dropout < 1.0:
            raise ConfigError(f"task.aug_dropout must lie in [0, 1), got {self.aug_dropout}")
        if self.num_points is not None and self.num_points < 1:
            raise ConfigError(f"task.num_points must be positive or null, got {self.num_points}")


def upgrade_point_adapter(cfg) -> list:
    """Map the deprecated v1 PointAdapter fields of ``cfg.task`` onto registered adapters, in place.

    v1 (719a042 and before) chose PointAdapter with ``task.point_adapter`` (default ``residual_mlp``) and kept the
    ``adapter`` section for a generic method on top. The exact mapping:

    - ``prompts_only``: the adapter section as it is (``linear`` = PPT-Base);
    - ``residual_mlp`` with ``adapter.name=linear``: ``adapter = point_mlp(hidden=task.adapter_hidden or 256)``;
    - ``last_stage`` with ``adapter.name=linear``: ``adapter = point_last_stage(reinit=task.last_stage_reinit)``;
    - ``residual_mlp`` / ``last_stage`` with another adapter (e.g. ``lora`` on ``conv5``): the adapter section stays
      and the PointAdapter is returned to be applied after it (v1's order), so such runs keep loading.

    The three task fields are reset to None. Returns the adapter configs to apply after ``cfg.adapter``.
    """
    t = cfg.task
    variant, hidden, reinit = t.point_adapter, t.adapter_hidden, t.last_stage_reinit
    t.point_adapter = t.adapter_hidden = t.last_stage_reinit = None
    if variant in (None, "prompts_only"):
        return []
    if variant == "residual_mlp":
        point = PointMLPConfig(hidden=hidden or 256)
    else:
        point = PointLastStageConfig(reinit=bool(reinit))
    if cfg.adapter.name == "linear":
        cfg.adapter = point
        return []
    return [point]


def fixed_orthogonal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A fixed (rows, cols) projection with orthonormal rows (or columns, when rows > cols): the Q factor of a
    Gaussian matrix drawn from ``seed`` on the CPU, signs fixed by R's diagonal, so it is the same on every machine
    and torch version that keeps ``torch.randn``'s CPU stream."""
    tall = max(rows, cols), min(rows, cols)
    a = torch.randn(*tall, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(a)  # q (max, min) with orthonormal columns
    q = q * torch.sign(torch.diagonal(r))[None]  # unique Q: positive diagonal of R
    return (q.t() if rows < cols else q).float().contiguous()


def project_points(head: nn.Linear, f: torch.Tensor, normalize: bool) -> torch.Tensor:
    """f W_pc in float32, L2-normalised when ``normalize`` (cosine logits), else PPT/ULIP's raw point embedding."""
    z = head(f).float()
    return F.normalize(z, dim=-1) if normalize else z


class PointCloudModel(TaskModel):
    """Frozen point encoder (+ PointAdapter) → W_pc (learned or frozen) → logits against learned-prompt class text
    features (cosine, or PPT's raw point embedding · normalised text)."""

    def __init__(self, backbone, adapter, text, classnames: list[str], t: PointCloudConfig) -> None:
        super().__init__(backbone, adapter)
        self.add_frozen_encoder("text", text)  # never trained, never saved, eval mode
        self.prompt = PromptLearner(text, classnames, t.n_ctx, t.class_position, t.ctx_init)
        self.head = nn.Linear(backbone.embed_dim, text.embed_dim, bias=False)  # W_pc
        if t.head_init == "identity":
            if backbone.embed_dim != text.embed_dim:
                raise ConfigError(
                    f"task.head_init=identity needs equal widths; point {backbone.embed_dim} vs text {text.embed_dim}"
                )
            nn.init.eye_(self.head.weight)
        elif t.head_init == "orthogonal":
            with torch.no_grad():
                self.head.weight.copy_(fixed_orthogonal(text.embed_dim, backbone.embed_dim, t.head_seed))
        self.head.weight.requires_grad_(t.train_head)
        self.logit_scale = nn.Parameter(torch.tensor(float(t.logit_scale_init)), requires_grad=t.learn_logit_scale)
        self.smoothing = t.label_smoothing
        self.normalize_points = t.normalize_points

    def class_features(self) -> torch.Tensor:
        """All class prompts through the text encoder: (K, text embed_dim), L2-normalised."""
        p = self.prompt
        _, t = self.text.forward_tokens(p.input_ids, p.attention_mask, inputs_embeds=p())
        return F.normalize(t.float(), dim=-1)

    def point_features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) → projected point features (B, text embed_dim), see :meth:`project`."""
        return self.project(self.backbone.forward_features(points))

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """Pooled point features (B, embed_dim) → f W_pc (B, text width), L2-normalised unless ``normalize_points``
        is off (PPT's raw point embedding)."""
        return project_points(self.head, f, self.normalize_points)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def logits(self, points: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        tf = self.class_features() if text_features is None else text_features
        return self.scale() * self.point_features(points) @ tf.t()  # (B, K)

    def forward(self, batch: dict[str, torch.Tensor], text_features: torch.Tensor | None = None) -> dict:
        logits = self.logits(batch["points"], text_features)
        out = {"output": logits}
        if "label" in batch:
            out["loss"] = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.smoothing)
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        return [self.head.weight] if self.head.weight.requires_grad else []


class _PointLogits(nn.Module):
    """points (B, N, 3) → logits (B, K); the learned prompts' text features are a baked-in constant (the text
    encoder is not part of the graph)."""

    def __init__(self, model: PointCloudModel) -> None:
        super().__init__()
        self.backbone, self.head, self.normalize_points = model.backbone, model.head, model.normalize_points
        with torch.no_grad():
            self.register_buffer("text_features", model.class_features().detach().clone())  # (K, D)
            self.register_buffer("scale", model.scale().detach().clone())

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        f = project_points(self.head, self.backbone.forward_features(points), self.normalize_points)  # (B, D)
        return self.scale * f @ self.text_features.t()


@TASKS.register(
    "pointcloud", config_cls=PointCloudConfig, help="point-cloud classification with PPT prompts",
    requires=("points",), provides=("pooled",),
    spec={  # tiny task config (tests)
        "n_ctx": 2, "num_points": 64, "classes": ["chair", "table"],
        "text_backbone": {"name": "open_clip_text:vp-tiny-clip", "pretrained": False},
    },
)  # fmt: skip
class PointCloudTask(ClassFolderTask):
    """Point-cloud classification: learnable prompts (PPT) on a frozen point encoder + PointAdapter."""

    name = "pointcloud"
    runtime = "pointcloud"
    upload_suffixes = POINT_SUFFIXES
    preview = "point_folders"
    has_classes = True
    predict_options = ("top_k",)
    frozen_encoders = ("text_backbone",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._legacy_adapters = upgrade_point_adapter(cfg)  # v1 task.point_adapter → registered adapters
        self._splits: dict[str, list] | None = None

    # -- data -------------------------------------------------------------------------------------------
    def read_scan(self, root: Path, classes: list[str] | None) -> Any:
        """The point folder's scan (class order matters: the prompts are built from the class names)."""
        from vision_peft.data.points import scan_point_folder

        return scan_point_folder(root, classes)

    def samples(self) -> dict[str, list]:
        from vision_peft.data.points import few_shot_subset

        if self._splits is None:
            t = self.cfg.task
            scan = self.scan()
            train = scan.splits["train"]
            out: dict[str, list] = {}
            if t.val_per_class > 0:
                rng = np.random.default_rng(t.shot_seed + 7)
                val, rest = [], []
                for c in range(len(scan.classes)):
                    items = [s for s in train if s.label == c]
                    pick = set(
                        rng.choice(len(items), size=min(t.val_per_class, len(items) - 1), replace=False).tolist()
                    )
                    val += [s for i, s in enumerate(items) if i in pick]
                    rest += [s for i, s in enumerate(items) if i not in pick]
                train, out["val"] = rest, val
            out["train"] = few_shot_subset(train, t.shots, t.data_ratio, t.shot_seed, len(scan.classes))
            if scan.splits.get("test"):
                out["test"] = scan.splits["test"]
            self._splits = out
        return self._splits

    def splits(self) -> dict[str, list[tuple[str, int]]]:
        return {k: [(s.path, s.label) for s in v] for k, v in self.samples().items()}

    def num_points(self, model: TaskModel) -> int:
        return int(self.cfg.task.num_points or model.backbone.data_config.get("num_points", 1024))

    def datasets(self, model: TaskModel) -> dict[str, torch.utils.data.Dataset]:
        from vision_peft.data.points import PointAugment, PointCloudDataset

        t = self.cfg.task
        aug = PointAugment(
            scale=(float(t.aug_scale[0]), float(t.aug_scale[1])),
            jitter=t.aug_jitter,
            rotate=t.aug_rotate,
            dropout=t.aug_dropout,
        )
        n = self.num_points(model)
        return {
            split: PointCloudDataset(
                samples,
                n,
                t.sampling,
                t.up_axis,
                augment=aug if split == "train" else None,
                seed=self.cfg.train.seed,
                extra_columns=t.extra_columns,
                off_points=t.off_points,
            )
            for split, samples in self.samples().items()
            if samples
        }

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    # -- model ------------------------------------------------------------------------------------------
    def build_text(self):
        """The frozen text encoder of ``task.text_backbone`` (its weights recorded in ``state_info``)."""
        return self.build_frozen_encoder("text_backbone", "text")

    def build_model(self) -> PointCloudModel:
        backbone, handle, base = build_adapted_backbone(self.cfg)
        if getattr(backbone, "kind", "") != "points":
            raise ConfigError(
                f"pointcloud needs a point backbone (pointnet, pointbert); {self.cfg.backbone.name!r} is "
                f"a {getattr(backbone, 'kind', '?')} encoder"
            )
        for extra in self._legacy_adapters:  # v1 runs: PointAdapter on top of a generic adapter, applied after it
            handle.touched = list(handle.touched) + ADAPTERS.get(extra.name).builder(backbone, extra).touched
        text = self.build_text()
        model = PointCloudModel(backbone, handle, text, self.classes, self.cfg.task)
        model.mark_base(base)
        return model

    # -- metrics ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: TaskModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        model.eval()
        tf = model.class_features()  # the prompts are fixed during evaluation: encode them once
        preds, targets, loss_sum = [], [], 0.0
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(batch, text_features=tf)
            loss_sum += float(out["loss"]) * len(batch["label"])
            preds.append(out["output"].float().argmax(1).cpu().numpy())
            targets.append(batch["label"].cpu().numpy())
        pred, target = np.concatenate(preds), np.concatenate(targets)
        cm = confusion_matrix(pred, target, len(self.classes))
        per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
        return {
            "top1": float((pred == target).mean()),
            "mean_class_acc": float(per_class[cm.sum(1) > 0].mean()),
            "loss": loss_sum / len(target),
            "n": int(len(target)),
            "confusion_matrix": cm.tolist(),
        }

    @torch.no_grad()
    def predict(
        self, model: TaskModel, inputs: list[str], device: torch.device, top_k: int = 5
    ) -> list[dict[str, Any]]:
        from vision_peft.data.points import eval_rng, preprocess_points, read_points

        t = self.cfg.task
        model.eval()
        tf = model.class_features()
        n = self.num_points(model)
        out = []
        for path in inputs:
            raw = read_points(path, t.extra_columns, off_points=t.off_points)
            p = preprocess_points(raw, n, t.sampling, t.up_axis, eval_rng(0), str(path))
            x = torch.from_numpy(p)[None].to(device)  # (1, N, 3)
            probs = torch.softmax(model.logits(x, tf).float(), dim=1)[0].cpu().numpy()
            out.append(ranked_prediction(path, probs, self.classes, top_k))
        return out

    def evaluate_onnx(self, run_fn, model: TaskModel) -> dict[str, Any] | None:
        return top1_onnx(self.datasets(model).get("test"), run_fn, "points")

    # -- export / tests ---------------------------------------------------------------------------------
    def preprocess_spec(self, model: TaskModel) -> dict[str, Any]:
        t = self.cfg.task
        return {
            "points": {
                "input": "points",
                "shape": ["batch", self.num_points(model), 3],
                "dtype": "float32",
                "columns": "x y z (extra columns such as rgb or normals are dropped)",
                "num_points": self.num_points(model),
                "up_axis": {
                    "rule": t.up_axis,
                    "meaning": "swap_yz: new (x, y, z) = old (x, z, y), z-up files to the y-up model"
                    if t.up_axis == "swap_yz"
                    else "none: files are already y-up",
                },
                "sampling": {
                    "rule": t.sampling,
                    "order": "after the up-axis conversion, before normalisation",
                    "meaning": "exactly num_points points; more: a random subset without replacement (random) or "
                    "farthest-point sampling (fps); fewer: all points plus random duplicates (with replacement)",
                },
                "normalize": {
                    "rule": "center_unit_sphere",
                    "meaning": "subtract the centroid of the sampled points, divide by the largest point norm",
                },
                "model_up_axis": model.backbone.data_config.get("up_axis", "y"),
            }
        }

    def export_spec(self, model: TaskModel) -> ExportSpec:
        n = self.num_points(model)
        return ExportSpec(
            module=_PointLogits(model),
            example_inputs={"points": torch.randn(2, n, 3)},
            output_names=["logits"],
            outputs_meaning={
                "logits": "class logits in labels order (softmax for probabilities); learned prompt text features baked in"
            },
            preprocess=self.preprocess_spec(model),
            labels=list(self.classes),
            task_info={"extra_columns": self.cfg.task.extra_columns, "off_points": self.cfg.task.off_points},
        )

    def synthetic_batch(self, model: TaskModel, n: int = 2) -> dict[str, torch.Tensor]:
        pts = F.normalize(torch.randn(n, self.num_points(model), 3), dim=-1)
        return {"points": pts, "label": torch.randint(0, len(self.classes), (n,))}


def trainable_summary(model: PointCloudModel) -> dict[str, int]:
    """Trainable parameters by part: prompts, W_pc head, logit scale, adapter (for tables)."""
    parts = {"prompts": model.prompt.ctx, "head": model.head.weight, "logit_scale": model.logit_scale}
    out = {k: p.numel() if p.requires_grad else 0 for k, p in parts.items()}
    out["adapter"] = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    out["total"] = sum(out.values())
    return out
