"""Adapters (design.md §3): generated from the registry, so a new adapter is covered without a new test.

Every registered adapter is applied to every tiny image backbone it is compatible with; the invariants are
freezing (only adapter tensors train), step-0 identity for re-parameterising adapters, exact ``merge()``, and a
gradient for every trainable tensor. Method-specific tests follow (LoRA on fused MHA and TF-"same" convs,
asymmetric LoRA, VPT sizes, pad-prompt limits).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import adapter_data_files
from torch import nn
from torch.nn.utils import parametrize

from vision_peft.adapters import ADAPTERS, AdapterHandle, apply_adapter
from vision_peft.adapters.lora import LoRAConfig
from vision_peft.adapters.pad_prompt import PadPromptConfig
from vision_peft.adapters.vpt import VPTConfig
from vision_peft.backbones import ImageBackbone, build_backbone  # noqa: F401
from vision_peft.config import BackboneConfig
from vision_peft.registry import satisfied, unmet
from vision_peft.tasks import TASKS

SIZE = 32
IMAGE_BACKBONES = ["timm:test_vit", "timm:test_efficientnet", "open_clip:vp-tiny-clip"]
# one tiny backbone of every other kind, so adapters that need a DiT or a point encoder are exercised here too
OTHER_BACKBONES = ["dit:d1-w32-h2-c3", "pointnet"]
TINY_BACKBONES = IMAGE_BACKBONES + OTHER_BACKBONES
GROUPS = ("qkv", "attn_out", "mlp", "conv_pw", "conv_dw")  # portable target groups tried, in this order
# the error an adapter raises on a backbone lacking one of its registered requirements: it says what is needed
REFUSALS = {
    "tokens": r"(?i)token backbone.*pad_prompt",
    "linear": r"matched no nn.Linear",
    "denoiser": r"KIND needs a class-conditional backbone",
    "points": r"needs a point backbone",
    "image": r"needs an image backbone|needs ViT blocks or CNN stages",
    "image|points": r"needs an image backbone .*or a point backbone|needs ViT blocks, CNN stages or point stages",
}
MERGE_TOL = 1e-5
# scale of the random values given to trainable tensors: PVeRA's update is a product of two scaling vectors on
# tiny shared random matrices (r = 2 here), so 0.05-sized vectors barely move the output
RANDOM_STD = {"pvera": 1.0}
_PRISTINE: dict[str, nn.Module] = {}
_FISHER_DIR = Path(tempfile.mkdtemp(prefix="vp-fisher-"))


def backbone(spec: str) -> nn.Module:
    """A fresh copy of a tiny random backbone (built once per spec, deep-copied per test)."""
    if spec not in _PRISTINE:
        kw = {"image_size": SIZE} if spec in IMAGE_BACKBONES else {}
        bb = build_backbone(BackboneConfig(name=spec, pretrained=False, **kw)).eval()
        if spec.startswith("dit:"):  # adaLN-Zero outputs 0 at init: give every weight some value so gradients flow
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in bb.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        _PRISTINE[spec] = bb
    return copy.deepcopy(_PRISTINE[spec])


def capabilities(bb: nn.Module) -> set[str]:
    """What a backbone instance offers, in the registry's capability tags (``Entry.requires`` of adapters)."""
    kind = getattr(bb, "kind", "image")
    caps = {kind}
    if hasattr(bb, "token_blocks") and bb.token_blocks() is not None:
        caps.add("tokens")
    if any(isinstance(bb.get_submodule(n), nn.Linear) for n in _group_targets(bb)):
        caps.add("linear")
    return caps


def _group_targets(bb: nn.Module) -> list[str]:
    groups = [g for g in GROUPS if g in bb.target_groups]
    return bb.resolve_targets(groups) if groups else []


def tiny_adapter_cfg(name: str, bb: nn.Module, **kw):
    """The adapter's registered tiny spec, pointed at targets the backbone has (and a Fisher file for FISH)."""
    entry = ADAPTERS.get(name)
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    tiny = dict(entry.spec or {})
    groups = [g for g in GROUPS if g in bb.target_groups]
    if "targets" in fields:
        tiny["targets"] = groups
    tiny.update(adapter_data_files(entry.config_cls, bb, groups, _FISHER_DIR))  # FISH: stand-in Fisher scores
    return entry.config_cls(**{**tiny, **kw})


