"""KIND — knowledge integration and diversion (Xie et al., AAAI 2025, arXiv 2408.07337), for the latent DiT.

Each targeted ``nn.Linear`` becomes a :class:`KINDLinear` whose weight is split SVD-style into components:

    W(y) = U_G diag(σ_G) V_Gᵀ  +  U_T diag(g(y) ⊙ σ_T) V_Tᵀ        (+ the untouched residual, see below)

learngenes (U_G, σ_G, V_G: class-agnostic) and tailors (U_T, σ_T, V_T: ``groups`` blocks of ``tailor_rank``
components), with a class gate g(y) that weights the tailor blocks for class y.

Class → tailor assignment (``assignment``):
- ``mod`` (the default, and what every run written before this option did): hard gate, class y uses block
  ``y mod groups`` — which classes share a block is arbitrary.
- ``similarity``: hard gate, classes grouped by the cosine similarity of their class-embedding rows (the DiT's
  ``y_embed``): balanced k-means (group sizes differ by at most one, so every block trains), deterministic. The
  embeddings only mean something once trained, so the grouping is computed at training step ``regroup_step``
  (``handle.step_fn``; until then the gate is ``y mod groups``) and stored as the ``kind_gate.assign`` buffer of
  the run (saved with the adapter, so a reloaded run keeps its grouping).
- ``learned``: soft gate g(y) = softmax(A[y] / ``gate_temperature``) over the groups, with a trainable
  (classes × groups) logit table A (``kind_gate.logits``, zeros at step 0: every class starts on the average of
  the blocks). The temperature is the logits' step size: AdamW moves A by about ``lr`` per step, so at lr 1e-3 and
  a few hundred steps a temperature of 1 would leave the gate uniform; 0.05 lets a class reach a one-block gate.

Distinct group initialisations (transfer, ``tailor_init``): ``mean`` (all new blocks start at the mean of the
pre-trained blocks — identical, the old behaviour), ``random`` (seeded orthonormal bases per block, σ = 0: the
model is unchanged at step 0) or ``blocks`` (new block j starts as pre-trained block j, so blocks differ and
carry their base groups' knowledge; needs ``groups`` = the pre-trained groups; with ``assignment: learned``
each target class learns its mix of the pre-trained blocks). In pre-training the blocks are distinct SVD slices.

Orthogonality (``orthogonal_lambda`` > 0): the penalty λ Σ_layers (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) through
``handle.extra_losses`` (logged as ``loss_orthogonal``) keeps the factors near their SVD structure: in pre-training
U = [U_G U_T] and V = [V_G V_T] (all components mutually orthonormal, as the SVD split started them); in transfer
per tailor block (each block an orthonormal basis; the learngenes are the frozen base weight).

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
weight for pre-training; the three class → group assignments above (the paper's gate routes classes to tailors
but no grouping rule is published); the null class (classifier-free guidance) has all tailors off; dropping the
spectrum beyond learngenes + tailors; the transfer inits; the orthogonality penalty's form; storing learngenes
merged as a dense weight in the checkpoint.
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
    tailor_init: str = "mean"  # transfer: mean (of pre-trained tailors) | random | blocks (pre-trained block j)
    seed: int = 0
    # class -> tailor block: mod (y mod groups, the old behaviour) | similarity (class-embedding k-means at
    # regroup_step) | learned (soft gate, trainable logits)
    assignment: str = "mod"
    regroup_step: int = 0  # similarity: the training step at which classes are grouped (>= 1)
    gate_temperature: float = 0.05  # learned: softmax temperature of the gate logits
    orthogonal_lambda: float = 0.0  # weight of the ‖UᵀU − I‖² + ‖VᵀV − I‖² penalty (0 = off)

    def __post_init__(self) -> None:
        if self.mode not in ("pretrain", "transfer"):
            raise ValueError(f"KIND mode must be pretrain or transfer, got {self.mode!r}")
        if self.tailor_init not in ("mean", "random", "blocks"):
            raise ValueError(f"KIND tailor_init must be mean, random or blocks, got {self.tailor_init!r}")
        if min(self.learngene_rank, self.tailor_rank, self.groups) < 1:
            raise ValueError("KIND learngene_rank, tailor_rank and groups must be positive")
        if self.assignment not in ("mod", "similarity", "learned"):
            raise ValueError(f"KIND assignment must be mod, similarity or learned, got {self.assignment!r}")
        if self.assignment == "similarity" and self.regroup_step < 1:
            raise ValueError(
                "KIND assignment=similarity groups the classes by their trained class embeddings: set "
                "adapter.regroup_step >= 1 (the training step at which to group them)"
            )
        if not self.gate_temperature > 0:
            raise ValueError(f"KIND gate_temperature must be > 0, got {self.gate_temperature}")
        if not self.orthogonal_lambda >= 0:
            raise ValueError(f"KIND orthogonal_lambda must be >= 0, got {self.orthogonal_lambda}")


def _capture_classes(backbone: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the class-conditional backbone (``forward(x, t, y)``): the class-conditioning hook that
    hands the batch's class ids to the KIND layers (read back from ``backbone.kind_y``)."""
    backbone.kind_y = kwargs["y"] if "y" in kwargs else args[2]


