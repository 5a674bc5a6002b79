"""Few-shot scene classification with MVP: meta visual prompt tuning (task ``fewshot``).

MVP: "Parameter-Efficient Meta Visual Prompt Tuning for Few-Shot Remote Sensing Scene Classification"
(TGRS 2024, https://arxiv.org/abs/2309.09276), built on PMF ("Pushing the Limits of Simple Pipelines for
Few-Shot Learning", Hu et al., CVPR 2022, https://arxiv.org/abs/2204.07305).

The idea: keep the pre-trained encoder frozen and learn only visual prompts (and the cosine classifier's scale
and bias) inside the episodic pre-train → meta-train → fine-tune pipeline of PMF. Meta-training samples
N-way K-shot episodes from the base classes; at meta-test the prompts are copied, fine-tuned for a few steps on
the episode's support set, used on the queries and reset. Patch-embedding recombination (PER) builds extra
samples of a class by taking each grid position's embedding from a random image of the same class.

No official MVP code exists; this is a reconstruction. Marked **[inferred]** below is what the paper's abstract
and PMF's code do not fix:

- PMF classifier [PMF code]: prototypes are class means of support embeddings, ``logits = s·(cos(f, p) + b)``,
  learnable ``s`` (init 10) and ``b`` (init 0). [inferred] embeddings are L2-normalised *before* the class
  mean (PMF averages raw features), so the exported ``image → embedding`` graph is all a consumer needs.
- Meta-training [inferred]: one episode per step through the shared training engine (``train.batch_size: 1``;
  :meth:`FewShotTask.collate` unwraps it), cross-entropy of query logits; only prompts, ``s`` and ``b`` learn.
  Meta-training episodes use ``task.train_q_query`` queries per class (fewer than at test, for CPU budget) and
  random flips / 90° rotations of the images. Validation episodes (``val`` classes, no fine-tuning unless
  ``task.val_finetune``) are logged by the engine to ``metrics.jsonl`` for model selection (meta-training
  length, learning rates, PER settings are chosen on them, never on the novel classes).
- Meta-test fine-tuning [PMF code, details inferred]: copy the trainable tensors, ``finetune_steps`` AdamW
  steps on the support set: prototypes from the support, pseudo-queries = randomly flipped / rotated copies of
  the support's *grid* (feature-grid augmentation, so the frozen layers before the grid run once per episode
  [inferred: PMF augments pixels]), plus PER copies; then classify the queries and restore the tensors. With
  more than one ``finetune_lr_search`` candidate the lr is picked by accuracy on a held-out shot per class
  (1-shot: on an augmented view of the support) after fine-tuning on the rest.
- PER [inferred from the abstract]: on the first grid the backbone exposes (ViT: patch embeddings before the
  position embedding; EfficientNet: the output of stage ``grid_stage``), each position of a sample is replaced
  with probability ``per_ratio`` by the same position of a random sample of the *same class* in the batch.
  ``per_mode``: ``extend`` (recombined copies are added as extra pseudo-queries), ``replace`` (recombined in
  place), ``none``.
- Prompts: ``vpt`` (shallow/deep tokens) on token backbones (timm ViTs); ``prompt_map`` (a learnable map added
  to the EfficientNet-Lite0 stage-``stage`` feature map, the grid PER works on) or ``pad_prompt`` (pixels) on
  CNNs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.config import ConfigError, resolve_data_path
from vision_peft.tasks import TASKS, ExportSpec, Task, TaskModel, build_adapted_backbone, ranked_prediction

AID_SPLIT = {  # data/README.md: 30 AID class names sorted, permuted with numpy RandomState(0)
    "base": [
        "BaseballField", "StorageTanks", "Meadow", "Farmland", "Square", "School", "Stadium", "Forest",
        "Parking", "Resort", "Center", "Park", "DenseResidential", "MediumResidential", "River", "Port",
    ],
    "val": ["BareLand", "Viaduct", "Church", "Bridge", "Playground", "Pond", "Desert"],
    "novel": ["Commercial", "SparseResidential", "Beach", "Airport", "RailwayStation", "Mountain", "Industrial"],
}  # fmt: skip
PER_MODES = ("none", "extend", "replace")


@dataclass
class FewShotConfig:
    """N-way K-shot episodes, MVP meta-training and PMF-style per-episode fine-tuning."""

    name: str = "fewshot"  # registry name
    data_root: str = "aid"  # folder of class sub-folders (relative paths resolve under $VISION_PEFT_DATA)
    classes: dict[str, list[str]] = field(default_factory=lambda: copy.deepcopy(AID_SPLIT))  # base / val / novel
    n_way: int = 5  # classes per episode
    n_way_max: int | None = None  # various-way: N drawn uniformly from [n_way, n_way_max] per episode
    k_shot: int = 1  # support images per class
    q_query: int = 15  # query images per class at validation / test
    train_q_query: int = 5  # query images per class in meta-training episodes
    train_episodes: int = 100  # meta-training episodes per epoch (fresh episodes every epoch)
    val_episodes: int = 50  # validation episodes (fixed) on the val classes
    test_episodes: int = 0  # test episodes on the novel classes evaluated at the end of a run (0 = none)
    episode_seed: int = 0  # val/test episode i depends only on (episode_seed, i)
    augment: str | None = "dihedral"  # meta-training augmentation: none | dihedral (flips + 90° rotations)
    per_mode: str | None = "extend"  # patch-embedding recombination: none (or null) | extend | replace
    per_ratio: float = 0.5  # probability that a grid position comes from another image of the same class
    grid_stage: int = 2  # CNNs: the stage whose output is the grid for PER (prompt_map uses its own stage)
    finetune_steps: int = 0  # per-episode fine-tuning steps at meta-test (test split, predict); 0 = none
    finetune_lr: float = 1e-3  # per-episode fine-tuning learning rate (prompts, scale, bias)
    finetune_lr_search: list[float] = field(default_factory=list)  # >1 values: choose on a held-out shot
    finetune_pseudo_per_class: int = 0  # augmented support views per class used as pseudo-queries per step (0 = all)
    val_finetune: bool = False  # also fine-tune per episode on validation episodes (slower)
    scale_init: float = 10.0  # initial cosine-classifier scale s
    bias_init: float = 0.0  # initial cosine-classifier bias b
    resize: str = "squash"  # resize to the input size: squash | shorter_then_center_crop | letterbox
    bad_files: str = "skip"  # corrupt / non-image files: skip (with a warning) | fail
    cache_images: int = 4096  # decoded images kept in memory
    cache_grids: bool = (
        True  # compute each image's frozen grid once (not with pad_prompt); augmentation then acts on grids
    )

    def __post_init__(self) -> None:
        self.augment = self.augment or "none"  # a CLI override "none" arrives as None
        self.per_mode = self.per_mode or "none"
        for key in ("n_way", "k_shot", "q_query", "train_q_query", "train_episodes", "val_episodes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.{key} must be positive, got {getattr(self, key)}")
        if self.n_way < 2:
            raise ConfigError(f"task.n_way must be >= 2, got {self.n_way}")
        if self.n_way_max is not None and self.n_way_max < self.n_way:
            raise ConfigError(f"task.n_way_max ({self.n_way_max}) must be >= task.n_way ({self.n_way})")
        if self.test_episodes < 0 or self.finetune_steps < 0:
            raise ConfigError("task.test_episodes and task.finetune_steps must be >= 0")
        if self.augment not in ("none", "dihedral"):
            raise ConfigError(f"task.augment must be none or dihedral, got {self.augment!r}")
        if self.per_mode not in PER_MODES:
            raise ConfigError(f"task.per_mode must be one of {', '.join(PER_MODES)}, got {self.per_mode!r}")
        if not 0.0 <= self.per_ratio <= 1.0:
            raise ConfigError(f"task.per_ratio must lie in [0, 1], got {self.per_ratio}")
        if self.bad_files not in ("skip", "fail"):
            raise ConfigError(f"task.bad_files must be skip or fail, got {self.bad_files!r}")
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


# -- PMF classifier and PER ------------------------------------------------------------------------------------
class CosineHead(nn.Module):
    """PMF's classifier: ``logits = s · (cos(f, prototype) + b)`` with learnable s and b."""

    def __init__(self, scale: float = 10.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(feats, dim=-1) @ F.normalize(prototypes, dim=-1).T  # (Q, D) x (N, D) -> (Q, N)
        return self.scale * (cos + self.bias)


def prototypes(feats: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means of L2-normalised embeddings: (S, D), (S,) -> (N, D)."""
    onehot = F.one_hot(labels, n_way).to(feats.dtype)  # (S, N)
    counts = onehot.sum(0).clamp_min(1)  # (N,)
    return (onehot.T @ F.normalize(feats, dim=-1)) / counts[:, None]  # (N, S) x (S, D) -> (N, D)


def recombine(grid: torch.Tensor, labels: torch.Tensor, ratio: float, channel_dim: int, generator=None) -> torch.Tensor:
    """Patch-embedding recombination: each position of sample i comes, with probability ``ratio``, from the same
    position of a random sample of i's class (possibly i itself); other positions stay. Shapes are kept.

    Args:
        grid: (B, …) embeddings on a grid; ``channel_dim`` is the embedding axis, every other non-batch axis a
            position axis.
        labels: (B,) class of each sample; recombination never crosses classes.
    """
    g = grid.movedim(channel_dim, -1)  # (B, ..., C)
    shape = g.shape
    flat = g.reshape(shape[0], -1, shape[-1])  # (B, ..., C) -> (B, P, C)
    b, p = flat.shape[:2]
    dev = grid.device
    src = torch.arange(b, device=dev)[:, None].expand(b, p).clone()  # (B, P): default = itself
    pick = torch.rand(b, p, generator=generator).to(dev) < ratio  # (B, P)
    rnd = torch.rand(b, p, generator=generator).to(dev)  # (B, P) uniform, mapped to a same-class sample
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()  # (M,)
        rows = members
        choice = members[(rnd[rows] * len(members)).long().clamp_max(len(members) - 1)]  # (M, P)
        src[rows] = torch.where(pick[rows], choice, src[rows])
    pos = torch.arange(p, device=dev)[None].expand(b, p)  # (B, P)
    out = flat[src, pos]  # (B, P, C)
    return out.reshape(shape).movedim(-1, channel_dim)  # (B, P, C) -> grid layout


# -- the model -------------------------------------------------------------------------------------------------
class FewShotModel(TaskModel):
    """Frozen backbone (+ prompts) split at its first grid, and the PMF cosine head.

    ``grid(x)`` runs the frozen layers up to the grid; ``embed_grid(g)`` runs the rest (where prompts live) and
    returns the L2-normalised embedding; ``embed(x)`` is both, equal to ``backbone.forward_features`` normalised.
    """

    def __init__(self, backbone: nn.Module, adapter, cfg: FewShotConfig) -> None:
        super().__init__(backbone, adapter)
        self.head = CosineHead(cfg.scale_init, cfg.bias_init)
        self.per_mode, self.per_ratio = cfg.per_mode, cfg.per_ratio
        from vision_peft.adapters.prompt_map import cnn_stages

        m = getattr(backbone, "model", None)
        stages = cnn_stages(backbone)
        if backbone.token_blocks() is not None and hasattr(m, "_pos_embed"):
            self.layout = "tokens"  # timm ViT: patch embeddings (B, L, D) or (B, H, W, D)
            self.channel_dim = -1
        elif stages is not None:
            self.layout = "cnn"  # (B, C, H, W)
            self.channel_dim = 1
            self.grid_stage = int(getattr(backbone, "prompt_map_stage", cfg.grid_stage))
            if not 0 <= self.grid_stage < len(stages) - 1:
                raise ConfigError(f"task.grid_stage must lie in [0, {len(stages) - 2}], got {self.grid_stage}")
        else:
            self.layout = "none"  # any other image backbone: no grid, no PER
            self.channel_dim = 1
            if cfg.per_mode != "none":
                raise ConfigError(
                    f"PER needs a timm ViT or a timm CNN with stages; {backbone.spec!r} exposes no grid. "
                    "Set task.per_mode=none"
                )

    # the frozen part up to the grid, and the rest
    def grid(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.prepare(x)
        if self.layout == "tokens":
            return bb.model.patch_embed(x)  # (B, 3, H, W) -> (B, L, D) or (B, h, w, D)
        if self.layout == "cnn":
            m = bb.model
            x = m.bn1(m.conv_stem(x))
            for stage in m.blocks[: self.grid_stage + 1]:
                x = stage(x)
            return x  # (B, C, h, w)
        return x  # pixels

    def embed_grid(self, g: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if self.layout == "tokens":
            m = bb.model
            x = m.norm_pre(m.patch_drop(m._pos_embed(g)))  # (B, L', D) with prefix tokens
            x = m.norm(m.blocks(x))
            f = m.forward_head(x, pre_logits=True)
        elif self.layout == "cnn":
            m = bb.model
            x = g
            for stage in m.blocks[self.grid_stage + 1 :]:
                x = stage(x)
            f = m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)
        else:
            f = bb._features(g)
        return F.normalize(f.float(), dim=-1)  # (B, D)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_grid(self.grid(x))

    @property
    def grid_is_frozen(self) -> bool:
        """True when nothing before the grid trains, so a grid can be computed once and reused."""
        return not any(p.requires_grad for p in self.backbone.input_prompts.parameters())

    def grid_map(self, g: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(B, C, h, w) view of a grid for spatial augmentation, and what :meth:`grid_unmap` needs."""
        if self.layout == "cnn" or self.layout == "none":
            return g, None
        if g.ndim == 4:  # (B, h, w, D)
            return g.permute(0, 3, 1, 2), "nhwc"  # (B,h,w,D)->(B,D,h,w)
        h, w = self.backbone.model.patch_embed.grid_size
        return g.transpose(1, 2).reshape(g.shape[0], g.shape[2], h, w), "nld"  # (B,L,D)->(B,D,h,w)

    @staticmethod
    def grid_unmap(m: torch.Tensor, how: Any) -> torch.Tensor:
        if how is None:
            return m
        if how == "nhwc":
            return m.permute(0, 2, 3, 1)  # (B,D,h,w)->(B,h,w,D)
        return m.flatten(2).transpose(1, 2)  # (B,D,h,w)->(B,L,D)

    def augment_grid(self, g: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from vision_peft.data.episodes import dihedral_augment

        m, how = self.grid_map(g)
        if m.shape[-1] != m.shape[-2]:
            return g
        return self.grid_unmap(dihedral_augment(m, gen), how)

    def per(self, g: torch.Tensor, labels: torch.Tensor, gen=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply PER per ``per_mode``: returns (grids, labels) (``extend`` appends recombined copies)."""
        if self.per_mode == "none" or self.layout == "none":
            return g, labels
        r = recombine(g, labels, self.per_ratio, self.channel_dim, gen)
        if self.per_mode == "replace":
            return r, labels
        return torch.cat([g, r]), torch.cat([labels, labels])

    def episode_logits(
        self, support: torch.Tensor, support_label: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        fs, fq = self.embed(support), self.embed(query)
        return self.head(fq, prototypes(fs, support_label, n_way))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One meta-training episode: prototypes from the support, cross-entropy on the queries (+ PER)."""
        sl, ql = batch["support_label"], batch["query_label"]
        n_way = int(batch["way"]) if "way" in batch else int(sl.max()) + 1
        ns, nq = len(sl), len(ql)
        if "grid_support" in batch:  # grids precomputed by the dataset
            g = torch.cat([batch["grid_support"], batch["grid_query"]])  # (S+Q, ...)
        else:
            g = self.grid(torch.cat([batch["support"], batch["query"]]))  # (S+Q, 3, H, W) -> (S+Q, ...)
        labels = torch.cat([sl, ql])
        if self.training and self.per_mode != "none":
            g, labels = self.per(g, labels)
        f = self.embed_grid(g)
        logits = self.head(torch.cat([f[ns : ns + nq], f[ns + nq :]]), prototypes(f[:ns], sl, n_way))
        targets = torch.cat([ql, labels[ns + nq :]])
        loss = F.cross_entropy(logits, targets)
        return {"loss": loss, "output": logits[:nq]}


# -- per-episode fine-tuning -----------------------------------------------------------------------------------
def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in snap.items():
            params[n].copy_(t)


def _finetune(
    model: FewShotModel,
    support: torch.Tensor,
    labels: torch.Tensor,
    n_way: int,
    steps: int,
    lr: float,
    gen: torch.Generator,
    grids: bool = False,
    pseudo_per_class: int = 0,
) -> None:
    """PMF-style fine-tuning in place: prototypes from the support, pseudo-queries = augmented support grids.

    ``grids=True``: ``support`` already holds the support's grids (the frozen layers before them never change).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if steps == 0 or lr == 0 or not params:
        return
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(steps):
            g = support if grids else model.grid(support)
            gq, lq = g, labels
            if pseudo_per_class:
                perm = torch.randperm(len(labels), generator=gen)
                keep = torch.cat([perm[labels[perm] == c][:pseudo_per_class] for c in range(n_way)])
                gq, lq = g[keep], labels[keep]
            gq, lq = model.per(model.augment_grid(gq, gen), lq, gen)
            f = model.embed_grid(torch.cat([g, gq]))
            ns = len(g)
            loss = F.cross_entropy(model.head(f[ns:], prototypes(f[:ns], labels, n_way)), lq)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def classify_episode(
    model: FewShotModel,
    support: torch.Tensor,
    support_label: torch.Tensor,
    query: torch.Tensor,
    n_way: int,
    steps: int = 0,
    lr: float = 1e-3,
    lr_search: list[float] | None = None,
    seed: int = 0,
    grids: bool = False,
    pseudo_per_class: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Query logits (Q, N) for one episode, after optional per-episode fine-tuning; the model is restored after.

    ``grids=True``: ``support`` and ``query`` are grids from :meth:`FewShotModel.grid`, not images.

    Returns:
        (logits, info) where info holds the chosen fine-tuning lr.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    snap = _snapshot(model) if steps else {}
    info: dict[str, Any] = {"lr": lr if steps else 0.0}
    if not grids and model.grid_is_frozen:
        support, query, grids = model.grid(support), model.grid(query), True
    embed = model.embed_grid if grids else model.embed
    try:
        if steps and lr_search and len(lr_search) > 1:
            info["lr"] = _choose_lr(
                model, support, support_label, n_way, steps, lr_search, gen, snap, grids, pseudo_per_class
            )
        if steps:
            _finetune(model, support, support_label, n_way, steps, info["lr"], gen, grids, pseudo_per_class)
        logits = model.head(embed(query), prototypes(embed(support), support_label, n_way))
    finally:
        if snap:
            _restore(model, snap)
    return logits, info


def _choose_lr(model, support, labels, n_way, steps, candidates, gen, snap, grids, pseudo_per_class) -> float:
    """Pick the lr with the best accuracy on a held-out shot per class (1-shot: an augmented support view)."""
    k = int(torch.bincount(labels).min())
    embed = model.embed_grid if grids else model.embed
    if k >= 2:
        last = torch.zeros_like(labels, dtype=torch.bool)
        for c in range(n_way):
            last[(labels == c).nonzero().flatten()[-1]] = True
        tr_x, tr_y, ho_y = support[~last], labels[~last], labels[last]
        ho_g = support[last] if grids else model.grid(support[last])
    else:
        tr_x, tr_y, ho_y = support, labels, labels
        ho_g = model.augment_grid(support if grids else model.grid(support), gen)
    best, best_acc = candidates[0], -1.0
    for lr in candidates:
        _finetune(model, tr_x, tr_y, n_way, steps, lr, gen, grids, pseudo_per_class)
        protos = prototypes(embed(tr_x), tr_y, n_way)
        fq = model.embed_grid(ho_g)
        acc = float((model.head(fq, protos).argmax(1) == ho_y).float().mean())
        if acc > best_acc:
            best, best_acc = lr, acc
        _restore(model, snap)
    return best


def mean_ci95(accs: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of the 95 % normal confidence interval (1.96 · std / √n)."""
    a = np.asarray(accs, dtype=np.float64)
    return float(a.mean()), float(1.96 * a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


class _Embedding(nn.Module):
    def __init__(self, model: FewShotModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.embed(image)


# -- the task --------------------------------------------------------------------------------------------------
@TASKS.register("fewshot", config_cls=FewShotConfig, help="few-shot scene classification: MVP (meta visual prompts)")
class FewShotTask(Task):
    """N-way K-shot episodes; prompts meta-trained on base classes, fine-tuned per episode at meta-test."""

    name = "fewshot"

    def image_spec(self, model: TaskModel) -> dict:
        from vision_peft.preprocess import image_spec

        return image_spec(model.backbone.data_config, resize=self.cfg.task.resize)

    def state_info(self) -> dict[str, Any]:
        t = self.cfg.task
        return {"class_split": t.classes, "n_way": t.way, "k_shot": t.k_shot}

    def build_model(self) -> FewShotModel:
        if self.cfg.train.batch_size != 1:
            raise ConfigError(
                f"task fewshot trains one episode per step: set train.batch_size=1 (got {self.cfg.train.batch_size}); "
                "use train.grad_accum to average several episodes"
            )
        backbone, handle, base = build_adapted_backbone(self.cfg)
        if getattr(backbone, "kind", "image") != "image":
            raise ConfigError(f"fewshot needs an image backbone; {self.cfg.backbone.name!r} is a {backbone.kind} one")
        model = FewShotModel(backbone, handle, self.cfg.task)
        model.mark_base(base)
        return model

    def samplers(self, q_query: int | None = None, seed: int | None = None, way=None, k_shot: int | None = None):
        """Episode samplers per split (base / val / novel) of the recipe's dataset."""
        from vision_peft.data.episodes import EpisodeSampler, scan_class_split

        t = self.cfg.task
        files = scan_class_split(resolve_data_path(t.data_root), t.classes, t.bad_files)
        q = t.q_query if q_query is None else q_query
        out = {}
        for split, f in files.items():
            qq = t.train_q_query if (split == "base" and q_query is None) else q
            out[split] = EpisodeSampler(
                f, way or t.way, k_shot or t.k_shot, qq, t.episode_seed if seed is None else seed
            )
        return out

    def datasets(self, model: TaskModel) -> dict[str, torch.utils.data.Dataset]:
        from vision_peft.data.episodes import EpisodeDataset, ImageCache, dihedral_augment

        t = self.cfg.task
        cache = ImageCache(self.image_spec(model), t.cache_images)
        samplers = self.samplers()
        base = samplers["base"]
        base.seed = self.cfg.train.seed * 1_000_003 + 17  # meta-training episodes never equal eval episodes
        grid_fn = self.grid_fn(model) if t.cache_grids and model.grid_is_frozen else None
        aug = None
        if t.augment == "dihedral":
            aug = model.augment_grid if grid_fn is not None else dihedral_augment
        out = {"train": EpisodeDataset(base, t.train_episodes, cache, "train", aug, self.cfg.train.seed, grid_fn)}
        if "val" in samplers:
            out["val"] = EpisodeDataset(samplers["val"], t.val_episodes, cache, "val", grid_fn=grid_fn)
        if "novel" in samplers and t.test_episodes:
            out["test"] = EpisodeDataset(samplers["novel"], t.test_episodes, cache, "test", grid_fn=grid_fn)
        for ds in out.values():
            ds.warm()  # grids in batches of 64 now: much faster than one image at a time during the first epoch
        return out

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
                    pseudo_per_class=t.finetune_pseudo_per_class,
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
        )
        probs = torch.softmax(logits.float(), 1).cpu().numpy()
        out = []
        for path, pr in zip(inputs[1:], probs):
            out.append(ranked_prediction(path, pr, scan.classes, top_k))
        return out

    def export_spec(self, model: TaskModel) -> ExportSpec:
        h, w = model.backbone.input_size
        s, b = model.head.scale.item(), model.head.bias.item()
        return ExportSpec(
            module=_Embedding(model),
            example_inputs={"image": torch.randn(2, 3, h, w)},
            output_names=["embedding"],
            outputs_meaning={
                "embedding": (
                    "L2-normalised image embedding (meta-trained prompts, no per-episode fine-tuning). "
                    "prototype_c = mean of class c's support embeddings, L2-normalised; "
                    f"logits_c = {s:.6g} * (embedding . prototype_c + {b:.6g}); softmax for probabilities"
                )
            },
            preprocess={"image": self.image_spec(model)},
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
