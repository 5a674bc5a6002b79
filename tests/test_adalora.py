"""AdaLoRA specifics: the cubic budget (by hand and against peft's schedule), the orthogonality term on hand-made
P / Q, sensitivity and triplet scores by brute force, masking to exactly the budget, exact merge on a tiny ViT
and a tiny EfficientNet, bad input, a tiny run that learns, and a few steps of parity with peft."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vision_peft.adapters import apply_adapter
from vision_peft.adapters.adalora import (
    AdaLoRAConfig,
    AdaLoRATriplets,
    allocates,
    budget,
    mask_to_budget,
    orthogonality_loss,
)
from vision_peft.backbones import build_backbone
from vision_peft.config import BackboneConfig


def triplets(fan_in: int, fan_out: int, r: int, seed: int = 0) -> AdaLoRATriplets:
    cfg = AdaLoRAConfig(init_r=r, target_r=1)
    return AdaLoRATriplets(fan_in, fan_out, cfg, torch.Generator().manual_seed(seed), torch.zeros(1))


def test_budget_is_flat_then_cubic_then_the_target() -> None:
    cfg = AdaLoRAConfig(init_r=3, target_r=2, tinit=10, tfinal=20)
    b = [budget(s, 100, 60, 40, cfg) for s in range(101)]
    assert b[0] == b[10] == 60, "flat for the first tinit steps"
    assert b[80] == b[100] == 40, "the target from total − tfinal on"
    assert all(x >= y for x, y in zip(b, b[1:])), "the budget never grows"
    # half-way through the decay window (steps 10 … 80), (1 − ½)³ of the excess 20 is left: ⌊42.5⌋
    assert b[45] == math.floor(40 + 20 * 0.5**3) == 42
    assert b[11] == math.floor(40 + 20 * (1 - 1 / 70) ** 3)


@pytest.mark.parametrize("tinit,tfinal,delta_t", [(0, 0, 1), (10, 20, 3), (5, 0, 4)])
def test_budget_and_allocation_steps_equal_peft(tinit: int, tfinal: int, delta_t: int) -> None:
    """peft's RankAllocator.budget_schedule gives the same budgets; we allocate where peft does (its schedule's
    mask flag, plus its forced masking at total − tfinal)."""
    from peft.tuners.adalora.layer import RankAllocator

    total = 100
    cfg = AdaLoRAConfig(init_r=6, target_r=4, tinit=tinit, tfinal=tfinal, deltaT=delta_t)
    ref = SimpleNamespace(
        peft_config=SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=delta_t),
        init_bgt=60, target_bgt=40,
    )  # fmt: skip
    for step in range(1, total + 1):
        b_ref, mask_ref = RankAllocator.budget_schedule(ref, step)
        assert budget(step, total, 60, 40, cfg) == b_ref, step
        assert allocates(step, total, cfg) == (mask_ref or step == total - tfinal), step


def test_orthogonality_term_on_hand_made_factors() -> None:
    """Q with orthonormal rows costs 0; P = 2·(orthonormal columns) costs ‖4I − I‖²_F = 9 r."""
    layers = [triplets(4, 5, 3, seed) for seed in range(2)]
    with torch.no_grad():
        for t in layers:
            t.lora_A.copy_(torch.eye(4)[:3])  # QQᵀ = I
            t.lora_B.copy_(2 * torch.eye(5)[:, :3])  # PᵀP = 4 I
    paper = AdaLoRAConfig(init_r=3, target_r=1, orth_reg_weight=0.5, orth_reg="squared_sum")
    assert float(orthogonality_loss(layers, paper).detach()) == pytest.approx(0.5 * 2 * 27)  # γ Σ_layers (0 + 27)
    peft = AdaLoRAConfig(init_r=3, target_r=1, orth_reg_weight=0.5)  # mean_norm, the default
    assert float(orthogonality_loss(layers, peft).detach()) == pytest.approx(
        0.5 * 2 * math.sqrt(27) / 4
    )  # mean of 4 norms
    with torch.no_grad():
        layers[1].lora_B.copy_(torch.eye(5)[:, :3])
    assert float(orthogonality_loss(layers, paper).detach()) == pytest.approx(0.5 * 27)


def test_sensitivity_smoothing_and_triplet_scores_by_brute_force() -> None:
    t = triplets(6, 5, 3)
    with torch.no_grad():
        t.lora_E.copy_(torch.tensor([0.5, -1.0, 2.0]))
    with pytest.raises(RuntimeError, match="after optimizer.step"):
        t.update_sensitivity(0.85, 0.7)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    (t.side(x) ** 2).sum().backward()
    t.update_sensitivity(0.85, 0.7)
    for name in ("lora_A", "lora_E", "lora_B"):
        p = getattr(t, name)
        ipt = (p * p.grad).abs().detach()
        assert torch.allclose(getattr(t, f"{name}_importance"), 0.15 * ipt)  # Ī from 0: (1 − β1) I
        assert torch.allclose(getattr(t, f"{name}_uncertainty"), 0.3 * 0.85 * ipt)  # Ū: (1 − β2) |I − Ī|
    s = {n: getattr(t, f"{n}_importance") * getattr(t, f"{n}_uncertainty") for n in ("lora_A", "lora_E", "lora_B")}
    want = torch.stack(
        [s["lora_E"][i] + s["lora_A"][i].sum() / 6 + s["lora_B"][:, i].sum() / 5 for i in range(3)]
    )  # fmt: skip
    assert torch.allclose(t.scores(), want)


def test_masking_keeps_exactly_the_budget_globally() -> None:
    layers = [triplets(4, 4, 3, seed) for seed in range(2)]
    scores = [torch.tensor([0.1, 0.5, 0.3]), torch.tensor([0.9, 0.05, 0.2])]
    with torch.no_grad():
        for t, s in zip(layers, scores):
            t.lora_E.copy_(torch.tensor([1.0, 2.0, 3.0]))
            t.lora_E_importance.copy_(s)
            t.lora_E_uncertainty.fill_(1.0)  # score = Ī · Ū of λ (P, Q's moving averages are 0)
    mask_to_budget(layers, 3)
    assert layers[0].mask.tolist() == [0.0, 1.0, 1.0] and layers[1].mask.tolist() == [1.0, 0.0, 0.0]
    assert layers[0].lora_E.tolist() == [0.0, 2.0, 3.0] and layers[1].lora_E.tolist() == [1.0, 0.0, 0.0]
    assert [t.rank for t in layers] == [2, 1], "ranks follow the scores, not an even split"
    for t in layers:  # all scores tied: still exactly the budget
        t.lora_E_importance.fill_(0.5)
    mask_to_budget(layers, 4)
    assert sum(t.rank for t in layers) == 4
    mask_to_budget(layers, 6)  # the full budget revives every mask (λ of a masked triplet trains on)
    assert sum(t.rank for t in layers) == 6


@pytest.mark.parametrize(
    "spec,targets", [("timm:test_vit", ["qkv", "mlp"]), ("timm:test_efficientnet", ["conv_pw"])], ids=["vit", "conv"]
)
def test_identity_at_init_masks_during_training_and_exact_merge(spec: str, targets: list[str]) -> None:
    ref = build_backbone(BackboneConfig(name=spec, pretrained=False, image_size=32)).eval()
    bb = copy.deepcopy(ref)
    handle = apply_adapter(bb, AdaLoRAConfig(init_r=4, target_r=2, targets=targets, tinit=1, tfinal=2))
    n = handle.report["layers"]

    def x(seed: int) -> torch.Tensor:
        return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        assert (bb.forward_features(x(0)) - ref.forward_features(x(0))).abs().max() < 1e-6
    opt = torch.optim.AdamW([p for p in bb.parameters() if p.requires_grad], lr=5e-2)
    target = torch.randn_like(ref.forward_features(x(1)))
    logs = []
    for step in range(1, 7):
        loss = ((bb.forward_features(x(step)) - target) ** 2).mean() + handle.extra_losses(bb)["orth"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        logs.append(handle.step_fn(step, 6))
    assert logs[0]["adalora_triplets"] == 4 * n and logs[-1]["adalora_triplets"] == 2 * n == logs[-1]["adalora_budget"]
    bb.eval()
    with torch.no_grad():
        adapted = bb.forward_features(x(7))
        assert (adapted - ref.forward_features(x(7))).abs().max() > 1e-4, "the steps moved the model"
        handle.merge()
        merged = bb.forward_features(x(7))
    assert (merged - adapted).abs().max() < 1e-5
    assert not [p for p in bb.parameters() if p.requires_grad], "merge leaves plain frozen weights"


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"init_r": 4, "target_r": 6}, r"target_r must lie in \[1, init_r=4\]"),
        ({"target_r": 0}, r"target_r must lie in \[1, init_r=12\]"),
        ({"init_r": 0}, "init_r must be >= 1"),
        ({"deltaT": 0}, "deltaT must be >= 1"),
        ({"beta1": 1.0}, r"beta1 must lie in \(0, 1\)"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight must be >= 0"),
        ({"tinit": -1}, "tinit and adapter.tfinal must be >= 0"),
    ],
)
def test_bad_config_is_refused_with_the_valid_range(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaLoRAConfig(**fields)


def test_schedule_without_a_decay_phase_is_refused_at_the_first_step() -> None:
    bb = build_backbone(BackboneConfig(name="timm:test_vit", pretrained=False, image_size=32))
    handle = apply_adapter(bb, AdaLoRAConfig(init_r=2, target_r=1, tinit=6, tfinal=4))
    with pytest.raises(ValueError, match=r"tinit \(6\) \+ adapter.tfinal \(4\) must be < the run's total steps \(10\)"):
        handle.step_fn(1, 10)


def test_recipe_refuses_target_r_above_init_r(run_cfg) -> None:
    with pytest.raises(ValueError, match="target_r"):
        run_cfg(adapter={"name": "adalora", "init_r": 2, "target_r": 3})


def test_tiny_run_learns_reaches_the_budget_reloads_and_exports(run_cfg) -> None:
    from vision_peft.export import export_run
    from vision_peft.predict import load_run
    from vision_peft.train import run

    cfg = run_cfg(
        "train.epochs=30",
        "train.max_steps=16",
        "train.lr=1e-2",
        adapter={"name": "adalora", "init_r": 3, "target_r": 2, "targets": ["qkv", "mlp"], "tinit": 2, "tfinal": 4},
    )
    run_dir = Path(run(cfg, progress=False))
    logged = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "adalora_budget" in m]
    assert len(steps) == 16
    task_loss = [m["loss"] - m["loss_orth"] for m in steps]
    assert sum(task_loss[-4:]) < sum(task_loss[:4]), f"the task loss did not drop: {task_loss}"
    _, _, model, _ = load_run(run_dir)
    layers = [m for m in model.modules() if isinstance(m, AdaLoRATriplets)]
    assert steps[0]["adalora_triplets"] == 3 * len(layers)
    assert steps[-1]["adalora_triplets"] == sum(t.rank for t in layers) == 2 * len(layers), "saved masks: the budget"
    assert all(float(t.lora_E[t.mask == 0].abs().sum()) == 0.0 for t in layers), "masked λ are 0 in the saved run"
    manifest = export_run(run_dir, batch_sizes=(1, 2))
    assert manifest["files"] and json.loads((run_dir / "export" / "parity.json").read_text())["max_abs_diff"] < 1e-4


PARITY_ARGS = ["--steps", "8", "--tinit", "1", "--tfinal", "2", "--deltaT", "2", "--init-r", "4", "--target-r", "2",
               "--batch", "2", "--threads", "1"]  # fmt: skip


def test_matches_hf_peft_for_a_few_steps(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/adalora_vs_peft.py: gradients, Ī / Ū, rank masks and outputs equal to peft's after the same steps."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    from adalora_vs_peft import main

    rc = main(PARITY_ARGS)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "parity OK" in out and ", 0 layer masks differ" in out
    effect = float(out.split("effect on output vs λ = 0: ")[1].split(")")[0])
    assert effect > 1e-3, "the adapter did not change the output, so the parity check proved nothing"


def test_parity_check_catches_a_wrong_triplet_score(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same comparison with the P / Q terms left out of our score: the masks must stop matching."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    from adalora_vs_peft import main

    monkeypatch.setattr(AdaLoRATriplets, "scores", lambda t: t.lora_E_importance * t.lora_E_uncertainty)
    rc = main(PARITY_ARGS)
    out = capsys.readouterr().out
    assert rc == 1 and "parity FAILED" in out and "rank masks" in out.split("parity FAILED")[1], out


def test_interrupted_run_resumes_to_the_same_scores_masks_and_weights(run_cfg, monkeypatch) -> None:
    """The moving averages and masks are checkpointed: a run stopped after step 6 and resumed ends where the
    uninterrupted one ends (a resume that reset them would allocate differently)."""
    import vision_peft.train as train_mod
    from vision_peft.checkpoint import load_tensors

    adapter = {"name": "adalora", "init_r": 3, "target_r": 2, "targets": ["qkv", "mlp"], "tinit": 1, "tfinal": 3}
    dotted = ("train.epochs=30", "train.max_steps=10", "train.lr=1e-2", "train.ckpt_every=2")
    ref = Path(train_mod.run(run_cfg(*dotted, "output.name=ref", adapter=adapter), progress=False))

    real_step = train_mod.train_step

    def stop_at_seven(*args, **kwargs):
        if args[-1] == 6:  # the steps done so far: the checkpoint of step 6 is written, step 7 never happens
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    cfg = run_cfg(*dotted, "output.name=stopped", adapter=adapter)
    monkeypatch.setattr(train_mod, "train_step", stop_at_seven)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(cfg, progress=False)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    resumed = Path(train_mod.run(cfg, resume=ref.parent / "stopped", progress=False))
    want, got = load_tensors(ref / "adapter.safetensors"), load_tensors(resumed / "adapter.safetensors")
    assert set(want) == set(got) and any(k.endswith("adalora.lora_E_importance") for k in want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=1e-5), (k, (got[k] - want[k]).abs().max())
