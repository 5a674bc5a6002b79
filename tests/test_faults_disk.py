"""Fault injection with real OS limits: a full disk / file-size limit while a checkpoint, the final adapter, an export
bundle or an upload is written (``RLIMIT_FSIZE`` in a forked child, SIGXFSZ ignored so writes fail with EFBIG),
metrics.jsonl or the TensorBoard folder fills up, and a real full tmpfs (ENOSPC) under a run, a bundle or a sweep.

Each test checks what a user finds afterwards: the previous file intact and loadable, nothing half-written under a
final name, an error naming the path and the cause, and the work continuing once the fault is gone.
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

import pytest
import yaml
from fault_injection import (
    assert_same,
    cfg_for,
    in_child,
    limit_file_size,
    listing,
    no_temp_files,
    on_call,
    report,
    train_steps,
)

from vision_peft import bundle, rundir
from vision_peft import checkpoint as ckpt
from vision_peft.checkpoint import load_tensors


# -- disk full / file too large -----------------------------------------------------------------------------
def test_disk_full_at_checkpoint_and_final_adapter_then_resume(data, reference, tmp_path, vp_logging_reset) -> None:
    """The 2nd checkpoint (step 4) and, on resume, the final adapter hit RLIMIT_FSIZE: each time the CLI prints one
    line naming the file, EFBIG and how to resume; the step-2 / step-6 checkpoint stays intact; the third attempt,
    with space again, ends with exactly the uninterrupted run's adapter."""
    from vision_peft.cli import main
    from vision_peft.train import run

    runs = tmp_path / "runs"
    cfg = cfg_for(data, runs, "full")
    recipe = tmp_path / "full.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # see the note: split order
    run_dir = runs / "full"

    def checkpoint_limited() -> int:
        on_call(ckpt, "save_checkpoint", lambda n: limit_file_size(30_000) if n == 2 else None)
        return main(["train", str(recipe), "--no-progress"])

    code, err = in_child(checkpoint_limited)
    assert code == 2, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert line and "Traceback" not in err, err[-3000:]
    msg = line[-1]
    assert f"could not write {run_dir / 'checkpoint' / 'state.pt'}:" in msg, msg
    assert "EFBIG" in msg and "ulimit -f" in msg, msg
    assert "stopped at step 4" in msg and "last intact checkpoint is step 2" in msg, msg
    assert f"--resume {run_dir}" in msg, msg
    report("checkpoint EFBIG", user_saw=msg, exit_code=code, on_disk=listing(run_dir / "checkpoint"))
    # on disk: the step-2 checkpoint, intact and loadable; no adapter, no temp file
    state, meta = ckpt.load_checkpoint(run_dir)
    assert meta["step"] == 2 and set(state["model"]) == set(reference)
    assert not (run_dir / rundir.ADAPTER_FILE).exists() and not rundir.is_finished(run_dir)
    assert no_temp_files(run_dir) == []

    def adapter_limited() -> int:
        on_call(ckpt, "save_tensors", lambda n: limit_file_size(1_000) if n == 1 else None)
        return main(["train", "--resume", str(run_dir), "--no-progress"])

    code, err = in_child(adapter_limited)
    assert code == 2, err[-3000:]
    msg = [ln for ln in err.splitlines() if ln.startswith("error: ")][-1]
    assert f"could not write {run_dir / rundir.ADAPTER_FILE}" in msg and "EFBIG" in msg, msg
    assert "last intact checkpoint is step 6" in msg, msg
    report("final adapter EFBIG", user_saw=msg, exit_code=code, on_disk=listing(run_dir))
    assert not (run_dir / rundir.ADAPTER_FILE).exists() and no_temp_files(run_dir) == []
    assert ckpt.load_checkpoint(run_dir)[1]["step"] == 6
    prev = json.loads((run_dir / "checkpoint" / "previous" / "meta.json").read_text())
    assert prev["step"] == 4  # the last two are kept

    # space is back: the resume finishes with the uninterrupted run's tensors, every step logged once
    run(cfg, resume=run_dir, progress=False)
    assert_same(load_tensors(run_dir / rundir.ADAPTER_FILE), reference)
    report("checkpoint+adapter EFBIG", resumed="yes: adapter equal to the uninterrupted run's (atol 1e-6)")
    assert train_steps(run_dir) == [6]  # log_every=100: only the last step is logged
    assert rundir.is_finished(run_dir)


