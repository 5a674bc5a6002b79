"""KIND fidelity (issue 14): the class → tailor assignment is a real choice (class-embedding similarity or a learned
soft gate, ``y mod groups`` only as the old default), the orthogonality option keeps U/V near their SVD structure,
and transfer groups can start distinct (``tailor_init: blocks``). Tiny DiTs, CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vision_peft.adapters import apply_adapter
from vision_peft.adapters.kind import KINDConfig, KINDLinear, balanced_groups, kind_pretrained_state
from vision_peft.backbones.dit import DiT, DiTArch


def tiny_dit(classes: int = 4, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(DiTArch(depth=1, width=32, heads=2, num_classes=classes))
    with torch.no_grad():  # adaLN-Zero starts at zero output; give every tensor some weight so gradients flow
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.requires_grad_(False)


def forward_loss(m: DiT, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(y), 32, 4, 4, generator=g)
    return m(x, torch.full((len(y),), 300), y).pow(2).mean()


def kind_layers(m: nn.Module) -> list[KINDLinear]:
    return [x for x in m.modules() if isinstance(x, KINDLinear)]


def pretrained_kind_base(classes: int = 4, groups: int = 2, rank: int = 2, seed: int = 0) -> DiT:
    """A DiT in the checkpoint form transfer reads (learngene products as weights, tailors as ``kind.*``), with
    tailor blocks made distinct by a perturbation (as training would)."""
    m = tiny_dit(classes, seed)
    h = apply_adapter(m, KINDConfig(mode="pretrain", learngene_rank=8, tailor_rank=rank, groups=groups))
    with torch.no_grad():
        for lay in kind_layers(m):
            lay.u_t.add_(torch.randn_like(lay.u_t) * 0.1)
    sd, extra = kind_pretrained_state(m, h.touched[1:])
    base = DiT(m.arch)
    base.load_state_dict(sd)
    base.extra_tensors = extra
    return base.requires_grad_(False)


# -- class -> tailor assignment -------------------------------------------------------------------------------
def test_old_config_keeps_y_mod_groups_and_its_state_dict():
    """A KIND config written before ``assignment`` existed (no key) builds the old layers: gate y mod groups, no
    gate module, no new tensors in the state dict (old run directories load strictly)."""
    cfg = KINDConfig(**{"mode": "pretrain", "learngene_rank": 8, "tailor_rank": 2, "groups": 2})
    assert cfg.assignment == "mod" and cfg.orthogonal_lambda == 0.0
    m = tiny_dit()
    h = apply_adapter(m, cfg)
    assert not hasattr(m, "kind_gate") and not any(k.startswith("kind_gate") for k in m.state_dict())
    assert h.step_fn is None and h.extra_losses(m) == {}
    lay = kind_layers(m)[0]
    assert lay.gate(torch.tensor([0, 1, 2, 3, 4])).tolist() == [
        [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]
    ]  # fmt: skip


def test_balanced_groups_follow_embedding_similarity():
    """Classes whose embeddings point the same way share a group, whatever their ids; groups are balanced. Here
    classes {0, 3}, {1, 4}, {2, 5} are near-duplicates, so ``y mod 3`` would pair them right and ``y mod 2`` wrong."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    emb = torch.cat([centres, centres]) + 0.05 * torch.randn(6, 16, generator=g)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])  # shuffle the ids: the grouping must follow the vectors, not the ids
    a = balanced_groups(emb[perm], 3)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(6)
    a = a[inv]  # back to the original order
    assert a[0] == a[3] and a[1] == a[4] and a[2] == a[5] and len(set(a.tolist())) == 3
    # balanced: 7 classes in 3 groups -> sizes 3, 2, 2, even when the embeddings are one cluster plus outliers
    b = balanced_groups(torch.cat([torch.zeros(5, 4) + 1.0, torch.randn(2, 4, generator=g)]), 3)
    assert sorted(torch.bincount(b, minlength=3).tolist()) == [2, 2, 3]


