"""train.recompute (exact gradients, BatchNorm statistics, the auto choice, bad input) and train.compile (fallback
warnings, compile + resume + export of a tiny run)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_run_cfg
from vision_peft import recompute
from vision_peft.tasks import TASKS

VIT = {"name": "timm:test_vit", "pretrained": False, "image_size": 32}
EFFNET = {"name": "effnet_lite0", "pretrained": False, "image_size": 32}
CPU = torch.device("cpu")


def _build(folder: Path, tmp_path: Path, backbone: dict, adapter: dict, **train):
    cfg = make_run_cfg(folder, tmp_path / "runs", backbone=backbone, adapter=adapter, train=train)
    task = TASKS.get(cfg.task.name).builder(cfg)
    model = task.build_model()
    return cfg, task, model


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.set_train_mode()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout draws for both models
    model(batch)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


CASES = {
    "vit-lora-dropout": (VIT, {"name": "lora", "r": 2, "targets": ["qkv", "mlp"], "dropout": 0.2}),
    "effnet-lora": (EFFNET, {"name": "lora", "r": 2, "targets": ["conv_pw"]}),
    "effnet-full-bn": (EFFNET, {"name": "full"}),  # BatchNorm layers in training mode
}


@pytest.mark.parametrize("mode", ["blocks", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_recompute_gradients_and_bn_stats_equal_no_recompute(tmp_path, tiny_image_folder, case, mode) -> None:
    backbone, adapter = CASES[case]
    cfg, task, model = _build(tiny_image_folder(), tmp_path, backbone, adapter, batch_size=4)
    batch = task.synthetic_batch(model, 4)
    ref = copy.deepcopy(model)
    g_ref = _grads(ref, batch)
    t = dataclasses.replace(cfg.train, recompute=mode, recompute_budget_mb=0)  # auto with budget 0: every unit
    report = recompute.apply(model, task, t, CPU, None)
    json.dumps(report)  # JSON-able for final_metrics.json
    names = recompute.installed(model)
    assert names and names == report["checkpointed"]
    g = _grads(model, batch)
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert torch.equal(g[k], g_ref[k]), k
    # buffers (BatchNorm running stats, num_batches_tracked) updated exactly once, as without recompute
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd_ref)
    if case == "effnet-full-bn":
        tracked = [v for k, v in sd.items() if k.endswith("num_batches_tracked")]
        assert tracked and all(int(v) == 1 for v in tracked)


def test_bn_stats_would_double_without_the_restore(tmp_path, tiny_image_folder, monkeypatch) -> None:
    """The BN test above can fail: without restoring the stats the recomputation updates them twice."""
    cfg, task, model = _build(tiny_image_folder(), tmp_path, EFFNET, {"name": "full"}, batch_size=4)
    monkeypatch.setattr(recompute, "_restored_bn_stats", lambda bns: __import__("contextlib").nullcontext())
    recompute.apply(model, task, dataclasses.replace(cfg.train, recompute="blocks"), CPU, None)
    _grads(model, task.synthetic_batch(model, 4))
    tracked = [int(v) for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert max(tracked) == 2


def test_auto_checkpoints_the_fewest_blocks_from_the_input_side(tmp_path, tiny_image_folder) -> None:
    cfg, task, model = _build(tiny_image_folder(), tmp_path, VIT, {"name": "lora", "r": 2, "targets": ["qkv"]})
    batch = task.synthetic_batch(model, 8)
    units = recompute.find_units(model)
    order = [n for n, _ in units]
    assert order == [f"backbone.model.blocks.{i}" for i in range(len(order))]

    def forward():
        model.set_train_mode()
        return model(batch)

    full = recompute.saved_bytes(model, forward)["total"]
    budget = full // 2
    rep = recompute.plan_auto(model, forward, units, budget, CPU)
    k = len(rep["checkpointed"])
    assert 0 < k < len(order) and rep["checkpointed"] == order[:k]
    assert rep["under_budget"] and rep["saved_mb_measured"] * recompute.MIB <= budget
    assert recompute.saved_bytes(model, forward)["total"] <= budget  # what training will save
    # one block fewer would not have been enough
    for _, unit in units[k - 1 :]:
        recompute.uninstall(unit)
    assert recompute.saved_bytes(model, forward)["total"] > budget
    # a budget above the need checkpoints nothing
    for _, unit in units:
        recompute.uninstall(unit)
    rep = recompute.plan_auto(model, forward, units, full + 1, CPU)
    assert rep["checkpointed"] == [] and recompute.installed(model) == []


def test_auto_probe_leaves_rng_and_bn_stats_alone(tmp_path, tiny_image_folder) -> None:
    cfg, task, model = _build(tiny_image_folder(), tmp_path, EFFNET, {"name": "full"}, batch_size=4)
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    recompute.apply(model, task, dataclasses.replace(cfg.train, recompute="auto", recompute_budget_mb=0), CPU, None)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recompute_without_blocks(tmp_path, tiny_image_folder, caplog) -> None:
    """Bad input: blocks on a backbone with nothing to checkpoint is an error; auto logs and goes on."""
    from vision_peft.backbones import build_backbone
    from vision_peft.config import BackboneConfig

    pointnet = build_backbone(BackboneConfig(name="pointnet", pretrained=False))
    holder = torch.nn.Module()
    holder.backbone = pointnet
    cfg = make_run_cfg(tiny_image_folder(), tmp_path / "runs")
    with pytest.raises(ValueError, match=r"train.recompute=blocks: backbone 'pointnet'.*train.recompute=none"):
        recompute.apply(holder, None, dataclasses.replace(cfg.train, recompute="blocks"), CPU, None)
    with caplog.at_level(logging.INFO, logger="vision_peft"):
        rep = recompute.apply(holder, None, dataclasses.replace(cfg.train, recompute="auto"), CPU, None)
    assert rep["checkpointed"] == [] and "nothing to checkpoint" in caplog.text
    assert recompute.apply(holder, None, cfg.train, CPU, None) == {"mode": "none"}


def test_compile_falls_back_when_the_backend_is_missing(tmp_path, tiny_image_folder, monkeypatch, caplog) -> None:
    cfg, task, model = _build(tiny_image_folder(), tmp_path, VIT, {"name": "lora", "r": 2, "targets": ["qkv"]})
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(recompute.shutil, "which", lambda name: None)  # no C++ compiler on PATH
    with caplog.at_level(logging.WARNING, logger="vision_peft"):
        out, rep = recompute.maybe_compile(model, dataclasses.replace(cfg.train, compile=True), CPU)
    assert out is model and rep["status"] == "eager (fallback)" and "C++ compiler" in rep["fallback"]
    assert sum("train.compile" in r.message for r in caplog.records) == 1
    assert recompute.maybe_compile(model, cfg.train, CPU) == (model, {"enabled": False})


def test_compile_falls_back_when_the_first_call_fails(tmp_path, tiny_image_folder, monkeypatch, caplog) -> None:
    cfg, task, model = _build(tiny_image_folder(), tmp_path, VIT, {"name": "lora", "r": 2, "targets": ["qkv"]})

    def broken_compile(module, **kw):
        def call(*a, **k):
            raise RuntimeError("inductor exploded while lowering")

        return call

    monkeypatch.setattr(recompute, "backend_missing", lambda device: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped, rep = recompute.maybe_compile(model, dataclasses.replace(cfg.train, compile=True), CPU)
    batch = task.synthetic_batch(model, 2)
    model.eval()
    with caplog.at_level(logging.WARNING, logger="vision_peft"), torch.no_grad():
        a = wrapped(batch)["output"]
        b = wrapped(batch)["output"]
    assert torch.equal(a, model(batch)["output"]) and torch.equal(a, b)
    assert rep["status"] == "eager (fallback)" and "inductor exploded" in rep["fallback"]
    assert sum("compilation failed" in r.message for r in caplog.records) == 1
    assert list(wrapped.state_dict()) == list(model.state_dict())  # no _orig_mod. prefixes


@pytest.mark.slow  # CPU inductor compiles the tiny ViT in two runs (interrupted, resumed): > 60 s on shared cores
def test_compile_resume_and_export(tmp_path, tiny_image_folder, monkeypatch) -> None:
    from vision_peft import train
    from vision_peft.checkpoint import load_tensors

    folder = tiny_image_folder(per_class=6)
    common = ("train.max_steps=4", "train.epochs=4", "train.ckpt_every=2", "train.batch_size=2")
    eager = train.run(make_run_cfg(folder, tmp_path / "runs", *common, output={"runs_root": str(tmp_path / "runs"), "name": "eager"}),
                      progress=False)  # fmt: skip
    cfg = make_run_cfg(folder, tmp_path / "runs", *common, "train.compile=true", "train.recompute=blocks")
    save = train._save_checkpoint

    def save_then_die(run_dir, model, opt, sched, scaler, step, *rest):
        save(run_dir, model, opt, sched, scaler, step, *rest)
        if step == 2:
            raise KeyboardInterrupt("interrupted after the step-2 checkpoint")

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, progress=False)
    monkeypatch.setattr(train, "_save_checkpoint", save)
    run_dir = tmp_path / "runs" / "tiny"
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    assert state["model"] and not any("_orig_mod" in k for k in state["model"])
    train.run(cfg, resume=run_dir, progress=False)  # compiled again on resume
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["compute"]["compile"]["status"] == "compiled"
    assert final["compute"]["recompute"]["mode"] == "blocks"
    a, b = load_tensors(eager / "adapter.safetensors"), load_tensors(run_dir / "adapter.safetensors")
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
    res = subprocess.run(
        [sys.executable, "-m", "vision_peft", "export", str(run_dir), "--out", str(tmp_path / "bundle")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "bundle" / "manifest.json").is_file()
