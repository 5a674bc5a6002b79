"""The training engine: exact resume after SIGKILL, torchrun data parallelism, accumulation, metrics files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vision_peft.checkpoint import load_tensors
from vision_peft.recipe import build_run_config
from vision_peft.train import run

REPO = Path(__file__).resolve().parent.parent


def tiny_recipe(runs_root: Path, name: str, **train) -> dict:
    """A real-data recipe small enough for CPU tests: 3 AID classes, timm's test ViT at 32²."""
    return {
        "task": {
            "name": "classification",
            "data_root": "aid",
            "classes": ["Beach", "Forest", "Port"],
            "split": {"train": 8, "val": 2, "test": 4},
            "augment": "light",
            "resize": "squash",
        },
        "backbone": {"name": "timm:test_vit", "pretrained": False, "image_size": 32},
        "adapter": {"name": "lora", "r": 4, "targets": ["qkv", "mlp"], "dropout": 0.1},
        "train": {
            "epochs": 3,
            "batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 2,
            "device": "cpu",
            "log_every": 1,
            "ckpt_every": 2,
            **train,
        },
        "output": {"runs_root": str(runs_root), "name": name},
    }


def n_split(recipe: dict, split: str) -> int:
    """Images in ``split`` of a recipe's stratified split: its per-class count times the number of classes."""
    return recipe["task"]["split"][split] * len(recipe["task"]["classes"])


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


TRAIN_CLI = [sys.executable, "-m", "vision_peft", "train"]


def _check_run(cmd: list[str]) -> None:
    """Runs ``cmd`` in the CLI environment (300 s at most); it must exit 0 (else the tail of its stderr shows)."""
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path, aid_root: Path) -> None:
    # Both runs go through the same CLI in the same environment: Adam amplifies float-level differences
    # between thread settings, so the reference must not run in-process.
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, "ref")))
    _check_run([*TRAIN_CLI, str(tmp_path / "ref.yaml"), "--no-progress"])
    ref = load_tensors(tmp_path / "ref" / "adapter.safetensors")

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, "killed")))
    env = _env()
    env["VISION_PEFT_STEP_DELAY"] = "0.4"  # slow steps down so the kill lands mid-run
    proc = subprocess.Popen(
        [*TRAIN_CLI, str(recipe), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    meta = tmp_path / "killed" / "checkpoint" / "meta.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if meta.exists() and json.loads(meta.read_text())["step"] >= 6:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(meta.read_text())["step"]
    total = json.loads((tmp_path / "killed" / "config.json").read_text())["steps"]["total"]
    assert 6 <= killed_at < total, "the kill must land part-way through the run"
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()

    _check_run([*TRAIN_CLI, "--resume", str(tmp_path / "killed"), "--no-progress"])
    resumed = load_tensors(tmp_path / "killed" / "adapter.safetensors")
    assert set(resumed) == set(ref)
    for k in ref:
        assert torch.allclose(resumed[k], ref[k], atol=1e-5, rtol=1e-4), (k, (resumed[k] - ref[k]).abs().max())
    # the adapter really trained (the comparison is not between two untouched initialisations)
    assert any(float(v.abs().max()) > 0 for k, v in ref.items() if "lora_B" in k)
    # metrics.jsonl has each step once, in order, after the resume
    steps = [
        json.loads(ln)["step"]
        for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
        if "split" not in json.loads(ln)
    ]
    assert steps == list(range(1, total + 1))


def test_resume_refuses_changed_config(tmp_path: Path, aid_root: Path) -> None:
    d = run(build_run_config(tiny_recipe(tmp_path, "a", epochs=1)), progress=False)
    changed = build_run_config(tiny_recipe(tmp_path, "a", epochs=1, lr=1e-2))
    from vision_peft.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="differs"):
        run(changed, resume=d, progress=False)


def test_resume_accepts_old_configs_and_changed_execution_keys(tmp_path: Path, aid_root: Path) -> None:
    """A run written before the execution keys existed (its config.json lacks train.cache, recompute, compile …)
    resumes, and a resume may change how the run executes (cache, recompute) but not what it computes."""
    from vision_peft.checkpoint import CheckpointError
    from vision_peft.config import EXECUTION_KEYS

    recipe = tiny_recipe(tmp_path, "old", epochs=2, ckpt_every=0)
    d = run(build_run_config(recipe), progress=False)
    cfg_file = d / "config.json"
    info = json.loads(cfg_file.read_text())
    for key in EXECUTION_KEYS:
        if key != "num_workers":
            info["config"]["train"].pop(key)
    cfg_file.write_text(json.dumps(info))
    (d / "adapter.safetensors").unlink()
    resumed = run(build_run_config(tiny_recipe(tmp_path, "old", epochs=2, ckpt_every=0, cache="off")), resume=d,
                  progress=False)  # fmt: skip
    assert (resumed / "adapter.safetensors").is_file()
    with pytest.raises(CheckpointError, match=r"section\(s\) \['train'\]"):
        run(build_run_config(tiny_recipe(tmp_path, "old", epochs=2, ckpt_every=0, lr=1e-2)), resume=d, progress=False)


def test_torchrun_two_processes_gloo(tmp_path: Path, aid_root: Path) -> None:
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, "ddp", epochs=2, ckpt_every=0)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "vision_peft",
        "train",
        str(recipe),
        "--no-progress",
    ]
    _check_run(cmd)
    info = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert info["world_size"] == 2
    # 24 training images sharded over 2 ranks of batch 4 -> 3 steps per epoch
    assert info["steps"]["per_epoch"] == 3 and info["steps"]["total"] == 6
    final = json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())
    assert final["test"]["n"] == n_split(tiny_recipe(tmp_path, "ddp"), "test")
    adapter = load_tensors(tmp_path / "ddp" / "adapter.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)


def test_torchrun_with_compile_and_recompute(tmp_path: Path, aid_root: Path) -> None:
    """DDP (2 gloo ranks) with train.compile and train.recompute=blocks: both ranks compile the DDP-wrapped module,
    the run finishes, and its checkpoint and adapter carry plain parameter names (no ``_orig_mod.`` / ``module.``), so
    resume and export read them as any run's (both tested for a single-process compiled run in test_recompute)."""
    recipe = tmp_path / "ddpc.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, "ddpc", epochs=1, ckpt_every=2, compile=True,
                                                 recompute="blocks")))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
           "vision_peft", "train", str(recipe), "--no-progress"]  # fmt: skip
    _check_run(cmd)
    d = tmp_path / "ddpc"
    assert json.loads((d / "config.json").read_text())["world_size"] == 2
    final = json.loads((d / "final_metrics.json").read_text())
    assert final["compute"]["compile"]["status"] == "compiled", final["compute"]["compile"]
    assert final["compute"]["recompute"]["mode"] == "blocks"
    state = torch.load(d / "checkpoint" / "state.pt", weights_only=True)
    adapter = load_tensors(d / "adapter.safetensors")
    for names in (list(state["model"]), list(adapter)):
        assert names and not any("_orig_mod" in k or k.startswith("module.") for k in names), names[:5]
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)


