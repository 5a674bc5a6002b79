"""Sweeps on a real PostgreSQL server (issue 19): two workers of one study from two `sweep` commands, a worker killed
mid-trial, an unreachable server, a study of another recipe. The server is Debian's postgresql, started here on a
free loopback port with a throw-away data directory (the SQLite variants are in test_sweep.py).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from optuna.trial import TrialState
from test_sweep import _env, _recipe, _space

from vision_peft import rundir
from vision_peft.leaderboard import CSV_FILE
from vision_peft.sweep import STATE_FILE, SweepError, budget_done, load_study, prepare_study
from vision_peft.sweep import main as sweep_main

USER, DB = "vp", "vp_sweep"
# one method, so two workers drawing from equally seeded samplers would show up as duplicate parameter sets
LORA = """\
adapter.name: [lora]
lora: {adapter.r: [2, 4], train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
fixed: {train.epochs: 1, train.ckpt_every: 100}
pruner: none
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    """(SQLAlchemy URL with a password, the password) of a fresh server; stopped and removed at teardown."""
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    assert initdbs, "no PostgreSQL server (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql (.ci/run does)"
    bindir = Path(initdbs[-1]).parent
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: the `postgres` system user (made by Debian's package) runs it
        pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="vp-pg-"))  # not under pytest's root-only tmp dirs: the server user enters it
    data, password = root / "data", secrets.token_hex(8)
    try:
        (root / "pw").write_text(password)
        if as_user:
            shutil.chown(root, "postgres")
            shutil.chown(root / "pw", "postgres")
        run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True, text=True)  # noqa: E731
        run(bindir / "initdb", "-D", data, "-U", USER, f"--pwfile={root / 'pw'}", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions")  # fmt: skip
        port = _free_port()
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off"
        try:
            run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", opts, "-w", "-t", "30", "start")
        except subprocess.CalledProcessError as e:
            log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
            pytest.fail(f"the PostgreSQL server did not start: {e.stderr}{log[-2000:]}", pytrace=False)
        with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=password, dbname="postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute(f"CREATE DATABASE {DB}")
        yield f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{port}/{DB}", password
    finally:
        if (data / "postmaster.pid").is_file():
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def _cli(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vision_peft", "sweep", *args, "--no-progress"], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait(what: str, cond, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a worker ended while waiting for {what}: {p.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _done(p: subprocess.Popen, timeout: float = 180) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out


def test_two_workers_share_one_postgres_study(server: tuple[str, str], tmp_path: Path, aid_root: Path) -> None:
    url, password = server
    recipe, space, out = _recipe(tmp_path, log_every=1), _space(tmp_path, LORA), tmp_path / "sweep"
    budget, slow = 4, {"VISION_PEFT_STEP_DELAY": "0.5"}  # a trial outlasts the second worker's start
    main = _cli(str(recipe), "--space", str(space), "--trials", str(budget), "--storage", url, "--study", "two",
                "--out", str(out), "--no-posthoc", **slow)  # fmt: skip
    _wait("the study", (out / "space.yaml").is_file, [main])  # written once the study is on the server
    join = _cli("--join", url, "--study", "two", **slow)  # its sweep folder comes from the study
    joined, printed = json.loads(_done(join)), _done(main)
    trials = load_study(url, "two").get_trials()

    # the budget exactly, each trial trained once in its own run directory, no parameter set twice, none lost
    assert [t.state for t in trials] == [TrialState.COMPLETE] * budget
    assert sorted(int(p.name) for p in (out / "trials").iterdir()) == [t.number for t in trials]
    assert [Path(t.user_attrs["run_dir"]) for t in trials] == [(out / "trials" / str(t.number)).resolve()
                                                                 for t in trials]  # fmt: skip
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert (run / "train.log").read_text().count("run directory:") == 1
        assert json.loads((run / STATE_FILE).read_text())["state"] == "complete"
        assert t.value == json.loads((run / rundir.FINAL_FILE).read_text())["val"]["top1"]
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == budget, f"a parameter set ran twice: {params}"
    assert len({t.user_attrs["pid"] for t in trials}) == budget
    per_worker = collections.Counter(t.user_attrs["worker_pid"] for t in trials)
    assert set(per_worker) == {main.pid, join.pid} and joined["trials_run"] == per_worker[join.pid], per_worker
    assert budget_done(load_study(url, "two")) == (budget, budget)

    # the sweep selected on the server's study and wrote its leaderboard; the printed storage hides the password
    assert len((out / CSV_FILE).read_text().splitlines()) == 1 + budget
    assert json.loads(printed)["storage"] == url.replace(password, "***") and password not in printed


def test_killed_worker_trial_fails_and_is_retried_by_the_other(
    server: tuple[str, str], tmp_path: Path, aid_root: Path
) -> None:
    url, _ = server
    recipe, space, out = _recipe(tmp_path, log_every=1), _space(tmp_path, LORA), tmp_path / "sweep"
    beat = ("--heartbeat", "3")  # a silent trial is stale after 9 s (1 s flaked on a loaded 2-core box)
    doomed = _cli(str(recipe), "--space", str(space), "--trials", "2", "--storage", url, "--study", "kill", "--out",
                  str(out), *beat, VISION_PEFT_STEP_DELAY="10")  # fmt: skip  (trial 0 outlasts the join on a busy box)
    metrics = out / "trials" / "0" / rundir.METRICS_FILE
    _wait("trial 0's first metrics", lambda: metrics.is_file() and metrics.read_text().strip(), [doomed])
    other = _cli("--join", url, "--study", "kill", *beat)
    _wait("the second worker's trial", lambda: "worker_pid" in load_study(url, "kill").trials[1].user_attrs,
          [doomed, other])  # fmt: skip
    assert load_study(url, "kill").trials[0].state == TrialState.RUNNING, "trial 0 ended before the kill"
    doomed.send_signal(signal.SIGKILL)  # mid-trial 0
    doomed.communicate()
    ran = json.loads(_done(other))["trials_run"]

    trials = load_study(url, "kill").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].user_attrs["worker_pid"] == doomed.pid
    assert {t.user_attrs["worker_pid"] for t in trials[1:]} == {other.pid} and ran == 2
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == trials[0].params
    assert [read["state"] for read in (json.loads((out / "trials" / str(n) / STATE_FILE).read_text())
                                        for n in range(3))] == ["failed", "complete", "complete"]  # fmt: skip
    assert budget_done(load_study(url, "kill")) == (2, 2)  # 2 counted + 1 retried failure = 3 trials: none lost


def test_unreachable_or_refused_server_fails_fast_naming_the_url(
    server: tuple[str, str], tmp_path: Path, aid_root: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    url, password = server
    recipe, space = _recipe(tmp_path), _space(tmp_path, LORA)
    closed = f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{_free_port()}/{DB}"
    for argv in ([str(recipe), "--space", str(space), "--trials", "1", "--storage", closed], ["--join", closed,
                                                                                             "--study", "s"]):  # fmt: skip
        t0 = time.time()
        assert sweep_main([*argv, "--out", str(tmp_path / "sweep"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert time.time() - t0 < 15, "an unreachable server must fail fast"
        assert err.count("\n") == 1 and err.startswith(f"error: storage {closed.replace(password, '***')} "), err
        assert "Connection refused" in err and "start the server" in err and password not in err, err
    wrong = url.replace(f":{password}@", ":not-the-password@")
    with pytest.raises(SweepError, match="password authentication failed") as e:
        load_study(wrong, "s")
    assert "not-the-password" not in str(e.value) and "fix the host, port, user, password" in str(e.value)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # the driver not installed
    with pytest.raises(SweepError, match=r'driver is missing .*pip install "vision_peft\[postgres\]"') as e:
        load_study(url, "s")
    assert password not in str(e.value)


def test_study_of_another_recipe_on_the_server_is_refused(
    server: tuple[str, str], tmp_path: Path, aid_root: Path
) -> None:
    url, password = server
    recipe, space = _recipe(tmp_path), _space(tmp_path, LORA)
    bare = url.replace("postgresql+psycopg://", "postgresql://")  # a URL without a driver uses psycopg 3 too
    prepare_study(recipe, space, trials=2, sweep_dir=tmp_path / "a", storage=bare, study="mine")
    with pytest.raises(SweepError, match=f"belongs to recipe '{recipe}'") as e:
        prepare_study(_recipe(tmp_path, "other.yaml", lr=5e-3), space, 2, tmp_path / "b", storage=url, study="mine")
    assert password not in str(e.value)
    assert len(load_study(url, "mine").get_trials()) == 2  # only the queued trials: nothing added by the refusal
