"""KIND — knowledge integration and diversion (Xie et al., AAAI 2025, arXiv 2408.07337), for the latent DiT.

Each targeted ``nn.Linear`` becomes a :class:`KINDLinear` whose weight is split SVD-style into components:

    W(y) = U_G diag(σ_G) V_Gᵀ  +  U_T diag(g(y) ⊙ σ_T) V_Tᵀ        (+ the untouched residual, see below)

learngenes (U_G, σ_G, V_G: class-agnostic) and tailors (U_T, σ_T, V_T: ``groups`` blocks of ``tailor_rank``
components), with a class gate g(y) ∈ {0,1} that switches on the block of class y's group.

Modes:
- ``pretrain`` (integration and diversion): the DiT's targeted weights are decomposed by SVD into the top
  ``learngene_rank`` components (learngenes) and the next ``groups × tailor_rank`` (tailors); the remaining
  spectrum stays as a frozen-at-zero residual (dropped: at random init it carries no knowledge). Everything
  trains; learngenes receive gradients from every class, each tailor block only from its classes' samples
  (the gate zeroes the others — "diversion").
- ``transfer``: on a KIND-pre-trained checkpoint (whose targeted weights are the learngene products and whose
  ``kind.*`` tensors hold the pre-trained tailors), learngenes are frozen (they *are* the frozen base weight)
  and new tailors — one block per target-class group — are trained. New tailors start from the mean of the
  pre-trained tailor blocks (``tailor_init: mean``) or from a random orthonormal basis with σ = 0
  (``tailor_init: random``, model unchanged at step 0).

[inferred] — no code was released, so these are this project's choices: the SVD split of a random-init
weight for pre-training; class → group = ``y mod groups``; the null class (classifier-free guidance) has all
tailors off; dropping the spectrum beyond learngenes + tailors; the pre-trained tailors' mean as the transfer
init; storing learngenes merged as a dense weight in the checkpoint; the class gate is hard (0/1), not learnt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle, set_module


@dataclass
class KINDConfig:
    """SVD learngenes (shared) + class-gated tailors; pretrain or transfer mode."""

    name: str = "kind"  # registry name
    mode: str = "transfer"  # pretrain (integration and diversion) | transfer (frozen learngenes, new tailors)
    targets: list[str] = field(default_factory=lambda: ["blocks_linear"])  # portable groups or module patterns
    learngene_rank: int = 64  # pretrain: components kept as learngenes
    tailor_rank: int = 8  # components per tailor group
    groups: int = 8  # tailor groups (pretrain: base-class groups; transfer: target-class groups)
    tailor_init: str = "mean"  # transfer: mean (of pre-trained tailors) | random
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("pretrain", "transfer"):
            raise ValueError(f"KIND mode must be pretrain or transfer, got {self.mode!r}")
        if self.tailor_init not in ("mean", "random"):
            raise ValueError(f"KIND tailor_init must be mean or random, got {self.tailor_init!r}")
        if min(self.learngene_rank, self.tailor_rank, self.groups) < 1:
            raise ValueError("KIND learngene_rank, tailor_rank and groups must be positive")


def _capture_classes(backbone: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the class-conditional backbone (``forward(x, t, y)``): the class-conditioning hook that
    hands the batch's class ids to the KIND layers (read back from ``backbone.kind_y``)."""
    backbone.kind_y = kwargs["y"] if "y" in kwargs else args[2]


