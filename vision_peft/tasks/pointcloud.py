"""Point-cloud classification with PPT: Parameter-efficient Prompt Learning for 3D Point Cloud Understanding
(Sun et al., ICRA 2024, https://arxiv.org/abs/2402.15823).

The idea: instead of hand-written prompts ("a point cloud of a chair"), learn M context vectors in the text
encoder's token-embedding space (CoOp-style PromptLearner), shared by all classes, with the class name placed at
the front, middle or end of the prompt. Every forward encodes all class prompts with the frozen text encoder;
class text features and projected point features are L2-normalised and logits = exp(logit_scale) · f_pc W_pc · t_kᵀ,
trained with cross-entropy and label smoothing 0.2. The frozen point encoder gets a light PointAdapter, named
by what it trains (``task.point_adapter``): ``prompts_only`` (PPT-Base: nothing in the encoder trains);
``residual_mlp`` (a bottleneck MLP on the pooled global feature, f ← f + MLP(f), output layer zero-initialised so
step 0 equals the frozen encoder); ``last_stage`` (PointNet ``conv5`` + ``bn5``, PointBERT's last block + final
norm re-trained, from the pretrained values or — ``last_stage_reinit``, PPT's choice — from random init).
PointAdapter lives here rather than in the adapter registry because it only fits point encoders; the run's
``adapter`` section stays free for a generic method on top (``linear`` = none, ``lora`` on ``conv5`` …).

Where this differs from PPT: PPT pairs ULIP's PointBERT with ULIP's aligned CLIP text tower, so W_pc is ULIP's
pretrained ``pc_projection``. The offline pair here (PointNet on ModelNet40 + MiniLM) was never aligned, so W_pc
(``head``, embed_dim → text width, no bias) is learned in every variant and counted in the trainable parameters.
With a ULIP checkpoint (``pointbert`` with ``pc_projection``) and an open_clip text tower, ``head_init: identity``
starts W_pc at the identity. Few-shot training draws K shots per class (``shots``) or a stratified fraction
(``data_ratio``) from the train split with ``shot_seed``; the full test split is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.config import BackboneConfig, ConfigError, resolve_data_path
from vision_peft.tasks import TASKS, ExportSpec, Task, TaskModel, build_adapted_backbone, ranked_prediction, top1_onnx
from vision_peft.tasks.classification import confusion_matrix

POSITIONS = ("front", "middle", "end")
POINT_ADAPTERS = ("prompts_only", "residual_mlp", "last_stage")


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
    point_adapter: str = "residual_mlp"  # PointAdapter, by what it trains: prompts_only | residual_mlp | last_stage
    adapter_hidden: int = 256  # residual_mlp bottleneck width
    last_stage_reinit: bool = False  # last_stage: start from random init (PPT) instead of the pretrained weights
    head_init: str = "random"  # W_pc start: random | identity (aligned encoders, embed_dim == text width)
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
        if self.point_adapter not in POINT_ADAPTERS:
            raise ConfigError(
                f"task.point_adapter must be one of {', '.join(POINT_ADAPTERS)}, got {self.point_adapter!r}"
            )
        if self.adapter_hidden < 1:
            raise ConfigError(f"task.adapter_hidden must be positive, got {self.adapter_hidden}")
        if self.head_init not in ("random", "identity"):
            raise ConfigError(f"task.head_init must be random or identity, got {self.head_init!r}")
        if len(self.aug_scale) != 2 or not 0 < self.aug_scale[0] <= self.aug_scale[1]:
            raise ConfigError(f"task.aug_scale must be [low, high] with 0 < low <= high, got {self.aug_scale}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.aug_dropout < 1.0:
            raise ConfigError(f"task.aug_dropout must lie in [0, 1), got {self.aug_dropout}")
        if self.num_points is not None and self.num_points < 1:
            raise ConfigError(f"task.num_points must be positive or null, got {self.num_points}")


def class_text(name: str) -> str:
    """Class folder name → the words put in the prompt (``night_stand`` → ``night stand``)."""
    return name.replace("_", " ").strip()


class ResidualMLP(nn.Module):
    """PointAdapter ``residual_mlp``: f + W2 · ReLU(W1 · f), W2 = 0 at init (the frozen feature at step 0)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.fc2(self.fc1(f).relu())