# tags a task offers (a head on pooled features, a bound text encoder): the task's side of a pairing, checked by
# vision_peft.recipe.check_compatible before training, not by the adapter on a bare backbone
TASK_TAGS = {t for _, e in TASKS.items() for t in e.provides}


def compatible(name: str, bb: nn.Module) -> bool:
    return satisfied(ADAPTERS.get(name).requires, capabilities(bb) | TASK_TAGS)


def refusal(name: str, bb: nn.Module) -> str:
    """The error an incompatible pair must raise: it names the first unmet requirement."""
    missing = sorted(unmet(ADAPTERS.get(name).requires, capabilities(bb) | TASK_TAGS))
    return REFUSALS[missing[0]]


PAIRS = [(a, b) for a in ADAPTERS.names() for b in TINY_BACKBONES]
IDS = [f"{a}-{b}" for a, b in PAIRS]


def tiny_input(spec: str, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Positional inputs of one forward of a tiny backbone: images, points, or (latent, timestep, class) for the DiT."""
    g = torch.Generator().manual_seed(seed)
    if spec.startswith("dit:"):
        return torch.randn(n, 32, 4, 4, generator=g), torch.tensor([10, 700][:n]), torch.tensor([0, 1][:n])
    if spec == "pointnet":
        return (torch.randn(n, 64, 3, generator=g),)
    return (torch.randn(n, 3, SIZE, SIZE, generator=g),)


def features(bb: nn.Module, spec: str, seed: int = 0) -> torch.Tensor:
    """The backbone's output on :func:`tiny_input` (features; the denoiser's noise prediction for the DiT)."""
    inputs = tiny_input(spec, seed=seed)
    return bb(*inputs) if spec.startswith("dit:") else bb.forward_features(*inputs)


def x_input(n: int = 2, seed: int = 0) -> torch.Tensor:
    return tiny_input(IMAGE_BACKBONES[0], n, seed)[0]


def apply(name: str, spec: str, **kw) -> tuple[nn.Module, nn.Module, AdapterHandle, dict[str, torch.Tensor]]:
    """(frozen reference, adapted copy, handle, the reference state before the adapter)."""
    ref = backbone(spec)
    bb = copy.deepcopy(ref)
    before = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    bb._orig_ids = {id(p) for p in bb.parameters()}  # type: ignore[attr-defined]
    handle = apply_adapter(bb, tiny_adapter_cfg(name, bb, **kw))
    return ref, bb, handle, before


def randomise_trainable(bb: nn.Module, std: float = 0.05, seed: int = 1) -> int:
    """Give every new trainable tensor random values (LoRA's B is zero at step 0); returns how many."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad and id(p) not in bb._orig_ids:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def original_state(bb: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen tensors after the adapter, keyed like ``before`` (parametrized weights live under .original)."""
    sd = bb.state_dict()
    out = {}
    for k in before:
        if k in sd:
            out[k] = sd[k]
        else:
            mod, _, leaf = k.rpartition(".")
            out[k] = sd[f"{mod}.parametrizations.{leaf}.original"]
    return out


def _under(name: str, modules: list[str]) -> bool:
    return any(t == "" or name.startswith(t + ".") for t in modules)


def _compatible_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a, b in PAIRS if compatible(a, backbone(b))]


COMPAT = _compatible_pairs()
COMPAT_IDS = [f"{a}-{b}" for a, b in COMPAT]


# -- registry-generated invariants ------------------------------------------------------------------------------
def test_every_adapter_is_exercised_by_the_generated_cases(request: pytest.FixtureRequest) -> None:
    """Every registered adapter fits at least one tiny backbone, and the generated invariant tests below really
    collected a case for it (read from this session's collected items, not from the list they were built from)."""
    unfit = [a for a in ADAPTERS.names() if not any(a == name for name, _ in COMPAT)]
    assert not unfit, f"no tiny backbone provides what {unfit} require; add one to OTHER_BACKBONES"
    collected: dict[str, set[str]] = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec is not None and "name" in callspec.params:
            collected.setdefault(item.originalname, set()).add(callspec.params["name"])
    generated = ("test_only_adapter_tensors_train", "test_one_training_step_moves_only_trainable_tensors")
    for test in generated:
        if test not in collected:
            pytest.skip(f"{test} is deselected in this session; the coverage check needs the generated tests")
        missing = set(ADAPTERS.names()) - collected[test]
        assert not missing, f"{test} has no case for {sorted(missing)}"


