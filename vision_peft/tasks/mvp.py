"""MVP: meta visual prompt tuning — the PMF cosine head, patch-embedding recombination, the model split at its
first grid, and per-episode fine-tuning (used by the ``fewshot`` task, :mod:`vision_peft.tasks.fewshot`).

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
  the support's *grid* (``task.finetune_augment``; feature-grid augmentation, so the frozen layers before the
  grid run once per episode [inferred: PMF augments pixels]; never the identity view, so a pseudo-query is never
  its own prototype's source), plus PER copies (``task.finetune_per``); then classify the queries and restore
  the tensors. With more than one ``finetune_lr_search`` candidate the lr is picked by accuracy on a held-out
  shot per class (the last) after fine-tuning on the others [PMF code: ``ProtoNet_Auto_Finetune`` holds out all
  but one shot]. An episode with a one-shot class has no held-out shot: no search, and the lr is
  ``task.finetune_lr_fallback`` (``zero``: no fine-tuning, PMF's rule; ``finetune_lr``: the recipe's lr, chosen
  on the validation classes).
- PER [inferred from the abstract]: on the first grid the backbone exposes (ViT: patch embeddings before the
  position embedding; EfficientNet: the output of stage ``grid_stage``), each position of a sample is replaced
  with probability ``per_ratio`` by the same position of *another* view of the same class. It works on the
  support side only: the pool of a class is its support shots plus one dihedral view of each (meta-training:
  with ``task.augment: dihedral``; meta-test: the step's pseudo-query views), so in 1-shot the shot is
  recombined with its own turned view. Meta-training ``per_mode``: ``extend`` (recombined support samples are
  added to the prototypes' sources), ``replace`` (they replace the support), ``none``; the queries are never
  recombined and are the only scored samples. Meta-test: ``extend`` adds a recombined copy of each pseudo-query,
  ``replace`` uses the copy instead. A class with a single view (one shot, no augmentation) is refused with an
  error instead of silently recombining the view with itself.
- Prompts: ``vpt`` (shallow/deep tokens) on token backbones (timm ViTs); ``prompt_map`` (a learnable map added
  to the EfficientNet-Lite0 stage-``stage`` feature map, the grid PER works on) or ``pad_prompt`` (pixels) on
  CNNs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.config import ConfigError
from vision_peft.tasks.base import TaskModel

if TYPE_CHECKING:
    from vision_peft.tasks.fewshot import FewShotConfig


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


def recombine(
    grid: torch.Tensor,
    labels: torch.Tensor,
    ratio: float,
    channel_dim: int,
    generator=None,
    others_only: bool = False,
) -> torch.Tensor:
    """Patch-embedding recombination: each position of sample i comes, with probability ``ratio``, from the same
    position of a random sample of i's class; other positions stay. Shapes are kept.

    Args:
        grid: (B, …) embeddings on a grid; ``channel_dim`` is the embedding axis, every other non-batch axis a
            position axis.
        labels: (B,) class of each sample; recombination never crosses classes.
        others_only: a picked position comes from a *different* sample of i's class (so a recombined sample
            differs from its source wherever the class's samples differ); otherwise the draw may return i itself.
            Either way a class with one sample stays as it is (callers that need a change check for that).
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
        m = len(members)
        if others_only:
            if m < 2:
                continue
            # j-th of the other m-1 members: index j, skipping the sample's own rank
            j = (rnd[members] * (m - 1)).long().clamp_max(m - 2)  # (M, P)
            own = torch.arange(m, device=dev)[:, None]  # (M, 1)
            choice = members[j + (j >= own).long()]  # (M, P)
        else:
            choice = members[(rnd[members] * m).long().clamp_max(m - 1)]  # (M, P)
        src[members] = torch.where(pick[members], choice, src[members])
    pos = torch.arange(p, device=dev)[None].expand(b, p)  # (B, P)
    out = flat[src, pos]  # (B, P, C)
    return out.reshape(shape).movedim(-1, channel_dim)  # (B, P, C) -> grid layout