def test_disk_full_during_export_keeps_the_previous_bundle(tmp_path: Path, tiny_run: Path) -> None:
    """A re-export that hits RLIMIT_FSIZE while writing model.onnx raises a WriteError naming the bundle folder and
    EFBIG; the previous bundle is byte-for-byte intact and verifies; no staging folder is left; a retry works."""
    from vision_peft.export import export_run

    out = tmp_path / "bundle"
    export_run(tiny_run, out, exporter="torchscript", batch_sizes=(1,))
    before = {p.name: bundle.sha256_file(p) for p in out.iterdir()}

    def limited() -> None:
        limit_file_size(200_000)  # model.onnx is ~1.2 MB
        export_run(tiny_run, out, exporter="torchscript", batch_sizes=(1,))

    code, err = in_child(limited)
    assert code == 1 and "RAISED WriteError errno=27" in err, err[-3000:]
    assert f"could not write {out}" in err and "EFBIG" in err and "its previous bundle is intact" in err, err[-3000:]
    assert {p.name: bundle.sha256_file(p) for p in out.iterdir()} == before
    bundle.verify_files(out, bundle.read_manifest(out))
    assert no_temp_files(tmp_path) == []
    report("export EFBIG", user_saw=err.split("RAISED ", 1)[1].splitlines()[0], on_disk=listing(tmp_path))
    export_run(tiny_run, out, exporter="torchscript", batch_sizes=(1,))  # space is back
    bundle.verify_files(out, bundle.read_manifest(out))


def test_disk_full_during_upload_extraction_leaves_nothing(tmp_path: Path) -> None:
    """An upload whose extraction hits RLIMIT_FSIZE leaves no partial dataset folder; once there is space the same
    archive extracts completely."""
    from app.uploads import extract_zip

    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for cls in ("a", "b"):
            for i in range(3):
                zf.writestr(f"ds/{cls}/{i}.png", os.urandom(150_000))
    uploads = tmp_path / "uploads"
    uploads.mkdir()

    code, err = in_child(lambda: (limit_file_size(100_000), extract_zip(archive, "classification", uploads))[1] and 0)
    assert code == 1 and "RAISED UploadError" in err and "EFBIG" in err and "up.zip" in err, err[-2000:]
    assert list(uploads.iterdir()) == [], "a partial upload folder was left behind"
    report("upload EFBIG", user_saw=err.split("RAISED ", 1)[1].splitlines()[0], on_disk=listing(uploads))
    root = extract_zip(archive, "classification", uploads)
    assert sorted(p.stat().st_size for p in root.rglob("*.png")) == [150_000] * 6


def test_disk_full_while_appending_metrics_then_resume_rewrites_them(tmp_path: Path) -> None:
    """metrics.jsonl appends past RLIMIT_FSIZE: a WriteError naming the file (a cut line may remain); the resume's
    truncation skips the cut line instead of failing on it."""
    rundir.append_metrics(tmp_path, {"step": 1, "loss": 1.0})

    def limited() -> None:
        limit_file_size((tmp_path / rundir.METRICS_FILE).stat().st_size + 10)
        rundir.append_metrics(tmp_path, {"step": 2, "loss": 0.5, "pad": "x" * 100})

    code, err = in_child(limited)
    assert code == 1 and "RAISED WriteError errno=27" in err and str(tmp_path / rundir.METRICS_FILE) in err, err
    lines = (tmp_path / rundir.METRICS_FILE).read_text().splitlines()
    assert len(lines) == 2 and lines[0] == '{"step": 1, "loss": 1.0}'  # the second is cut short
    rundir.truncate_metrics(tmp_path, 1)
    assert rundir.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
    rundir.append_metrics(tmp_path, {"step": 2, "loss": 0.5})
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [1, 2]


