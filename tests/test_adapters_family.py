"""FLoRA, HUT and CapaBoost specifics: identity at init, exact merge after optimizer steps on a tiny ViT and a
tiny EfficientNet-like conv stack, the forms of their updates, parameter counts, static seeded masks, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vision_peft.adapters import apply_adapter
from vision_peft.adapters.capaboost import CapaBoostConfig, CapaBoostFactors, CapaBoostFLoRA
from vision_peft.adapters.flora import FLoRAConfig, FLoRAFactors
from vision_peft.adapters.hut import HUTConfig, HUTFactors
from vision_peft.backbones import build_backbone
from vision_peft.config import BackboneConfig

CONFIGS = {
    "flora": lambda t: FLoRAConfig(r=2, targets=t),
    "hut": lambda t: HUTConfig(r=2, targets=t),
    "capaboost": lambda t: CapaBoostConfig(r=2, n=2, density=0.5, targets=t),
    "capaboost_flora": lambda t: CapaBoostConfig(base="flora", r=2, n=2, density=0.5, targets=t),
}
BACKBONES = {"timm:test_vit": ["qkv", "mlp"], "timm:test_efficientnet": ["conv_pw", "conv_dw"]}
_CACHE: dict[str, nn.Module] = {}


def tiny(spec: str) -> nn.Module:
    if spec not in _CACHE:
        _CACHE[spec] = build_backbone(BackboneConfig(name=spec, pretrained=False, image_size=32)).eval()
    return copy.deepcopy(_CACHE[spec])


def x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", list(BACKBONES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_identity_at_init_and_exact_merge_after_steps(name: str, spec: str) -> None:
    ref = tiny(spec)
    bb = copy.deepcopy(ref)
    handle = apply_adapter(bb, CONFIGS[name](BACKBONES[spec]))
    with torch.no_grad():
        assert (bb.forward_features(x()) - ref.forward_features(x())).abs().max() < 1e-6
    params = [p for p in bb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    target = torch.randn_like(ref.forward_features(x(1)))
    for step in range(3):
        loss = ((bb.forward_features(x(step)) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    bb.eval()
    with torch.no_grad():
        adapted = bb.forward_features(x(7))
        assert (adapted - ref.forward_features(x(7))).abs().max() > 1e-4  # the steps moved the model
        handle.merge()
        merged = bb.forward_features(x(7))
    assert (merged - adapted).abs().max() < 1e-5


def test_flora_on_linear_is_a_rank_r_matrix_update_with_the_formula_count() -> None:
    lin = nn.Linear(12, 10)
    f = FLoRAFactors(12, 10, FLoRAConfig(r=3), torch.Generator().manual_seed(0), lin.weight)
    with torch.no_grad():
        f.core.normal_()
    u1, u2 = f.factors
    want = u1 @ f.core @ u2.T * f.scale
    assert torch.allclose(f.delta(), want, atol=1e-6)
    assert torch.linalg.matrix_rank(f.delta()).item() == 3
    xs = torch.randn(4, 12)
    assert torch.allclose(f.side(xs), xs @ want.T, atol=1e-5)
    assert sum(p.numel() for p in f.parameters()) == 3 * (10 + 12) + 3 * 3


def test_flora_keeps_the_conv_kernel_structure_and_counts() -> None:
    conv = nn.Conv2d(8, 6, 3)
    cfg = FLoRAConfig(r=2, r_spatial=2)
    f = FLoRAFactors(8 * 9, 6, cfg, torch.Generator().manual_seed(0), conv.weight)
    assert f.full().shape == conv.weight.shape and f.ranks == [2, 2, 2, 2]
    assert sum(p.numel() for p in f.parameters()) == 6 * 2 + 8 * 2 + 3 * 2 + 3 * 2 + 2**4 == f.num_params()
    with torch.no_grad():
        f.core.normal_()
    # mode-1 unfolding of a Tucker tensor has rank <= r1
    assert torch.linalg.matrix_rank(f.full().reshape(6, -1)).item() <= 2
    with pytest.raises(ValueError, match=r"r_spatial=5 exceeds a kernel size of 3.*1 … 3"):
        FLoRAFactors(8 * 9, 6, FLoRAConfig(r=2, r_spatial=5), torch.Generator(), conv.weight)


def test_hut_is_a_transformation_of_w0_not_an_increment() -> None:
    w0 = torch.randn(6, 5)
    w0[0, 0] = 0.0
    f = HUTFactors(5, 6, HUTConfig(r=3), torch.Generator().manual_seed(0), w0)
    assert torch.allclose(f.updated(), w0)  # identity at init: M_A M_B = 1
    with torch.no_grad():
        f.hut_A.normal_()
        f.hut_B.normal_()
    m = f.hut_A @ f.hut_B
    assert torch.allclose(f.updated(), w0 * m, atol=1e-6)
    assert f.updated()[0, 0] == 0.0  # a zero weight stays zero whatever the factors: not W0 + ΔW
    g = HUTFactors(5, 6, HUTConfig(r=3), torch.Generator(), 2 * w0)
    g.load_state_dict(f.state_dict())
    assert torch.allclose(g.delta(), 2 * f.delta(), atol=1e-5)  # the change scales with W0
    assert sum(p.numel() for p in f.parameters()) == 3 * (5 + 6)


def test_capaboost_masks_are_static_seeded_and_raise_the_rank() -> None:
    w = torch.zeros(16, 16)
    cfg = CapaBoostConfig(r=2, n=4, density=0.5)
    a = CapaBoostFactors(16, 16, cfg, torch.Generator().manual_seed(3), w)
    b = CapaBoostFactors(16, 16, cfg, torch.Generator().manual_seed(3), w)
    c = CapaBoostFactors(16, 16, cfg, torch.Generator().manual_seed(4), w)
    assert torch.equal(a.mask_A, b.mask_A) and torch.equal(a.mask_B, b.mask_B)
    assert not torch.equal(a.mask_A, c.mask_A)
    assert {n for n, _ in a.named_parameters()} == {"lora_A", "lora_B"}  # masks are buffers
    assert sum(p.numel() for p in a.parameters()) == 2 * (16 + 16)
    masks = a.mask_A.clone()
    with torch.no_grad():
        a.lora_B.normal_()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    a.delta().pow(2).sum().backward()
    opt.step()
    assert torch.equal(a.mask_A, masks)
    assert torch.linalg.matrix_rank(a.delta()).item() > cfg.r  # masked copies exceed the shared rank
    assert torch.allclose(
        a.delta(), sum((a.lora_B * a.mask_B[i]) @ (a.lora_A * a.mask_A[i]) for i in range(4)) * a.scale
    )


def test_capaboost_over_flora_masks_the_shared_core_and_factors() -> None:
    """base: flora wraps FLoRA's own factor module: FLoRA's parameters, n static seeded masks per tensor, a sum of
    masked Tucker products whose rank exceeds one FLoRA update's on a Linear."""
    w = torch.zeros(16, 16)
    cfg = CapaBoostConfig(base="flora", r=2, n=4, density=0.5)
    a = CapaBoostFLoRA(16, 16, cfg, torch.Generator().manual_seed(3), w)
    b = CapaBoostFLoRA(16, 16, cfg, torch.Generator().manual_seed(3), w)
    c = CapaBoostFLoRA(16, 16, cfg, torch.Generator().manual_seed(4), w)
    plain = FLoRAFactors(16, 16, FLoRAConfig(r=2), torch.Generator().manual_seed(3), w)
    assert torch.equal(a.mask_core, b.mask_core) and torch.equal(a.mask_factor1, b.mask_factor1)
    assert not torch.equal(a.mask_factor0, c.mask_factor0)
    assert {n for n, _ in a.named_parameters()} == {"inner.core", "inner.factors.0", "inner.factors.1"}
    assert sum(p.numel() for p in a.parameters()) == plain.num_params() == 2 * (16 + 16) + 2 * 2
    assert a.mask_core.shape == (4, 2, 2) and a.mask_factor0.shape == (4, 16, 2)
    assert a.delta().abs().max() == 0.0  # G = 0: identity at step 0
    with torch.no_grad():
        a.inner.core.normal_()
    masks = a.mask_core.clone()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    a.delta().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())
    opt.step()
    assert torch.equal(a.mask_core, masks)
    f = a.inner
    want = sum(
        (f.factors[0] * a.mask_factor0[i]) @ (f.core * a.mask_core[i]) @ (f.factors[1] * a.mask_factor1[i]).T
        for i in range(4)
    ) * f.scale
    assert torch.allclose(a.delta(), want, atol=1e-6)
    assert torch.linalg.matrix_rank(a.delta()).item() > cfg.r  # masked copies exceed one FLoRA update's rank


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (FLoRAConfig, {"r": 0}, r"adapter.r must be a positive"),
        (FLoRAConfig, {"r_spatial": -1}, r"adapter.r_spatial"),
        (HUTConfig, {"r": 1}, r"adapter.r must be an integer >= 2"),
        (CapaBoostConfig, {"density": 0.0}, r"adapter.density must lie in \(0, 1\]"),
        (CapaBoostConfig, {"n": 0}, r"adapter.n must be an integer >= 1"),
        (CapaBoostConfig, {"base": "vpt"}, r"adapter.base must be one of \['flora', 'lora'\]"),
    ],
)
def test_bad_inputs_are_refused_naming_the_key(cls, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kw)
