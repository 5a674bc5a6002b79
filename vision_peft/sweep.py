"""Sweeps on Optuna: which method, at which settings, for this recipe — every trial an ordinary run directory.

``run_sweep(recipe, space, trials)`` makes a sweep folder::

    <sweep dir>/
      study.db            the Optuna study (SQLite) unless another storage URL is given
      recipe.yaml         the recipe as it was when the study was made (every trial trains this file)
      space.yaml          the space file (vision_peft.sweep_space)
      trials/<n>/         trial n: a run directory made by `python -m vision_peft train recipe.yaml --k=v …`,
                          plus sweep_trial.json (its state: complete | pruned | stopped | failed, and why)
      best.json           the selected best (on val) with its one test evaluation; per-method bests, post hoc
      leaderboard.csv  leaderboard.png  (vision_peft.leaderboard)

How it runs. The budget is a queue: the study holds ``trials`` trials in total, created as WAITING trials (each
method in turn with ``methods: round_robin``, so a small budget still covers every method; TPE, seeded, samples
the rest of each trial's parameters from the history). A worker pops a WAITING trial atomically (the storage's
WAITING → RUNNING update), starts the child ``train`` process in its own session (a process group it can stop),
follows its ``metrics.jsonl``: every validation record is reported to Optuna (``trial.report``) and the pruner
(median or successive halving) may stop it; ``config.json`` gives the trainable-parameter counts, the step records
the step time, so a trial that breaks a constraint is stopped too. A stopped trial's run directory stays, with its
state in ``sweep_trial.json``. ``--workers K`` starts K worker processes on the same storage; ``--join URL --study
NAME`` adds a worker from anywhere that reaches the storage (it reads the recipe and the space from the study).

Failure policy. Workers record a heartbeat on their RUNNING trial (RDB storage ``heartbeat_interval``). When a worker
dies, the next worker that looks at the queue (every worker, before each trial and while it waits) marks that trial
FAIL and puts one retry in the queue with the same parameters (``RetryHeartbeatStaleTrialCallback(max_retry=1)``);
the retry trains afresh in its own ``trials/<m>``, the dead one's folder stays marked failed. A trial whose child
exits with an error is FAIL and is not retried (the same config would fail again). The child dies with its worker
(Linux ``PR_SET_PDEATHSIG``), so a killed worker leaves no orphan training.

Seeds. Trial n samples with TPE seeded from (``seed``, n), so two workers never draw the same parameters; every
trial trains with ``train.seed = seed`` (common random numbers across methods). One worker, the same seed, a fresh
storage: the same trials. The same storage: the finished trials stay
and the sweep continues up to ``trials``. With several workers the order of completion changes what TPE sees, so
only the first (random) trials are reproduced exactly.

Selection without peeking (:func:`vision_peft.leaderboard.select_best`). Trials are ranked on the validation metric
only. When the recipe's task has a ``task.split`` whose last entry is ``test``, trials train with
``task.split.test=0`` (train and val are the very same images, checked against ``split.json``) so no trial ever sees
the test images; the test split is evaluated once, for the selected best, and — labelled post hoc — for each
method's best. Every trial trains with ``train.final_test=false``, so no trial of any task evaluates test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from vision_peft import rundir, sweep_cli
from vision_peft.paths import REPO_ROOT
from vision_peft.sweep_cli import cli_main  # noqa: F401  (the sweep command: stays importable from here)
from vision_peft.sweep_study import (  # noqa: F401  (re-exported: the sweep's names stay importable from here)
    BEST_FILE,
    DB_FILE,
    HEARTBEAT_S,
    POLL_S,
    RECIPE_FILE,
    SPACE_FILE,
    STATE_FILE,
    TRIALS_DIR,
    Context,
    SweepError,
    budget_done,
    load_study,
    make_context,
    open_storage,
    prepare_study,
    read_json,
    read_state,
    redact,
    retry_once,
    storage_url,
    write_state,
)

log = logging.getLogger("vision_peft")


# -- one worker --------------------------------------------------------------------------------------------------
def _sqlite_file(storage: Any) -> Path | None:
    """The database file of a SQLite-backed study storage (optuna wraps the RDB storage in a cache), else None."""
    url = str(getattr(getattr(storage, "_backend", storage), "url", ""))
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


@contextlib.contextmanager
def _claim_lock(storage: Any) -> Iterator[None]:
    """Serialise claims on a SQLite study across worker processes (an flock next to the database file).

    Optuna's WAITING → RUNNING update reads the trial ``FOR UPDATE``, which PostgreSQL and MySQL honour and SQLite
    ignores: two workers could both read WAITING and both claim one trial (seen in CI: one trial trained twice, the
    second ``tell`` refused). SQLite studies live on one machine, so a file lock makes the read-and-update atomic."""
    db = _sqlite_file(storage)
    if db is None or not db.parent.is_dir():
        yield
        return
    with open(db.with_name(db.name + ".claim.lock"), "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pop_waiting(study: optuna.Study) -> int | None:
    """Claim a WAITING trial (WAITING → RUNNING, atomic in the storage; under :func:`_claim_lock` for SQLite);
    its id, or None."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            with _claim_lock(storage):
                if storage.get_trial(t._trial_id).state != TrialState.WAITING:
                    continue  # another worker claimed it since the list was read
                if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    continue
            storage.record_heartbeat(t._trial_id)  # from now on a dead worker shows as a stale trial
            return t._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _fail_orphans(study: optuna.Study) -> None:
    """RUNNING trials claimed by a worker that died before its first heartbeat (no ``worker_pid`` recorded after a
    grace period): optuna never sees them as stale, so they are failed and retried here."""
    grace = 3 * (study._storage.get_heartbeat_interval() or HEARTBEAT_S)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start.timestamp() if t.datetime_start else time.time()
        if "worker_pid" not in t.user_attrs and time.time() - started > grace:
            try:
                if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    retry_once(study, study._storage.get_trial(t._trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:
                continue


def run_worker(ctx: Context, progress: Any = None) -> int:
    """Run trials from the queue until it is empty and no other worker's trial can still come back; returns the
    number of trials this worker ran."""
    ran = 0
    while True:
        with warnings.catch_warnings():  # optuna marks the heartbeat API experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(ctx.study)  # a dead worker's trial → FAIL + one retry queued
        _fail_orphans(ctx.study)
        if ctx.deadline is not None and time.time() > ctx.deadline:
            break
        trial_id = _pop_waiting(ctx.study)
        if trial_id is None:
            if not ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            time.sleep(POLL_S * 4)  # another worker's trial may still go stale and come back as a retry
            continue
        run_trial(ctx, trial_id)
        ran += 1
        if progress is not None:
            done, total = budget_done(ctx.study)
            progress.total = total
            progress.n = done
            progress.refresh()
    return ran


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the worker dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:  # not Linux: the heartbeat still fails the trial; the child finishes on its own
        pass


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the child's whole process group: SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _overrides(ctx: Context, params: dict[str, Any], number: int) -> dict[str, Any]:
    out = dict(params)
    out.update({"train.seed": ctx.seed, "output.runs_root": str(ctx.trials_dir.resolve()), "output.name": str(number),
                "train.final_test": False})  # fmt: skip
    if ctx.hidden_test is not None:
        out["task.split.test"] = 0
    if ctx.device:
        out["train.device"] = ctx.device
    return out


def headline(record: dict[str, Any], metric: str | None) -> str | None:
    """The metric ranked on: the space's, else the first scalar of a val record (the task's headline)."""
    if metric is not None:
        return metric if metric in record else None
    return next((k for k, v in record.items() if k not in ("step", "split") and isinstance(v, (int, float))), None)


def trial_sampler(seed: int, number: int) -> optuna.samplers.TPESampler:
    """Trial ``number``'s sampler: TPE seeded from (seed, number). Workers in other processes that each seeded one
    sampler with ``seed`` would draw the same parameters for their trials; this way trial n's random draws are its
    own wherever it runs (TPE still reads the whole history from the storage)."""
    return optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([seed, number]).generate_state(1)[0]))


