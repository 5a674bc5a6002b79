"""The run-directory contract (vision_peft.rundir): config.json as a versioned RunInfo, old run directories keep
loading, clear errors naming the file and the fix, metrics.jsonl helpers, the model card, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vision_peft
from vision_peft import rundir
from vision_peft.rundir import RUN_FORMAT, CheckpointError, RunInfo


def write_run_dir_as_719a042(run_dir: Path, cfg) -> dict:
    """A finished run directory written exactly the way train.py of commit 719a042 wrote one (no training):
    config.json is the ad-hoc dict of that version (no ``format`` key) and adapter.safetensors the model's
    adapter + head tensors. Returns the config.json dict."""
    from vision_peft.checkpoint import save_tensors
    from vision_peft.tasks import TASKS

    task = TASKS.get(cfg.task.name).builder(cfg)
    model = task.build_model()
    task.datasets(model)  # the classification task learns its class names from the data
    info = {
        "vision_peft_version": vision_peft.__version__,
        "config": cfg.to_dict(),
        "backbone": {
            "spec": model.backbone.spec,
            "weights_id": model.backbone.weights_id,
            "weights_source": model.backbone.weights_source,
            "data_config": model.backbone.data_config,
            "embed_dim": model.backbone.embed_dim,
        },
        "task_state": task.state_info(),
        "parameters": {"trainable": 10, "trainable_no_head": 4, "head": 6, "backbone_total": 100, "total": 110},
        "adapter_touched": model.adapter.touched[:50],
        "device": "cpu",
        "amp": "none",
        "world_size": 1,
        "steps": {"total": 2, "per_epoch": 1},
        "torch": torch.__version__,
    }
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(info, indent=2, default=str) + "\n")  # 719a042's atomic_write_json
    save_tensors(run_dir / "adapter.safetensors", model.adapter_state_dict())
    return info


def test_old_run_directory_loads_as_runinfo_and_predicts(tmp_path: Path, run_cfg) -> None:
    cfg = run_cfg()
    old = write_run_dir_as_719a042(tmp_path / "old-run", cfg)
    info = RunInfo.read(tmp_path / "old-run")
    assert info.format == RUN_FORMAT  # absent = format 1
    assert info.config == json.loads(json.dumps(old["config"]))
    assert info.backbone.spec == "timm:test_vit" and info.backbone.weights_id == old["backbone"]["weights_id"]
    assert info.steps.total == 2 and info.world_size == 1 and info.parameters["head"] == 6
    assert info.task_name == "classification" and info.adapter_name == "lora"
    assert info.classes == ["alpha", "beta", "gamma"]
    # writing it back adds only the format key: every old key keeps its value
    again = info.to_dict()
    assert again.pop("format") == RUN_FORMAT and again == json.loads(json.dumps(old))

    from vision_peft.predict import load_run, predict_files

    loaded_cfg, task, model, loaded = load_run(tmp_path / "old-run")
    assert loaded_cfg == cfg and loaded == info and task.classes == ["alpha", "beta", "gamma"]
    image = sorted((Path(cfg.task.data_root) / "beta").iterdir())[0]
    (rec,) = predict_files(tmp_path / "old-run", [image], top_k=2)
    assert rec["label"] in info.classes and len(rec["top"]) == 2


def test_old_config_json_trains_again_through_the_cli(tmp_path: Path, run_cfg, vp_logging_reset, capsys) -> None:
    """``python -m vision_peft train <run>/config.json --overrides`` re-runs an old run's resolved config."""
    from vision_peft.cli import main

    write_run_dir_as_719a042(tmp_path / "old-run", run_cfg())
    assert main(["train", str(tmp_path / "old-run" / "config.json"), "--output.name=again", "--no-progress"]) == 0
    again = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert again.name == "again" and rundir.is_finished(again)
    info = RunInfo.read(again)
    assert info.config == RunInfo.read(tmp_path / "old-run").config | {"output": info.config["output"]}


def test_runinfo_write_read_round_trip(tmp_path: Path) -> None:
    info = RunInfo(config={"task": {"name": "classification"}, "adapter": {"name": "lora"}}, world_size=2)
    path = info.write(tmp_path)
    assert path == tmp_path / rundir.CONFIG_FILE and json.loads(path.read_text())["format"] == RUN_FORMAT
    assert RunInfo.read(tmp_path) == info and RunInfo.read(path) == info  # the dir or the file itself
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "atomic write left a temp file"


def test_missing_config_json_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        RunInfo.read(tmp_path)
    msg = str(e.value)
    assert "is not a run directory" in msg and str(tmp_path / "config.json") in msg and "vision_peft train" in msg


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "is not valid JSON"),
        ('["a list"]', "must hold a JSON object"),
        ('{"format": "vision_peft.run/9", "config": {"task": {}}}', "upgrade vision_peft"),
        ('{"backbone": {}}', "no resolved 'config' section"),
        ('{"config": {"task": {"name": "x"}}, "steps": {"totl": 3}}', "did you mean config.json.steps.total"),
        ('{"config": {"task": {"name": "x"}}, "world_size": "two"}', "world_size must be an integer"),
    ],
)
def test_bad_config_json_names_the_file(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError) as e:
        RunInfo.read(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and needle in str(e.value)


def test_metrics_append_read_truncate(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        rundir.append_metrics(tmp_path, {"step": step, "loss": 1.0 / step})
    rundir.append_metrics(tmp_path, {"step": 3, "split": "val", "top1": 0.5})
    with open(tmp_path / rundir.METRICS_FILE, "a") as f:
        f.write('{"step": 4, "lo')  # a line being written right now
    recs = rundir.read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 3] and recs[-1]["split"] == "val"
    (tmp_path / rundir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in recs))
    rundir.truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [1, 2]
    assert rundir.read_metrics(tmp_path / "nowhere") == []


def test_model_card(tmp_path: Path) -> None:
    info = RunInfo(
        vision_peft_version="9.9",
        config={"task": {"name": "classification"}, "backbone": {"name": "timm:test_vit"}, "adapter": {"name": "lora"}},
        parameters={"trainable": 10, "trainable_no_head": 4, "head": 6, "backbone_total": 100, "total": 110},
    )
    info.backbone.weights_source = "random init"
    path = rundir.write_model_card(tmp_path / "my-run", info, {"step": 7, "test": {"top1": 0.5, "n": 12, "cm": [1]}})
    card = path.read_text()
    assert path.name == "README.md" and card.startswith("# my-run")
    assert "task: `classification`; backbone: `timm:test_vit` (random init); adapter: `lora`" in card
    assert "trainable 10 / 110 (9.09 %) with head; 4 / 100 (4.00 %) of the backbone without head" in card
    assert "| test | top1 | 0.5000 |" in card and "| test | n | 12 |" in card and "cm" not in card
    assert f"train {tmp_path / 'my-run' / 'config.json'}" in card and "vision_peft 9.9" in card
