"""DoRA (dynamic rank) specifics (the registry-generated invariants are in test_adapters_generated.py): the cubic
budget, each component's importance, global pruning, and a run that prunes to the budget, reloads and exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


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