def test_disk_full_in_the_tensorboard_folder_stops_like_metrics_then_resumes_without_events(
    data, reference, tmp_path, monkeypatch, capfd, vp_logging_reset
) -> None:
    """After the step-4 checkpoint every write of the event file fails with ENOSPC (TensorBoard's own file write,
    in its writer thread): the run stops as a full metrics.jsonl stops it — one ``error:`` line, no traceback,
    naming the event file in <run>/tensorboard, ENOSPC, ``--train.tensorboard=false`` and ``--resume``; the step-4
    checkpoint intact, metrics.jsonl whole. With the disk still full, ``train --resume <run>
    --train.tensorboard=false`` ends with the uninterrupted run's adapter, every step logged once."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    from vision_peft.cli import main

    runs = tmp_path / "runs"
    recipe = tmp_path / "tb.yaml"
    recipe.write_text(yaml.safe_dump(cfg_for(data, runs, "tb").to_dict(), sort_keys=False))
    run_dir, tb_dir = runs / "tb", runs / "tb" / rundir.TB_DIR
    full: list[str] = []  # the event files a write was refused to
    write, save = gfile.LocalFileSystem._write, ckpt.save_checkpoint

    def event_write(self, filename, file_content, mode):
        name = os.fsdecode(filename)
        if full and Path(name).parent == tb_dir:
            full.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return write(self, filename, file_content, mode)

    def saved_then_full(*a, **k):
        save(*a, **k)
        if ckpt.checkpoint_step(run_dir) == 4:
            full.append("armed")

    monkeypatch.setattr(gfile.LocalFileSystem, "_write", event_write)
    monkeypatch.setattr(ckpt, "save_checkpoint", saved_then_full)
    assert main(["train", str(recipe), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert len(full) > 1, "the event file was never written after the step-4 checkpoint"
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
    msg = lines[0]
    assert f"could not write {full[1]}:" in msg and Path(full[1]).parent == tb_dir, msg
    assert "(ENOSPC)" in msg and f"df -h {tb_dir}" in msg and "--train.tensorboard=false" in msg, msg
    assert "stopped at step 6" in msg and "last intact checkpoint is step 4" in msg and f"--resume {run_dir}" in msg
    report("tensorboard ENOSPC", user_saw=msg, on_disk=listing(run_dir))
    state, meta = ckpt.load_checkpoint(run_dir)
    assert meta["step"] == 4 and set(state["model"]) == set(reference)
    lines = (run_dir / rundir.METRICS_FILE).read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines if "split" not in json.loads(ln)] == [6], lines  # none cut
    assert not (run_dir / rundir.ADAPTER_FILE).exists() and not rundir.is_finished(run_dir)
    assert no_temp_files(run_dir) == []

    refused = len(full)  # the disk stays full: the resume runs without event files
    assert main(["train", "--resume", str(run_dir), "--train.tensorboard=false", "--no-progress"]) == 0
    assert len(full) == refused, "the resume with train.tensorboard=false still wrote events"
    assert_same(load_tensors(run_dir / rundir.ADAPTER_FILE), reference)
    assert train_steps(run_dir) == [6] and rundir.is_finished(run_dir)
    report("tensorboard ENOSPC", resumed="--train.tensorboard=false: adapter equal to the uninterrupted run's")


@pytest.fixture
def small_fs(tmp_path: Path):
    """A real 8 MiB tmpfs mounted for the test (needs root and CAP_SYS_ADMIN; unmounted afterwards). Where it
    cannot be mounted the test is skipped: the RLIMIT_FSIZE tests above cover the same save sites everywhere."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE tests cover the same save sites")
    d = tmp_path / "fs"
    d.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the RLIMIT_FSIZE tests cover the save sites")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(folder: Path) -> Path:
    """Fill ``folder``'s filesystem to the last byte with a ballast file (another program filling the disk)."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        chunk = 1 << 16
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                chunk //= 2  # down to the last byte
    finally:
        os.close(fd)
    return ballast


def test_enospc_on_a_full_filesystem_then_resume(small_fs, data, reference, tiny_run, monkeypatch, vp_logging_reset):
    """A real full disk (a tmpfs filled by a ballast file at the 2nd checkpoint, and before a re-export): WriteError
    with ENOSPC, the path and `df -h`; the step-2 checkpoint and the previous bundle intact; once the ballast is
    deleted the run resumes to the uninterrupted run's adapter and the export succeeds."""
    from vision_peft.export import export_run
    from vision_peft.rundir import WriteError
    from vision_peft.train import run

    runs = small_fs / "runs"
    cfg = cfg_for(data, runs, "enospc")
    ballast: list[Path] = []
    orig, calls = ckpt.save_checkpoint, []

    def hooked(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the disk fills up just before the step-4 checkpoint
            ballast.append(fill(small_fs))
        return orig(*a, **k)

    monkeypatch.setattr(ckpt, "save_checkpoint", hooked)
    with pytest.raises(WriteError) as e:
        run(cfg, progress=False)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and f"could not write {runs / 'enospc' / 'checkpoint' / 'state.pt'}" in msg
    assert "(ENOSPC)" in msg and f"df -h {runs / 'enospc' / 'checkpoint'}" in msg and "--resume" in msg, msg
    assert ckpt.load_checkpoint(runs / "enospc")[1]["step"] == 2 and no_temp_files(runs) == []
    report("checkpoint ENOSPC (tmpfs)", user_saw=msg, on_disk=listing(runs / "enospc" / "checkpoint"))
    ballast.pop().unlink()  # space is back
    monkeypatch.setattr(ckpt, "save_checkpoint", orig)
    run(cfg, resume=runs / "enospc", progress=False)
    assert_same(load_tensors(runs / "enospc" / rundir.ADAPTER_FILE), reference)

    out = small_fs / "bundle"
    export_run(tiny_run, out, exporter="torchscript", batch_sizes=(1,))
    before = {p.name: bundle.sha256_file(p) for p in out.iterdir()}
    ballast_file = fill(small_fs)
    with pytest.raises(WriteError) as e:
        export_run(tiny_run, out, exporter="torchscript", batch_sizes=(1,))
    assert e.value.errno == errno.ENOSPC and f"could not write {out}" in str(e.value), str(e.value)
    assert {p.name: bundle.sha256_file(p) for p in out.iterdir()} == before and no_temp_files(small_fs) == []
    report("export ENOSPC (tmpfs)", user_saw=str(e.value))
    ballast_file.unlink()
    export_run(tiny_run, out, exporter="torchscript", batch_sizes=(1,))
    bundle.verify_files(out, bundle.read_manifest(out))


def test_disk_full_upload_error_names_the_entry_and_cause(tmp_path: Path) -> None:
    from app.uploads import extract_zip

    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ds/a/0.png", os.urandom(150_000))
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    code, err = in_child(lambda: (limit_file_size(100_000), extract_zip(archive, "classification", uploads))[1] and 0)
    assert "ds/a/0.png" in err.split("RAISED", 1)[1].splitlines()[0] and "EFBIG" in err, err[-2000:]


# -- disk full in a sweep folder ------------------------------------------------------------------------------
ONE_METHOD = (
    "adapter.name: [linear]\nlinear: {train.head_lr: [3.0e-3, 1.0e-2]}\nfixed: {train.epochs: 1}\npruner: none\n"
)


def test_disk_full_in_the_sweep_folder_fails_the_trial_then_the_sweep_continues(
    small_fs, tmp_path: Path, aid_root: Path
) -> None:
    """A sweep whose folder sits on a full filesystem (the study storage on another disk): the trial's `train` child
    hits ENOSPC, the trial is told to the study as FAIL (never left RUNNING) with a reason naming the cause, the
    worker's own state-file write failing too is only logged; once space returns the same sweep runs its next trial
    to COMPLETE."""
    from optuna.trial import TrialState
    from test_sweep import _recipe, _space

    from vision_peft.sweep import budget_done, load_study, run_sweep

    recipe, space = _recipe(tmp_path), _space(tmp_path, ONE_METHOD)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    ballast = fill(small_fs)
    with open(ballast, "r+b") as f:  # give back 64 KiB: the sweep folder's files fit, a trial's run does not
        f.truncate(ballast.stat().st_size - (64 << 10))
    out = small_fs / "sweep"
    res = run_sweep(recipe, space, trials=1, storage=storage, study="full", out=out, progress=False, select=False)
    trials = load_study(res["storage"], res["study"]).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL], [(t.state, t.user_attrs.get("reason")) for t in trials]
    reason = trials[0].user_attrs["reason"]
    assert "No space left on device" in reason or "ENOSPC" in reason, reason
    report("sweep trial ENOSPC", user_saw=reason[-300:], on_disk=listing(out))
    ballast.unlink()
    res = run_sweep(recipe, space, trials=2, storage=storage, study="full", out=out, progress=False, select=False)
    study = load_study(res["storage"], res["study"])
    states = [t.state for t in study.get_trials()]
    assert states[0] == TrialState.FAIL and states[-1] == TrialState.COMPLETE, states
    assert TrialState.RUNNING not in states and budget_done(study)[0] == budget_done(study)[1]
