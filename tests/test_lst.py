"""LST (ladder side-tuning) specifics: the frozen backbone runs without autograd and gets no gradient, only the side
network and the head train, the gates' initial value, shapes, structural-pruning init, the grid path, copies,
a tiny training run, and the refusals. The registry-generated invariants live in test_adapters_generated /
test_contracts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vision_peft.adapters import apply_adapter
from vision_peft.adapters.lst import LSTConfig, SideAttentionBlock
from vision_peft.backbones import build_backbone
from vision_peft.backbones.base import prefix_blockers
from vision_peft.config import BackboneConfig

SPECS = ["timm:test_vit", "timm:test_efficientnet"]
_CACHE: dict[str, nn.Module] = {}


def tiny(spec: str) -> nn.Module:
    if spec not in _CACHE:
        kw = {"image_size": 32} if spec.startswith(("timm", "open_clip")) else {}
        _CACHE[spec] = build_backbone(BackboneConfig(name=spec, pretrained=False, **kw)).eval()
    return copy.deepcopy(_CACHE[spec])


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def adapted(spec: str, **kw) -> tuple[nn.Module, object]:
    bb = tiny(spec)
    return bb, apply_adapter(bb, LSTConfig(**{"reduction": 4, **kw}))


@pytest.mark.parametrize("spec", SPECS)
def test_backbone_gets_no_gradient_and_runs_without_autograd(spec: str) -> None:
    bb, handle = adapted(spec)
    grad_mode: list[bool] = []
    first = bb.lst.ladders[0]
    taps = [m for m in bb.modules() if any(getattr(h, "args", (None,))[0] is bb.lst for h in m._forward_hooks.values())]
    assert len(taps) == len(bb.lst.ladders)  # one recording hook per ladder
    hooks = [m.register_forward_hook(lambda *_: grad_mode.append(torch.is_grad_enabled())) for m in taps]
    head = nn.Linear(bb.embed_dim, 3)
    bb.train()
    logits = head(bb.forward_features(images()))
    for h in hooks:
        h.remove()
    assert grad_mode and not any(grad_mode), "the frozen backbone must run under no_grad"
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    side = {id(p) for p in bb.lst.parameters()}
    for n, p in bb.named_parameters():
        if id(p) in side:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, f"backbone tensor {n} got a gradient"
    assert first.alpha.grad is not None and head.weight.grad is not None
    assert handle.touched == ["lst"] and not handle.mergeable


@pytest.mark.parametrize("spec", SPECS)
def test_gates_start_at_the_configured_value_and_output_fits_the_head(spec: str) -> None:
    bb, _ = adapted(spec)
    gates = torch.cat([lad.gate() for lad in bb.lst.ladders])
    assert torch.equal(gates, torch.full_like(gates, 0.5))  # the paper: α = 0, σ(0 / T) = 0.5
    bb2, _ = adapted(spec, gate_alpha=0.3, gate_temperature=0.6)
    want = torch.sigmoid(torch.tensor(0.3) / 0.6)
    assert all(torch.allclose(lad.gate(), want) for lad in bb2.lst.ladders)
    with torch.no_grad():
        assert bb.forward_features(images(3)).shape == (3, bb.embed_dim)


def test_layers_choose_the_ladders() -> None:
    bb, handle = adapted("timm:test_vit", layers=[1, -1])
    assert handle.report["ladders"] == [1, 5] and len(bb.lst.ladders) == 2
    with torch.no_grad():
        assert bb.forward_features(images(2)).shape == (2, bb.embed_dim)


def _rows_of(sub: torch.Tensor, full: torch.Tensor) -> bool:
    """Every row of ``sub`` is a row of ``full``."""
    return bool(((sub[:, None, :] - full[None, :, :]).abs().amax(-1).amin(1) == 0).all())


def test_vit_side_blocks_are_pruned_from_the_backbone_blocks() -> None:
    bb, handle = adapted("timm:test_vit")
    assert handle.report["init"] == "pruned from the backbone blocks"
    for i, lad in enumerate(bb.lst.ladders):
        blk, side = bb.model.blocks[i], lad.block
        assert isinstance(side, SideAttentionBlock)
        w = lad.down.weight
        keep = w.argmax(1)
        assert torch.equal(w, nn.functional.one_hot(keep, w.shape[1]).to(w.dtype)), "ladder starts as a selection"
        assert len(set(keep.tolist())) == len(keep)
        assert torch.equal(side.norm1.weight, blk.norm1.weight[keep])
        assert _rows_of(side.qkv.weight, blk.attn.qkv.weight[:, keep])
        assert _rows_of(side.fc1.weight, blk.mlp.fc1.weight[:, keep])
        assert _rows_of(side.fc2.weight.T, blk.mlp.fc2.weight[keep].T)  # fc2's kept columns are fc1's kept units
        # the kept residual coordinates carry the largest weight magnitude of the block's qkv columns + fc1 columns
        score = blk.attn.qkv.weight.abs().sum(0) + blk.mlp.fc1.weight.abs().sum(0)
        score = score + blk.attn.proj.weight.abs().sum(1) + blk.mlp.fc2.weight.abs().sum(1)
        dropped = torch.ones_like(score, dtype=torch.bool)
        dropped[keep] = False
        assert score[keep].min() >= score[dropped].max()
    bb_rand, h_rand = adapted("timm:test_vit", prune_init=False)
    assert h_rand.report["init"] == "random"
    assert not _rows_of(bb_rand.lst.ladders[-1].block.qkv.weight, bb.model.blocks[-1].attn.qkv.weight[:, keep])


def test_vit_grid_path_equals_features() -> None:
    bb, _ = adapted("timm:test_vit")
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(bb.forward_from_grid(bb.forward_grid(x)), bb.forward_features(x), atol=1e-6)
    # the token grid's prefix (the patch embedding) holds no ladder: a frozen-prefix cache may use it; the
    # features (the side network trains) may not
    assert not prefix_blockers(bb, bb.grid_point())
    assert prefix_blockers(bb, bb.features_point())


def test_cnn_grid_points_before_a_ladder_are_not_cached_and_the_grid_path_runs() -> None:
    bb, _ = adapted("timm:test_efficientnet")
    for point in bb.split_points():
        assert prefix_blockers(bb, point), f"{point.name} would be cached although it feeds a ladder"
    with torch.no_grad():  # stage 2's grid: the ladders of levels 0-2 lie in its prefix, the side starts after it
        out = bb.forward_from_grid(bb.forward_grid(images(2), 2), 2)
    assert out.shape == (2, bb.embed_dim) and torch.isfinite(out).all()


def test_a_copy_records_into_its_own_side_network() -> None:
    bb, _ = adapted("timm:test_vit")
    twin = copy.deepcopy(bb)
    twin.forward_features(images(2)).sum().backward()
    assert all(p.grad is None for p in bb.lst.parameters())
    assert all(p.grad is not None for p in twin.lst.parameters())
    with torch.no_grad():
        for p in twin.lst.parameters():
            p.add_(0.1)
        assert not torch.allclose(twin.forward_features(images(2)), bb.forward_features(images(2)))


@pytest.mark.parametrize("spec", SPECS)
def test_a_tiny_training_run_lowers_the_loss(spec: str) -> None:
    torch.manual_seed(0)
    bb, _ = adapted(spec)
    head = nn.Linear(bb.embed_dim, 2)
    x, y = images(8, seed=1), torch.tensor([0, 1] * 4)
    params = [p for p in bb.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    bb.train()
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(head(bb.forward_features(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_refusals_name_the_backbone_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"needs ViT blocks, CNN stages or point stages.*'dit:.*Supported: timm ViTs"):
        apply_adapter(tiny("dit:d1-w32-h2-c3"), LSTConfig())
    with pytest.raises(ValueError, match=r"layers \[6\] outside the 6 ladder points of 'timm:test_vit'"):
        adapted("timm:test_vit", layers=[0, 6])
    with pytest.raises(ValueError, match=r"name a ladder point twice"):
        adapted("timm:test_vit", layers=[5, -1])
    with pytest.raises(ValueError, match=r"reduction=3 does not divide the width 64 of ViT block 0"):
        adapted("timm:test_vit", reduction=3)
    with pytest.raises(ValueError, match=r"reduction=5 does not divide the width 16 of feature level 0"):
        adapted("timm:test_efficientnet", reduction=5)
    for bad, msg in (({"reduction": 0}, "reduction factor must be >= 1"), ({"gate_temperature": 0}, "positive")):
        with pytest.raises(ValueError, match=msg):
            LSTConfig(**bad)
    with pytest.raises(ValueError, match="at least one ladder"):
        LSTConfig(layers=[])


@pytest.mark.parametrize("backbone", ["timm:test_vit", "timm:test_efficientnet"])
def test_run_trains_reloads_and_exports_the_side_network(run_cfg, backbone: str) -> None:
    """LST is not re-parameterising (nothing to merge): the ONNX graph holds the frozen backbone and the side
    network, and onnxruntime agrees with PyTorch."""
    import json
    from pathlib import Path

    from vision_peft.export import export_run
    from vision_peft.predict import load_run
    from vision_peft.train import run

    cfg = run_cfg("train.max_steps=2", f"backbone.name={backbone}", adapter={"name": "lst", "reduction": 4})
    run_dir = run(cfg, progress=False)
    _, _, model, _ = load_run(run_dir)
    assert isinstance(model.backbone.lst.ladders[0].alpha, nn.Parameter)
    manifest = export_run(run_dir, batch_sizes=(1, 2))
    parity = json.loads((Path(run_dir) / "export" / "parity.json").read_text())
    assert manifest["files"] and parity["passed"] and parity["max_abs_diff"] < 1e-4


# -- point backbones -------------------------------------------------------------------------------------------------
POINT_SPECS = ["pointnet", "pointbert:tiny"]


def clouds(n: int = 4, points: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, points, 3, generator=torch.Generator().manual_seed(seed))


def _side_ids(bb: nn.Module) -> set[int]:
    return {id(p) for p in bb.lst.parameters()}


def test_pointnet_ladders_read_the_stage_outputs() -> None:
    """Each ladder reads exactly PointNet's per-point stage output relu(bn_i(conv_i x)) (B, C_i, N)."""
    bb, handle = adapted("pointnet")
    assert handle.report["layout"] == "points" and handle.report["ladders"] == [0, 1, 2, 3, 4]
    assert handle.report["widths"] == [[c // 4] for c in (64, 64, 64, 128, 1024)]
    x = clouds(2)
    with torch.no_grad(), bb.lst.recording() as taps:
        type(bb)._features(bb, x)
        want = bb.forward_intermediates(x, [0, 1, 2, 3, 4])
    for i, w in enumerate(want):
        assert torch.equal(nn.functional.relu(taps[i]), w), f"stage {i}"


@pytest.mark.parametrize("spec", POINT_SPECS)
def test_point_backbone_gets_no_gradient_and_runs_without_autograd(spec: str) -> None:
    bb, handle = adapted(spec)
    grad_mode: list[bool] = []
    taps = [m for m in bb.modules() if any(getattr(h, "args", (None,))[0] is bb.lst for h in m._forward_hooks.values())]
    assert len(taps) == len(bb.lst.ladders)
    hooks = [m.register_forward_hook(lambda *_: grad_mode.append(torch.is_grad_enabled())) for m in taps]
    head = nn.Linear(bb.embed_dim, 3)
    bb.train()
    out = bb.forward_features(clouds())
    for h in hooks:
        h.remove()
    assert out.shape == (4, bb.embed_dim)
    assert grad_mode and not any(grad_mode), "the frozen backbone must run under no_grad"
    nn.functional.cross_entropy(head(out), torch.tensor([0, 1, 2, 0])).backward()
    side = _side_ids(bb)
    for n, p in bb.named_parameters():
        if id(p) in side:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, f"backbone tensor {n} got a gradient"


@pytest.mark.parametrize("spec", POINT_SPECS)
def test_point_side_is_order_invariant(spec: str) -> None:
    """The side network pools like the backbone (max over points / tokens): shuffling a PointNet cloud's points
    leaves the feature unchanged (PointBERT's FPS start point depends on the order, so only PointNet is exact)."""
    bb, _ = adapted(spec)
    x = clouds(2)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = bb.forward_features(x), bb.forward_features(x[:, perm])
    assert torch.isfinite(a).all()
    if spec == "pointnet":
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("spec", POINT_SPECS)
def test_a_point_training_step_changes_only_the_side_network(spec: str) -> None:
    bb, _ = adapted(spec)
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in bb.named_buffers()}
    head = nn.Linear(bb.embed_dim, 2)
    opt = torch.optim.AdamW([p for p in bb.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-2)
    bb.eval()  # frozen BatchNorm statistics stay (the tasks' set_train_mode does the same)
    loss = nn.functional.cross_entropy(head(bb.forward_features(clouds())), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    side = {n for n, p in bb.named_parameters() if id(p) in _side_ids(bb)}
    for n, p in bb.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n in side), f"{n} moved={moved}"
    assert all(torch.equal(b, buffers[n]) for n, b in bb.named_buffers())


@pytest.mark.parametrize("spec", POINT_SPECS)
def test_point_side_network_saves_and_reloads(spec: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    bb, _ = adapted(spec)
    with torch.no_grad():
        for p in bb.lst.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in bb.lst.state_dict().items()}, tmp_path / "lst.safetensors")
    fresh, _ = adapted(spec, seed=7)  # another random side network
    x = clouds(2, seed=4)
    with torch.no_grad():
        assert not torch.allclose(fresh.forward_features(x), bb.forward_features(x))
        fresh.lst.load_state_dict(load_file(tmp_path / "lst.safetensors"), strict=True)
        assert torch.equal(fresh.forward_features(x), bb.forward_features(x))


def test_point_refusals_name_the_valid_range() -> None:
    with pytest.raises(ValueError, match=r"reduction=3 does not divide the width 64 of point stage 0.*'pointnet'"):
        adapted("pointnet", reduction=3)
    with pytest.raises(ValueError, match=r"layers \[5\] outside the 5 ladder points of 'pointnet'.*0\.\.4"):
        adapted("pointnet", layers=[5])
    bb, _ = adapted("pointnet")
    with pytest.raises(ValueError, match=r"LST on 'pointnet' needs point clouds \(B, N, 3\) with N >= 1.*num_points"):
        bb.forward_features(torch.zeros(2, 0, 3))
    bb, handle = adapted("pointnet", layers=[-2, -1])  # the last two stages only: the side starts at conv4's output
    assert handle.report["ladders"] == [3, 4]
    with torch.no_grad():
        assert bb.forward_features(clouds(2)).shape == (2, 1024)


def test_pointbert_side_blocks_are_pruned_from_its_blocks() -> None:
    bb, handle = adapted("pointbert:tiny")
    assert handle.report["layout"] == "tokens" and handle.report["init"] == "pruned from the backbone blocks"
    for lad, blk in zip(bb.lst.ladders, bb.blocks.blocks, strict=True):
        keep = lad.down.weight.argmax(1)
        assert torch.equal(lad.block.norm1.weight, blk.norm1.weight[keep])
        assert _rows_of(lad.block.qkv.weight, blk.attn.qkv.weight[:, keep])
