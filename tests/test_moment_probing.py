"""Moment Probing, MP and MP+ (vision_peft/adapters/moment_probing.py).

The generic invariants (freezing, gradients, one optimizer step, save → strict reload) come from the registry in
test_adapters_generated.py and test_contracts.py; here: MHC³ by hand, the first-order part, PSRP's identity start,
what trains, a tiny training run, the refusals and the ONNX export.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_contracts import Case, trained_run
from torch import nn

from vision_peft.adapters import apply_adapter
from vision_peft.adapters.moment_probing import (
    MHC3,
    MomentProbingConfig,
    MomentProbingPlusConfig,
    conv_side,
)
from vision_peft.backbones import build_backbone
from vision_peft.config import BackboneConfig

SIZE = 32
_BUILT: dict[str, nn.Module] = {}


def frozen(spec: str) -> nn.Module:
    if spec not in _BUILT:
        kw = {"image_size": SIZE} if spec.startswith(("timm", "open_clip", "effnet")) else {}
        _BUILT[spec] = build_backbone(BackboneConfig(name=spec, pretrained=False, **kw)).eval().requires_grad_(False)
    return copy.deepcopy(_BUILT[spec])


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def mp(hidden: int = 32, heads: int = 4) -> MomentProbingConfig:
    return MomentProbingConfig(hidden_dim=hidden, heads=heads)


def mp_plus(hidden: int = 32, heads: int = 4, rank: int = 4) -> MomentProbingPlusConfig:
    return MomentProbingPlusConfig(hidden_dim=hidden, heads=heads, psrp_rank=rank)


# -- MHC³ ------------------------------------------------------------------------------------------------------------
def identity_mhc3(width: int, heads: int) -> MHC3:
    m = MHC3(width, width, heads)
    with torch.no_grad():
        m.proj.weight.copy_(torch.eye(width))
        m.proj.bias.zero_()
    return m


def test_mhc3_single_token_by_hand() -> None:
    """One token: each cross second-moment is the outer product a bᵀ of the two layer-normed groups; with unit
    columns every column is sign(b_j) · a / ‖a‖."""
    a = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # mean 0, variance 1: LayerNorm keeps it (≈)
    b = torch.tensor([2.0, -2.0, 0.5, -0.5, 3.0, -3.0, -1.0, 1.0])  # mean 0: LayerNorm only rescales, signs stay
    cov = identity_mhc3(16, 2).cross_covariances(torch.cat([a, b]).view(1, 1, 16))
    assert cov.shape == (1, 1, 8, 8)
    signs = [1, -1, 1, -1, 1, -1, -1, 1]
    want = torch.stack([s * a / math.sqrt(8) for s in signs], dim=1)  # column j = sign(b_j) a / ‖a‖
    assert torch.allclose(cov[0, 0], want, atol=1e-4)


def test_mhc3_matches_a_loop_reference() -> None:
    """Several tokens and groups: cross_covariances against explicit loops (LayerNorm per group, the group's scalar
    mean removed, (1/N) Σ_n x_i[n] x_{i+1}[n]ᵀ, every column scaled to unit norm)."""
    heads, d, n = 3, 8, 5
    m = identity_mhc3(heads * d, heads)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.3, 0.3)
    tokens = torch.randn(2, n, heads * d, generator=torch.Generator().manual_seed(0))
    got = m.cross_covariances(tokens)
    assert got.shape == (2, heads - 1, d, d)
    for bi in range(2):
        groups = []
        for g in range(heads):
            x = tokens[bi, :, g * d : (g + 1) * d]
            x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
            x = x * m.norm.weight + m.norm.bias
            groups.append(x - x.mean())
        for g in range(heads - 1):
            c = sum(torch.outer(groups[g][t], groups[g + 1][t]) for t in range(n)) / n
            c = c / c.norm(dim=0, keepdim=True)
            assert torch.allclose(got[bi, g], c, atol=1e-5)


def test_mhc3_sizes() -> None:
    # the official ViT-B head: 768 → 512, 4 heads of 128, 3 × 31² = 2,883 inputs to its second classifier
    assert MHC3(768, 512, 4).out_dim == 2883
    assert conv_side(7) == 1 and conv_side(6) == 0
    m = MHC3(64, 32, 4)
    out = m(torch.randn(3, 10, 64))
    assert out.shape == (3, m.out_dim) and m.out_dim == 3 * conv_side(8) ** 2


# -- the widened features --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["timm:test_vit", "timm:test_efficientnet", "effnet_lite0"])
def test_first_order_part_is_the_cls_token_or_the_mean(spec: str) -> None:
    ref = frozen(spec)
    bb = copy.deepcopy(ref)
    handle = apply_adapter(bb, mp())
    x = images()
    with torch.no_grad():
        got = bb.forward_features(x)
        final = ref.model.forward_features(x)  # ViT: normed tokens (B, L, D); CNN: the last map (B, C, H, W)
    d = ref.embed_dim
    first = final[:, 0] if final.dim() == 3 else final.mean(dim=(2, 3))
    assert got.shape == (2, d + handle.report["second_order_dim"]) and bb.embed_dim == got.shape[1]
    assert torch.allclose(got[:, :d], first, atol=1e-6)
    assert got[:, d:].abs().sum() > 0


def test_second_order_part_reads_the_patch_tokens_only() -> None:
    bb = frozen("timm:test_vit")
    apply_adapter(bb, mp())
    x = images()
    with torch.no_grad():
        tokens = bb.model.forward_features(x)  # (B, 1 + N, D)
        want = bb.moment_probe.mhc3(tokens[:, 1:])
        got = bb.forward_features(x)[:, bb.model.embed_dim :]
    assert torch.allclose(got, want, atol=1e-6)


def test_deep_copy_rebinds_the_hooks() -> None:
    bb = frozen("timm:test_vit")
    apply_adapter(bb, mp())
    twin = copy.deepcopy(bb)
    x = images()
    with torch.no_grad():
        twin.moment_probe.mhc3.proj.weight.mul_(3.0)
        assert not torch.allclose(twin.forward_features(x), bb.forward_features(x))
        assert torch.equal(copy.deepcopy(bb).forward_features(x), bb.forward_features(x))


# -- MP+ -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["timm:test_vit", "effnet_lite0", "open_clip:vp-tiny-clip"])
def test_psrp_starts_as_the_identity(spec: str) -> None:
    plain, plus = frozen(spec), frozen(spec)
    apply_adapter(plain, mp())
    handle = apply_adapter(plus, mp_plus())
    assert handle.report["psrp_blocks"] == len(plus.psrp) > 0
    plus.moment_probe.load_state_dict(plain.moment_probe.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.allclose(plus.forward_features(x), plain.forward_features(x), atol=1e-5)
        for unit in plus.psrp:  # a moved shift changes what the blocks compute
            unit.up_shift.weight.normal_(std=0.5)
        assert not torch.allclose(plus.forward_features(x), plain.forward_features(x), atol=1e-3)


def test_psrp_recalibrates_every_block() -> None:
    vit = frozen("timm:test_vit")
    apply_adapter(vit, mp_plus())
    assert len(vit.psrp) == len(vit.model.blocks)
    lite = frozen("effnet_lite0")
    apply_adapter(lite, mp_plus())
    assert len(lite.psrp) == sum(len(s) for s in lite.model.blocks)  # 16 blocks: bn2 / bn3 of each


# -- what trains -----------------------------------------------------------------------------------------------------
def _mhc3_params(width: int, hidden: int, heads: int) -> int:
    return width * hidden + hidden + 2 * (hidden // heads) + 2 * (heads - 1) ** 2 * 9


@pytest.mark.parametrize("plus", [False, True])
def test_only_mhc3_psrp_and_the_head_train(plus: bool, run_cfg) -> None:
    from vision_peft.tasks import build_adapted_backbone
    from vision_peft.tasks.classification import ClassifierModel

    cfg = run_cfg(adapter={"name": "moment_probing_plus" if plus else "moment_probing", "hidden_dim": 32})
    bb, handle, base = build_adapted_backbone(cfg)
    model = ClassifierModel(bb, handle, num_classes=3, dropout=0.0, smoothing=0.0)
    model.mark_base(base)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    prefixes = ("backbone.moment_probe.", "backbone.psrp.", "head.") if plus else ("backbone.moment_probe.", "head.")
    assert all(n.startswith(prefixes) for n in trainable), sorted(trainable)
    assert not any(id(p) in base[0] for p in trainable.values())
    width, d2 = handle.report["token_width"], handle.report["second_order_dim"]
    n_mp = sum(p.numel() for n, p in trainable.items() if n.startswith("backbone.moment_probe."))
    assert n_mp == _mhc3_params(width, 32, 4)
    assert model.head.in_features == handle.report["first_order_dim"] + d2
    if plus:
        d, blocks = width, handle.report["psrp_blocks"]  # test_vit: every block's MLP is D wide
        assert sum(p.numel() for n, p in trainable.items() if n.startswith("backbone.psrp.")) == blocks * 3 * d * 16
    assert set(model.adapter_state_dict()) == set(trainable)


@pytest.mark.parametrize("name", ["moment_probing", "moment_probing_plus"])
def test_a_tiny_training_run_lowers_the_loss(name: str, run_cfg) -> None:
    from vision_peft.tasks import build_adapted_backbone
    from vision_peft.tasks.classification import ClassifierModel

    torch.manual_seed(0)
    bb, handle, base = build_adapted_backbone(run_cfg(adapter={"name": name, "hidden_dim": 32}))
    model = ClassifierModel(bb, handle, num_classes=3, dropout=0.0, smoothing=0.0)
    model.mark_base(base)
    batch = {"image": images(6, seed=1), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.set_train_mode()
    losses = []
    for _ in range(15):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


# -- refusals --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"heads": 1}, r"heads >= 2"),
        ({"hidden_dim": 30, "heads": 4}, r"not divisible by heads=4"),
        ({"hidden_dim": 24, "heads": 4}, r"group width .* below 7.*hidden_dim >= 28"),
    ],
)
def test_bad_configs_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MomentProbingConfig(**kwargs)


def test_bad_psrp_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="psrp_rank must be positive"):
        MomentProbingPlusConfig(psrp_rank=0)


def test_features_too_narrow_for_the_head_are_refused() -> None:
    bb = frozen("timm:test_vit")  # tokens 64 wide
    with pytest.raises(ValueError, match=r"width 64 .* hidden_dim must lie in \[28, 64\]"):
        apply_adapter(bb, mp(hidden=128))
    with pytest.raises(ValueError, match=r"width 64 .* \[140, 64\]"):  # 20 heads of 7 need 140 > 64 channels
        apply_adapter(frozen("timm:test_vit"), mp(hidden=140, heads=20))
    assert not hasattr(bb, "moment_probe") and bb.embed_dim == 64  # refused before touching the backbone


def test_a_single_position_map_is_applied_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    bb = frozen("effnet_lite0")  # 32² input: a 1×1 final map
    with caplog.at_level("WARNING", logger="vision_peft"):
        handle = apply_adapter(bb, mp())
    assert handle.report["tokens"] == 1 and "1 position(s)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vision_peft"):
        apply_adapter(frozen("timm:test_vit"), mp())  # 4 patch tokens: no warning
    assert "position(s)" not in caplog.text


def test_backbones_without_images_or_points_are_refused() -> None:
    with pytest.raises(ValueError, match=r"needs an image backbone .* or a point backbone .*'dit:d1-w32-h2-c3'"):
        apply_adapter(frozen("dit:d1-w32-h2-c3"), mp())


# -- point backbones -------------------------------------------------------------------------------------------------
POINTS = ["pointnet", "pointbert:tiny"]


def clouds(n: int = 2, points: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, points, 3, generator=torch.Generator().manual_seed(seed))


def point_tokens(bb: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The per-point features before the global pool, from the backbone's own API (not the adapter's hooks)."""
    if bb.spec == "pointnet":
        return bb.forward_intermediates(x, [-1])[0].transpose(1, 2)  # (B, 1024, N) -> (B, N, 1024)
    return bb.tokens(x)[:, 1:]  # PointBERT: normed patch tokens, the CLS token dropped


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("spec", POINTS)
def test_point_first_order_is_the_frozen_feature_and_second_order_reads_the_points(spec: str, plus: bool) -> None:
    ref = frozen(spec)
    bb = copy.deepcopy(ref)
    handle = apply_adapter(bb, mp_plus() if plus else mp())
    x = clouds()
    with torch.no_grad():
        out, want = bb.forward_features(x), ref.forward_features(x)
        second = bb.moment_probe.mhc3(point_tokens(ref, x))  # PSRP starts as the identity: the frozen tokens
    d = ref.embed_dim
    assert handle.report["first_order_dim"] == d and bb.embed_dim == d + handle.report["second_order_dim"]
    assert torch.equal(out[:, :d], want), "the first-order part must be exactly the frozen pooled feature"
    assert torch.allclose(out[:, d:], second, atol=1e-6)
    if spec == "pointnet":  # every point is a token; its width is the last stage's 1,024 channels
        assert handle.report["tokens"] == ref.data_config["num_points"] and handle.report["token_width"] == 1024