def balanced_groups(emb: torch.Tensor, groups: int, iters: int = 20) -> torch.Tensor:
    """Class → group ids (C,) by balanced spherical k-means on the rows of ``emb`` (C, d): every group gets
    ⌊C/groups⌋ or ⌈C/groups⌉ classes, so no block goes untrained. Deterministic: centres start at the
    farthest-point traversal from the row nearest the mean; each round assigns (class, group) pairs greedily by
    similarity under the capacity limits."""
    c = emb.shape[0]
    if groups > c:
        raise ValueError(f"KIND: {groups} groups for {c} classes; use groups <= the number of classes")
    x = F.normalize(emb.detach().double(), dim=1)
    first = int((x @ F.normalize(x.mean(0), dim=0)).argmax())
    picked = [first]
    for _ in range(groups - 1):
        sim = (x @ x[picked].T).max(1).values
        sim[picked] = float("inf")
        picked.append(int(sim.argmin()))
    centres = x[picked]
    cap = [c // groups + (1 if j < c % groups else 0) for j in range(groups)]
    assign = torch.full((c,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centres.T  # (C, G)
        order = torch.argsort(sim.flatten(), descending=True, stable=True)
        new = torch.full((c,), -1, dtype=torch.long)
        left = list(cap)
        for k in order.tolist():
            i, j = divmod(k, groups)
            if new[i] < 0 and left[j] > 0:
                new[i] = j
                left[j] -= 1
        if torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack([F.normalize(x[assign == j].mean(0), dim=0) for j in range(groups)])
    return assign


class KINDGate(nn.Module):
    """The class → tailor-block gate shared by every KIND layer (``backbone.kind_gate``) when ``assignment`` is not
    ``mod``: a hard assignment buffer (``similarity``) or trainable soft-gate logits (``learned``)."""

    def __init__(self, assignment: str, num_classes: int, groups: int, temperature: float) -> None:
        super().__init__()
        self.assignment, self.groups, self.temperature = assignment, groups, temperature
        self.resize(num_classes)

    def resize(self, num_classes: int) -> None:
        """A fresh gate for ``num_classes`` classes (the task rebuilt its class table)."""
        self.num_classes = num_classes
        if self.assignment == "learned":
            self.logits = nn.Parameter(torch.zeros(num_classes, self.groups))
        else:  # similarity: y mod groups until regroup() fires
            self.register_buffer("assign", torch.arange(num_classes) % self.groups)

    @torch.no_grad()
    def regroup(self, emb: torch.Tensor) -> torch.Tensor:
        self.assign.copy_(balanced_groups(emb[: self.num_classes], self.groups).to(self.assign.device))
        return self.assign

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(B, groups) gate weights; the null class (y >= num_classes) gets zeros."""
        real = y < self.num_classes
        yc = torch.where(real, y, torch.zeros_like(y))
        if self.assignment == "learned":
            g = torch.softmax(self.logits[yc] / self.temperature, dim=1)
        else:
            g = F.one_hot(self.assign[yc], self.groups).to(torch.float32)
        return g * real.to(g.dtype).unsqueeze(1)


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
        """(B, groups·r_T): the weight of each tailor component for class y — with ``assignment: mod`` 0/1 for the
        block of group ``y mod groups``, else the shared ``owner.kind_gate``; the null class (y == num_classes)
        gets none."""
        r = self.s_t.numel() // self.groups
        shared = getattr(self._owner[0], "kind_gate", None)
        if shared is not None:
            g = shared(y).to(self.s_t.dtype)
        else:
            g = F.one_hot(y.remainder(self.groups), self.groups).to(self.s_t.dtype)
            g = g * (y < self.num_classes).to(g.dtype).unsqueeze(1)
        return g.repeat_interleave(r, dim=1)

    def orthogonality(self) -> torch.Tensor:
        """‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F: U = [U_G U_T] in pre-training, per tailor block in transfer."""
        if self.weight is None:  # pretrain: all components, as the SVD split started them
            us, vs = [torch.cat([self.u_g, self.u_t], 1)], [torch.cat([self.v_g, self.v_t], 1)]
        else:
            us, vs = self.u_t.chunk(self.groups, 1), self.v_t.chunk(self.groups, 1)
        pen = self.s_t.new_zeros(())
        for m in (*us, *vs):
            eye = torch.eye(m.shape[1], device=m.device, dtype=m.dtype)
            pen = pen + ((m.T @ m - eye) ** 2).sum()
        return pen

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
            elif cfg.tailor_init == "blocks":  # new block j = pre-trained block j: distinct, each with its knowledge
                if key + "u_t" not in extra:
                    raise ValueError(
                        f"KIND transfer with tailor_init=blocks needs a KIND-pre-trained DiT checkpoint ({key}u_t "
                        "missing); pre-train with adapter.name=kind adapter.mode=pretrain, or use tailor_init=random"
                    )
                pg = int(extra[key + "groups"])
                if pg != cfg.groups or extra[key + "s_t"].numel() != rt:
                    r0 = extra[key + "s_t"].numel() // pg
                    raise ValueError(
                        f"KIND tailor_init=blocks copies the pre-trained blocks one to one: the checkpoint has "
                        f"{pg} groups × rank {r0}, the config {cfg.groups} × {cfg.tailor_rank}; set "
                        f"adapter.groups={pg} adapter.tailor_rank={r0} (assignment: learned maps the target "
                        "classes onto them)"
                    )
                u_t, s_t, v_t = extra[key + "u_t"], extra[key + "s_t"], extra[key + "v_t"]
            else:
                u_t = torch.cat([_orthonormal(w.shape[0], cfg.tailor_rank, gen) for _ in range(cfg.groups)], 1)
                v_t = torch.cat([_orthonormal(w.shape[1], cfg.tailor_rank, gen) for _ in range(cfg.groups)], 1)
                s_t = torch.zeros(rt)
            new = KINDLinear(lin.weight, lin.bias, u_t, s_t, v_t, cfg.groups, n_cls, backbone)
        set_module(backbone, n, new.to(lin.weight.device))
    gate = None
    if cfg.assignment != "mod":  # one gate for every layer (mod keeps the old, buffer-free layers and state dicts)
        if cfg.assignment == "similarity" and cfg.groups > n_cls:
            raise ValueError(f"KIND assignment=similarity: groups={cfg.groups} > {n_cls} classes")
        gate = KINDGate(cfg.assignment, n_cls, cfg.groups, cfg.gate_temperature).to(lin.weight.device)
        backbone.kind_gate = gate
    if cfg.mode == "pretrain":
        backbone.requires_grad_(True)  # pre-training: the whole DiT learns

    backbone.kind_y = None
    hook = backbone.register_forward_pre_hook(_capture_classes, with_kwargs=True)

    def on_classes(classes: list[str]) -> None:  # the task rebuilt the class table: the null id moved
        for n in names:
            backbone.get_submodule(n).num_classes = backbone.num_classes
        if gate is not None:
            gate.resize(backbone.num_classes)
            gate.to(backbone.y_embed.weight.device)

    report: dict = {"mode": cfg.mode, "assignment": cfg.assignment}

    def step_fn(step: int, total: int) -> dict[str, float] | None:  # similarity: group the trained embeddings once
        if gate is None or cfg.assignment != "similarity" or step != cfg.regroup_step:
            return None
        assign = gate.regroup(backbone.y_embed.weight)
        report["groups_of_classes"] = assign.tolist()
        moved = float((assign.cpu() != torch.arange(len(assign)) % cfg.groups).float().mean())
        return {"kind_regrouped_fraction_moved": moved}

    def loss_fn(model: nn.Module) -> dict[str, torch.Tensor]:
        if cfg.orthogonal_lambda <= 0:
            return {}
        pen = sum(backbone.get_submodule(n).orthogonality() for n in names)
        return {"orthogonal": cfg.orthogonal_lambda * pen}

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
        if gate is not None:  # the plain DiT has no gate; its assignment travels as kind.gate.* tensors
            del backbone.kind_gate
        return extra

    # what trains: pre-training the whole DiT ("" = the backbone itself, as for full fine-tuning; the KIND layers
    # follow), transfer only the KIND layers' tailors
    touched = ["", *names] if cfg.mode == "pretrain" else list(names)
    if gate is not None and cfg.mode != "pretrain":
        touched.append("kind_gate")
    # class-gated: no single dense weight, so no merge_fn; merge_and_unload() gives the base-checkpoint form
    return AdapterHandle(
        "kind", touched=touched, report=report, classes_fn=on_classes, condition_fn=condition,
        unload_fn=unload, step_fn=step_fn if cfg.assignment == "similarity" else None,
        loss_fn=loss_fn if cfg.orthogonal_lambda > 0 else None,
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
    gate = getattr(backbone, "kind_gate", None)
    if gate is not None:  # how the pre-training classes used the blocks (read by nobody; kept for inspection)
        sd = {k: v for k, v in sd.items() if not k.startswith("kind_gate.")}
        ids = torch.arange(gate.num_classes, device=backbone.y_embed.weight.device)
        extra["kind.gate.weights"] = gate(ids).detach()  # (classes, groups)
    return sd, extra