def test_grad_accumulation_matches_big_batch(tmp_path: Path, aid_root: Path) -> None:
    """batch 4 × accumulation 2 takes the same optimizer steps as batch 8 when nothing random intervenes."""
    common = {"epochs": 1, "max_steps": 2, "warmup_steps": 0, "grad_clip": None}
    a = tiny_recipe(tmp_path, "acc", batch_size=4, grad_accum=2, **common)
    b = tiny_recipe(tmp_path, "big", batch_size=8, grad_accum=1, **common)
    for r in (a, b):
        r["adapter"]["dropout"] = 0.0
        r["task"]["augment"] = "none"
    ta = load_tensors(run(build_run_config(a), progress=False) / "adapter.safetensors")
    tb = load_tensors(run(build_run_config(b), progress=False) / "adapter.safetensors")
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-5), k


def test_run_directory_contents(tmp_path: Path, aid_root: Path) -> None:
    d = run(build_run_config(tiny_recipe(tmp_path, "files", epochs=1)), progress=False)
    for f in (
        "config.json",
        "adapter.safetensors",
        "metrics.jsonl",
        "train.log",
        "README.md",
        "split.json",
        "checkpoint/state.pt",
        "checkpoint/meta.json",
        "final_metrics.json",
    ):
        assert (d / f).is_file(), f
    info = json.loads((d / "config.json").read_text())
    assert info["backbone"]["spec"] == "timm:test_vit" and len(info["backbone"]["weights_id"]) == 64
    assert info["backbone"]["data_config"]["input_size"] == [3, 32, 32]
    p = info["parameters"]
    assert p["trainable"] == p["trainable_no_head"] + p["head"] and p["head"] == 64 * 3 + 3
    log = (d / "train.log").read_text()
    assert "trainable" in log and "of the backbone without head" in log
    # only adapter tensors and the head are saved, never the frozen backbone
    saved = load_tensors(d / "adapter.safetensors")
    assert all(("lora" in k) or k.startswith("head.") for k in saved), sorted(saved)[:5]
    split = json.loads((d / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"]) and not set(split["train"]) & set(split["val"])
    assert len(split["test"]) == n_split(tiny_recipe(tmp_path, "files"), "test")


def test_train_step_adds_and_logs_the_adapters_extra_losses() -> None:
    """The engine adds ``handle.extra_losses(model)`` to the task loss and logs each term as ``loss_<name>``."""
    from vision_peft.adapters import AdapterHandle
    from vision_peft.config import TrainConfig
    from vision_peft.engine import train_step

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([2.0]))
            self.adapter = AdapterHandle("toy", loss_fn=lambda m: {"l2": (m.w**2).sum()})

        def forward(self, batch: dict) -> dict:
            return {"loss": (self.w * batch["x"]).sum()}

    model = Toy()
    t = TrainConfig(lr=0.1, grad_accum=2, grad_clip=None, weight_decay=0.0, device="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batches = iter([{"x": torch.tensor([1.0])}, {"x": torch.tensor([3.0])}])
    logged = train_step(model, model, batches, opt, sched, scaler, t, torch.device("cpu"), None, False, 0)
    # mean over 2 micro-batches of w·x + w² at w=2: ((2 + 4) + (6 + 4)) / 2 = 8; the penalty alone: 4
    assert logged == {"loss": pytest.approx(8.0), "loss_l2": pytest.approx(4.0)}
    # gradient = mean(x) + 2w = 2 + 4 = 6 -> w = 2 - 0.1 * 6
    assert float(model.w) == pytest.approx(1.4)
