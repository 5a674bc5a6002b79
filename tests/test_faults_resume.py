"""Fault injection on ``--resume``: a truncated or corrupted last checkpoint (the run resumes from the previous one
and ends with exactly the uninterrupted run's tensors), both checkpoints damaged (a clear error), and a run folder
written before checkpoint/previous/ existed.

Each test checks what a user finds afterwards: the previous file intact and loadable, nothing half-written under a
final name, an error naming the path and the cause, and the work continuing once the fault is gone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_injection import assert_same, cfg_for, report

from vision_peft import checkpoint as ckpt
from vision_peft import rundir
from vision_peft.checkpoint import CheckpointError, load_tensors


# -- a truncated or corrupted last checkpoint ---------------------------------------------------------------
def _interrupted_run(data: Path, runs: Path, name: str, monkeypatch) -> tuple[object, Path]:
    """A 6-step run stopped right after its step-4 checkpoint (checkpoints at 2 and 4 on disk)."""
    from vision_peft import train

    cfg = cfg_for(data, runs, name)
    save = train._save_checkpoint

    def save_then_die(run_dir, model, opt, sched, scaler, step, *rest):
        save(run_dir, model, opt, sched, scaler, step, *rest)
        if step == 4:
            raise KeyboardInterrupt("killed after the step-4 checkpoint")

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, progress=False)
    monkeypatch.setattr(train, "_save_checkpoint", save)
    return cfg, runs / name


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: _truncate(d / "state.pt"), id="truncated-state"),
        pytest.param(lambda d: _flip(d / "state.pt"), id="flipped-byte"),
        pytest.param(lambda d: (d / "meta.json").write_text('{"step": 4, "rng'), id="truncated-meta"),
        pytest.param(lambda d: (d / "state.pt").unlink(), id="missing-state"),
    ],
)
def test_damaged_last_checkpoint_resumes_from_the_previous(
    damage, data, reference, tmp_path, monkeypatch, vp_logging_reset
) -> None:
    from vision_peft.train import run

    cfg, run_dir = _interrupted_run(data, tmp_path / "runs", "dmg", monkeypatch)
    damage(run_dir / "checkpoint")
    with pytest.raises(CheckpointError, match=str(run_dir / "checkpoint")):
        ckpt.load_checkpoint(run_dir)  # the strict loader says what is wrong
    run(cfg, resume=run_dir, progress=False)
    log = (run_dir / rundir.LOG_FILE).read_text()  # what the user sees (also on stderr)
    warning = [ln for ln in log.splitlines() if "WARNING cannot resume from the latest checkpoint" in ln]
    assert warning and str(run_dir / "checkpoint") in warning[0] and "(step 2)" in warning[0], warning
    report("damaged checkpoint", user_saw=warning[0].split(" WARNING ", 1)[1])
    assert_same(load_tensors(run_dir / rundir.ADAPTER_FILE), reference)  # steps 3-4 recomputed, nothing lost


def test_both_checkpoints_damaged_is_a_clear_error(data, tmp_path, monkeypatch, vp_logging_reset) -> None:
    from vision_peft.train import run

    cfg, run_dir = _interrupted_run(data, tmp_path / "runs", "both", monkeypatch)
    _truncate(run_dir / "checkpoint" / "state.pt")
    _flip(run_dir / "checkpoint" / "previous" / "state.pt")
    with pytest.raises(CheckpointError) as e:
        run(cfg, resume=run_dir, progress=False)
    msg = str(e.value)
    report("both checkpoints damaged", user_saw=msg)
    assert "no intact checkpoint" in msg and "truncated" in msg and "corrupted" in msg, msg
    assert str(run_dir / "checkpoint" / "previous" / "state.pt") in msg and "without --resume" in msg, msg


def test_old_single_checkpoint_run_directory_still_resumes(data, reference, tmp_path, monkeypatch, vp_logging_reset):
    """A run directory written before checkpoint/previous/ and the recorded hash existed resumes as before."""
    from vision_peft.train import run

    cfg, run_dir = _interrupted_run(data, tmp_path / "runs", "old", monkeypatch)
    import shutil

    shutil.rmtree(run_dir / "checkpoint" / "previous")
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    for k in ("state_sha256", "state_bytes"):
        meta.pop(k)
    (run_dir / "checkpoint" / "meta.json").write_text(json.dumps(meta))
    assert ckpt.load_resume_checkpoint(run_dir).step == 4
    run(cfg, resume=run_dir, progress=False)
    assert_same(load_tensors(run_dir / rundir.ADAPTER_FILE), reference)