def run_trial(ctx: Context, trial_id: int) -> TrialState:
    """Train one claimed trial in a child process, following and pruning it; tell the study how it ended."""
    study, space = ctx.study, ctx.space
    study.sampler = trial_sampler(ctx.seed, study._storage.get_trial_number_from_id(trial_id))
    trial = optuna.Trial(study, trial_id)
    number = trial.number
    run_dir = ctx.trials_dir / str(number)
    params = space.suggest(trial)
    ov = _overrides(ctx, params, number)
    attrs = {"run_dir": str(run_dir.resolve()), "method": params["adapter.name"], "host": socket.gethostname(),
             "worker_pid": os.getpid(), "train_seed": ctx.seed, "overrides": json.dumps(ov)}  # fmt: skip
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if (run_dir / rundir.CONFIG_FILE).exists():
        reason = f"{run_dir} already holds a run (a sweep folder reused with a fresh storage?); move it away"
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    cmd = [sys.executable, "-m", "vision_peft", "train", str(ctx.recipe_file.resolve()), "--no-progress"]
    cmd += [f"--{k}={json.dumps(v)}" for k, v in ov.items()]
    log_path = run_dir / "sweep_stdout.log"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_f = open(log_path, "w")
    except OSError as e:  # disk full / unwritable sweep folder: the trial fails, the study says why
        reason = f"cannot create {log_path}: {e.strerror or e}; free space in {ctx.trials_dir} and run the sweep again"
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("sweep: trial %d: %s", number, reason)
        return TrialState.FAIL
    with log_f:
        proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=_child_env(),
                                start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
    trial.set_user_attr("pid", proc.pid)
    try:
        state, reason = _follow(ctx, trial, proc, run_dir)
    except BaseException:  # Ctrl-C / SIGTERM (cli_main turns it into KeyboardInterrupt): same policy as a death
        stop_group(proc)
        write_state(run_dir, "failed", "the worker was interrupted; retried once as a new trial")
        study.tell(trial, state=TrialState.FAIL)
        retry_once(study, study._storage.get_trial(trial._trial_id))
        raise
    return _finish_trial(ctx, trial, proc, run_dir, state, reason, log_path)


