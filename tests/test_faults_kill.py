"""Fault injection with real kills and races: SIGKILL of the app server while jobs run, SIGKILL during export, and
two clients starting jobs at the same moment (threads released together).

Each test checks what a user finds afterwards: the previous file intact and loadable, nothing half-written under a
final name, an error naming the path and the cause, and the work continuing once the fault is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fault_injection import in_child, no_temp_files, on_call, report, train_steps

from vision_peft import bundle, rundir
from vision_peft import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent


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
