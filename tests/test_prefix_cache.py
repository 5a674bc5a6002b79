"""Frozen-prefix cache (train.cache): cached runs equal uncached ones, the reasons when nothing is cached, disk reuse,
invalidation, corrupt shards, an unwritable cache folder, MVP episode grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_run_cfg, write_image_folder
from PIL import Image

from vision_peft.checkpoint import load_tensors
from vision_peft.prefix_cache import PrefixCacheError
from vision_peft.recipe import build_run_config
from vision_peft.train import run


def _cls_run(data: Path, runs: Path, name: str, cache: str, adapter: dict, **train):
    cfg = make_run_cfg(
        data, runs, f"output.name={name}", "backbone.name=effnet_lite0", "train.max_steps=null",
        "task.split.train=3", "task.split.val=1", "task.split.test=1",
        train={"epochs": 2, "batch_size": 3, "cache": cache, **train}, adapter=adapter,
    )  # fmt: skip
    d = run(cfg, progress=False)
    return json.loads((d / "final_metrics.json").read_text()), load_tensors(d / "adapter.safetensors")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data", per_class=5)


@pytest.mark.parametrize(
    ("adapter", "point"),
    [({"name": "linear"}, "features"), ({"name": "prompt_map", "stage": 2, "init_std": 0.01}, "stage 2")],
)
def test_cached_run_equals_uncached(data, tmp_path, vp_logging_reset, adapter, point):
    off, a = _cls_run(data, tmp_path / "runs", "ref", "off", adapter)
    on, b = _cls_run(data, tmp_path / "runs", "cached", "memory", adapter)
    rep = on["compute"]["cache"]
    assert rep["cached"] and rep["point"] == point and rep["splits"] == {"train": 9, "val": 3, "test": 3}
    assert not off["compute"]["cache"]["cached"]
    assert on["val"]["top1"] == off["val"]["top1"]
    assert on["val"]["loss"] == pytest.approx(off["val"]["loss"], abs=1e-5)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if k.startswith("head."))


def test_not_cached_reasons(data, tmp_path, vp_logging_reset):
    lora, _ = _cls_run(data, tmp_path / "runs", "lora", "memory", {"name": "lora", "r": 2, "targets": ["conv_pw"]})
    rep = lora["compute"]["cache"]
    assert not rep["cached"] and "conv_pw" in rep["reason"] and "stage 0" in rep["reason"]
    cfg = make_run_cfg(data, tmp_path / "runs", "output.name=aug", "task.augment=standard", adapter={"name": "linear"})
    d = run(cfg, progress=False)
    rep = json.loads((d / "final_metrics.json").read_text())["compute"]["cache"]
    assert not rep["cached"] and "task.augment=standard" in rep["reason"] and "task.augment=none" in rep["reason"]


def test_disk_reuse_invalidation_and_corrupt_shard(data, tmp_path, vp_logging_reset, caplog):
    lin = {"name": "linear"}
    cache_dir = tmp_path / "cache"
    first, a = _cls_run(data, tmp_path / "runs", "d1", "disk", lin, cache_dir=str(cache_dir))
    r1 = first["compute"]["cache"]
    assert r1["store"] == "miss" and r1["rows_built"] == 15 and Path(r1["path"]).parent == cache_dir
    second, b = _cls_run(data, tmp_path / "runs", "d2", "disk", lin, cache_dir=str(cache_dir))
    r2 = second["compute"]["cache"]
    assert r2["store"] == "hit" and r2["rows_built"] == 0 and r2["rows_reused"] == 15
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one image's content changes: only its row is rebuilt
    img = sorted((data / "beta").glob("*.jpg"))[0]
    Image.fromarray(np.full((40, 48, 3), 7, np.uint8)).save(img, quality=90)
    third, _ = _cls_run(data, tmp_path / "runs", "d3", "disk", lin, cache_dir=str(cache_dir))
    r3 = third["compute"]["cache"]
    assert r3["store"] == "partial" and r3["rows_built"] == 1 and r3["rows_reused"] == 14
    # a truncated shard is removed with a warning and its rows rebuilt
    shard = max(Path(r3["path"]).glob("*.bin"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:10])
    from conftest import reset_vision_peft_logging

    reset_vision_peft_logging()
    with caplog.at_level("WARNING", logger="vision_peft"):
        fourth, _ = _cls_run(data, tmp_path / "runs", "d4", "disk", lin, cache_dir=str(cache_dir))
    r4 = fourth["compute"]["cache"]
    assert r4["cached"] and r4["rows_built"] > 0 and r4["rows_built"] + r4["rows_reused"] == 15


def test_unwritable_cache_dir_names_path_and_fix(data, tmp_path, vp_logging_reset):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PrefixCacheError, match=r"(?s)a_file/sub.*train\.cache_dir"):
        _cls_run(data, tmp_path / "runs", "bad", "disk", {"name": "linear"}, cache_dir=str(blocker / "sub"))


def test_mvp_cached_equals_recomputed(tmp_path, vp_logging_reset):
    data = write_image_folder(tmp_path / "fs", classes=("a", "b", "c", "d", "e", "f"), per_class=4, size=(40, 40))

    def go(name: str, cache: str):
        cfg = build_run_config({
            "task": {"name": "fewshot", "data_root": str(data), "n_way": 2, "k_shot": 1, "q_query": 2,
                     "classes": {"base": ["a", "b"], "val": ["c", "d"], "novel": ["e", "f"]}, "train_q_query": 2,
                     "train_episodes": 6, "val_episodes": 3, "test_episodes": 0},
            "backbone": {"name": "effnet_lite0", "pretrained": False, "image_size": 32},
            "adapter": {"name": "prompt_map", "stage": 3, "init_std": 0.01},
            "train": {"batch_size": 1, "epochs": 2, "lr": 1e-2, "device": "cpu", "cache": cache},
            "output": {"runs_root": str(tmp_path / "runs"), "name": name},
        })  # fmt: skip
        d = run(cfg, progress=False)
        return json.loads((d / "final_metrics.json").read_text()), load_tensors(d / "adapter.safetensors")

    off, a = go("off_run", "off")
    on, b = go("disk_run", "disk")
    assert on["compute"]["cache"]["cached"] and on["compute"]["cache"]["point"] == "stage 3"
    assert not off["compute"]["cache"]["cached"]
    assert on["val"]["acc"] == off["val"]["acc"]
    assert torch.allclose(a["backbone.prompt_map.prompt"], b["backbone.prompt_map.prompt"], atol=1e-5)


def test_resume_of_a_cached_run(data, tmp_path, vp_logging_reset, monkeypatch):
    """A cached run interrupted after its step-2 checkpoint and resumed equals the uninterrupted cached run."""
    import vision_peft.train as train_mod

    lin = {"name": "linear"}
    ref, a = _cls_run(data, tmp_path / "runs", "whole", "memory", lin, epochs=4, ckpt_every=2)
    real, calls = train_mod.train_step, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _cls_run(data, tmp_path / "runs", "cut", "memory", lin, epochs=4, ckpt_every=2)
    monkeypatch.setattr(train_mod, "train_step", real)
    d = run(make_run_cfg(
        data, tmp_path / "runs", "output.name=cut", "backbone.name=effnet_lite0", "train.max_steps=null",
        "task.split.train=3", "task.split.val=1", "task.split.test=1",
        train={"epochs": 4, "batch_size": 3, "cache": "disk", "ckpt_every": 2}, adapter=lin,
    ), resume=tmp_path / "runs" / "cut", progress=False)  # fmt: skip
    final = json.loads((d / "final_metrics.json").read_text())
    assert final["compute"]["cache"]["cached"] and final["compute"]["cache"]["mode"] == "disk"
    b = load_tensors(d / "adapter.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert final["val"]["top1"] == ref["val"]["top1"]