def _follow(ctx: Context, trial: optuna.Trial, proc: subprocess.Popen, run_dir: Path) -> tuple[str, str]:
    """Follow the child until it exits or is stopped: ("ran", "") or ("pruned" | "stopped", why)."""
    storage, limits = ctx.study._storage, ctx.space.constraints
    reported: set[int] = set()
    seen, last_beat = 0, 0.0
    params_checked = False
    while True:
        exited = proc.poll() is not None
        if time.time() - last_beat >= storage.get_heartbeat_interval() / 2:
            storage.record_heartbeat(trial._trial_id)
            last_beat = time.time()
        if not params_checked and (run_dir / rundir.CONFIG_FILE).is_file():
            params_checked = True
            counts = rundir.RunInfo.read(run_dir).parameters
            for name, key in (("max_trainable_params", "trainable"), ("max_trainable_params_no_head",
                                                                       "trainable_no_head")):  # fmt: skip
                if name in limits and counts.get(key, 0) > limits[name]:
                    stop_group(proc)
                    return "stopped", f"constraint {name}={limits[name]:g}: the run trains {counts[key]:,}"
        recs = rundir.read_metrics(run_dir)
        new, seen = recs[seen:], len(recs)
        step_times = [r["step_time"] for r in recs if "step_time" in r]
        if "max_step_time" in limits and len(step_times) >= 2:
            med = statistics.median(step_times)
            if med > limits["max_step_time"]:
                stop_group(proc)
                return "stopped", f"constraint max_step_time={limits['max_step_time']:g} s: median step {med:.3f} s"
        for r in new:
            if r.get("split") != "val":
                continue
            metric = headline(r, ctx.space.metric)
            if metric is None or r["step"] in reported or not isinstance(r[metric], (int, float)):
                continue
            reported.add(r["step"])
            trial.report(float(r[metric]), int(r["step"]))
            if not exited and trial.should_prune():
                stop_group(proc)
                return "pruned", f"pruner: val {metric}={r[metric]:.4f} at step {r['step']}"
        if exited:
            return "ran", ""
        time.sleep(POLL_S)