def per_needs_views(labels: torch.Tensor, where: str, fix: str) -> None:
    """Refuse PER where a class has a single view: recombining it with itself would return it unchanged."""
    counts = torch.bincount(labels)
    lonely = (counts == 1).nonzero().flatten().tolist()
    if lonely:
        raise ConfigError(
            f"PER ({where}) recombines the grid positions of a class's support views, but class(es) {lonely} of "
            f"this episode have a single view (one shot and no augmented view), so PER would return its input "
            f"unchanged. {fix}"
        )


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
        # meta-training: PER's pool also holds one dihedral view per shot (task.augment: dihedral)
        self.per_train_views = getattr(cfg, "augment", "dihedral") == "dihedral"
        # meta-test fine-tuning: pseudo-queries are dihedral views of the support; PER there too
        self.finetune_augment = getattr(cfg, "finetune_augment", "dihedral") == "dihedral"
        self.finetune_per = bool(getattr(cfg, "finetune_per", True))
        info = backbone.grid_info()  # tokens: (B, L, D) or (B, h, w, D); cnn: (B, C, h, w); pixels: no grid
        self.layout, self.channel_dim, self.grid_stage = info.layout, info.channel_dim, None
        if info.layout == "cnn":
            # prompt_map's stage when it is applied (its prompt enters the next stage), else task.grid_stage
            self.grid_stage = int(getattr(backbone, "prompt_map_stage", cfg.grid_stage))
            if not 0 <= self.grid_stage < info.stages - 1:
                raise ConfigError(f"task.grid_stage must lie in [0, {info.stages - 2}], got {self.grid_stage}")
        elif info.layout == "pixels" and cfg.per_mode != "none":
            raise ConfigError(
                f"PER (task.per_mode={cfg.per_mode}) needs a backbone with a patch / feature grid (capability "
                f"'grid': timm ViTs, timm CNNs with stages, effnet_lite0); {backbone.spec!r} exposes none "
                "(vision_peft/tasks/mvp.py). Set task.per_mode=none, or pick a backbone that provides 'grid'"
            )

    # the frozen part up to the grid, and the rest
    def grid(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_grid(x, self.grid_stage)

    def embed_grid(self, g: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_from_grid(g, self.grid_stage)
        return F.normalize(f.float(), dim=-1)  # (B, D)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_grid(self.grid(x))

    @property
    def grid_is_frozen(self) -> bool:
        """True when nothing before the grid trains, so a grid can be computed once and reused."""
        return not any(p.requires_grad for p in self.backbone.input_prompts.parameters())

    def grid_map(self, g: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(B, C, h, w) view of a grid for spatial augmentation, and what :meth:`grid_unmap` needs."""
        if self.layout != "tokens":
            return g, None
        if g.ndim == 4:  # (B, h, w, D)
            return g.permute(0, 3, 1, 2), "nhwc"  # (B,h,w,D)->(B,D,h,w)
        h, w = self.backbone.grid_info().hw
        return g.transpose(1, 2).reshape(g.shape[0], g.shape[2], h, w), "nld"  # (B,L,D)->(B,D,h,w)

    @staticmethod
    def grid_unmap(m: torch.Tensor, how: Any) -> torch.Tensor:
        if how is None:
            return m
        if how == "nhwc":
            return m.permute(0, 2, 3, 1)  # (B,D,h,w)->(B,h,w,D)
        return m.flatten(2).transpose(1, 2)  # (B,D,h,w)->(B,L,D)

    def can_augment_grid(self, g: torch.Tensor) -> bool:
        """Dihedral views of a grid need a square grid (a 90° turn of an h×w map with h ≠ w changes its shape)."""
        m, _ = self.grid_map(g[:1])
        return m.shape[-1] == m.shape[-2]

    def augment_grid(self, g: torch.Tensor, gen: torch.Generator | None, non_identity: bool = False) -> torch.Tensor:
        """A random flip / 90° turn of every grid (unchanged when the grid is not square); ``non_identity``: never
        the identity, so each view differs from its source."""
        from vision_peft.data.episodes import dihedral_augment

        if not self.can_augment_grid(g):
            return g
        m, how = self.grid_map(g)
        return self.grid_unmap(dihedral_augment(m, gen, non_identity=non_identity), how)

    def per_support(
        self, g: torch.Tensor, labels: torch.Tensor, gen: torch.Generator | None, views: torch.Tensor | None
    ) -> torch.Tensor:
        """PER on the support side only: one recombined sample per row of ``views`` (or of ``g`` when
        ``views`` is None), each position taken with probability ``per_ratio`` from another member of its class's
        pool = the support shots ``g`` (+ their augmented ``views``). Nothing outside the support enters.

        Args:
            g: (S, …) support grids, labels (S,).
            views: (S, …) augmented views of ``g`` (row i a view of shot i), or None.

        Returns:
            (S, …) recombined grids, row i built from view i (shot i without views) and its class's pool.
        """
        pool, pool_labels = (g, labels) if views is None else (torch.cat([g, views]), torch.cat([labels, labels]))
        r = recombine(pool, pool_labels, self.per_ratio, self.channel_dim, gen, others_only=True)
        return r if views is None else r[len(g) :]

    def _train_support(self, gs: torch.Tensor, sl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta-training PER: the support side (prototype sources) after ``per_mode``; queries never change."""
        views = None
        if self.per_train_views and self.can_augment_grid(gs):
            views = self.augment_grid(gs, None, non_identity=True)
        per_needs_views(
            sl if views is None else torch.cat([sl, sl]),
            "meta-training",
            "Use task.augment=dihedral (a square grid), k_shot >= 2, or task.per_mode=none",
        )
        r = self.per_support(gs, sl, None, views)
        if self.per_mode == "replace":
            return r, sl
        return torch.cat([gs, r]), torch.cat([sl, sl])  # extend: recombined copies join the prototypes

    def episode_logits(
        self, support: torch.Tensor, support_label: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        fs, fq = self.embed(support), self.embed(query)
        return self.head(fq, prototypes(fs, support_label, n_way))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One meta-training episode: prototypes from the support, cross-entropy on the queries.

        PER (training mode, ``per_mode`` extend / replace) acts on the support side only: recombined support
        samples are added to (extend) or replace (replace) the prototypes' sources; the queries stay as they are
        and are the only scored samples, so no query patch reaches a prototype and no sample is scored against a
        prototype built from its own patches.
        """
        sl, ql = batch["support_label"], batch["query_label"]
        n_way = int(batch["way"]) if "way" in batch else int(sl.max()) + 1
        if "grid_support" in batch:  # grids precomputed by the dataset
            gs, gq = batch["grid_support"], batch["grid_query"]
        else:
            ns = len(sl)
            g = self.grid(torch.cat([batch["support"], batch["query"]]))  # (S+Q, 3, H, W) -> (S+Q, ...)
            gs, gq = g[:ns], g[ns:]
        ps, pl = gs, sl
        if self.training and self.per_mode != "none" and self.layout != "pixels":
            ps, pl = self._train_support(gs, sl)
        f = self.embed_grid(torch.cat([ps, gq]))
        np_ = len(ps)
        logits = self.head(f[np_:], prototypes(f[:np_], pl, n_way))
        loss = F.cross_entropy(logits, ql)
        return {"loss": loss, "output": logits}


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
    """PMF-style fine-tuning in place: prototypes from the support, pseudo-queries = augmented support views.

    Each step: one dihedral view of every support grid (never the identity; ``model.finetune_augment``), of which
    ``pseudo_per_class`` per class are kept (0 = all) as pseudo-queries; with ``model.finetune_per`` (and
    ``per_mode`` extend / replace) each kept view also gets a PER copy that takes positions from the other views of
    its class (its shot, the class's other shots and their views), added (extend) or in place of it (replace).
    ``grids=True``: ``support`` already holds the support's grids (the frozen layers before them never change).

    Raises:
        ConfigError: PER is on but a class has one shot and no augmented view (nothing to recombine with).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if steps == 0 or lr == 0 or not params:
        return
    per = model.finetune_per and model.per_mode != "none" and model.layout != "pixels"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(steps):
            g = support if grids else model.grid(support)
            views = None
            if model.finetune_augment and model.can_augment_grid(g):
                views = model.augment_grid(g, gen, non_identity=True)
            if per:
                per_needs_views(
                    labels if views is None else torch.cat([labels, labels]),
                    "meta-test fine-tuning",
                    "Use task.finetune_augment=dihedral (a square grid), >= 2 shots per class, "
                    "task.finetune_per=false or task.per_mode=none",
                )
            keep = torch.arange(len(labels))
            if pseudo_per_class:
                perm = torch.randperm(len(labels), generator=gen)
                keep = torch.cat([perm[labels[perm] == c][:pseudo_per_class] for c in range(n_way)])
            gq, lq = (g if views is None else views)[keep], labels[keep]
            if per:
                r = model.per_support(g, labels, gen, views)[keep]
                gq, lq = (r, lq) if model.per_mode == "replace" else (torch.cat([gq, r]), torch.cat([lq, lq]))
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
    no_holdout_lr: float = 0.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Query logits (Q, N) for one episode, after optional per-episode fine-tuning; the model is restored after.

    ``grids=True``: ``support`` and ``query`` are grids from :meth:`FewShotModel.grid`, not images. With more than
    one ``lr_search`` candidate the lr is chosen on a held-out shot per class (:func:`_choose_lr`); an episode
    with a one-shot class has no held-out shot, so there is no search and ``no_holdout_lr`` is used (0 = no
    fine-tuning, as PMF's ``ProtoNet_Auto_Finetune``).

    Returns:
        (logits, info) where info holds the fine-tuning lr used and how it was chosen.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    snap = _snapshot(model) if steps else {}
    info: dict[str, Any] = {"lr": lr if steps else 0.0, "lr_source": "fixed"}
    if not grids and model.grid_is_frozen:
        support, query, grids = model.grid(support), model.grid(query), True
    embed = model.embed_grid if grids else model.embed
    try:
        if steps and lr_search and len(lr_search) > 1:
            if int(torch.bincount(support_label, minlength=n_way).min()) >= 2:
                info["lr"] = _choose_lr(
                    model, support, support_label, n_way, steps, lr_search, gen, snap, grids, pseudo_per_class
                )
                info["lr_source"] = "search"
            else:
                info["lr"], info["lr_source"] = no_holdout_lr, "no held-out shot"
        if steps:
            _finetune(model, support, support_label, n_way, steps, info["lr"], gen, grids, pseudo_per_class)
        logits = model.head(embed(query), prototypes(embed(support), support_label, n_way))
    finally:
        if snap:
            _restore(model, snap)
    return logits, info


def _choose_lr(model, support, labels, n_way, steps, candidates, gen, snap, grids, pseudo_per_class) -> float:
    """Pick the lr with the best accuracy on a held-out shot per class (the last shot of every class) after
    fine-tuning on the other shots; ties go to the earlier candidate. Needs >= 2 shots in every class."""
    embed = model.embed_grid if grids else model.embed
    last = torch.zeros_like(labels, dtype=torch.bool)
    for c in range(n_way):
        last[(labels == c).nonzero().flatten()[-1]] = True
    tr_x, tr_y, ho_y = support[~last], labels[~last], labels[last]
    ho_g = support[last] if grids else model.grid(support[last])
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
