"""Fault injection with real OS limits: a full disk / file-size limit while a checkpoint, the final adapter, an export
bundle or an upload is written (``RLIMIT_FSIZE`` in a forked child, SIGXFSZ ignored so writes fail with EFBIG),
SIGKILL of the app server while jobs run, SIGKILL during export, a truncated or corrupted last checkpoint on
``--resume``, and two clients starting jobs at the same moment.

Each test checks what a user finds afterwards: the previous file intact and loadable, nothing half-written under a
final name, an error naming the path and the cause, and the work continuing once the fault is gone.
"""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_run_cfg, reset_vision_peft_logging, write_image_folder

from vision_peft import bundle, rundir
from vision_peft import checkpoint as ckpt
from vision_peft.checkpoint import CheckpointError, load_tensors

REPO = Path(__file__).resolve().parent.parent
TRAIN = ("train.epochs=6", "train.max_steps=6", "train.ckpt_every=2", "train.batch_size=2", "train.log_every=100")


# -- helpers ------------------------------------------------------------------------------------------------
def in_child(fn: Callable[[], object], timeout: float = 120) -> tuple[int, str]:
    """Run ``fn`` in a forked child (SIGXFSZ ignored, so a write past RLIMIT_FSIZE raises EFBIG instead of killing
    it); returns (exit code, or -signal, and what it printed to stderr + the exception it raised, if any)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        os.close(r)
        buf = io.StringIO()
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            with redirect_stderr(buf):
                out = fn()
            code = out if isinstance(out, int) else 0
        except BaseException as e:  # noqa: BLE001  (reported to the parent)
            buf.write(f"\nRAISED {type(e).__name__} errno={getattr(e, 'errno', None)}: {e}\n")
            buf.write(traceback.format_exc())
            code = 1
        finally:
            os.write(w, buf.getvalue().encode(errors="replace"))
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.time() + timeout
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        assert time.time() < deadline, "child timed out"
    os.close(r)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, b"".join(chunks).decode(errors="replace")


def limit_file_size(nbytes: int) -> None:
    """RLIMIT_FSIZE: no file of this process may grow beyond ``nbytes`` from now on (a full disk, per file)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))


def on_call(obj: object, name: str, before: Callable[[int], None]) -> None:
    """Patch ``obj.name`` (in the child only) to call ``before(n)`` ahead of its n-th call (1-based)."""
    orig = getattr(obj, name)
    calls = [0]

    def wrapped(*a, **k):
        calls[0] += 1
        before(calls[0])
        return orig(*a, **k)

    setattr(obj, name, wrapped)


def report(fault: str, **facts: object) -> None:
    """One line per fact for the closing note (shown with ``pytest -s``): what the user saw, what was on disk."""
    for k, v in facts.items():
        print(f"[fault] {fault} | {k}: {v}")


def listing(folder: Path) -> list[str]:
    return sorted(f"{p.relative_to(folder)} ({p.stat().st_size} B)" for p in folder.rglob("*") if p.is_file())


def no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".export-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("faults") / "data")