def _finish_trial(
    ctx: Context, trial: optuna.Trial, proc: subprocess.Popen, run_dir: Path, state: str, reason: str, log_path: Path
) -> TrialState:
    """Record what the run measured on the trial, write its state file, tell the study."""
    study = ctx.study
    final = read_json(run_dir / rundir.FINAL_FILE)
    info = rundir.RunInfo.read(run_dir) if (run_dir / rundir.CONFIG_FILE).is_file() else None
    recs = rundir.read_metrics(run_dir)
    step_times = [r["step_time"] for r in recs if "step_time" in r]
    timing = final.get("timing") or {}
    attrs = {
        "parameters": info.parameters if info else {},
        "step_time_median": timing.get("step_time_median") or (statistics.median(step_times) if step_times else None),
        "peak_memory_mb": timing.get("peak_memory_mb"),
        "train_seconds": timing.get("train_seconds"),
    }
    vals = [r for r in recs if r.get("split") == "val"]
    val = final.get("val") or (vals[-1] if vals else {})
    metric = headline(val, ctx.space.metric) if val else None
    if metric:
        attrs["metric"] = metric
        attrs["val"] = {k: v for k, v in val.items() if isinstance(v, (int, float)) and k not in ("step",)}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if state in ("pruned", "stopped"):
        trial.set_user_attr("reason", reason)
        write_state(run_dir, state, reason, trial=trial.number)
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    if proc.returncode != 0 or not final:
        tail = log_path.read_text()[-1500:] if log_path.is_file() else ""
        reason = f"train exited with code {proc.returncode}: …{tail.strip()[-600:]}"
        trial.set_user_attr("reason", reason)
        write_state(run_dir, "failed", reason, trial=trial.number)
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    if metric is None or not isinstance(val.get(metric), (int, float)) or not math.isfinite(val[metric]):
        want = ctx.space.metric or "a headline metric"
        reason = f"the run wrote no val {want} (sweeps rank on the val split: give the recipe one)"
        trial.set_user_attr("reason", reason)
        write_state(run_dir, "failed", reason, trial=trial.number)
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    write_state(run_dir, "complete", "", trial=trial.number, value=val[metric], metric=metric)
    study.tell(trial, float(val[metric]))
    return TrialState.COMPLETE