class KINDLinear(nn.Module):
    """Linear layer W(y) = learngene part + gated tailors; reads the class ids from ``owner.kind_y``."""

    def __init__(
        self,
        base_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        u_t: torch.Tensor,
        s_t: torch.Tensor,
        v_t: torch.Tensor,
        groups: int,
        num_classes: int,
        owner: nn.Module,
        learngenes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = u_t.shape[0], v_t.shape[0]
        self.groups, self.num_classes = groups, num_classes
        self._owner = [owner]  # a list so the DiT is not registered as a child
        if learngenes is not None:  # pretrain: factorised, trainable
            self.u_g, self.s_g, self.v_g = (nn.Parameter(t.clone()) for t in learngenes)
            self.weight = None
        else:  # transfer: the learngene product is the frozen base weight
            self.weight = base_weight
        self.bias = bias
        self.u_t, self.s_t, self.v_t = nn.Parameter(u_t.clone()), nn.Parameter(s_t.clone()), nn.Parameter(v_t.clone())

    def gate(self, y: torch.Tensor) -> torch.Tensor:
        """(B, groups·r_T) 0/1: the block of y's group; the null class (y == num_classes) gets none."""
        r = self.s_t.numel() // self.groups
        g = F.one_hot(y.remainder(self.groups), self.groups).to(self.s_t.dtype)
        g = g * (y < self.num_classes).to(g.dtype).unsqueeze(1)
        return g.repeat_interleave(r, dim=1)

    def learngene_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        return (self.u_g * self.s_g) @ self.v_g.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._owner[0].kind_y
        out = F.linear(x, self.learngene_weight(), self.bias)
        coef = self.s_t.unsqueeze(0) * self.gate(y)  # (B, r)
        z = (x @ self.v_t) * (coef.unsqueeze(1) if x.dim() == 3 else coef)
        return out + z @ self.u_t.T


def _orthonormal(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
    return q


@ADAPTERS.register(
    "kind", config_cls=KINDConfig, help="KIND: SVD learngenes + class-gated tailors (DiT)", requires=("denoiser",),
    spec={"mode": "transfer", "tailor_init": "random", "tailor_rank": 2, "groups": 2},
)  # fmt: skip
def apply_kind(backbone: nn.Module, cfg: KINDConfig) -> AdapterHandle:
    """Replace the targeted Linear layers of a DiT by KIND layers (see the module docstring)."""
    if getattr(backbone, "kind", "") != "denoiser" or not hasattr(backbone, "num_classes"):
        raise ValueError(
            "KIND needs a class-conditional backbone whose forward takes the class ids (the latent DiT, "
            "backbone.name=dit:…)"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    names = [n for n in backbone.resolve_targets(cfg.targets) if type(backbone.get_submodule(n)) is nn.Linear]
    if not names:
        raise ValueError(f"KIND targets {cfg.targets} matched no nn.Linear")
    extra = getattr(backbone, "extra_tensors", {}) or {}
    n_cls = backbone.num_classes
    rt = cfg.groups * cfg.tailor_rank
    for n in names:
        lin: nn.Linear = backbone.get_submodule(n)
        w = lin.weight.detach().float()
        if cfg.mode == "pretrain":
            if cfg.learngene_rank + rt > min(w.shape):
                raise ValueError(
                    f"KIND {n}: learngene_rank + groups·tailor_rank = {cfg.learngene_rank + rt} > {min(w.shape)}"
                )
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            g, t = slice(0, cfg.learngene_rank), slice(cfg.learngene_rank, cfg.learngene_rank + rt)
            bias = nn.Parameter(lin.bias.detach().clone()) if lin.bias is not None else None
            new = KINDLinear(
                None, bias, u[:, t], s[t], vh[t].T, cfg.groups, n_cls, backbone, learngenes=(u[:, g], s[g], vh[g].T)
            )
        else:
            key = f"kind.{n}."
            if cfg.tailor_init == "mean":
                if key + "u_t" not in extra:
                    raise ValueError(
                        f"KIND transfer with tailor_init=mean needs a KIND-pre-trained DiT checkpoint ({key}u_t missing); "
                        "pre-train with adapter.name=kind adapter.mode=pretrain, or use tailor_init=random"
                    )
                pu, ps, pv = extra[key + "u_t"], extra[key + "s_t"], extra[key + "v_t"]
                pg = int(extra[key + "groups"])
                r0 = ps.numel() // pg
                if r0 != cfg.tailor_rank:
                    raise ValueError(f"KIND tailor_rank {cfg.tailor_rank} differs from the pre-trained {r0}")
                mu = pu.reshape(pu.shape[0], pg, r0).mean(1)
                ms = ps.reshape(pg, r0).mean(0)
                mv = pv.reshape(pv.shape[0], pg, r0).mean(1)
                u_t, s_t, v_t = mu.repeat(1, cfg.groups), ms.repeat(cfg.groups), mv.repeat(1, cfg.groups)
            else:
                u_t = torch.cat([_orthonormal(w.shape[0], cfg.tailor_rank, gen) for _ in range(cfg.groups)], 1)
                v_t = torch.cat([_orthonormal(w.shape[1], cfg.tailor_rank, gen) for _ in range(cfg.groups)], 1)
                s_t = torch.zeros(rt)
            new = KINDLinear(lin.weight, lin.bias, u_t, s_t, v_t, cfg.groups, n_cls, backbone)
        set_module(backbone, n, new.to(lin.weight.device))
    if cfg.mode == "pretrain":
        backbone.requires_grad_(True)  # pre-training: the whole DiT learns

    backbone.kind_y = None
    hook = backbone.register_forward_pre_hook(_capture_classes, with_kwargs=True)

    def on_classes(classes: list[str]) -> None:  # the task rebuilt the class table: the null id moved
        for n in names:
            backbone.get_submodule(n).num_classes = backbone.num_classes

    def condition(y: torch.Tensor) -> None:
        backbone.kind_y = y

    def unload() -> dict[str, torch.Tensor]:
        """Learngene products as plain Linear weights (in place); the tailors as ``kind.*`` tensors."""
        _, extra = kind_pretrained_state(backbone, names)
        for n in names:
            m: KINDLinear = backbone.get_submodule(n)
            w = m.learngene_weight().detach()
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_module(backbone, n, lin)
        hook.remove()
        return extra

    # what trains: pre-training the whole DiT ("" = the backbone itself, as for full fine-tuning; the KIND layers
    # follow), transfer only the KIND layers' tailors
    touched = ["", *names] if cfg.mode == "pretrain" else list(names)
    # class-gated: no single dense weight, so no merge_fn; merge_and_unload() gives the base-checkpoint form
    return AdapterHandle(
        "kind", touched=touched, report={"mode": cfg.mode}, classes_fn=on_classes, condition_fn=condition,
        unload_fn=unload,
    )  # fmt: skip


def kind_pretrained_state(
    backbone: nn.Module, names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a KIND-pre-trained DiT into (plain DiT state dict with learngene products as the targeted weights,
    ``kind.*`` tensors with the pre-trained tailors) — the checkpoint format transfer mode reads."""
    sd = {}
    extra = {}
    for k, v in backbone.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in names:
            continue
        sd[k] = v
    for n in names:
        m: KINDLinear = backbone.get_submodule(n)
        sd[f"{n}.weight"] = m.learngene_weight().detach()
        if m.bias is not None:
            sd[f"{n}.bias"] = m.bias.detach()
        for t in ("u_t", "s_t", "v_t"):
            extra[f"kind.{n}.{t}"] = getattr(m, t).detach()
        extra[f"kind.{n}.groups"] = torch.tensor(m.groups)
    return sd, extra
