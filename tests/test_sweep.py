"""Sweeps (issue 19): space files, Optuna trials as run directories, workers sharing one SQLite study, a killed
worker, selection on val with one test evaluation, the leaderboard. Real AID images through timm's tiny test ViT.

No PostgreSQL test here (the issue's two-worker PostgreSQL test is left for a session that installs the server).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from test_train import tiny_recipe

from vision_peft import rundir
from vision_peft.leaderboard import CSV_FILE, PNG_FILE, pareto_front
from vision_peft.leaderboard import main as leaderboard_main
from vision_peft.sweep import (
    BEST_FILE,
    STATE_FILE,
    SweepError,
    budget_done,
    load_study,
    make_context,
    prepare_study,
    run_sweep,
    run_worker,
)
from vision_peft.sweep import main as sweep_main
from vision_peft.sweep_space import SpaceError, load_space

REPO = Path(__file__).resolve().parent.parent
TWO_METHODS = """\
adapter.name: [linear, lora]
linear: {train.head_lr: [3.0e-3, 1.0e-2]}
lora: {adapter.r: [2, 4], train.lr: {low: 1.0e-3, high: 1.0e-2, log: true}}
fixed: {train.epochs: 1, train.ckpt_every: 100}
pruner: none
"""


def _recipe(tmp: Path, name: str = "tiny-sweep.yaml", **train) -> Path:
    """The tiny real-data recipe, split order kept (train, val, test: the sweep hides the test split)."""
    r = tiny_recipe(tmp / "unused", "unused", epochs=1, **train)
    r["task"]["split"] = {"train": 4, "val": 2, "test": 2}
    r["adapter"] = {"name": "lora", "r": 4, "targets": ["qkv"]}
    path = tmp / name
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def _space(tmp: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _val_top1(run_dir: Path) -> float:
    return json.loads((run_dir / rundir.FINAL_FILE).read_text())["val"]["top1"]


def test_two_workers_share_one_sqlite_study_end_to_end(
    tmp_path: Path, aid_root: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe, space = _recipe(tmp_path), _space(tmp_path, TWO_METHODS)
    out = tmp_path / "sweep"
    res = run_sweep(recipe, space, trials=3, workers=2, out=out, seed=3, progress=False, posthoc=False)
    study = load_study(res["storage"], res["study"])
    trials = study.get_trials()
    # the trial count is exact and no trial ran twice: 3 trials, 3 run directories, each trained once
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1", "2"]
    assert len({t.user_attrs["pid"] for t in trials}) == 3
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2, "both workers should have run trials"
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert (run / "train.log").read_text().count("run directory:") == 1
        assert json.loads((run / STATE_FILE).read_text())["state"] == "complete"
        final = json.loads((run / rundir.FINAL_FILE).read_text())
        assert "test" not in final, "a trial must not evaluate the test split"
        assert rundir.RunInfo.read(run).config["task"]["split"]["test"] == 0
        assert rundir.RunInfo.read(run).config["train"]["final_test"] is False
        assert t.value == final["val"]["top1"]
        assert rundir.RunInfo.read(run).config["train"]["seed"] == 3
    assert [t.user_attrs["method"] for t in trials] == ["linear", "lora", "linear"]  # round robin

    # selection on val only; the test split evaluated once, for the selected best only
    best = json.loads((out / BEST_FILE).read_text())
    vals = {t.number: _val_top1(Path(t.user_attrs["run_dir"])) for t in trials}
    assert vals[best["selected"]["trial"]] == max(vals.values())
    assert best["selected"]["test"]["n"] == 2 * 3  # the recipe's test count restored: 2 per class, 3 classes
    lo, hi = best["selected"]["test"]["top1_ci95"]
    assert lo <= best["selected"]["test"]["top1"] <= hi
    assert [e["trial"] for e in best["test_evaluations"]] == [best["selected"]["trial"]]
    assert "post_hoc" not in best

    # the leaderboard: one row per trial, ranked on val, and a PNG
    with open(out / CSV_FILE) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {int(r["trial"]) for r in rows} == {0, 1, 2}
    ranked = [float(r["val"]) for r in rows]
    assert ranked == sorted(ranked, reverse=True) and int(rows[0]["trial"]) == best["selected"]["trial"]
    png = (out / PNG_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # the same sweep again, with the post-hoc bests: nothing new runs, the best's test is not evaluated again, the
    # other method's best is evaluated once, labelled post hoc
    again = run_sweep(recipe, space, trials=3, out=out, seed=3, progress=False)
    assert len(load_study(again["storage"], again["study"]).get_trials()) == 3
    best2 = json.loads((out / BEST_FILE).read_text())
    per = best2["post_hoc"]["per_method"]
    assert set(per) == {"linear", "lora"} and "post hoc" in best2["post_hoc"]["note"]
    for m, row in per.items():
        assert row["val"] == max(v for n, v in vals.items() if trials[n].user_attrs["method"] == m)
    evaluated = [e["trial"] for e in best2["test_evaluations"]]
    assert evaluated[0] == best["selected"]["trial"] and sorted(evaluated) == sorted(r["trial"] for r in per.values())
    assert all(e["why"].startswith("post hoc") for e in best2["test_evaluations"][1:])

    # the command prints the same leaderboard
    assert leaderboard_main([str(out)]) == 0
    assert capsys.readouterr().out.count("| complete |") == 3


def test_killed_worker_trial_fails_and_is_retried_once(tmp_path: Path, aid_root: Path) -> None:
    recipe = _recipe(tmp_path, log_every=1)
    space = _space(tmp_path, "adapter.name: [lora]\nfixed: {train.epochs: 1, train.ckpt_every: 100}\npruner: none\n")
    url, name, out = prepare_study(recipe, space, trials=1, sweep_dir=tmp_path / "sweep")
    cmd = [sys.executable, "-m", "vision_peft.sweep", "--join", url, "--study", name, "--heartbeat", "1",
           "--no-progress"]  # fmt: skip
    worker = subprocess.Popen(cmd, env=_env(VISION_PEFT_STEP_DELAY="1.5"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = out / "trials" / "0" / rundir.METRICS_FILE
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        assert worker.poll() is None, "the worker ended before its trial started"
        time.sleep(0.3)
    assert metrics.read_text().strip(), "the trial never started"
    study = load_study(url, name)
    child = study.get_trials()[0].user_attrs["pid"]
    worker.send_signal(signal.SIGKILL)  # mid-trial
    worker.wait()
    for _ in range(50):  # the child training dies with its worker
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the killed worker's training process {child} is still running")
    assert study.get_trials()[0].state == TrialState.RUNNING
    time.sleep(3.5)  # past the grace period (3 heartbeats)

    ctx = make_context(url, name, heartbeat_s=1)  # the next worker: fails the stale trial, runs its retry
    assert run_worker(ctx) == 1
    trials = load_study(url, name).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert json.loads((out / "trials" / "0" / STATE_FILE).read_text())["state"] == "failed"
    assert json.loads((out / "trials" / "1" / STATE_FILE).read_text())["state"] == "complete"
    assert budget_done(ctx.study) == (1, 1)  # the retry replaces the dead trial: the budget holds


def test_constraint_stops_a_trial_and_keeps_its_run(
    tmp_path: Path, aid_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISION_PEFT_STEP_DELAY", "0.3")  # every step of the child takes > 0.3 s
    recipe = _recipe(tmp_path, log_every=1)
    space = _space(tmp_path, "fixed: {train.epochs: 3}\nconstraints: {max_step_time: 0.2}\npruner: none\n")
    res = run_sweep(recipe, space, trials=1, out=tmp_path / "sweep", progress=False, select=False)
    t = load_study(res["storage"], res["study"]).get_trials()[0]
    assert t.state == TrialState.PRUNED
    run = Path(t.user_attrs["run_dir"])
    state = json.loads((run / STATE_FILE).read_text())
    assert state["state"] == "stopped" and "max_step_time" in state["reason"]
    assert (run / rundir.CONFIG_FILE).is_file() and not (run / rundir.FINAL_FILE).exists()  # stopped, kept


BAD_SPACES = [
    ("train.lrr: [1.0e-3]\n", "train.lrr"),
    ("adapter.name: [linear, lora]\nadapter.r: [2, 4]\n", "adapter.r"),  # linear has no r: belongs in lora's sub-space
    ("train.lr: []\n", "empty list of choices"),
    ("train.lr: {low: 1.0e-2, high: 1.0e-3}\n", "low=0.01 > high=0.001"),
    ("train.lr: {low: 0.0, high: 1.0e-3, log: true}\n", "log range needs low > 0"),
    ("adapter.name: [lora, lorra]\n", "unknown adapter 'lorra'"),
    ("adapter.name: [lora, point_mlp]\n", "compatible adapters:"),
    ("adapter.name: [lora]\nlora: {adapter.r: [0, 4]}\n", "LoRA rank must be positive"),
    ("adapter.name: [lora]\ndora: {adapter.r: [4]}\n", "which adapter.name does not list"),
    ("learning_rate: [1]\n", "not a dotted config key"),
    ("train.seed: [0, 1]\n", "the sweep sets this"),
    ("adapter.name: [linear, lora]\nconstraints: {max_trainable_params: 10}\n", "no trial of 'linear' can meet"),
    ("constraints: {max_params: 10}\n", "unknown constraint"),
    ("pruner: hyperband\n", "pruner"),
]


@pytest.mark.parametrize(("text", "expect"), BAD_SPACES, ids=[e for _, e in BAD_SPACES])
def test_bad_space_files_fail_naming_file_and_key(tmp_path: Path, aid_root: Path, text: str, expect: str) -> None:
    space = _space(tmp_path, text)
    with pytest.raises(SpaceError) as e:
        load_space(space, _recipe(tmp_path))
    assert str(space) in str(e.value) and expect in str(e.value), str(e.value)


def test_bad_space_from_the_command_starts_no_trial(
    tmp_path: Path, aid_root: Path, capsys: pytest.CaptureFixture
) -> None:
    space = _space(tmp_path, "train.lr: {low: 1.0e-2, high: 1.0e-3}\n")
    out = tmp_path / "sweep"
    rc = sweep_main([str(_recipe(tmp_path)), "--space", str(space), "--trials", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "train.lr" in err and str(space) in err, err
    assert not out.exists()


def test_study_of_another_recipe_or_space_is_refused(tmp_path: Path, aid_root: Path) -> None:
    recipe, space = _recipe(tmp_path), _space(tmp_path, TWO_METHODS)
    url, name, out = prepare_study(recipe, space, trials=2, sweep_dir=tmp_path / "sweep", study="s")
    other = _recipe(tmp_path, "other.yaml", lr=5e-3)
    with pytest.raises(SweepError, match=f"belongs to recipe '{recipe}'"):
        prepare_study(other, space, trials=2, storage=url, study="s")
    with pytest.raises(SweepError, match="another space file"):
        prepare_study(recipe, _space(tmp_path, TWO_METHODS + "# changed\n", "s2.yaml"), 2, storage=url, study="s")
    with pytest.raises(SweepError, match="holds no study 'nope'"):
        load_study(url, "nope")
    with pytest.raises(SweepError, match="cannot be opened"):
        prepare_study(recipe, space, trials=2, storage="nosuchdb://x", study="s")
    assert len(optuna.load_study(study_name="s", storage=url).get_trials()) == 2  # only the queued trials


def test_pareto_front() -> None:
    pts = [(10, 0.5), (20, 0.7), (15, 0.4), (30, 0.7), (5, 0.2)]  # (cost, value)
    assert pareto_front(pts) == [4, 0, 1]
    assert pareto_front([(1, 0.1), (2, 0.3)], maximize=False) == [0]
    assert pareto_front([(1, 0.3), (2, 0.1)], maximize=False) == [0, 1]


def _sample_all(tmp: Path, recipe: Path, space: Path, seed: int) -> list[dict]:
    """Claim and tell every queued trial of a fresh study without training (value: a function of the params)."""
    from vision_peft.sweep import _pop_waiting

    url, name, out = prepare_study(recipe, space, trials=6, sweep_dir=tmp, seed=seed)
    ctx = make_context(url, name)
    got = []
    while (tid := _pop_waiting(ctx.study)) is not None:
        trial = optuna.Trial(ctx.study, tid)
        params = ctx.space.suggest(trial)
        got.append(params)
        ctx.study.tell(trial, float(params.get("train.lr", 0.0)) + float(params.get("adapter.r", 0)))
    return got


def test_same_seed_reproduces_the_trials(tmp_path: Path, aid_root: Path) -> None:
    recipe, space = _recipe(tmp_path), _space(tmp_path, TWO_METHODS)
    a = _sample_all(tmp_path / "a", recipe, space, seed=7)
    b = _sample_all(tmp_path / "b", recipe, space, seed=7)
    c = _sample_all(tmp_path / "c", recipe, space, seed=8)
    assert a == b and a != c
    assert [p["adapter.name"] for p in a] == ["linear", "lora"] * 3  # round robin


def test_add_cli_gives_the_two_sub_commands() -> None:
    import argparse

    from vision_peft import leaderboard, sweep

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sweep.add_cli(sub)
    leaderboard.add_cli(sub)
    a = p.parse_args(["sweep", "classification-aid", "--space", "s.yaml", "--trials", "3", "--workers", "2"])
    assert (a.func, a.recipe, a.trials, a.workers) == (sweep.cli_main, "classification-aid", 3, 2)
    b = p.parse_args(["leaderboard", "--storage", "sqlite:///x.db", "--study", "s"])
    assert (b.func, b.storage, b.study) == (leaderboard.cli_main, "sqlite:///x.db", "s")


def test_stopped_worker_stops_its_trial_and_queues_a_retry(tmp_path: Path, aid_root: Path) -> None:
    recipe = _recipe(tmp_path, log_every=1)
    space = _space(tmp_path, "adapter.name: [lora]\nfixed: {train.epochs: 1, train.ckpt_every: 100}\npruner: none\n")
    url, name, out = prepare_study(recipe, space, trials=1, sweep_dir=tmp_path / "sweep")
    cmd = [sys.executable, "-m", "vision_peft.sweep", "--join", url, "--study", name, "--no-progress"]
    worker = subprocess.Popen(cmd, env=_env(VISION_PEFT_STEP_DELAY="1.5"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    study, deadline = load_study(url, name), time.time() + 120
    while "pid" not in study.get_trials()[0].user_attrs and time.time() < deadline:  # its child has started
        assert worker.poll() is None, "the worker ended before its trial started"
        time.sleep(0.3)
    worker.send_signal(signal.SIGTERM)  # e.g. `timeout` ending a sweep
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 130 and "interrupted" in err, err[-2000:]
    trials = load_study(url, name).get_trials()
    with pytest.raises(ProcessLookupError):  # its training process group was stopped
        os.kill(trials[0].user_attrs["pid"], 0)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert json.loads((out / "trials" / "0" / STATE_FILE).read_text())["state"] == "failed"


PET_FAMILY = ("flora", "hut", "capaboost", "adalora", "moment_probing", "moment_probing_plus", "lst")


def test_aid_pet_family_space_loads_and_every_configuration_builds() -> None:
    """tasks/sweeps/aid-pet-family.yaml (bench/sweep_aid.py --space): the PET family next to lora and linear on
    classification-aid; every method compatible with the recipe, every structural combination an adapter that
    applies to the recipe's backbone (random weights; the adapters' own checks against the backbone run)."""
    import dataclasses
    import itertools

    from vision_peft.sweep_space import compatible, recipe_data, trial_config
    from vision_peft.tasks.base import build_adapted_backbone

    path = Path(__file__).resolve().parent.parent / "tasks" / "sweeps" / "aid-pet-family.yaml"
    space = load_space(path, "classification-aid")  # preflight on
    _, rdata = recipe_data("classification-aid")
    base = trial_config(rdata, space.fixed)
    assert set(PET_FAMILY) | {"lora", "linear"} == set(space.methods)
    assert base.train.epochs == 1
    assert all(p.key.startswith("train.") for p in space.common)
    for m in space.methods:
        assert compatible(m, base.backbone.name, base.task.name), m
        structural = [p for p in space.conditional[m] if not p.key.startswith("train.")]
        for combo in itertools.product(*[[(p.key, v) for v in p.choices] for p in structural]):
            cfg = trial_config(rdata, {**space.fixed, "adapter.name": m, **dict(combo)})
            cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=False, weights=None))
            backbone, _, _ = build_adapted_backbone(cfg)  # a combination the backbone refuses fails here
            trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
            assert (trainable == 0) == (m == "linear"), (m, combo, trainable)


CLAIMER = """
import json, sys, time
from pathlib import Path
from vision_peft.sweep import _pop_waiting, make_context
ctx = make_context(sys.argv[1], sys.argv[2])
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
got = []
while (tid := _pop_waiting(ctx.study)) is not None:
    got.append(tid)
print(json.dumps(got))
"""


def test_workers_racing_for_trials_never_claim_one_twice(tmp_path: Path, aid_root: Path) -> None:
    """Four processes claim the queue of one SQLite study at the same moment: every trial is claimed exactly once
    (SQLite ignores optuna's SELECT … FOR UPDATE; before the claim lock a CI run trained one trial twice)."""
    recipe, space = _recipe(tmp_path), _space(tmp_path, TWO_METHODS)
    url, name, _ = prepare_study(recipe, space, trials=40, sweep_dir=tmp_path / "sweep", seed=0)
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, url, name, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]  # fmt: skip
    time.sleep(4.0)  # every child has imported optuna and opened the study
    go.touch()
    claims = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        claims.append(json.loads(out.strip().splitlines()[-1]))
    flat = [t for c in claims for t in c]
    assert len(flat) == len(set(flat)) == 40, [len(c) for c in claims]
    study = load_study(url, name)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 40