# -- the sweep ---------------------------------------------------------------------------------------------------
def run_sweep(
    recipe: str | Path,
    space: str | Path,
    trials: int,
    storage: str | None = None,
    study: str | None = None,
    workers: int = 1,
    timeout_min: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    device: str | None = None,
    posthoc: bool = True,
    progress: bool = True,
    select: bool = True,
    heartbeat_s: int = HEARTBEAT_S,
) -> dict[str, Any]:
    """Run (or continue) a sweep to ``trials`` trials in total, then select on val and write the leaderboard.

    Args:
        recipe: recipe path or name in tasks/.
        space: the space file (vision_peft.sweep_space).
        trials: the study's trial budget (finished trials of an existing study count).
        storage: a SQLAlchemy URL; None = SQLite in the sweep folder.
        study: study name; None = ``<recipe>-<space>``.
        workers: worker processes sharing the storage (1 = this process).
        timeout_min: no new trial starts after this many minutes (running ones finish).
        seed: TPE's seed and every trial's ``train.seed``.
        out: the sweep folder; None = ``runs/sweeps/<study>``.
        device: ``train.device`` of the trials (None: the recipe's).
        posthoc: also evaluate test for each method's best (labelled post hoc).
        progress: a tqdm bar over trials on stderr.
        select: select the best and write the leaderboard at the end.
        heartbeat_s: seconds between heartbeats; a trial silent for 3× this counts as its worker's death.

    Returns:
        {"sweep_dir", "storage", "study", "best" (best.json's content or None), "leaderboard" (csv path or None)}.
    """
    if workers < 1:
        raise SweepError(f"--workers must be positive, got {workers}")
    url, name, sweep_dir = prepare_study(recipe, space, trials, out, storage, study, seed)
    deadline = time.time() + 60 * timeout_min if timeout_min else None
    bar = _bar(trials) if progress else None
    if workers == 1:
        ctx = make_context(url, name, sweep_dir, device, deadline, heartbeat_s)
        if bar is not None:
            bar.n = budget_done(ctx.study)[0]
            bar.refresh()
        run_worker(ctx, bar)
    else:
        _run_workers(url, name, sweep_dir, workers, device, deadline, bar, heartbeat_s)
    if bar is not None:
        bar.close()
    result: dict[str, Any] = {"sweep_dir": str(sweep_dir), "storage": url, "study": name, "best": None,
                              "leaderboard": None}  # fmt: skip
    if select:
        from vision_peft.leaderboard import select_best, write_leaderboard

        st = load_study(url, name)
        try:
            result["best"] = select_best(st, sweep_dir, posthoc, device or "cpu")
        except SweepError as e:
            print(f"warning: {e}", file=sys.stderr)
        result["leaderboard"] = str(write_leaderboard(st, sweep_dir)["csv"])
    return result


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep", unit="trial", file=sys.stderr, dynamic_ncols=True)


def worker_command(
    url: str, name: str, sweep_dir: Path, device: str | None, deadline: float | None, heartbeat_s: int = HEARTBEAT_S
) -> list[str]:
    """The argv of one extra worker process (``python -m vision_peft.sweep --join URL --study NAME``)."""
    cmd = [sys.executable, "-m", "vision_peft.sweep", "--join", url, "--study", name, "--out", str(sweep_dir)]
    cmd += ["--heartbeat", str(heartbeat_s)]
    if device:
        cmd += ["--device", device]
    if deadline:
        cmd += ["--deadline", str(deadline)]
    return cmd + ["--no-progress"]


def _run_workers(url: str, name: str, sweep_dir: Path, k: int, device: str | None, deadline: float | None,
                 bar: Any, heartbeat_s: int = HEARTBEAT_S) -> None:  # fmt: skip
    """Start ``k`` worker processes on the storage and wait for them (the bar follows the study)."""
    procs = [subprocess.Popen(worker_command(url, name, sweep_dir, device, deadline, heartbeat_s), env=_child_env(),
                              preexec_fn=_die_with_parent) for _ in range(k)]  # fmt: skip
    st = load_study(url, name)
    try:
        while any(p.poll() is None for p in procs):
            if bar is not None:
                done, total = budget_done(st)
                bar.total, bar.n = total, done
                bar.refresh()
            time.sleep(1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        print(f"warning: {len(bad)} of {k} workers exited with codes {bad}", file=sys.stderr)


# -- command line (vision_peft.sweep_cli: the arguments and the handler, importing no optuna) -------------------
def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``sweep`` for ``python -m vision_peft``; the handler is :func:`cli_main` (set as ``func``)."""
    return sweep_cli.add_sweep_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m vision_peft.sweep …``: the ``sweep`` command on its own (how a sweep starts its extra workers)."""
    p = argparse.ArgumentParser(prog="python -m vision_peft.sweep", description=__doc__.splitlines()[0])
    sweep_cli.sweep_arguments(p)
    args = p.parse_args(argv)
    try:
        return cli_main(args)
    except (ValueError, LookupError, FileNotFoundError) as e:  # SweepError, SpaceError, ConfigError: user errors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
