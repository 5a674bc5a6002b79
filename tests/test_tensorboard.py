"""TensorBoard event files of a run: the same steps and values as metrics.jsonl, off with train.tensorboard=false."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_run_cfg, write_image_folder

from vision_peft import rundir


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / rundir.TB_DIR))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_events_match_metrics_and_switch_off(tmp_path: Path, vp_logging_reset) -> None:
    from vision_peft.train import run

    data = write_image_folder(tmp_path / "data")
    d = run(make_run_cfg(data, tmp_path / "runs", "train.epochs=3", "train.eval_every=2"), progress=False)
    steps = [r for r in rundir.read_metrics(d) if "split" not in r]
    assert len(steps) >= 2
    got = _scalars(d, "train/loss")
    assert [s for s, _ in got] == [r["step"] for r in steps]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    val = [r for r in rundir.read_metrics(d) if r.get("split") == "val"]
    assert [s for s, _ in _scalars(d, "val/top1")] == [r["step"] for r in val]
    off = run(make_run_cfg(data, tmp_path / "runs", "train.tensorboard=false", output={"runs_root": str(tmp_path / "runs"), "name": "off"}), progress=False)
    assert not (off / rundir.TB_DIR).exists() and rundir.is_finished(off)


def test_resume_does_not_duplicate_steps(tmp_path: Path, monkeypatch, vp_logging_reset) -> None:
    from vision_peft import train

    data = write_image_folder(tmp_path / "data")
    cfg = make_run_cfg(data, tmp_path / "runs", "train.epochs=4", "train.max_steps=4", "train.ckpt_every=2",
                       "train.batch_size=2")  # fmt: skip
    orig, calls = train.train_step, []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(train, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, progress=False)
    d = tmp_path / "runs" / "tiny"
    assert [s for s, _ in _scalars(d, "train/loss")] == [1, 2, 3]
    monkeypatch.setattr(train, "train_step", orig)
    train.run(cfg, resume=d, progress=False)
    steps = [r for r in rundir.read_metrics(d) if "split" not in r]
    got = _scalars(d, "train/loss")
    assert [s for s, _ in got] == [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
