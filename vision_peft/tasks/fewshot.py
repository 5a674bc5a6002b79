"""Few-shot scene classification with MVP (task ``fewshot``): the recipe section, episodes, evaluation, predict
and export. The method itself — PMF cosine head, patch-embedding recombination (PER), the model split at its
first grid, per-episode fine-tuning, and what this reconstruction infers — is in :mod:`vision_peft.tasks.mvp`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vision_peft.config import ConfigError, check_choices
from vision_peft.data.aid import aid_class_split
from vision_peft.paths import resolve_data_path
from vision_peft.preprocess import IMAGE_SUFFIXES
from vision_peft.tasks import TASKS
from vision_peft.tasks.base import ExportSpec, Task, TaskModel, ranked_prediction
from vision_peft.tasks.mvp import (  # noqa: F401  (re-exported: the method's public names)
    CosineHead,
    FewShotModel,
    classify_episode,
    mean_ci95,
    prototypes,
    recombine,
)

PerMode = Literal["none", "extend", "replace"]  # patch-embedding recombination


@dataclass
class FewShotConfig:
    """N-way K-shot episodes, MVP meta-training and PMF-style per-episode fine-tuning."""

    name: str = "fewshot"  # registry name
    data_root: str = "aid"  # folder of class sub-folders (relative paths resolve under $VISION_PEFT_DATA)
    meta_train_root: str | None = None  # cross-domain: base and val classes from here (None = data_root)
    test_root: str | None = None  # cross-domain: novel (test) classes from here (None = data_root)
    classes: dict[str, list[str]] = field(default_factory=aid_class_split)  # base / val / novel (data/aid.py)
    n_way: int = 5  # classes per episode
    n_way_max: int | None = None  # various-way: N drawn uniformly from [n_way, n_way_max] per episode
    k_shot: int = 1  # support images per class
    k_shot_max: int | None = None  # various-shot: K drawn uniformly from [k_shot, k_shot_max] per episode
    q_query: int = 15  # query images per class at validation / test
    train_q_query: int = 5  # query images per class in meta-training episodes
    train_episodes: int = 100  # meta-training episodes per epoch (fresh episodes every epoch)
    val_episodes: int = 50  # validation episodes (fixed) on the val classes
    test_episodes: int = 0  # test episodes on the novel classes evaluated at the end of a run (0 = none)
    episode_seed: int = 0  # val/test episode i depends only on (episode_seed, i)
    augment: Literal["none", "dihedral"] | None = "dihedral"  # meta-training: none | dihedral (flips, 90° turns)
    per_mode: PerMode | None = "extend"  # patch-embedding recombination: none (or null) | extend | replace
    per_ratio: float = 0.5  # probability that a grid position comes from another image of the same class
    grid_stage: int = 2  # CNNs: the stage whose output is the grid for PER (prompt_map uses its own stage)
    finetune_steps: int = 0  # per-episode fine-tuning steps at meta-test (test split, predict); 0 = none
    finetune_lr: float = 1e-3  # per-episode fine-tuning learning rate (prompts, scale, bias)
    finetune_lr_search: list[float] = field(default_factory=list)  # >1 values: choose per episode on a held-out shot
    finetune_lr_fallback: Literal["zero", "finetune_lr"] = "zero"  # lr when the search has no held-out shot (1-shot)
    finetune_pseudo_per_class: int = 0  # augmented support views per class used as pseudo-queries per step (0 = all)
    finetune_augment: Literal["none", "dihedral"] | None = "dihedral"  # pseudo-queries: dihedral views | the support
    finetune_per: bool = True  # PER (per_mode, per_ratio) also on the fine-tuning pseudo-queries at meta-test
    val_finetune: bool = False  # also fine-tune per episode on validation episodes (slower)
    scale_init: float = 10.0  # initial cosine-classifier scale s
    bias_init: float = 0.0  # initial cosine-classifier bias b
    resize: str = "squash"  # resize to the input size: squash | shorter_then_center_crop | letterbox
    bad_files: Literal["skip", "fail"] = "skip"  # corrupt / non-image files: skip (with a warning) | fail
    cache_images: int = 4096  # decoded images kept in memory
    cache_grids: bool = True  # episodes hold frozen grids, augmented as grids (stored per train.cache); false: images

    def __post_init__(self) -> None:
        self.augment = self.augment or "none"  # a CLI override "none" arrives as None
        self.finetune_augment = self.finetune_augment or "none"
        self.per_mode = self.per_mode or "none"
        check_choices(self, "task")
        for key in ("n_way", "k_shot", "q_query", "train_q_query", "train_episodes", "val_episodes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.{key} must be positive, got {getattr(self, key)}")
        if self.n_way < 2:
            raise ConfigError(f"task.n_way must be >= 2, got {self.n_way}")
        if self.n_way_max is not None and self.n_way_max < self.n_way:
            raise ConfigError(f"task.n_way_max ({self.n_way_max}) must be >= task.n_way ({self.n_way})")
        if self.k_shot_max is not None and self.k_shot_max < self.k_shot:
            raise ConfigError(f"task.k_shot_max ({self.k_shot_max}) must be >= task.k_shot ({self.k_shot})")
        if self.per_mode != "none" and self.k_shot == 1 and self.augment == "none":
            raise ConfigError(
                f"task.per_mode={self.per_mode} with 1-shot meta-training episodes and task.augment=none: each class "
                "has a single support view, so PER would recombine it with itself and change nothing. Set "
                "task.augment=dihedral (PER then mixes each shot with a turned view), k_shot >= 2, or task.per_mode=none"
            )
        if (
            self.per_mode != "none"
            and self.finetune_per
            and self.finetune_steps > 0
            and self.k_shot == 1
            and self.finetune_augment == "none"
        ):
            raise ConfigError(
                f"task.finetune_per with task.per_mode={self.per_mode}, 1-shot episodes and task.finetune_augment=none: "
                "at meta-test each class has a single support view, so PER would change nothing. Set "
                "task.finetune_augment=dihedral, task.finetune_per=false, or task.per_mode=none"
            )
        if self.test_episodes < 0 or self.finetune_steps < 0:
            raise ConfigError("task.test_episodes and task.finetune_steps must be >= 0")
        if not 0.0 <= self.per_ratio <= 1.0:
            raise ConfigError(f"task.per_ratio must lie in [0, 1], got {self.per_ratio}")
        if any(lr < 0 for lr in self.finetune_lr_search) or self.finetune_lr < 0:
            raise ConfigError("task.finetune_lr and task.finetune_lr_search must be >= 0")
        from vision_peft.data.episodes import check_class_split

        try:
            check_class_split(self.classes)
        except ValueError as e:
            raise ConfigError(f"task.classes: {e}") from None
        if not self.classes.get("base"):
            raise ConfigError("task.classes needs a non-empty 'base' list (the meta-training classes)")

    @property
    def way(self) -> int | tuple[int, int]:
        return self.n_way if self.n_way_max is None else (self.n_way, self.n_way_max)

    @property
    def shot(self) -> int | tuple[int, int]:
        return self.k_shot if self.k_shot_max is None else (self.k_shot, self.k_shot_max)

    def split_roots(self) -> dict[str, Path]:
        """Dataset root per class split: base and val from ``meta_train_root``, novel from ``test_root`` (each
        ``data_root`` when unset); relative paths resolve under $VISION_PEFT_DATA."""
        train = resolve_data_path(self.meta_train_root or self.data_root)
        return {"base": train, "val": train, "novel": resolve_data_path(self.test_root or self.data_root)}

    @property
    def finetune_no_holdout_lr(self) -> float:
        """The fine-tuning lr of an lr-search episode that has no held-out shot."""
        return self.finetune_lr if self.finetune_lr_fallback == "finetune_lr" else 0.0


# -- the task --------------------------------------------------------------------------------------------------
@TASKS.register(
    "fewshot",
    config_cls=FewShotConfig,
    help="few-shot scene classification: MVP (meta visual prompts)",
    # PER recombines the backbone's first patch / feature grid (forward_grid); prototypes of the pooled features
    requires=("image", "grid"), provides=("pooled",),
    spec={"n_way": 2, "k_shot": 1, "q_query": 1, "train_q_query": 1},  # tiny offline config (train.batch_size: 1)
)
class FewShotTask(Task):
    """N-way K-shot episodes; prompts meta-trained on base classes, fine-tuned per episode at meta-test."""

    name = "fewshot"
    runtime = "fewshot"
    upload_suffixes = IMAGE_SUFFIXES
    preview = "class_folders"
    has_classes = False  # classes come with each episode's support set
    predict_options = ("top_k",)

    def extra_state(self) -> dict[str, Any]:
        t = self.cfg.task
        return {"class_split": t.classes, "n_way": t.way, "k_shot": t.shot}

    def build_model(self) -> FewShotModel:
        if self.cfg.train.batch_size != 1:
            raise ConfigError(
                f"task fewshot trains one episode per step: set train.batch_size=1 (got {self.cfg.train.batch_size}); "
                "use train.grad_accum to average several episodes"
            )
        return self.build_head_model(lambda backbone, handle: FewShotModel(backbone, handle, self.cfg.task))

    def samplers(self, q_query: int | None = None, seed: int | None = None, way=None, k_shot=None):
        """Episode samplers per split (base / val / novel), each split from its root (:meth:`FewShotConfig.split_roots`)."""
        from vision_peft.data.episodes import EpisodeSampler, scan_split_roots

        t = self.cfg.task
        files = scan_split_roots(t.split_roots(), t.classes, t.bad_files)
        q = t.q_query if q_query is None else q_query
        out = {}
        for split, f in files.items():
            qq = t.train_q_query if (split == "base" and q_query is None) else q
            out[split] = EpisodeSampler(f, way or t.way, k_shot or t.shot, qq, t.episode_seed if seed is None else seed)
        return out

    def datasets(self, model: TaskModel) -> dict[str, torch.utils.data.Dataset]:
        """Episodes of the base (train), val and novel (test) classes. When the layers before the grid are frozen
        and deterministic (:meth:`grid_plan`), items hold grids and augmentation acts on them; the grids are kept
        once computed (``train.run`` installs the run's prefix cache as their store, see
        ``vision_peft.prefix_cache``), or recomputed every episode with ``train.cache: off``."""
        from vision_peft.data.episodes import EpisodeDataset, ImageCache, dihedral_augment

        t = self.cfg.task
        cache = ImageCache(self.image_spec(model), t.cache_images)
        samplers = self.samplers()
        base = samplers["base"]
        base.seed = self.cfg.train.seed * 1_000_003 + 17  # meta-training episodes never equal eval episodes
        point, blocker = self.grid_plan(model)
        grid_fn = self.grid_fn(model) if blocker is None else None
        keep = self.cfg.train.cache != "off"
        aug = None
        if t.augment == "dihedral":
            aug = model.augment_grid if grid_fn is not None else dihedral_augment

        def episodes(split: str, sampler, n: int, augment=None, seed: int = 0) -> EpisodeDataset:
            ds = EpisodeDataset(sampler, n, cache, split, augment, seed, grid_fn, keep, point)
            ds.grid_blocker = blocker
            return ds

        out = {"train": episodes("train", base, t.train_episodes, aug, self.cfg.train.seed)}
        if "val" in samplers:
            out["val"] = episodes("val", samplers["val"], t.val_episodes)
        if "novel" in samplers and t.test_episodes:
            out["test"] = episodes("test", samplers["novel"], t.test_episodes)
        return out

    def grid_plan(self, model: FewShotModel) -> tuple[Any, str | None]:
        """(the backbone split point of the model's grid, why episodes cannot hold grids computed once per image —
        None when they can: ``task.cache_grids`` is on and the layers before the grid are frozen and deterministic)."""
        from vision_peft.backbones.base import prefix_blockers

        point = model.backbone.grid_point(model.grid_stage)
        if not self.cfg.task.cache_grids:
            why = (
                "task.cache_grids=false: episodes hold images, augmented as images, and every forward computes the "
                "grid; set task.cache_grids=true to compute each image's grid once"
            )
            return point, why
        reasons = prefix_blockers(model.backbone, point)
        if model.adapter.condition_fn is not None:
            reasons.append(f"adapter {model.adapter.name} conditions the backbone on the class")
        if reasons:
            return (
                point,
                f"the layers before the grid ({point.name}) are not frozen and deterministic: {'; '.join(reasons)}",
            )
        return point, None

    @staticmethod
    def grid_fn(model: FewShotModel):
        """image batch (CPU) -> frozen grids (CPU), computed on the model's device in eval mode."""

        @torch.no_grad()
        def fn(x: torch.Tensor) -> torch.Tensor:
            was = model.training
            model.eval()
            dev = next(model.parameters()).device
            g = model.grid(x.to(dev)).float().cpu()
            model.train(was)
            if was:
                model.set_train_mode()
            return g

        return fn

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if len(items) != 1:
            raise ValueError(f"few-shot batches hold one episode; got {len(items)} (set train.batch_size=1)")
        return items[0]

    def evaluate(self, model: TaskModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        """Mean episode accuracy ± 95 % CI; test episodes (and val with ``val_finetune``) are fine-tuned."""
        t = self.cfg.task
        split = getattr(loader.dataset, "split", "test")
        steps = t.finetune_steps if (split != "val" or t.val_finetune) else 0
        accs, losses = [], []
        for i, ep in enumerate(loader):
            ep = {k: v.to(device) for k, v in ep.items()}
            grids = "grid_support" in ep
            s, q = (ep["grid_support"], ep["grid_query"]) if grids else (ep["support"], ep["query"])
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, _ = classify_episode(
                    model, s, ep["support_label"], q, int(ep["way"]),
                    steps, t.finetune_lr, t.finetune_lr_search, seed=i, grids=grids,
                    pseudo_per_class=t.finetune_pseudo_per_class, no_holdout_lr=t.finetune_no_holdout_lr,
                )  # fmt: skip
            logits = logits.float()
            accs.append(float((logits.argmax(1) == ep["query_label"]).float().mean()))
            losses.append(float(F.cross_entropy(logits, ep["query_label"])))
        model.set_train_mode()
        mean, ci = mean_ci95(accs)
        return {
            "acc": mean,
            "ci95": ci,
            "loss": float(np.mean(losses)),
            "n_episodes": len(accs),
            "finetune_steps": steps,
            "scale": model.head.scale.item(),
            "bias": model.head.bias.item(),
        }

    @torch.no_grad()
    def predict(
        self, model: TaskModel, inputs: list[str], device: torch.device, top_k: int = 5
    ) -> list[dict[str, Any]]:
        """``inputs[0]``: a support folder with one sub-folder of images per class; the rest: query images.

        The support set is embedded (and, with ``task.finetune_steps``, the prompts fine-tuned on it as at
        meta-test); each query gets the class of its nearest prototype and the softmax of the PMF logits.
        """
        from vision_peft.data.folder import scan_image_folder
        from vision_peft.preprocess import load_image, preprocess_image

        if not inputs or not Path(inputs[0]).is_dir():
            raise ValueError(
                "fewshot predict takes a support folder (one sub-folder of images per class) and then query "
                f"images: `python -m vision_peft predict <run> support_dir/ q1.jpg q2.jpg`; got {inputs[:2]}"
            )
        if len(inputs) < 2:
            raise ValueError("fewshot predict needs at least one query image after the support folder")
        spec = self.image_spec(model)
        scan = scan_image_folder(inputs[0], None, self.cfg.task.bad_files)

        def load(p: str) -> torch.Tensor:
            return torch.from_numpy(preprocess_image(load_image(p), spec))

        support = torch.stack([load(p) for p, _ in scan.samples]).to(device)  # (S, 3, H, W)
        labels = torch.tensor([lab for _, lab in scan.samples], device=device)
        query = torch.stack([load(p) for p in inputs[1:]]).to(device)  # (Q, 3, H, W)
        t = self.cfg.task
        logits, _ = classify_episode(
            model,
            support,
            labels,
            query,
            len(scan.classes),
            t.finetune_steps,
            t.finetune_lr,
            t.finetune_lr_search,
            pseudo_per_class=t.finetune_pseudo_per_class,
            no_holdout_lr=t.finetune_no_holdout_lr,
        )
        probs = torch.softmax(logits.float(), 1).cpu().numpy()
        out = []
        for path, pr in zip(inputs[1:], probs):
            out.append(ranked_prediction(path, pr, scan.classes, top_k))
        return out

    def export_spec(self, model: TaskModel) -> ExportSpec:
        s, b = model.head.scale.item(), model.head.bias.item()
        meaning = (
            "L2-normalised image embedding (meta-trained prompts, no per-episode fine-tuning). "
            "prototype_c = mean of class c's support embeddings, L2-normalised; "
            f"logits_c = {s:.6g} * (embedding . prototype_c + {b:.6g}); softmax for probabilities"
        )
        return self.image_export_spec(
            model,
            "embed",
            "embedding",
            meaning,
            labels=[],
            graph_name="embedding",
            task_info={
                "scale": s,
                "bias": b,
                "classifier": "PMF cosine: logits_c = scale * (cos(embedding, prototype_c) + bias)",
                "prototypes": "mean of the class's L2-normalised support embeddings",
                "per_episode_finetuning": "none at deploy time (the graph holds the meta-trained prompts)",
            },
        )

    def synthetic_batch(self, model: TaskModel, n: int = 2) -> dict[str, torch.Tensor]:
        h, w = model.backbone.input_size
        way = max(2, n)
        return {
            "support": torch.randn(way, 3, h, w),
            "support_label": torch.arange(way),
            "query": torch.randn(way, 3, h, w),
            "query_label": torch.arange(way),
            "way": torch.tensor(way),
        }