@pytest.mark.parametrize(("name", "spec"), PAIRS, ids=IDS)
def test_incompatible_pairs_fail_loudly(name: str, spec: str) -> None:
    bb = backbone(spec)
    if compatible(name, bb):
        apply_adapter(bb, tiny_adapter_cfg(name, bb))  # must not raise
    else:
        with pytest.raises(ValueError, match=refusal(name, bb)):
            apply_adapter(bb, tiny_adapter_cfg(name, bb))


@pytest.mark.parametrize(("name", "spec"), COMPAT, ids=COMPAT_IDS)
def test_only_adapter_tensors_train(name: str, spec: str) -> None:
    _, bb, handle, before = apply(name, spec)
    assert handle.name == name
    trainable = {n: p for n, p in bb.named_parameters() if p.requires_grad}
    if "" in handle.touched:  # the baseline that unfreezes everything (full fine-tuning)
        assert all(p.requires_grad for p in bb.parameters())
        return
    for n, p in trainable.items():
        if handle.mergeable:  # a re-parameterisation never trains a pretrained tensor
            assert id(p) not in bb._orig_ids, f"{name} left the pretrained tensor {n} trainable"
        assert _under(n, handle.touched), (
            f"trainable {n} is not under a module the handle reports as touched ({handle.touched})"
        )
    for n, p in bb.named_parameters():
        if id(p) in bb._orig_ids and not _under(n, handle.touched):
            assert not p.requires_grad, f"{name}: pretrained {n} is trainable"
    if handle.touched:
        assert trainable, f"{name} created no trainable parameter on {spec}"
    # nothing in the pretrained weights moved
    after = original_state(bb, before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{name} changed the frozen tensor {k}"


@pytest.mark.parametrize(("name", "spec"), COMPAT, ids=COMPAT_IDS)
def test_step0_identity_or_frozen_weights_untouched(name: str, spec: str) -> None:
    ref, bb, handle, before = apply(name, spec)
    with torch.no_grad():
        want, got = features(ref, spec), features(bb, spec)
    assert torch.isfinite(got).all()
    if getattr(bb, "embed_dim", None) != getattr(ref, "embed_dim", None):
        # an adapter that widens the features (Moment Probing's second-order part) declares the new width and
        # keeps the frozen features as the leading columns at step 0
        assert not handle.mergeable and got.shape == (*want.shape[:-1], bb.embed_dim), (got.shape, bb.embed_dim)
        assert (got[..., : want.shape[-1]] - want).abs().max() < 1e-5
        got = got[..., : want.shape[-1]]
    assert got.shape == want.shape
    if handle.mergeable:
        # a re-parameterisation starts at the frozen model (LoRA: B = 0)
        assert (got - want).abs().max() < 1e-6
    else:
        # VPT cannot be identical at step 0: its prompt tokens are extra attention keys from the first step,
        # so only assert that the frozen weights stay exactly as they were.
        after = original_state(bb, before)
        assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(("name", "spec"), COMPAT, ids=COMPAT_IDS)
def test_merge_keeps_outputs_and_leaves_plain_modules(name: str, spec: str) -> None:
    ref, bb, handle, _ = apply(name, spec)
    n_random = randomise_trainable(bb, RANDOM_STD.get(name, 0.05)) if "" not in handle.touched else 0
    with torch.no_grad():
        frozen = features(ref, spec, seed=3)
        adapted = features(bb, spec, seed=3)
    reparam = handle.mergeable
    if reparam:
        assert n_random > 0
        assert (adapted - frozen).abs().max() > 1e-4, "randomised adapter tensors did not change the output"
    handle.merge()
    assert not handle.mergeable  # merging twice is a no-op
    handle.merge()
    with torch.no_grad():
        merged = features(bb, spec, seed=3)
    assert (merged - adapted).abs().max() < MERGE_TOL
    if reparam:
        leftovers = [n for n, m in bb.named_modules() if parametrize.is_parametrized(m)]
        assert not leftovers, f"parametrizations left after merge: {leftovers}"
        adapter_mods = [n for n, m in bb.named_modules() if type(m).__module__.startswith("vision_peft.adapters")]
        assert not adapter_mods, f"adapter modules left after merge: {adapter_mods}"
        assert not [n for n, p in bb.named_parameters() if p.requires_grad]
        assert set(bb.state_dict()) == set(ref.state_dict()), "merge must give back the plain backbone's keys"


@pytest.mark.parametrize(("name", "spec"), COMPAT, ids=COMPAT_IDS)
def test_gradient_reaches_every_trainable_tensor(name: str, spec: str) -> None:
    _, bb, handle, _ = apply(name, spec)
    randomise_trainable(bb, RANDOM_STD.get(name, 0.05))  # so that LoRA's A gets a non-zero gradient too
    trainable = {n: p for n, p in bb.named_parameters() if p.requires_grad}
    if not trainable:
        assert not handle.touched  # only the linear probe touches nothing
        return
    bb.eval()
    visited: set[str] = set()  # modules the forward runs (PointNet's classification head is not part of it)
    names = {m: n for n, m in bb.named_modules()}
    hooks = [m.register_forward_hook(lambda m, a, o: visited.add(names[m])) for m in names]
    f = features(bb, spec)
    for h in hooks:
        h.remove()
    (f.float() ** 2).mean().backward()
    missing = [n for n, p in trainable.items() if p.grad is None and n.rpartition(".")[0] in visited]
    assert not missing, f"{name} on {spec}: no gradient reached {missing[:5]}"
    zero = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert len(zero) < len(trainable), f"every gradient is zero: {zero[:5]}"
    for n, p in bb.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


@pytest.mark.parametrize(("name", "spec"), COMPAT, ids=COMPAT_IDS)
def test_one_training_step_moves_only_trainable_tensors(name: str, spec: str) -> None:
    """The engine's view of an adapter: forward + ``extra_losses`` → backward → AdamW step → ``step_fn``."""
    _, bb, handle, before = apply(name, spec)
    randomise_trainable(bb, RANDOM_STD.get(name, 0.05))
    params = [p for p in bb.parameters() if p.requires_grad]
    if not params:
        assert not handle.touched and handle.extra_losses(bb) == {}
        return
    start = [p.detach().clone() for p in params]
    frozen = {n: t.detach().clone() for n, t in bb.named_buffers()} | {
        n: p.detach().clone() for n, p in bb.named_parameters() if not p.requires_grad
    }
    bb.train()
    loss = (features(bb, spec).float() ** 2).mean()
    extra = handle.extra_losses(bb)
    assert all(torch.is_tensor(v) and v.dim() == 0 and torch.isfinite(v) for v in extra.values()), extra
    (loss + sum(extra.values())).backward()
    torch.optim.AdamW(params, lr=1e-2).step()
    logged = handle.step_fn(1, 10) if handle.step_fn is not None else None
    assert logged is None or all(isinstance(v, float) for v in logged.values())
    assert any(not torch.equal(p, s) for p, s in zip(params, start)), f"{name}: the optimizer step changed nothing"
    after = {n: t for n, t in bb.named_buffers()} | {n: p for n, p in bb.named_parameters() if not p.requires_grad}
    for n, v in frozen.items():  # frozen weights stay; buffers may only be adapter state or BatchNorm statistics
        adapter_state = ("importance", "uncertainty", "mask")  # DoRA's, AdaLoRA's moving averages and masks
        if n in after and not n.endswith(("running_mean", "running_var", "num_batches_tracked", *adapter_state)):
            assert torch.equal(after[n], v), f"{name}: the step moved the frozen tensor {n}"


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


# -- PVeRA specifics --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["timm:test_vit", "timm:test_efficientnet"])
def test_pvera_samples_in_training_and_is_deterministic_in_eval(spec: str) -> None:
    for sample in (True, False):
        _, bb, handle, _ = apply("pvera", spec, sample=sample)
        assert handle.report["sampled_layers"] == (len(handle.touched) - handle.report["weight_space_layers"]) * sample
        randomise_trainable(bb, std=1.0)
        x = x_input(seed=5)
        with torch.no_grad():
            bb.train()
            a, b = bb.forward_features(x), bb.forward_features(x)
            bb.eval()
            c, d = bb.forward_features(x), bb.forward_features(x)
        assert torch.equal(c, d), "inference must use z = μ"
        if sample:
            assert (a - b).abs().max() > 1e-4, f"training forwards on {spec} did not sample the latent"
        else:
            assert torch.equal(a, b)


def test_pvera_trains_two_vectors_per_layer_and_saves_shared_projections_once(run_cfg) -> None:
    from vision_peft.tasks import build_adapted_backbone
    from vision_peft.tasks.classification import ClassifierModel

    cfg = run_cfg(adapter={"name": "pvera", "r": 4, "targets": ["qkv", "mlp"]})
    bb, handle, base = build_adapted_backbone(cfg)
    trainable = {n: p for n, p in bb.named_parameters() if p.requires_grad}
    want = 0
    for name in handle.touched:
        out_features = bb.get_submodule(name).out_features
        want += 2 * 4 + out_features
        assert trainable[f"{name}.pvera.lambda_d"].shape == (8,)
        assert trainable[f"{name}.pvera.lambda_b"].shape == (out_features,)
        assert float(trainable[f"{name}.pvera.lambda_b"].detach().abs().max()) == 0.0  # the step-0 identity
    assert sum(p.numel() for p in trainable.values()) == want
    fan_in = max(bb.get_submodule(n).in_features for n in handle.touched)
    fan_out = max(bb.get_submodule(n).out_features for n in handle.touched)
    assert handle.report["shared_A"] == [8, fan_in] and handle.report["shared_B"] == [fan_out, 4]
    model = ClassifierModel(bb, handle, num_classes=3, dropout=0.0, smoothing=0.0)
    model.mark_base(base)
    sd = model.adapter_state_dict()
    shared = [k for k in sd if "pvera_shared" in k]
    assert shared == ["backbone.pvera_shared.A", "backbone.pvera_shared.B"], shared
    assert not [k for k in sd if k.startswith("backbone.") and "pvera" not in k], "pretrained tensors were saved"
    # the same seed gives the same projections; another seed other ones (and its checkpoint is refused)
    bb2, _, _ = build_adapted_backbone(cfg)
    assert torch.equal(bb.pvera_shared.A, bb2.pvera_shared.A)
    other, _, _ = build_adapted_backbone(
        run_cfg(adapter={"name": "pvera", "r": 4, "targets": ["qkv", "mlp"], "seed": 1})
    )
    assert not torch.equal(bb.pvera_shared.A, other.pvera_shared.A)


def test_pvera_run_trains_reloads_and_exports(run_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    from vision_peft.export import export_run
    from vision_peft.predict import load_run
    from vision_peft.train import run

    cfg = run_cfg("train.max_steps=3", "train.lr=5e-2", adapter={"name": "pvera", "r": 4, "targets": ["qkv"]})
    run_dir = run(cfg, progress=False)
    _, _, model, _ = load_run(run_dir)
    lambdas = [p for n, p in model.named_parameters() if n.endswith("lambda_b")]
    assert lambdas and any(float(p.detach().abs().max()) > 0 for p in lambdas), "training left every λ_b at zero"
    manifest = export_run(run_dir, batch_sizes=(1, 2))
    parity = json.loads((Path(run_dir) / "export" / "parity.json").read_text())
    assert manifest["files"] and parity["max_abs_diff"] < 1e-4

    # Monte Carlo prediction through the sampled latent (PVeRA's confidence estimates)
    from vision_peft.predict import predict_files

    image = str(sorted(Path(cfg.task.data_root).rglob("*.png"))[0])
    plain = predict_files(run_dir, [image], top_k=3)[0]
    assert predict_files(run_dir, [image], top_k=3)[0] == plain, "inference without --mc-samples must be deterministic"
    assert "mc" not in plain
    mc = predict_files(run_dir, [image], top_k=3, mc_samples=16)[0]
    assert mc["mc"]["samples"] == 16 and 0 < mc["mc"]["top1_agreement"] <= 1
    assert all(e["prob_std"] >= 0 for e in mc["top"]) and any(e["prob_std"] > 0 for e in mc["top"])
    assert sum(e["prob"] for e in mc["top"]) <= 1 + 1e-6 and mc["top"][0]["prob"] >= mc["top"][-1]["prob"]
    assert predict_files(run_dir, [image], top_k=3, mc_samples=16)[0] != mc, "the latent was not sampled"

    # the calibration benchmark runs on it (deterministic vs MC on the run's test split)
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("pvera_calibration")
    out = Path(run_dir) / "calibration.json"
    assert bench.main([str(run_dir), "--samples", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"pvera deterministic", "pvera mc"}
    assert res["modes"]["pvera mc"]["n"] == len(json.loads((Path(run_dir) / "split.json").read_text())["test"])
    d = res["mc_minus_deterministic"]
    assert d["nll_ci95"][0] <= d["nll"] <= d["nll_ci95"][1]


def test_calibration_metrics_on_known_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import numpy as np

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("pvera_calibration")
    right = np.array([True, True, False, False])
    assert bench.auroc(np.array([0.9, 0.8, 0.3, 0.2]), right) == 1.0  # confidence separates perfectly
    assert bench.auroc(np.array([0.2, 0.3, 0.8, 0.9]), right) == 0.0
    assert bench.auroc(np.array([0.5, 0.5, 0.5, 0.5]), right) == 0.5  # ties: chance
    # 10 predictions at confidence 0.7 with 7 right: calibrated; the same at 0.9 confidence: ECE 0.2
    correct = np.array([True] * 7 + [False] * 3)
    assert bench.ece(np.full(10, 0.7), correct) == pytest.approx(0.0)
    assert bench.ece(np.full(10, 0.9), correct) == pytest.approx(0.2)


def test_mc_prediction_refuses_models_without_a_sampled_latent(run_cfg) -> None:
    from vision_peft.predict import predict_files
    from vision_peft.train import run

    cfg = run_cfg("train.max_steps=1")  # LoRA
    run_dir = run(cfg, progress=False)
    image = str(sorted(Path(cfg.task.data_root).rglob("*.png"))[0])
    with pytest.raises(ValueError, match="needs an adapter trained with a sampled latent"):
        predict_files(run_dir, [image], mc_samples=4)


def test_pvera_rejects_bad_configs() -> None:
    from vision_peft.adapters.pvera import PVeRAConfig

    with pytest.raises(ValueError, match="r=0"):
        PVeRAConfig(r=0)
    with pytest.raises(ValueError, match="lambda_d_init must be non-zero"):
        PVeRAConfig(lambda_d_init=0.0)
    with pytest.raises(ValueError, match="matched no Linear, Conv"):
        apply_adapter(backbone("timm:test_vit"), PVeRAConfig(targets=["model.norm"]))


@pytest.mark.parametrize("method", ["lora", "pvera"])
def test_matches_hf_peft(method: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our LoRA and PVeRA against Hugging Face peft's as the reference: eval forward, train-mode gradients (PVeRA's
    sampled latent included: both draw the same ε) and one AdamW step, with non-zero B / λ_b."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    from lora_vs_peft import main

    rc = main(["--method", method, "--model", "test_vit", "--image-size", "32", "--rank", "8", "--threads", "1",
               "--steps", "1", "--warmup", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "parity OK" in out
    effect = float(out.split("effect on output vs frozen: ")[1].split()[0])
    assert effect > 1e-3, "the adapter did not change the output, so the parity check proved nothing"


# -- DoRA (dynamic rank) specifics -----------------------------------------------------------------------------
def test_dora_budget_is_cubic_between_start_and_end() -> None:
    from vision_peft.adapters.dora import DoRAConfig, budget

    cfg = DoRAConfig(r=4, prune_start=0.15, prune_end=0.5)
    b = [budget(s, 200, 60, 40, cfg) for s in range(201)]
    assert b[0] == b[30] == 60 and b[100] == b[200] == 40  # flat before 15 %, at the target after 50 %
    assert all(x >= y for x, y in zip(b, b[1:])), "the budget must never grow"
    assert b[65] == 40 + math.ceil(20 * 0.5**3)  # half-way through the window, (1 − ½)³ of the excess is left


def test_dora_importance_is_each_components_share_of_the_update() -> None:
    from vision_peft.adapters.dora import DoRAComponents, DoRAConfig

    cfg = DoRAConfig(r=2)  # 3 components
    comp = DoRAComponents(5, 4, cfg, torch.Generator().manual_seed(0), torch.zeros(1))
    with torch.no_grad():
        comp.lora_B.copy_(torch.randn(4, 3))
        comp.lora_c.copy_(torch.tensor([0.5, -2.0, 1.0]))
    delta = comp.lora_B @ torch.diag(comp.lora_c) @ comp.lora_A  # brute force, without the scale
    want = (
        torch.stack([torch.outer(comp.lora_B[:, i] * comp.lora_c[i], comp.lora_A[i]).norm() for i in range(3)])
        / delta.norm()
    )
    assert torch.allclose(comp.current_importance(), want.detach(), rtol=1e-5)
    comp.mask[1] = 0.0  # a pruned component has no importance and no share in the update
    assert float(comp.current_importance()[1]) == 0.0
    want_delta = (delta - torch.outer(comp.lora_B[:, 1] * -2.0, comp.lora_A[1])) * comp.scale
    assert torch.allclose(comp.delta(), want_delta, atol=1e-5)  # float cancellation: entries near 0 need an atol


def test_dora_prunes_the_least_important_components_globally() -> None:
    from vision_peft.adapters.dora import DoRAComponents, DoRAConfig, prune_to

    cfg = DoRAConfig(r=2)
    layers = [DoRAComponents(5, 4, cfg, torch.Generator().manual_seed(i), torch.zeros(1)) for i in range(2)]
    layers[0].importance.copy_(torch.tensor([0.1, 0.5, 0.3]))
    layers[1].importance.copy_(torch.tensor([0.9, 0.05, 0.2]))
    assert prune_to(layers, 3) == 3
    assert layers[0].mask.tolist() == [0.0, 1.0, 1.0] and layers[1].mask.tolist() == [1.0, 0.0, 0.0]
    assert [c.rank for c in layers] == [2, 1], "ranks are distributed by importance, not evenly"


def test_dora_run_prunes_to_the_budget_reloads_and_exports(run_cfg) -> None:
    from vision_peft.adapters.dora import DoRAComponents
    from vision_peft.export import export_run
    from vision_peft.predict import load_run
    from vision_peft.train import run

    cfg = run_cfg(
        "train.epochs=20",
        "train.max_steps=12",
        "train.lr=1e-2",
        adapter={"name": "dora", "r": 2, "targets": ["qkv", "mlp"]},
    )
    run_dir = Path(run(cfg, progress=False))
    logged = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    live = [m["dora_components"] for m in logged if "dora_components" in m]
    _, _, model, _ = load_run(run_dir)
    comps = [m for m in model.modules() if isinstance(m, DoRAComponents)]
    assert len(live) == cfg.train.max_steps and live[0] == 3 * len(
        comps
    )  # log_every=1: one per step and live[-1] == 2 * len(comps)
    assert all(a >= b for a, b in zip(live, live[1:]))
    assert sum(c.rank for c in comps) == 2 * len(comps), "the saved masks must hold the final budget"
    manifest = export_run(run_dir, batch_sizes=(1, 2))
    assert manifest["files"] and json.loads((run_dir / "export" / "parity.json").read_text())["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 10, 1, stride=2), nn.Conv1d(6, 10, 1)], ids=["conv2d-stride2", "conv1d"])
def test_pvera_pointwise_conv_path_equals_its_weight_update(conv: nn.Module) -> None:
    """The sampled 1×1-conv side path (eval: z = μ) equals the conv with W0 + ΔW, strides and Conv1d included."""
    from vision_peft.adapters.pvera import PVeRAConfig, apply_pvera

    class Tiny(nn.Module):
        spec = "tiny-conv"

        def __init__(self) -> None:
            super().__init__()
            self.conv = copy.deepcopy(conv)

        def resolve_targets(self, targets: list[str]) -> list[str]:
            return ["conv"]

    net = Tiny().eval().requires_grad_(False)
    handle = apply_pvera(net, PVeRAConfig(r=4, targets=["conv"]))
    assert handle.report["sampled_layers"] == 1
    randomise_vectors = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.conv.pvera.lambda_b.copy_(torch.randn(10, generator=randomise_vectors))
        net.conv.pvera.lambda_d.copy_(torch.randn(8, generator=randomise_vectors))
    x = torch.randn(2, 6, 9, 7) if isinstance(conv, nn.Conv2d) else torch.randn(2, 6, 11)
    with torch.no_grad():
        got = net.conv(x)
        w = conv.weight + net.conv.pvera.delta().view_as(conv.weight)
        op = torch.nn.functional.conv2d if isinstance(conv, nn.Conv2d) else torch.nn.functional.conv1d
        want = op(x, w, conv.bias, stride=conv.stride)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    handle.merge()
    with torch.no_grad():
        assert (net.conv(x) - want).abs().max() < 1e-5 and not hasattr(net.conv, "pvera")