def test_similarity_assignment_regroups_by_class_embedding_at_regroup_step():
    m = tiny_dit(classes=4)
    with torch.no_grad():  # classes 0 and 1 alike, 2 and 3 alike: y mod 2 would pair 0 with 2
        e = torch.randn(2, m.y_embed.weight.shape[1])
        m.y_embed.weight[:4] = torch.stack([e[0], e[0] * 1.1, e[1], e[1] * 0.9])
    h = apply_adapter(
        m, KINDConfig(mode="pretrain", learngene_rank=8, tailor_rank=2, groups=2, assignment="similarity",
                      regroup_step=3),
    )  # fmt: skip
    lay = kind_layers(m)[0]
    y = torch.tensor([0, 1, 2, 3, 4])
    assert lay.gate(y)[:, ::2].argmax(1)[:4].tolist() == [0, 1, 0, 1]  # before the regroup step: y mod groups
    assert h.step_fn(2, 10) is None
    log = h.step_fn(3, 10)
    assert log and log["kind_regrouped_fraction_moved"] > 0
    g = lay.gate(y)
    assert torch.equal(g[0], g[1]) and torch.equal(g[2], g[3]) and not torch.equal(g[0], g[2])
    assert float(g[4].abs().sum()) == 0.0  # the null class: no tailor
    assert "kind_gate.assign" in m.state_dict()  # saved with the run, so a reloaded run keeps its grouping
    # diversion follows the new grouping: a batch of classes 0 and 1 trains only their shared block
    m(torch.randn(2, 32, 4, 4), torch.tensor([10, 20]), torch.tensor([0, 1])).pow(2).mean().backward()
    blk = int(g[0].argmax()) // 2
    grad = lay.s_t.grad.reshape(2, 2).abs().sum(1)
    assert float(grad[blk]) > 0 and float(grad[1 - blk]) == 0.0
    with pytest.raises(ValueError, match="regroup_step"):
        KINDConfig(assignment="similarity")


def test_learned_soft_gate_trains_and_routes_by_class():
    base = pretrained_kind_base(classes=4, groups=2)
    h = apply_adapter(base, KINDConfig(mode="transfer", tailor_rank=2, groups=2, tailor_init="blocks",
                                       assignment="learned", gate_temperature=0.5))  # fmt: skip
    base.reset_classes(3)
    h.on_classes(["a", "b", "c"])
    gate = base.kind_gate
    assert gate.logits.shape == (3, 2) and gate.logits.requires_grad and "kind_gate" in h.touched
    lay = kind_layers(base)[0]
    g = lay.gate(torch.tensor([0, 1, 2, 3])).detach()
    assert torch.allclose(g[:3], torch.full((3, 4), 0.5)) and float(g[3].abs().sum()) == 0.0  # uniform; null off
    forward_loss(base, torch.tensor([0, 0, 2])).backward()
    assert gate.logits.grad is not None and float(gate.logits.grad[0].abs().sum()) > 0
    assert float(gate.logits.grad[1].abs().sum()) == 0.0  # class 1 not in the batch: its gate gets nothing
    with torch.no_grad():
        gate.logits[1] = torch.tensor([3.0, -3.0])
    assert float(lay.gate(torch.tensor([1]))[0, 0]) > 0.99  # a confident class uses one block