def test_pointnet_psrp_recalibrates_every_conv_stage() -> None:
    bb = frozen("pointnet")
    handle = apply_adapter(bb, mp_plus())
    assert handle.report["psrp_blocks"] == 5 and handle.touched == ["moment_probe", "psrp"]
    x = clouds()
    with torch.no_grad():
        before = bb.forward_features(x)
        for i, unit in enumerate(bb.psrp):
            assert unit.down.in_features == unit.up_scale.out_features == (64, 64, 64, 128, 1024)[i]
            unit.up_shift.weight.normal_(0, 0.1)
            unit.up_scale.weight.normal_(0, 0.1)
            out = bb.forward_features(x)
            assert not torch.allclose(out[:, :1024], before[:, :1024]), f"PSRP of stage {i + 1} changes nothing"
            before = out


@pytest.mark.parametrize("plus", [False, True])
def test_a_pointnet_training_step_changes_only_the_adapter(plus: bool) -> None:
    bb = frozen("pointnet")
    apply_adapter(bb, mp_plus() if plus else mp())
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in bb.named_buffers()}
    head = nn.Linear(bb.embed_dim, 2)
    trainable = [p for p in bb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable + list(head.parameters()), lr=1e-2)
    loss = F.cross_entropy(head(bb.forward_features(clouds(4))), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    adapter = ("moment_probe.", "psrp.") if plus else ("moment_probe.",)
    for n, p in bb.named_parameters():
        assert p.requires_grad == n.startswith(adapter), n
        assert (not torch.equal(p, before[n])) == n.startswith(adapter), f"{n} moved wrongly"
    assert all(torch.equal(b, buffers[n]) for n, b in bb.named_buffers())


@pytest.mark.parametrize("spec", POINTS)
def test_point_adapter_state_saves_and_reloads(spec: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bb = frozen(spec)
    apply_adapter(bb, mp_plus())
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in bb.state_dict().items() if k.startswith(("moment_probe.", "psrp."))}
    save_file(state, tmp_path / "mp.safetensors")
    fresh = frozen(spec)
    apply_adapter(fresh, mp_plus())
    x = clouds(seed=2)
    with torch.no_grad():
        assert not torch.allclose(fresh.forward_features(x), bb.forward_features(x))
        missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "mp.safetensors"), strict=False)
        assert not unexpected and not [k for k in missing if k.startswith(("moment_probe.", "psrp."))]
        assert torch.equal(fresh.forward_features(x), bb.forward_features(x))
    twin = copy.deepcopy(fresh)  # a copy widens through its own probe (the wrapped _features is rebound)
    with torch.no_grad():
        proj = twin.moment_probe.mhc3.proj.weight  # (a bias shift would vanish in the groups' LayerNorm)
        proj.add_(0.1 * torch.randn(proj.shape, generator=torch.Generator().manual_seed(5)))
        assert not torch.allclose(twin.forward_features(x), fresh.forward_features(x))
        assert torch.equal(fresh.forward_features(x), bb.forward_features(x))