def apply_point_adapter(backbone: nn.Module, variant: str, hidden: int = 256, reinit: bool = False) -> list[str]:
    """Add PointAdapter ``variant`` to a (frozen) point backbone in place; returns the module names it touched."""
    if variant not in POINT_ADAPTERS:
        raise ValueError(f"point adapter must be one of {', '.join(POINT_ADAPTERS)}, got {variant!r}")
    if variant == "prompts_only":
        return []
    if variant == "residual_mlp":
        p = next(backbone.parameters())
        backbone.feature_adapters.append(ResidualMLP(backbone.embed_dim, hidden).to(device=p.device, dtype=p.dtype))
        return [f"feature_adapters.{len(backbone.feature_adapters) - 1}"]
    names = backbone.resolve_targets(["last_stage"])
    if reinit:
        backbone.reinit_last_stage()
    for n in names:
        backbone.get_submodule(n).requires_grad_(True)
    return names


class PromptLearner(nn.Module):
    """M shared context vectors in the text encoder's token-embedding space, spliced into every class prompt.

    Token layouts (S = start token, E = end token, C = context slots):
    ``end``: S C…C name . E · ``front``: S name C…C . E · ``middle``: S C[:M/2] name C[M/2:] . E.
    ``input_ids`` / ``attention_mask`` (K, L) hold the frozen tokens; ``ctx_index`` (K, L) is the context slot at
    each position (-1 elsewhere); ``forward()`` returns the (K, L, width) input embeddings.
    """

    def __init__(self, text, classnames: list[str], n_ctx: int, position: str, ctx_init: str | None = None) -> None:
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class position must be one of {', '.join(POSITIONS)}, got {position!r}")
        empty = text.tokenize([""])
        real = empty["input_ids"][0][empty["attention_mask"][0].bool()].tolist()
        if len(real) != 2:
            raise ValueError(f"text encoder {text.spec!r}: expected start/end tokens for an empty text, got {real}")
        start, end = real
        two = text.tokenize(["", "a b c d"])
        pad_id = int(two["input_ids"][0][-1])

        def content(s: str) -> list[int]:
            enc = text.tokenize([s])
            return enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()[1:-1]

        dot = content(".")
        seqs, slots = [], []
        half = n_ctx // 2
        for name in classnames:
            words = content(class_text(name))
            if position == "end":
                parts = [("c", i) for i in range(n_ctx)] + [("t", t) for t in words]
            elif position == "front":
                parts = [("t", t) for t in words] + [("c", i) for i in range(n_ctx)]
            else:
                parts = [("c", i) for i in range(half)] + [("t", t) for t in words]
                parts += [("c", i) for i in range(half, n_ctx)]
            parts = [("t", start)] + parts + [("t", t) for t in dot] + [("t", end)]
            seqs.append([start if k == "c" else v for k, v in parts])
            slots.append([v if k == "c" else -1 for k, v in parts])
        length = max(len(s) for s in seqs)
        if length > text.context_length:
            raise ValueError(
                f"prompts are {length} tokens long, the text encoder {text.spec!r} takes {text.context_length}; "
                "lower task.n_ctx or shorten the class names"
            )
        k = len(classnames)
        ids = torch.full((k, length), pad_id, dtype=torch.long)
        mask = torch.zeros(k, length, dtype=torch.long)
        index = torch.full((k, length), -1, dtype=torch.long)
        for i, (s, c) in enumerate(zip(seqs, slots)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            index[i, : len(c)] = torch.tensor(c)
        emb = text.token_embedding()
        with torch.no_grad():
            base = emb(ids.to(emb.weight.device)).float().cpu()  # (K, L, W)
        self.register_buffer("input_ids", ids, persistent=False)
        self.register_buffer("attention_mask", mask, persistent=False)
        self.register_buffer("ctx_index", index, persistent=False)
        self.register_buffer("base_embeds", base, persistent=False)
        width = base.shape[-1]
        ctx = torch.randn(n_ctx, width, generator=torch.Generator().manual_seed(0)) * 0.02
        if ctx_init:
            init_ids = content(ctx_init)
            if len(init_ids) > n_ctx:
                raise ValueError(f"task.ctx_init {ctx_init!r} is {len(init_ids)} tokens; task.n_ctx is {n_ctx}")
            with torch.no_grad():
                ctx[: len(init_ids)] = emb(torch.tensor(init_ids, device=emb.weight.device)).float().cpu()
        self.ctx = nn.Parameter(ctx)  # (M, W)
        self.n_ctx, self.position = n_ctx, position

    def forward(self) -> torch.Tensor:
        sel = self.ctx[self.ctx_index.clamp(min=0)]  # (K, L, W)
        return torch.where((self.ctx_index >= 0)[..., None], sel.to(self.base_embeds.dtype), self.base_embeds)


class PointCloudModel(TaskModel):
    """Frozen point encoder (+ PointAdapter) → W_pc → cosine logits against learned-prompt class text features."""

    def __init__(self, backbone, adapter, text, classnames: list[str], t: PointCloudConfig) -> None:
        super().__init__(backbone, adapter)
        self.text = text.requires_grad_(False).eval()
        self.prompt = PromptLearner(text, classnames, t.n_ctx, t.class_position, t.ctx_init)
        self.head = nn.Linear(backbone.embed_dim, text.embed_dim, bias=False)  # W_pc
        if t.head_init == "identity":
            if backbone.embed_dim != text.embed_dim:
                raise ConfigError(
                    f"task.head_init=identity needs equal widths; point {backbone.embed_dim} vs text {text.embed_dim}"
                )
            nn.init.eye_(self.head.weight)
        self.logit_scale = nn.Parameter(torch.tensor(float(t.logit_scale_init)), requires_grad=t.learn_logit_scale)
        self.smoothing = t.label_smoothing

    def mark_base(self, base: tuple[set[int], set[str]]) -> None:
        """The frozen text encoder is pretrained too: never saved, never trained."""
        super().mark_base(base)
        self._base_ids |= {id(p) for p in self.text.parameters()}
        self._base_buffers |= {f"text.{n}" for n, _ in self.text.named_buffers()}

    def set_train_mode(self) -> None:
        super().set_train_mode()
        self.text.eval()  # no dropout in the frozen text encoder

    def class_features(self) -> torch.Tensor:
        """All class prompts through the text encoder: (K, text embed_dim), L2-normalised."""
        p = self.prompt
        _, t = self.text.forward_tokens(p.input_ids, p.attention_mask, inputs_embeds=p())
        return F.normalize(t.float(), dim=-1)

    def point_features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) → projected, L2-normalised point features (B, text embed_dim)."""
        return self.project(self.backbone.forward_features(points))

    def project(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(f).float(), dim=-1)

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
        self.backbone, self.head = model.backbone, model.head
        with torch.no_grad():
            self.register_buffer("text_features", model.class_features().detach().clone())  # (K, D)
            self.register_buffer("scale", model.scale().detach().clone())

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.head(self.backbone.forward_features(points)).float(), dim=-1)  # (B, D)
        return self.scale * f @ self.text_features.t()


@TASKS.register("pointcloud", config_cls=PointCloudConfig, help="point-cloud classification with PPT prompts")
class PointCloudTask(Task):
    """Point-cloud classification: learnable prompts (PPT) on a frozen point encoder + PointAdapter."""

    name = "pointcloud"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._scan = None
        self._classes: list[str] | None = None
        self._splits: dict[str, list] | None = None
        self._run_classes: list[str] | None = None

    # -- data -------------------------------------------------------------------------------------------
    def scan(self):
        if self._scan is None:
            from vision_peft.data.points import scan_point_folder

            t = self.cfg.task
            self._scan = scan_point_folder(resolve_data_path(t.data_root), t.classes or self._run_classes)
            if self._run_classes is not None and self._scan.classes != self._run_classes:
                raise ConfigError(
                    f"the classes found in {self._scan.root} ({', '.join(self._scan.classes)}) do not match the "
                    f"checkpoint's ({', '.join(self._run_classes)}); evaluate on data with the same class folders"
                )
            self._classes = self._scan.classes
        return self._scan

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self.scan()
        return self._classes

    def set_classes(self, classes: list[str]) -> None:
        """Use the class list of a run directory (checked against ``task.classes`` when the recipe names them)."""
        given = self.cfg.task.classes
        if given is not None and list(given) != list(classes):
            raise ConfigError(
                f"task.classes {list(given)} does not match the checkpoint's class list {list(classes)} "
                "(names and order must agree: the prompts are built from them)"
            )
        self._classes = self._run_classes = list(classes)

    def state_info(self) -> dict[str, Any]:
        return {"classes": self.classes, "text_backbone": getattr(self, "_text_info", {})}

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
        from vision_peft.backbones import build_backbone

        text = build_backbone(self.cfg.task.text_backbone)
        if getattr(text, "kind", "") != "text":
            raise ConfigError(
                f"task.text_backbone must be a text encoder (minilm, open_clip_text:…), got {self.cfg.task.text_backbone.name!r}"
            )
        self._text_info = {"spec": text.spec, "weights_id": text.weights_id, "weights_source": text.weights_source}
        return text

    def build_model(self) -> PointCloudModel:
        backbone, handle, base = build_adapted_backbone(self.cfg)
        if getattr(backbone, "kind", "") != "points":
            raise ConfigError(
                f"pointcloud needs a point backbone (pointnet, pointbert); {self.cfg.backbone.name!r} is "
                f"a {getattr(backbone, 'kind', '?')} encoder"
            )
        t = self.cfg.task
        handle.touched = list(handle.touched) + apply_point_adapter(
            backbone, t.point_adapter, t.adapter_hidden, t.last_stage_reinit
        )
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
