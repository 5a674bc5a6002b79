"""Helpers shared by the fault-injection tests (tests/test_faults_*.py): a forked child under RLIMIT_FSIZE
(SIGXFSZ ignored so writes fail with EFBIG), patching the n-th call, the closing-note report, what is on disk,
and the 6-step run every fault test compares against (the ``data`` / ``reference`` fixtures are in conftest)."""

from __future__ import annotations

import io
import os
import resource
import signal
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path

import torch
from conftest import make_run_cfg

from vision_peft import rundir

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


def cfg_for(data: Path, runs: Path, name: str, *extra: str):
    return make_run_cfg(data, runs, *TRAIN, *extra, output={"runs_root": str(runs), "name": name})


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, float((a[k] - b[k]).abs().max()))


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in rundir.read_metrics(run_dir) if "split" not in r]
