"""Method-specific adapter tests (the registry-generated invariants are in test_adapters_generated.py): LoRA on
fused MHA and TF-"same" convs, asymmetric LoRA, VPT sizes, pad-prompt limits, and adapter state across device
moves."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from adapter_cases import IMAGE_BACKBONES, MERGE_TOL, SIZE, apply, backbone, randomise_trainable, x_input
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.adapters import apply_adapter
from vision_peft.adapters.lora import LoRAConfig
from vision_peft.adapters.pad_prompt import PadPromptConfig
from vision_peft.adapters.vpt import VPTConfig
from vision_peft.backbones import ImageBackbone, build_backbone
from vision_peft.config import BackboneConfig


# -- LoRA specifics ---------------------------------------------------------------------------------------------
def test_lora_on_open_clip_mha_reparameterises_in_proj() -> None:
    ref, bb, handle, _ = apply("lora", "open_clip:vp-tiny-clip", targets=["qkv"])
    assert handle.touched
    for name in handle.touched:
        mod = bb.get_submodule(name)
        assert isinstance(mod, nn.MultiheadAttention)
        assert parametrize.is_parametrized(mod, "in_proj_weight")
    n_train = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    layers, width, r = len(handle.touched), 48, 2
    assert n_train == layers * r * (width + 3 * width)  # A (r × D) + B (3D × r) per MHA
    x = x_input()
    with torch.no_grad():
        assert (bb.forward_features(x) - ref.forward_features(x)).abs().max() < 1e-6
        randomise_trainable(bb)
        changed = bb.forward_features(x)
    # the fused MHA path must see the update (an nn.Linear-only LoRA would be silently bypassed)
    assert (changed - ref.forward_features(x)).abs().max() > 1e-3
    handle.merge()
    with torch.no_grad():
        assert (bb.forward_features(x) - changed).abs().max() < MERGE_TOL
    assert not any(parametrize.is_parametrized(bb.get_submodule(n)) for n in handle.touched)


def test_lora_targeting_mha_out_proj_changes_outputs() -> None:
    ref, bb, handle, _ = apply("lora", "open_clip:vp-tiny-clip", targets=["attn_out"])
    x = x_input()
    randomise_trainable(bb)
    with torch.no_grad():
        assert (bb.forward_features(x) - ref.forward_features(x)).abs().max() > 1e-3


def test_asymmetric_lora_trains_only_b_and_saves_a(run_cfg) -> None:
    from vision_peft.tasks import build_adapted_backbone
    from vision_peft.tasks.classification import ClassifierModel

    cfg = run_cfg(adapter={"name": "lora", "r": 2, "targets": ["qkv"], "train_a": False})
    bb, handle, base_ids = build_adapted_backbone(cfg)
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_B") for n in trainable), trainable
    a_buffers = [n for n, _ in bb.named_buffers() if n.endswith("lora_A")]
    assert len(a_buffers) == len(trainable) == len(handle.touched)
    model = ClassifierModel(bb, handle, num_classes=3, dropout=0.0, smoothing=0.0)
    model.mark_base(base_ids)
    sd = model.adapter_state_dict()
    assert {f"backbone.{n}" for n in a_buffers} <= set(sd), "frozen A must travel with the adapter"
    assert {f"backbone.{n}" for n in trainable} <= set(sd)
    assert {"head.weight", "head.bias"} <= set(sd)
    base_keys = [k for k in sd if k.startswith("backbone.") and ".lora." not in k]
    assert not base_keys, f"pretrained tensors in the adapter file: {base_keys[:4]}"
    # A is reproducible from the seed (so a frozen A is the same in every run)
    bb2, _, _ = build_adapted_backbone(cfg)
    assert all(torch.equal(bb.get_buffer(n), bb2.get_buffer(n)) for n in a_buffers)


def test_lora_symmetric_state_has_no_pretrained_tensors(run_cfg) -> None:
    from vision_peft.tasks import build_adapted_backbone
    from vision_peft.tasks.classification import ClassifierModel

    bb, handle, base_ids = build_adapted_backbone(run_cfg())
    model = ClassifierModel(bb, handle, num_classes=3, dropout=0.0, smoothing=0.0)
    model.mark_base(base_ids)
    keys = set(model.adapter_state_dict())
    want = {f"backbone.{n}" for n, p in bb.named_parameters() if p.requires_grad} | {"head.weight", "head.bias"}
    assert keys == want


@pytest.fixture(scope="module")
def effnet(weights_root: Path) -> ImageBackbone:
    return build_backbone(BackboneConfig(name="effnet_lite0", image_size=64)).eval()


@pytest.mark.parametrize("which", ["timm:test_efficientnet", "effnet_lite0"])
def test_lora_on_tf_same_convs_keeps_shapes(which: str, request: pytest.FixtureRequest) -> None:
    from timm.layers import Conv2dSame

    if which == "effnet_lite0":
        ref = request.getfixturevalue("effnet")
        size = 64
    else:
        ref, size = backbone(which), SIZE
    bb = copy.deepcopy(ref)
    bb._orig_ids = {id(p) for p in bb.parameters()}
    # stem (strided, TF-"same" on Lite0), every depthwise conv, one expand/project pair, the head conv
    targets = ["model.conv_stem", "conv_dw", "model.blocks.3.0.conv_pw*", "conv_head"]
    handle = apply_adapter(bb, LoRAConfig(r=2, targets=targets))
    same = [n for n in handle.touched if isinstance(bb.get_submodule(n), Conv2dSame)]
    if which == "effnet_lite0":
        assert same, "EfficientNet-Lite0's strided convs are TF-'same' padded: LoRA must adapt them too"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    idx = [0, 1, 2, -1]
    with torch.no_grad():
        want = ref.forward_intermediates(x, idx)
        got0 = bb.forward_intermediates(x, idx)
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(want, got0))
        randomise_trainable(bb, std=0.01)
        got = bb.forward_intermediates(x, idx)
        feats = bb.forward_features(x)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(torch.isfinite(t).all() for t in got)
    assert (feats - ref.forward_features(x)).abs().max() > 1e-5
    handle.merge()
    with torch.no_grad():
        merged = bb.forward_features(x)
    assert (merged - feats).abs().max() < 1e-4 * max(1.0, feats.abs().max().item())
    assert all(type(bb.get_submodule(n)) in (nn.Conv2d, Conv2dSame) for n in handle.touched)
    assert all(isinstance(bb.get_submodule(n), Conv2dSame) for n in same)  # still pads the TF way


def test_lora_matching_nothing_raises() -> None:
    bb = backbone("timm:test_efficientnet")
    with pytest.raises(ValueError, match="matches no module"):
        apply_adapter(bb, LoRAConfig(targets=["qkv"]))


# -- VPT specifics ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [b for b in IMAGE_BACKBONES if backbone(b).token_blocks() is not None])
def test_vpt_deep_vs_shallow_sizes(spec: str) -> None:
    p = 3
    counts = {}
    for deep in (True, False):
        bb = backbone(spec)
        blocks, _ = bb.token_blocks()
        apply_adapter(bb, VPTConfig(num_tokens=p, deep=deep))
        counts[deep] = sum(t.numel() for t in bb.parameters() if t.requires_grad)
        dim = bb.vpt.tokens.shape[-1]
        with torch.no_grad():
            x = x_input()
            maps = bb.forward_intermediates(x, [-1])
            plain = backbone(spec).forward_intermediates(x, [-1])
        assert maps[0].shape == plain[0].shape  # prompts are stripped after every block
    assert counts[True] == len(blocks) * p * dim
    assert counts[False] == p * dim


def test_vpt_shallow_and_deep_differ_from_frozen() -> None:
    x = x_input()
    ref = backbone("timm:test_vit")
    with torch.no_grad():
        frozen = ref.forward_features(x)
        for deep in (True, False):
            bb = backbone("timm:test_vit")
            apply_adapter(bb, VPTConfig(num_tokens=2, deep=deep))
            assert (bb.forward_features(x) - frozen).abs().max() > 1e-6


# -- pad prompt specifics ---------------------------------------------------------------------------------------
def test_pad_prompt_rejects_a_pad_too_large() -> None:
    bb = backbone("timm:test_vit")
    with pytest.raises(ValueError, match=r"pad=16 leaves no image inside a 32×32 input; use pad < 16"):
        apply_adapter(bb, PadPromptConfig(pad=16))
    with pytest.raises(ValueError, match="positive frame width"):
        PadPromptConfig(pad=0)


def test_pad_prompt_parameter_count_and_input_size() -> None:
    bb = backbone("timm:test_efficientnet")
    pad = 4
    apply_adapter(bb, PadPromptConfig(pad=pad))
    n = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    assert n == 3 * (2 * pad * SIZE + 2 * pad * (SIZE - 2 * pad))
    with pytest.raises(ValueError, match="pad_prompt was built for"):
        bb.forward_features(torch.randn(1, 3, SIZE + 8, SIZE + 8))


def test_adapter_state_survives_device_moves(run_cfg) -> None:
    """``.to()`` replaces buffer tensors (a CUDA move did, in the first GPU smoke run): frozen BatchNorm
    statistics must still be recognised as pretrained and stay out of the adapter file."""
    from vision_peft.tasks import build_adapted_backbone
    from vision_peft.tasks.classification import ClassifierModel

    cfg = run_cfg(
        backbone={"name": "timm:test_efficientnet", "pretrained": False},
        adapter={"name": "lora", "r": 2, "targets": ["conv_pw"]},
    )
    bb, handle, base = build_adapted_backbone(cfg)
    model = ClassifierModel(bb, handle, num_classes=3, dropout=0.0, smoothing=0.0)
    model.mark_base(base)
    before = set(model.adapter_state_dict())
    model.to(torch.float64).to(torch.float32)
    after = set(model.adapter_state_dict())
    assert before == after
    assert not [k for k in after if "running_" in k or "num_batches" in k]
