"""Sweeps for the app: each one is ``python -m vision_peft sweep <recipe> --space <file> …`` in a child process.

A sweep lives in ``<runs_root>/sweeps/<id>/`` (the CLI's sweep folder: study.db, trials/, leaderboard …); the app
writes the recipe it sweeps (``app_recipe.yaml``, the data folder filled in) and the space (``app_space.yaml``)
there, so the shown command reruns it. The list of sweeps started by the app is ``<runs_root>/.app_sweeps.json``
(atomic writes, before and right after each start), so a page reload or an app restart re-attaches. The child
leads its own session and carries ``VISION_PEFT_APP_ROOT=<runs_root>/sweeps`` (not the runs root itself: the
training-job manager would take it for an orphan of its own) and ``VISION_PEFT_APP_JOB=<id>``. Stop sends SIGTERM
to the sweep's process group: the sweep fails its running trial and queues one retry (its interruption policy),
then exits; SIGKILL follows after a grace period. Progress and the leaderboard are read from the Optuna study.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from app.jobs import ENV_JOB, ENV_ROOT, _alive, _children_of, _kill_group, _start_time
from vision_peft import rundir
from vision_peft.sweep_study import BEST_FILE, SPACE_FILE, read_json, storage_url

RECIPE_IN = "app_recipe.yaml"  # the recipe the app wrote (the sweep copies it to recipe.yaml)
SPACE_IN = "app_space.yaml"  # the space the app wrote (the sweep copies it to space.yaml once the study exists)
LOG = "app_sweep.log"  # the sweep's stdout + stderr
STOP_GRACE_S = 30.0  # SIGTERM → SIGKILL: the sweep stops its trial (10 s grace of its own) and records it


@dataclass
class Sweep:
    """One sweep started by the app."""

    id: str  # also the Optuna study name
    recipe: str  # the recipe name it was made from
    sweep_dir: str
    cmd: list[str]
    trials: int
    status: str = "starting"  # starting | running | done | failed | stopped
    pid: int | None = None
    pid_start: int | None = None
    message: str = ""
    created: float = field(default_factory=time.time)
    ended: float | None = None
    returncode: int | None = None
    # the Sweeps form it was started from (recipe, data, methods, trials …): a reload shows these settings again;
    # records written before this field existed load with {} and the form is read back from cmd and the space
    form: dict[str, Any] = field(default_factory=dict)

    @property
    def command_line(self) -> str:
        return " ".join(shlex.quote(c) for c in ["python", *self.cmd[1:]])

    @property
    def storage(self) -> str:
        return storage_url(Path(self.sweep_dir), None)

    @property
    def study_ready(self) -> bool:
        """The sweep has created its study (it copies the space into the folder right after)."""
        return (Path(self.sweep_dir) / SPACE_FILE).is_file()

    def log_tail(self, n: int = 15) -> str:
        p = Path(self.sweep_dir) / LOG
        lines = p.read_text(errors="replace").splitlines() if p.is_file() else []
        return ((self.message + "\n") if self.message else "") + "\n".join(lines[-n:])


class SweepManager:
    """The app's sweeps: child processes, persisted list, re-attach; polled by a daemon thread."""

    def __init__(self, runs_root: str | Path, env: dict[str, str] | None = None, poll_s: float = 1.0) -> None:
        import os

        self.root = Path(runs_root).resolve() / "sweeps"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = Path(runs_root).resolve() / ".app_sweeps.json"
        self.env = {**os.environ, **(env or {})}
        self.lock = threading.RLock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.sweeps: dict[str, Sweep] = {}
        if self.state.exists():
            known = {f.name for f in fields(Sweep)}
            for d in json.loads(self.state.read_text()):
                self.sweeps[d["id"]] = Sweep(**{k: v for k, v in d.items() if k in known})
        self._reattach()
        self._stop = threading.Event()
        threading.Thread(target=self._loop, args=(poll_s,), daemon=True).start()

    # -- public API ------------------------------------------------------------------------------------------
    def new_dir(self, recipe: str) -> tuple[str, Path]:
        """A fresh sweep id (the study name) and its folder."""
        sid = f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        d = self.root / sid
        d.mkdir(parents=True)
        return sid, d

    def start(self, sid: str, recipe: str, trials: int, workers: int, timeout_min: float | None,
              device: str, form: dict[str, Any] | None = None) -> Sweep:  # fmt: skip
        """Start the sweep whose folder :meth:`new_dir` made and whose recipe and space files are written."""
        d = self.root / sid
        cmd = [sys.executable, "-m", "vision_peft", "sweep", str(d / RECIPE_IN), "--space", str(d / SPACE_IN),
               "--trials", str(trials), "--study", sid, "--out", str(d), "--workers", str(workers),
               "--device", device, "--no-progress"]  # fmt: skip
        if timeout_min:
            cmd += ["--timeout", f"{timeout_min:g}"]
        sw = Sweep(sid, recipe, str(d), cmd, trials, form=dict(form or {}))
        with self.lock:
            self.sweeps[sid] = sw
            self._save()  # from here a killed server leaves a child that the next start finds by its environment
            env = {**self.env, ENV_ROOT: str(self.root), ENV_JOB: sid}
            if device.startswith("cuda:"):
                env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
                cmd[cmd.index("--device") + 1] = "cuda"
            with open(d / LOG, "ab") as log:
                try:
                    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
                except OSError as e:
                    sw.status, sw.ended, sw.message = "failed", time.time(), f"could not start {cmd[0]}: {e}"
                    self._save()
                    return sw
            self.procs[sid] = proc
            sw.pid, sw.pid_start, sw.status = proc.pid, _start_time(proc.pid), "running"
            self._save()
        return sw

    def stop(self, sid: str) -> Sweep:
        """SIGTERM to the sweep's process group (SIGKILL after the grace period); the sweep records its trial."""
        with self.lock:
            sw = self.get(sid)
            if sw.status not in ("starting", "running") or not sw.pid:
                return sw
            pid, proc = sw.pid, self.procs.get(sid)
        _kill_group(pid, STOP_GRACE_S)
        if proc is not None:
            proc.wait(timeout=30)
        with self.lock:
            sw.status, sw.ended, sw.returncode = "stopped", time.time(), proc.returncode if proc else None
            sw.message = "stopped from the app: the running trial is failed and queued again (the sweep's policy)"
            self.procs.pop(sid, None)
            self._save()
        return sw

    def list(self) -> list[Sweep]:
        with self.lock:
            return sorted(self.sweeps.values(), key=lambda s: s.created)

    def get(self, sid: str) -> Sweep:
        with self.lock:
            if sid not in self.sweeps:
                raise ValueError(f"unknown sweep {sid!r}; pick one from the sweep list")
            return self.sweeps[sid]

    def current(self) -> str | None:
        """The running sweep, else the latest one (what a page load selects)."""
        sweeps = self.list()
        active = [s.id for s in sweeps if s.status in ("starting", "running")]
        return (active or [s.id for s in sweeps] or [None])[-1]

    def close(self) -> None:
        self._stop.set()

    # -- internals -------------------------------------------------------------------------------------------
    def _save(self) -> None:
        rundir.atomic_write_json(self.state, [asdict(s) for s in self.list()])

    def _reattach(self) -> None:
        """After a (re)start: a sweep whose process still runs is re-attached; one that died is failed (or done,
        when it finished: its best.json is there and its log ends with the selection)."""
        live = _children_of(self.root)
        for sw in self.sweeps.values():
            if sw.status not in ("starting", "running"):
                continue
            pids = live.get(sw.id, [])
            if sw.pid in pids and sw.pid_start in (None, _start_time(sw.pid)):
                sw.status, sw.message = "running", "re-attached after an app restart"
                continue
            leader = [p for p in pids if _is_sweep(p)]
            if leader:  # the server died before it recorded the pid
                sw.pid, sw.pid_start, sw.status = leader[0], _start_time(leader[0]), "running"
                sw.message = "re-attached after an app restart (its start was not recorded)"
                continue
            self._ended_while_away(sw)
        self._save()

    def _ended_while_away(self, sw: Sweep) -> None:
        sw.ended, sw.returncode = time.time(), None
        if _finished(sw):
            sw.status, sw.message = "done", "finished while the app was not running"
            return
        sw.status = "failed"
        sw.message = (
            f"killed: the sweep process{f' (pid {sw.pid})' if sw.pid else ''} ended while the app was not running "
            f"(exit status unknown). Its study keeps the finished trials: rerun the command below to continue. "
            f"Log tail ({Path(sw.sweep_dir) / LOG}):"
        )

    def _loop(self, poll_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the poller must never die
                pass
            self._stop.wait(poll_s)

    def tick(self) -> None:
        """Reap finished sweeps."""
        with self.lock:
            changed = False
            for sw in self.sweeps.values():
                if sw.status != "running":
                    continue
                proc = self.procs.get(sw.id)
                if proc is not None:
                    rc = proc.poll()
                else:  # re-attached: not our child, the exit status is unknown
                    rc = None if _alive(sw.pid) and sw.pid_start in (None, _start_time(sw.pid)) else -1
                if rc is None:
                    continue
                sw.returncode, sw.ended = rc, time.time()
                if rc == 0 or (rc == -1 and _finished(sw)):
                    sw.status = "done"
                else:
                    sw.status = "failed"
                    sw.message = f"the sweep exited with code {rc}" if rc != -1 else "the re-attached sweep ended"
                self.procs.pop(sw.id, None)
                changed = True
            if changed:
                self._save()


def _finished(sw: Sweep) -> bool:
    """The sweep printed its selection (the last thing it does) or at least wrote best.json and the leaderboard."""
    d = Path(sw.sweep_dir)
    text = (d / LOG).read_text(errors="replace") if (d / LOG).is_file() else ""
    return '"sweep_dir"' in text or (bool(read_json(d / BEST_FILE)) and (d / "leaderboard.csv").is_file())


def _is_sweep(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"sweep" in args


def leaderboard(sw: Sweep) -> dict[str, Any] | None:
    """The sweep's rows and its budget progress from the study, or None before the study exists."""
    if not sw.study_ready:
        return None
    from vision_peft.leaderboard import trial_rows
    from vision_peft.sweep_study import budget_done, load_study

    study = load_study(sw.storage, sw.id)
    done, total = budget_done(study)
    return {"study": study, "rows": trial_rows(study), "done": done, "total": total}


def export_best(run_dir: Path, env: dict[str, str], timeout: float = 1800) -> tuple[str, dict[str, Any]]:
    """``python -m vision_peft export <run> --bundle <run>/export`` as a child; (zip path, parity report)."""
    import shutil
    import tempfile

    out = run_dir / "export"
    res = subprocess.run([sys.executable, "-m", "vision_peft", "export", str(run_dir), "--bundle", str(out)],
                         capture_output=True, text=True, env=env, timeout=timeout)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "export failed")
    report = json.loads(res.stdout)
    archive = shutil.make_archive(str(Path(tempfile.mkdtemp()) / f"{run_dir.parent.parent.name}-best-bundle"), "zip",
                                  out)  # fmt: skip
    return archive, report
