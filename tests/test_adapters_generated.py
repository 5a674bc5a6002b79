"""Adapters (design.md §3): generated from the registry, so a new adapter is covered without a new test.

Every registered adapter is applied to every tiny image backbone it is compatible with; the invariants are
freezing (only adapter tensors train), step-0 identity for re-parameterising adapters, exact ``merge()``, and a
gradient for every trainable tensor. Method-specific tests are in test_adapters_lora_prompts.py (LoRA on fused
MHA and TF-"same" convs, asymmetric LoRA, VPT sizes, pad-prompt limits), test_adapters_pvera.py and
test_adapters_dora.py.
"""

from __future__ import annotations

import pytest
import torch
from adapter_cases import (
    COMPAT,
    COMPAT_IDS,
    IDS,
    MERGE_TOL,
    PAIRS,
    RANDOM_STD,
    _under,
    apply,
    backbone,
    compatible,
    features,
    original_state,
    randomise_trainable,
    refusal,
    tiny_adapter_cfg,
)
from torch.nn.utils import parametrize

from vision_peft.adapters import ADAPTERS, apply_adapter


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