# -- distinct initialisations -----------------------------------------------------------------------------------
def test_transfer_blocks_init_gives_distinct_groups():
    base = pretrained_kind_base(classes=4, groups=2)
    extra = dict(base.extra_tensors)
    apply_adapter(base, KINDConfig(mode="transfer", tailor_rank=2, groups=2, tailor_init="blocks"))
    for lay in kind_layers(base):
        u = lay.u_t.detach().reshape(lay.u_t.shape[0], 2, 2)
        assert not torch.allclose(u[:, 0], u[:, 1])  # the groups differ ...
        name = next(n for n, x in base.named_modules() if x is lay)
        assert torch.equal(lay.u_t.detach(), extra[f"kind.{name}.u_t"])  # ... as the pre-trained blocks did
    mean = pretrained_kind_base(classes=4, groups=2)
    apply_adapter(mean, KINDConfig(mode="transfer", tailor_rank=2, groups=2, tailor_init="mean"))
    u = kind_layers(mean)[0].u_t.detach().reshape(-1, 2, 2)
    assert torch.equal(u[:, 0], u[:, 1])  # the old init: identical groups (kept for old configs)
    with pytest.raises(ValueError, match="one to one"):
        apply_adapter(pretrained_kind_base(), KINDConfig(mode="transfer", tailor_rank=2, groups=3,
                                                          tailor_init="blocks"))  # fmt: skip


# -- orthogonality ------------------------------------------------------------------------------------------------
def test_orthogonality_penalty_zero_at_svd_and_pulls_back():
    m = tiny_dit()
    h = apply_adapter(m, KINDConfig(mode="pretrain", learngene_rank=8, tailor_rank=2, groups=2,
                                    orthogonal_lambda=0.1))  # fmt: skip
    pen = h.extra_losses(m)
    assert set(pen) == {"orthogonal"} and float(pen["orthogonal"]) < 1e-8  # the SVD split is orthonormal
    lays = kind_layers(m)
    with torch.no_grad():
        for lay in lays:
            lay.u_t.mul_(1.5)
            lay.v_g.add_(torch.randn_like(lay.v_g) * 0.1)
    pen = h.extra_losses(m)["orthogonal"]
    want = 0.1 * sum(
        float(((torch.cat([a, b], 1).T @ torch.cat([a, b], 1) - torch.eye(a.shape[1] + b.shape[1])) ** 2).sum())
        for lay in lays
        for a, b in ((lay.u_g, lay.u_t), (lay.v_g, lay.v_t))
    )
    assert float(pen) == pytest.approx(want, rel=1e-5)
    pen.backward()
    lay = lays[0]
    before = float(pen)
    with torch.no_grad():  # a small step down the penalty's gradient moves the factors back towards orthonormal
        for x in lays:
            for p in (x.u_g, x.u_t, x.v_g, x.v_t):
                p.sub_(1e-2 * p.grad)
    assert float(h.extra_losses(m)["orthogonal"]) < before
    assert lay.s_g.grad is None or float(lay.s_g.grad.abs().sum()) == 0.0  # σ is not constrained
    # transfer: per tailor block (random init is orthonormal per block: zero penalty at step 0)
    t = apply_adapter(tiny_dit(), KINDConfig(mode="transfer", tailor_init="random", tailor_rank=2, groups=3,
                                             orthogonal_lambda=1.0))  # fmt: skip
    assert float(t.extra_losses(None)["orthogonal"]) < 1e-8


def test_gated_dit_traces_for_export():
    """The export path (TorchScript trace of the denoiser) sees the shared gate: the traced graph gives the eager
    outputs for other class ids too (the gate is not frozen into the trace)."""
    from vision_peft.tasks.diffusion_model import DenoiserGraph

    base = pretrained_kind_base(classes=4, groups=2)
    h = apply_adapter(base, KINDConfig(mode="transfer", tailor_rank=2, groups=2, tailor_init="blocks",
                                       assignment="learned", gate_temperature=0.5))  # fmt: skip
    with torch.no_grad():
        base.kind_gate.logits.copy_(torch.randn(4, 2))
    assert h.touched
    g = DenoiserGraph(base).eval()
    x, t = torch.randn(2, 32, 4, 4), torch.tensor([10, 500])
    traced = torch.jit.trace(g, (x, t, torch.tensor([0, 4])))
    for y in (torch.tensor([0, 4]), torch.tensor([3, 1])):
        with torch.no_grad():
            assert torch.allclose(traced(x, t, y), g(x, t, y), atol=1e-5)
