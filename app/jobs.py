"""Training jobs for the app: each run is ``python -m vision_peft train <recipe>`` in a child process.

One job runs per device at a time; the rest wait in a visible FIFO queue (in submission order, also for
requests that arrive at the same moment) that continues past failures. Job state lives in
``<runs_root>/.app_jobs.json`` (written atomically, before and right after each start), so a page reload or
an app restart re-attaches to running jobs. Stop kills the child's whole process group (SIGTERM, then SIGKILL)
and the job can later be resumed from its last checkpoint with ``--resume``. Progress comes from the run's
``metrics.jsonl``.

Surviving a killed app server: every child leads its own session (process group) and carries
``VISION_PEFT_APP_ROOT``/``VISION_PEFT_APP_JOB`` in its environment. On start-up the manager finds the live
children of its runs root through ``/proc``: a job whose child still runs is re-attached (also when the server
died before it could record the pid); a job whose child is gone is reported as killed, with its log; a child
that belongs to no active job is killed with its process group, so no orphaned training process remains.
A recorded pid is trusted only together with the process's start time (no pid reuse).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vision_peft import rundir

ACTIVE = ("queued", "starting", "running")
ENV_ROOT = "VISION_PEFT_APP_ROOT"  # in each child's environment: the runs root of the manager that started it
ENV_JOB = "VISION_PEFT_APP_JOB"  # … and its job id
RUN_RECIPE = rundir.RECIPE_FILE  # the resolved recipe `python -m vision_peft train` writes into a run directory


@dataclass
class Job:
    """One training job and where its files are."""

    id: str
    task: str
    device: str  # the device slot it occupies (cpu | cuda:N)
    recipe: str  # the recipe file written for this job
    run_dir: str
    cmd: list[str]
    status: str = "queued"  # queued | starting | running | done | failed | stopped
    pid: int | None = None
    pid_start: int | None = None  # the child's start time (/proc/<pid>/stat, clock ticks): guards against pid reuse
    seq: int = 0  # submission order (the queue's order)
    message: str = ""  # what happened to the job beyond its status (re-attached, killed while the app was down …)
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    resume: bool = False

    @property
    def command_line(self) -> str:
        """The CLI command that reproduces this run: training the resolved recipe that ``train`` writes into the run
        directory (``recipe.yaml``) once it starts; until then the recipe the app wrote for the job (same content,
        before resolution)."""
        written = Path(self.run_dir) / RUN_RECIPE
        return shlex.join(["python", "-m", "vision_peft", "train", str(written if written.is_file() else self.recipe)])


def _start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _children_of(root: Path) -> dict[str, list[int]]:
    """Live process-group leaders started for ``root``'s jobs: job id -> pids (from each process's environment).

    Processes of such a group whose leader is gone (e.g. data-loader workers of a killed trainer) are killed here:
    nothing could re-attach to them."""
    found: dict[str, list[int]] = {}
    want = f"{ENV_ROOT}={root}".encode()
    if not Path("/proc").is_dir():  # no procfs (macOS): only recorded pids can be re-attached
        return found
    leaderless: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            if want not in env or not _alive(pid):
                continue
            pgid = os.getpgid(pid)
        except (OSError, ProcessLookupError):
            continue
        if pgid != pid:
            if not _alive(pgid):
                leaderless.add(pgid)
            continue
        for item in env:
            if item.startswith(f"{ENV_JOB}=".encode()):
                found.setdefault(item.split(b"=", 1)[1].decode(errors="replace"), []).append(pid)
    for pgid in leaderless:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found


def _runs(job: Job) -> bool:
    """Whether ``job.pid`` is alive and still runs this job's command (its recipe or run directory is in the
    command line): how jobs recorded by an app version without the environment marker are recognised."""
    if not _alive(job.pid):
        return False
    if not Path("/proc").is_dir():
        return True  # no procfs: a live recorded pid is all there is to go by
    try:
        cmdline = Path(f"/proc/{job.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.decode(errors="replace") in (job.recipe, job.run_dir) for arg in cmdline)


def _kill_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM to the process group led by ``pid``, SIGKILL after ``timeout`` seconds if it is still there."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie that is not our child still answers kill(0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


class JobManager:
    """Queue + child processes + persisted state, polled by a daemon thread."""

    def __init__(self, runs_root: str | Path, env: dict[str, str] | None = None, poll_s: float = 0.5) -> None:
        self.runs_root = Path(runs_root).resolve()
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.state = self.runs_root / ".app_jobs.json"
        self.env = {**os.environ, **(env or {})}
        self.lock = threading.RLock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: dict[str, Job] = {}
        if self.state.exists():
            known = {f.name for f in dataclasses.fields(Job)}
            for d in json.loads(self.state.read_text()):
                self.jobs[d["id"]] = Job(**{k: v for k, v in d.items() if k in known})
        if any(j.seq == 0 for j in self.jobs.values()):  # a job recorded before ``seq`` existed: creation order
            for n, job in enumerate(sorted(self.jobs.values(), key=lambda j: j.created), 1):
                job.seq = n
        self._reattach()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(poll_s,), daemon=True)
        self.thread.start()

    # -- public API ------------------------------------------------------------------------------------
    def submit(self, recipe: dict[str, Any], device: str = "cpu", name: str | None = None) -> Job:
        """Queue a training run of ``recipe`` (a recipe dict); returns the job."""
        with self.lock:  # one submission at a time: ids, order and the recipe file cannot collide
            job_id = name or f"{recipe['task']['name']}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            if job_id in self.jobs or (self.runs_root / job_id).exists():
                raise ValueError(f"a job or run named {job_id!r} already exists in {self.runs_root}; pick another name")
            recipe = {**recipe, "output": {"runs_root": str(self.runs_root), "name": job_id}}
            recipe["train"] = {**recipe.get("train", {}), "device": "cuda" if device.startswith("cuda") else "cpu"}
            path = self.runs_root / ".app_recipes" / f"{job_id}.yaml"
            rundir.atomic_write_text(path, yaml.safe_dump(recipe, sort_keys=False))
            cmd = [sys.executable, "-m", "vision_peft", "train", str(path), "--no-progress"]
            job = Job(job_id, recipe["task"]["name"], device, str(path), str(self.runs_root / job_id), cmd)
            job.seq = max((j.seq for j in self.jobs.values()), default=0) + 1
            self.jobs[job_id] = job
            self._save()
        self.tick()
        return job

    def resume(self, job_id: str) -> Job:
        """Queue a stopped or failed job again, continuing from its checkpoint."""
        with self.lock:
            job = self._get(job_id)
            if job.status in ACTIVE:
                raise ValueError(f"job {job_id} is {job.status}; stop it before resuming")
            ckpt = Path(job.run_dir) / rundir.CKPT_DIR
            if not any((d / "state.pt").exists() for d in (ckpt, ckpt / rundir.PREV_CKPT_DIR)):
                raise ValueError(f"job {job_id} has no checkpoint yet; start it again instead")
            job.cmd = [sys.executable, "-m", "vision_peft", "train", "--resume", job.run_dir, "--no-progress"]
            job.status, job.resume, job.returncode, job.ended = "queued", True, None, None
            job.seq, job.message = max(j.seq for j in self.jobs.values()) + 1, ""  # back of the queue
            self._save()
        self.tick()
        return job

    def stop(self, job_id: str, timeout: float = 10.0) -> Job:
        """Kill the job's process tree (or drop it from the queue)."""
        with self.lock:
            job = self._get(job_id)
            if job.status == "queued":
                job.status, job.ended = "stopped", time.time()
                self._save()
                return job
            if job.status != "running" or not job.pid:
                return job
            pid, proc = job.pid, self.procs.get(job_id)
        try:
            os.killpg(pid, signal.SIGTERM)  # the child leads its own session: this reaches its workers too
        except ProcessLookupError:
            pass
        deadline = time.time() + timeout
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            proc.wait(timeout=30)  # reap it: no zombie left behind
        with self.lock:
            job.status, job.ended, job.returncode = "stopped", time.time(), None
            self.procs.pop(job_id, None)
            self._save()
        self.tick()
        return job

    def list(self) -> list[Job]:
        """Every job in submission order."""
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.seq)

    def get(self, job_id: str) -> Job:
        with self.lock:
            return self._get(job_id)

    def queue(self) -> list[Job]:
        return [j for j in self.list() if j.status == "queued"]

    def progress(self, job_id: str) -> dict[str, Any]:
        """Steps done / total, loss curve, latest eval and the log tail of a job."""
        job = self.get(job_id)
        run = Path(job.run_dir)
        steps, losses, evals = [], [], []
        total = None
        for rec in rundir.read_metrics(run):  # skips a line being written right now
            if "split" in rec:
                evals.append(rec)
            elif "loss" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
                total = rec.get("total_steps", total)
        if total is None and (run / rundir.CONFIG_FILE).exists():
            total = rundir.RunInfo.read(run).steps.total
        log_tail = f"{job.message}\n" if job.message else ""
        if (run / rundir.LOG_FILE).exists():
            log_tail += "\n".join((run / rundir.LOG_FILE).read_text(errors="replace").splitlines()[-15:])
        err = Path(job.run_dir + ".stderr")
        if job.status == "failed" and err.exists():
            log_tail += "\n" + "\n".join(err.read_text(errors="replace").splitlines()[-8:])
        return {
            "job": asdict(job),
            "step": steps[-1] if steps else 0,
            "total": total,
            "steps": steps,
            "losses": losses,
            "evals": evals,
            "log": log_tail,
            "command": job.command_line,
            "queue": [j.id for j in self.queue()],
        }

    def close(self) -> None:
        self._stop.set()

    # -- internals -------------------------------------------------------------------------------------
    def _get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise ValueError(f"unknown job {job_id!r}")
        return self.jobs[job_id]

    def _save(self) -> None:
        """Write the job list atomically (a unique temp file, fsync, rename)."""
        rundir.atomic_write_json(self.state, [asdict(j) for j in sorted(self.jobs.values(), key=lambda j: j.seq)])

    def _reattach(self) -> None:
        """After a (re)start: re-attach the jobs whose child still runs, report the others as killed, and kill
        children that belong to no active job (see the module docstring)."""
        live = _children_of(self.runs_root)
        for job in self.jobs.values():
            if job.status not in ("starting", "running"):
                continue
            pids = live.pop(job.id, [])
            if job.pid in pids and (job.pid_start is None or job.pid_start == _start_time(job.pid)):
                job.status, job.message = "running", "re-attached after an app restart"
                pids.remove(job.pid)
            elif job.pid and job.pid_start is None and _runs(job):  # an older app's job (no env marker, no start time)
                job.status, job.message = "running", "re-attached after an app restart"
            elif pids:  # the app died before it recorded this child
                job.pid, job.pid_start = pids[0], _start_time(pids[0])
                job.status, job.message = "running", "re-attached after an app restart (its start was not recorded)"
                pids = pids[1:]
            else:
                self._ended_while_away(job)
            for extra in pids:
                _kill_group(extra)
        for pids in live.values():  # children of jobs that are not active any more: orphans
            for pid in pids:
                _kill_group(pid)
        self._save()

    def _ended_while_away(self, job: Job) -> None:
        """A job whose child is gone although it was running: done if it finished, else killed."""
        job.returncode, job.ended = None, time.time()
        if (Path(job.run_dir) / rundir.FINAL_FILE).exists():
            job.status, job.message = "done", "finished while the app was not running"
            return
        ckpt_meta = Path(job.run_dir) / rundir.CKPT_DIR / "meta.json"
        try:
            at = f"its last checkpoint is step {json.loads(ckpt_meta.read_text())['step']}: Resume continues from it"
        except (OSError, ValueError, KeyError):
            at = "it has no checkpoint yet: start it again"
        job.status = "failed"
        job.message = (
            f"killed: the training process{f' (pid {job.pid})' if job.pid else ''} ended while the app was not "
            f"running (exit status unknown); {at}. Its log is below and in {job.run_dir}.stderr"
        )

    def _loop(self, poll_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the poller must never die
                pass
            self._stop.wait(poll_s)

    def tick(self) -> None:
        """Reap finished children, then start the next queued job on each free device."""
        with self.lock:
            changed = False
            for job in self.jobs.values():
                if job.status != "running":
                    continue
                proc = self.procs.get(job.id)
                if proc is not None:
                    rc = proc.poll()
                else:  # re-attached after a restart: not our child, the exit status is unknown
                    same = job.pid_start is None or _start_time(job.pid) == job.pid_start
                    rc = None if _alive(job.pid) and same else -1
                if rc is None:
                    continue
                done = (Path(job.run_dir) / rundir.FINAL_FILE).exists() and rc in (0, -1)
                job.status = "done" if done else "failed"
                job.returncode, job.ended = rc, time.time()
                if proc is None and not done:
                    job.message = "the re-attached training process ended without finishing (exit status unknown)"
                self.procs.pop(job.id, None)
                changed = True
            busy = {j.device for j in self.jobs.values() if j.status in ("running", "starting")}
            for job in sorted(self.jobs.values(), key=lambda j: j.seq):
                if job.status == "queued" and job.device not in busy:
                    self._start(job)
                    busy.add(job.device)
                    changed = True
            if changed:
                self._save()

    def _start(self, job: Job) -> None:
        """Start ``job``'s child in its own session; the state is saved before (``starting``) and right after."""
        env = dict(self.env)
        env[ENV_ROOT], env[ENV_JOB] = str(self.runs_root), job.id
        if job.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = job.device.split(":", 1)[1]
        job.status, job.message = "starting", ""
        self._save()  # a server killed from here on leaves a child that the next start re-attaches by its env
        err = open(job.run_dir + ".stderr", "ab")
        try:
            proc = subprocess.Popen(job.cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        except OSError as e:
            job.status, job.ended, job.message = "failed", time.time(), f"could not start {job.cmd[0]}: {e}"
            return
        finally:
            err.close()
        self.procs[job.id] = proc
        job.pid, job.pid_start, job.status, job.started = proc.pid, _start_time(proc.pid), "running", time.time()
        self._save()