def cfg_for(data: Path, runs: Path, name: str, *extra: str):
    return make_run_cfg(data, runs, *TRAIN, *extra, output={"runs_root": str(runs), "name": name})


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter tensors of the uninterrupted 6-step run every fault test must end up with (0 work lost)."""
    from vision_peft.train import run

    try:
        d = run(cfg_for(data, tmp_path_factory.mktemp("ref"), "ref"), progress=False)
    finally:
        reset_vision_peft_logging()
    return load_tensors(d / rundir.ADAPTER_FILE)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, float((a[k] - b[k]).abs().max()))


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in rundir.read_metrics(run_dir) if "split" not in r]


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


# -- SIGKILL during export ----------------------------------------------------------------------------------
def test_sigkill_during_export_leaves_no_partial_bundle(tmp_path: Path, tiny_run: Path, caplog) -> None:
    """SIGKILL after the bundle is assembled (before it is moved in) and SIGKILL between the two renames: the
    target name never holds a partial bundle, the previous bundle survives (restored by the next export), and
    the next export cleans the dead staging folders."""
    import vision_peft.export as ex

    out = tmp_path / "bundle"
    ex.export_run(tiny_run, out, exporter="torchscript", batch_sizes=(1,))
    before = {p.name: bundle.sha256_file(p) for p in out.iterdir()}

    def killed_before_move() -> None:
        on_call(ex.bundle, "write_manifest", lambda n: os.kill(os.getpid(), signal.SIGKILL))
        ex.export_run(tiny_run, tmp_path / "new", exporter="torchscript", batch_sizes=(1,))

    code, _ = in_child(killed_before_move)
    assert code == -signal.SIGKILL
    assert not (tmp_path / "new").exists()
    assert [p.name.startswith(".export-new-") for p in tmp_path.iterdir() if p.name.startswith(".")] == [True]
    report("export SIGKILL before the move", on_disk=sorted(p.name for p in tmp_path.iterdir()))

    def killed_between_renames() -> None:
        orig = Path.rename

        def rename(self, target):
            result = orig(self, target)
            if ".old-" in str(target):  # the previous bundle was just moved aside
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        Path.rename = rename
        ex.export_run(tiny_run, out, exporter="torchscript", batch_sizes=(1,))

    code, _ = in_child(killed_between_renames)
    assert code == -signal.SIGKILL
    assert not out.exists()  # the name is empty for a moment, never half a bundle
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.old-")]
    assert len(aside) == 1 and {p.name: bundle.sha256_file(p) for p in aside[0].iterdir()} == before
    report("export SIGKILL between renames", on_disk=sorted(p.name for p in tmp_path.iterdir()))

    with caplog.at_level("WARNING", logger="vision_peft"), pytest.raises(RuntimeError, match="boom"):
        with ex.staged_folder(out):  # the next export (here: one that fails) first restores the previous bundle
            raise RuntimeError("boom")
    assert {p.name: bundle.sha256_file(p) for p in out.iterdir()} == before
    assert any("restored" in r.getMessage() for r in caplog.records)
    ex.export_run(tiny_run, tmp_path / "new", exporter="torchscript", batch_sizes=(1,))
    bundle.verify_files(tmp_path / "new", bundle.read_manifest(tmp_path / "new"))
    assert no_temp_files(tmp_path) == [], "dead staging folders were not cleaned"


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


# -- the app server killed while jobs run -------------------------------------------------------------------
def _job_recipe(data: Path, lr: float = 1e-3, steps: int = 6) -> dict:
    return {
        "task": {"name": "classification", "data_root": str(data), "split": {"train": 2, "val": 1, "test": 1},
                 "augment": "none", "resize": "squash"},
        "backbone": {"name": "timm:test_vit", "pretrained": False, "image_size": 32},
        "adapter": {"name": "lora", "r": 2, "targets": ["qkv"]},
        "train": {"epochs": steps, "max_steps": steps, "batch_size": 2, "lr": lr, "device": "cpu", "log_every": 1,
                  "ckpt_every": 2},
    }  # fmt: skip


def _app_env(delay: str) -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "VISION_PEFT_STEP_DELAY": delay, "OMP_NUM_THREADS": "1"}


def _processes_of(root: Path) -> list[int]:
    """Every live process (leader or not) whose environment names ``root`` as its app runs root."""
    from app.jobs import ENV_ROOT, _alive

    want = f"{ENV_ROOT}={root}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and want in (entry / "environ").read_bytes().split(b"\0"):
                if _alive(int(entry.name)):
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_app_server_sigkill_with_running_and_queued_jobs(data, tmp_path) -> None:
    """The server starts A (cpu:0) and B (cpu:1) and is SIGKILLed right after B's child started, before it could
    record B's pid; C waits for cpu:0. While the server is down A's training is killed too. On restart: B is
    re-attached (found by its environment) and finishes, A is reported killed with its log and its checkpoint step
    and can be resumed, C runs once cpu:0 is free; no training process is left behind."""
    from app import jobs as jobs_mod
    from app.jobs import JobManager

    root = tmp_path / "runs"

    def server() -> None:
        orig_popen = jobs_mod.subprocess.Popen
        count = [0]

        def popen(*a, **k):
            proc = orig_popen(*a, **k)
            count[0] += 1
            if count[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # B's child runs, its pid is not recorded yet
            return proc

        jobs_mod.subprocess.Popen = popen
        m = JobManager(root, env=_app_env("0.4"), poll_s=3600)  # slow steps: B must outlive the restart
        tick, m.tick = m.tick, lambda: None  # queue all three first, then start what fits
        for name, dev, steps in (("A", "cpu:0", 6), ("B", "cpu:1", 12), ("C", "cpu:0", 6)):
            m.submit(_job_recipe(data, steps=steps), device=dev, name=name)  # B: long enough to outlive the restart
        m.tick = tick
        m.tick()
        time.sleep(60)

    code, _ = in_child(server, timeout=90)
    assert code == -signal.SIGKILL
    state = {j["id"]: j for j in json.loads((root / ".app_jobs.json").read_text())}
    assert state["A"]["status"] == "running" and state["A"]["pid"]
    assert state["B"]["status"] == "starting" and state["B"]["pid"] is None
    assert state["C"]["status"] == "queued"
    a_pid = state["A"]["pid"]
    assert os.getpgid(a_pid) == a_pid  # A leads its own process group
    # A trains on while the server is down; then it is killed too (OOM, a user's kill -9 …)
    _wait_for(lambda: (ckpt.checkpoint_step(root / "A") or 0) >= 2, 90, "A's first checkpoint")
    os.killpg(a_pid, signal.SIGKILL)
    _wait_for(lambda: not jobs_mod._alive(a_pid), 10, "A to die")

    restarted = time.time()
    m = JobManager(root, env=_app_env("0"), poll_s=0.1)  # the restarted server
    try:
        a, b = m.get("A"), m.get("B")
        assert a.status == "failed" and a.message.startswith("killed:") and "Resume continues" in a.message
        log = m.progress("A")["log"]
        assert a.message in log and "trainable" in log, log  # what the user sees: why, and the job's own log
        report("app SIGKILL", killed_job_saw=a.message, reattached_job_saw=b.message, log_tail=log[-300:])
        assert b.status == "running" and b.pid and "re-attached" in b.message and os.getpgid(b.pid) == b.pid
        assert m.get("C").status == "running" and m.get("C").started > restarted  # the queue moved on at once
        m.resume("A")  # the killed job can continue from its checkpoint: it queues behind C on cpu:0
        assert m.get("A").status == "queued" and "--resume" in m.get("A").cmd and m.get("A").seq > m.get("C").seq
        m.stop("A")  # (test_train covers the resume itself; here: no fourth training process)
        _wait_for(lambda: all(m.get(x).status in ("done", "failed") for x in "BC"), 240, "B and C to end")
        assert [m.get(x).status for x in "BC"] == ["done"] * 2, [m.progress(x)["log"] for x in "BC"]
        assert train_steps(root / "B") == list(range(1, 13)) and rundir.is_finished(root / "B")
    finally:
        m.close()
    assert _processes_of(root) == [], "a training process outlived its job"


def test_restart_kills_orphans_and_reattaches_by_recorded_pid(data, tmp_path) -> None:
    """A job whose recorded child still runs is re-attached by pid (+ start time); a job recorded by an app version
    that wrote neither the env marker nor the new state keys is re-attached by its command line; a child whose job
    is no longer active (here: marked stopped in the state file) is killed with its whole process group."""
    import subprocess

    from app.jobs import JobManager, _alive, _kill_group

    root = tmp_path / "runs"
    m1 = JobManager(root, env=_app_env("0.5"), poll_s=0.1)
    m1.submit(_job_recipe(data), device="cpu:0", name="keep")
    m1.submit(_job_recipe(data), device="cpu:1", name="orphan")
    m1.close()  # the first server "dies": its poller stops, the children run on
    keep, orphan = m1.get("keep"), m1.get("orphan")
    assert keep.status == orphan.status == "running"
    recipe = root / ".app_recipes" / "legacy.yaml"
    recipe.write_text(yaml.safe_dump({**_job_recipe(data), "output": {"runs_root": str(root), "name": "legacy"}}))
    cmd = [sys.executable, "-m", "vision_peft", "train", str(recipe), "--no-progress"]
    env = {**os.environ, **_app_env("0.5")}
    legacy = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    state = json.loads((root / ".app_jobs.json").read_text())
    for j in state:
        if j["id"] == "orphan":
            j["status"] = "stopped"  # as if the user stopped it but the kill never reached the child
    state.append(
        {
            "id": "legacy",
            "task": "classification",
            "device": "cpu:2",
            "recipe": str(recipe),
            "run_dir": str(root / "legacy"),
            "cmd": cmd,
            "status": "running",
            "pid": legacy.pid,
            "created": time.time(),
            "started": time.time(),
            "ended": None,
            "returncode": None,
            "resume": False,
        }
    )  # fmt: skip  (the keys an app before this change wrote)
    (root / ".app_jobs.json").write_text(json.dumps(state))
    # a trainer killed alone leaves its worker processes (same group, leader gone): they must go too
    from app.jobs import ENV_JOB, ENV_ROOT

    spawn_worker = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"  # noqa: E501
    leader = subprocess.Popen([sys.executable, "-c", spawn_worker], env={**env, ENV_ROOT: str(root), ENV_JOB: "gone"},
                              start_new_session=True)  # fmt: skip
    _wait_for(lambda: len([p for p in _processes_of(root) if os.getpgid(p) == leader.pid]) == 2, 30, "a worker")
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait()

    m2 = JobManager(root, env=_app_env("0"), poll_s=0.1)
    try:
        assert m2.get("keep").status == "running" and m2.get("keep").pid == keep.pid
        assert m2.get("keep").message == "re-attached after an app restart"
        assert m2.get("legacy").status == "running" and m2.get("legacy").pid == legacy.pid
        assert [j.id for j in m2.list()] == ["keep", "orphan", "legacy"]
        assert not _alive(orphan.pid), "the orphaned training process still runs"
        assert [p for p in _processes_of(root) if os.getpgid(p) == leader.pid] == [], "a leaderless worker survived"
        for name in ("keep", "legacy"):
            m2.stop(name, timeout=5)
        assert not _alive(keep.pid) and legacy.wait(timeout=10) is not None
    finally:
        m2.close()
        for p in [*m1.procs.values(), legacy]:
            _kill_group(p.pid, timeout=0)  # whatever an assertion left running
            p.wait(timeout=10)  # reap them in this process (they were its children)
    assert _processes_of(root) == []


# -- concurrency --------------------------------------------------------------------------------------------
def test_two_clients_start_jobs_at_the_same_moment(data, tmp_path) -> None:
    """Clients on threads released together: every submission gets its own id, recipe file and queue place; one
    job runs on the device, the rest wait in submission order; the job file is valid JSON at every moment;
    two clients choosing the same name: one wins, the other gets a clear error, nothing is overwritten."""
    from app.jobs import JobManager

    root = tmp_path / "runs"
    m = JobManager(root, env=_app_env("0"), poll_s=0.05)
    n = 8
    gate = threading.Barrier(n + 1)
    results: dict[int, object] = {}
    bad_reads: list[str] = []
    reading = threading.Event()

    def client(i: int) -> None:
        gate.wait()
        try:
            results[i] = m.submit(_job_recipe(data, lr=1e-3 * (i + 1)), device="cpu")
        except Exception as e:  # noqa: BLE001
            results[i] = e

    def reader() -> None:
        while not reading.is_set():
            try:
                json.loads((root / ".app_jobs.json").read_text())
            except FileNotFoundError:
                pass
            except json.JSONDecodeError as e:
                bad_reads.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    watch = threading.Thread(target=reader)
    try:
        watch.start()
        for t in threads:
            t.start()
        gate.wait()
        for t in threads:
            t.join()
        jobs = [results[i] for i in range(n)]
        assert all(not isinstance(j, Exception) for j in jobs), jobs
        assert len({j.id for j in jobs}) == n and len({j.recipe for j in jobs}) == n
        for i, j in enumerate(jobs):  # each recipe file holds its own client's recipe
            assert yaml.safe_load(Path(j.recipe).read_text())["train"]["lr"] == pytest.approx(1e-3 * (i + 1))
        order = [j.id for j in m.list()]
        assert [j.seq for j in m.list()] == list(range(1, n + 1))
        assert [j.status for j in m.list()][0] in ("running", "starting", "done", "failed")
        assert all(j.status == "queued" for j in m.list()[1:])
        # stop the running one: the next in submission order starts, not another
        m.stop(order[0], timeout=5)
        m.tick()
        assert m.get(order[1]).status in ("running", "done", "failed")
        assert all(m.get(x).status == "queued" for x in order[2:])

        same = threading.Barrier(2)
        outcome: list[object] = []

        def named(lr: float) -> None:
            same.wait()
            try:
                outcome.append(m.submit(_job_recipe(data, lr=lr), device="cpu", name="shared"))
            except ValueError as e:
                outcome.append(e)

        pair = [threading.Thread(target=named, args=(lr,)) for lr in (0.1, 0.2)]
        for t in pair:
            t.start()
        for t in pair:
            t.join()
        errors = [o for o in outcome if isinstance(o, ValueError)]
        won = [o for o in outcome if not isinstance(o, ValueError)]
        assert len(errors) == 1 and len(won) == 1 and "already exists" in str(errors[0]), outcome
        lr = yaml.safe_load(Path(won[0].recipe).read_text())["train"]["lr"]
        assert lr in (0.1, 0.2) and m.get("shared").recipe == won[0].recipe
    finally:
        reading.set()
        watch.join()
        for j in m.list():
            if j.status in ("queued", "running", "starting"):
                m.stop(j.id, timeout=5)
        m.close()
    assert bad_reads == [], bad_reads[:3]
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []
    assert _processes_of(root) == []


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