def test_point_refusals_name_the_valid_range() -> None:
    bb = frozen("pointnet")
    apply_adapter(bb, mp())
    with pytest.raises(ValueError, match=r"Moment Probing on 'pointnet' needs point clouds \(B, N, 3\) with N >= 2"):
        bb.forward_features(clouds(points=1))
    with pytest.raises(ValueError, match=r"width 64 \('pointbert:tiny'\).*hidden_dim must lie in \[28, 64\]"):
        apply_adapter(frozen("pointbert:tiny"), mp(hidden=128))
    with pytest.raises(ValueError, match=r"width 1024 \('pointnet'\).*\[28, 1024\]"):
        apply_adapter(frozen("pointnet"), mp(hidden=2048))
    one = frozen("pointnet")
    one.data_config = {**one.data_config, "num_points": 1}
    with pytest.raises(ValueError, match=r"1 point token\(s\); MHC³ needs >= 2.*task.num_points >= 2"):
        apply_adapter(one, mp())
    assert not hasattr(one, "moment_probe")


def test_recipe_fields_are_checked(run_cfg) -> None:
    from vision_peft.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="psrp_rank"):
        run_cfg(adapter={"name": "moment_probing", "psrp_rank": 4})  # MP has no PSRP: only moment_probing_plus


# -- export ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("adapter", "backbone"), [("moment_probing_plus", "timm"), ("moment_probing", "effnet_lite0")])
def test_onnx_export_carries_the_head(adapter: str, backbone: str, tmp_path: Path) -> None:
    from vision_peft.deploy import load_bundle
    from vision_peft.export import export_run

    case = Case("classification", adapter, backbone)
    task, model, batch, run_dir = trained_run(case, tmp_path)
    manifest = export_run(run_dir, tmp_path / "bundle", exporter="torchscript", batch_sizes=(1, 2))
    assert manifest["parity"]["passed"]
    bundle = load_bundle(tmp_path / "bundle", device="cpu")
    model.eval()
    with torch.no_grad():
        want = model.logits(batch["image"]).float()
    spec = task.export_spec(model)
    got = bundle.run(spec.graph_name, image=batch["image"].numpy())[spec.output_names[0]]
    assert got.shape == tuple(want.shape) and float((torch.from_numpy(got) - want).abs().max()) < 1e-3
    assert F.softmax(want, 1).argmax(1).tolist() == got.argmax(1).tolist()
