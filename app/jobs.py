"""Training jobs for the app: each run is ``python -m vision_peft train <recipe>`` in a child process.

One job runs per device at a time; the rest wait in a visible FIFO queue that continues past failures.
Job state lives in ``<runs_root>/.app_jobs.json``, so a page reload (or an app restart) re-attaches to
running jobs. Stop kills the child's whole process group (SIGTERM, then SIGKILL) and the job can later
be resumed from its last checkpoint with ``--resume``. Progress comes from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

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

ACTIVE = ("queued", "running")


@dataclass
class Job:
    """One training job and where its files are."""

    id: str
    task: str
    device: str  # the device slot it occupies (cpu | cuda:N)
    recipe: str  # the recipe file written for this job
    run_dir: str
    cmd: list[str]
    status: str = "queued"  # queued | running | done | failed | stopped
    pid: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    resume: bool = False

    @property
    def command_line(self) -> str:
        return " ".join(shlex.quote(c) for c in ["python", *self.cmd[1:]])


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
            for d in json.loads(self.state.read_text()):
                self.jobs[d["id"]] = Job(**d)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(poll_s,), daemon=True)
        self.thread.start()

    # -- public API ------------------------------------------------------------------------------------
    def submit(self, recipe: dict[str, Any], device: str = "cpu", name: str | None = None) -> Job:
        """Queue a training run of ``recipe`` (a recipe dict); returns the job."""
        job_id = name or f"{recipe['task']['name']}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        recipe = {**recipe, "output": {"runs_root": str(self.runs_root), "name": job_id}}
        recipe.setdefault("train", {})["device"] = "cuda" if device.startswith("cuda") else "cpu"
        jobs_dir = self.runs_root / ".app_recipes"
        jobs_dir.mkdir(exist_ok=True)
        path = jobs_dir / f"{job_id}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        cmd = [sys.executable, "-m", "vision_peft", "train", str(path), "--no-progress"]
        job = Job(job_id, recipe["task"]["name"], device, str(path), str(self.runs_root / job_id), cmd)
        with self.lock:
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
            if not (Path(job.run_dir) / rundir.CKPT_DIR / "state.pt").exists():
                raise ValueError(f"job {job_id} has no checkpoint yet; start it again instead")
            job.cmd = [sys.executable, "-m", "vision_peft", "train", "--resume", job.run_dir, "--no-progress"]
            job.status, job.resume, job.returncode, job.ended = "queued", True, None, None
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
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.created)

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
        log_tail = ""
        if (run / rundir.LOG_FILE).exists():
            log_tail = "\n".join((run / rundir.LOG_FILE).read_text(errors="replace").splitlines()[-15:])
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
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(j) for j in self.jobs.values()], indent=1))
        os.replace(tmp, self.state)

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
                rc = proc.poll() if proc is not None else (None if _alive(job.pid) else -1)
                if rc is None:
                    continue
                done = (Path(job.run_dir) / rundir.FINAL_FILE).exists() and rc in (0, -1)
                job.status = "done" if done else "failed"
                job.returncode, job.ended = rc, time.time()
                self.procs.pop(job.id, None)
                changed = True
            busy = {j.device for j in self.jobs.values() if j.status == "running"}
            for job in sorted(self.jobs.values(), key=lambda j: j.created):
                if job.status == "queued" and job.device not in busy:
                    self._start(job)
                    busy.add(job.device)
                    changed = True
            if changed:
                self._save()

    def _start(self, job: Job) -> None:
        env = dict(self.env)
        if job.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = job.device.split(":", 1)[1]
        err = open(job.run_dir + ".stderr", "ab")
        proc = subprocess.Popen(job.cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        err.close()
        self.procs[job.id] = proc
        job.pid, job.status, job.started = proc.pid, "running", time.time()
