"""The app's Sweeps tab without a browser: the generated space file, a real tiny sweep on classification-tiny (real
AID images, timm's test ViT), its leaderboard and Pareto plot, Export best, Stop, and re-attach from a new AppState."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.sweep_jobs import LOG, SPACE_IN  # noqa: E402
from app.sweeps_tab import (  # noqa: E402
    build_space,
    default_search,
    form_of,
    manager,
    methods_for,
    recipe_facts,
    size_choices,
    start_sweep,
    sweepable_recipes,
    view,
)

REPO = Path(__file__).resolve().parent.parent
RECIPE = "classification-tiny"


def _state(root: Path):
    from app.main import AppState

    return AppState(root / "runs", root / "uploads")


def _wait(state, sid: str, statuses=("done", "failed", "stopped"), timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = manager(state).get(sid).status
        if s in statuses:
            return s
        time.sleep(0.3)
    raise AssertionError(f"sweep {sid} still {manager(state).get(sid).status}: {manager(state).get(sid).log_tail()}")


def test_methods_and_space_agree_with_the_cli_checks(tmp_path: Path) -> None:
    from vision_peft.sweep_space import compatible, load_space

    rdata, backbone, task = recipe_facts(RECIPE)
    offered = methods_for(RECIPE)
    assert "lora" in offered and "point_ffn" not in offered
    assert all(compatible(m, backbone, task) for m in offered)
    space = tmp_path / "space.yaml"
    space.write_text(build_space(rdata, offered, epochs=1, max_steps=2))
    loaded = load_space(space, RECIPE)  # every offered method with its default search is a valid CLI space
    assert loaded.methods == offered and loaded.fixed == {"train.epochs": 1, "train.max_steps": 2}
    lora = {p.key: p for p in loaded.conditional["lora"]}
    assert rdata["adapter"]["r"] in lora["adapter.r"].choices
    assert lora["train.lr"].low < rdata["train"]["lr"] < lora["train.lr"].high


@pytest.mark.parametrize(
    ("methods", "kw", "match"),
    [
        ([], {}, "tick at least one method"),
        (["point_ffn"], {}, "point_ffn cannot adapt backbone 'timm:test_vit'"),
        (["lora"], {"trials": 0}, "trials must be a whole number ≥ 1"),
        (["lora"], {"workers": 0}, "workers must be"),
        (["lora"], {"minutes": -1}, "minutes must be ≥ 0"),
        (["lora"], {"data": "../../etc"}, "outside"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(tmp_path: Path, methods, kw, match) -> None:
    state = _state(tmp_path)
    args = {"data": "", "trials": 2, "minutes": 0, "workers": 1} | kw
    with pytest.raises(Exception, match=match):
        start_sweep(state, RECIPE, args["data"], methods, args["trials"], args["minutes"], "cpu", args["workers"])
    assert manager(state).list() == []
    state.jobs.close()


def test_tiny_sweep_fills_the_leaderboard_exports_the_best_and_reattaches(tmp_path: Path) -> None:
    state = _state(tmp_path)
    sw = start_sweep(state, RECIPE, "aid", ["linear", "lora"], 2, 0, "cpu", 1, epochs=1, max_steps=2)
    assert "vision_peft sweep" in sw.command_line and f"--space {Path(sw.sweep_dir) / SPACE_IN}" in sw.command_line
    assert _wait(state, sw.id) == "done", manager(state).get(sw.id).log_tail(40)
    v = view(state, sw.id)
    assert list(v["table"]["state"]) == ["complete", "complete"]
    assert sorted(v["table"]["method"]) == ["linear", "lora"]
    assert v["png"] and Path(v["png"]).stat().st_size > 0 and "done, trials 2 / 2" in v["html"]
    # the CLI reads the same sweep folder (the shown command's files are real)
    res = subprocess.run([sys.executable, "-m", "vision_peft", "leaderboard", sw.sweep_dir], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)  # fmt: skip
    assert res.returncode == 0 and "lora" in res.stdout and "linear" in res.stdout, res.stderr
    # export the best trial (best.json's selection) as a bundle
    from app.sweep_jobs import export_best
    from app.sweeps_tab import best_run

    run = best_run(state, sw.id)
    assert run.parent == Path(sw.sweep_dir) / "trials" and (run / "adapter.safetensors").is_file()
    archive, report = export_best(run, dict(os.environ, PYTHONPATH=str(REPO)))
    with zipfile.ZipFile(archive) as zf:
        assert {"model.onnx", "manifest.json"} <= set(zf.namelist())
    assert report["max_abs_diff"] < 1e-4
    # a new app process (new AppState) re-attaches: the sweep is listed and selected, still done
    manager(state).close()
    other = _state(tmp_path)
    assert manager(other).current() == sw.id and manager(other).get(sw.id).status == "done"
    # … with the form it was started from (what a reload puts back into the page)
    assert form_of(manager(other).get(sw.id)) == {
        "recipe": RECIPE, "data": "aid", "methods": ["linear", "lora"], "trials": 2, "minutes": 0, "device": "cpu",
        "workers": 1, "epochs": 1, "max_steps": 2,
    }  # fmt: skip
    for s in (state, other):
        s.jobs.close()
    manager(other).close()


def test_stop_reattach_and_a_sweep_that_died_while_the_app_was_away(tmp_path: Path) -> None:
    import optuna

    from app.jobs import _alive

    state = _state(tmp_path)
    manager(state).env["VISION_PEFT_STEP_DELAY"] = "1.0"  # slow trials: there is a running one to stop
    sw = start_sweep(state, RECIPE, "", ["lora"], 3, 0, "cpu", 1, epochs=1, max_steps=20)
    deadline = time.time() + 240
    while not (Path(sw.sweep_dir) / "trials" / "0" / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.3)
    assert manager(state).get(sw.id).status == "running", manager(state).get(sw.id).log_tail(40)
    # a page reload / app restart: a new AppState re-attaches to the running sweep
    manager(state).close()
    other = _state(tmp_path)
    mgr = manager(other)
    assert mgr.current() == sw.id and mgr.get(sw.id).status == "running"
    assert "re-attached" in mgr.get(sw.id).message
    pid = mgr.get(sw.id).pid
    stopped = mgr.stop(sw.id)
    assert stopped.status == "stopped" and not _alive(pid)
    study = optuna.load_study(study_name=sw.id, storage=stopped.storage)
    states = [t.state for t in study.get_trials()]
    # the sweep's interruption policy: the running trial failed, one retry queued with its parameters
    assert optuna.trial.TrialState.FAIL in states and optuna.trial.TrialState.WAITING in states
    assert "failed" in list(view(other, sw.id)["table"]["state"])
    # a sweep whose process dies while no app watches shows failed, with its log
    mgr.env["VISION_PEFT_STEP_DELAY"] = "1.0"
    gone = start_sweep(other, RECIPE, "", ["lora"], 2, 0, "cpu", 1, epochs=1, max_steps=20)
    mgr.close()  # the app is away: nobody reaps it
    time.sleep(1.0)
    os.killpg(gone.pid, signal.SIGKILL)
    while _alive(gone.pid):
        time.sleep(0.1)
    third = _state(tmp_path)
    failed = manager(third).get(gone.id)
    assert failed.status == "failed" and "ended while the app was not running" in failed.message
    assert (Path(gone.sweep_dir) / LOG).is_file() and failed.message in failed.log_tail()
    for s in (state, other, third):
        s.jobs.close()
    manager(third).close()


def test_the_app_builds_with_the_sweeps_tab(tmp_path: Path) -> None:
    """build_app wires every Sweeps handler (a keyword the installed gradio does not know fails here, not in use)."""
    from app.main import build_app

    state = _state(tmp_path)
    demo = build_app(state)
    names = {getattr(fn, "api_name", None) for fn in demo.fns.values()}
    assert {"sweeps_start", "sweeps_stop", "sweeps_export", "sweeps_reattach"} <= names
    state.jobs.close()
    manager(state).close()


NEEDS_A_FILE = {"fish": "fisher_file"}  # offered methods that cannot build without a file the tab cannot make


def _structural_combos(loaded, method: str) -> list[dict]:
    import itertools

    params = [p for p in loaded.conditional[method] if not p.key.startswith("train.")]
    return [dict(c) for c in itertools.product(*[[(p.key, v) for v in p.choices] for p in params])]


@pytest.mark.parametrize("recipe", sweepable_recipes())
def test_every_offered_method_gets_a_default_search_that_validates(tmp_path: Path, recipe: str) -> None:
    """Generated over the registries: every method the tab offers for every sweepable recipe gets a sub-space that
    load_space accepts, and every combination of its size choices is a config the recipe resolution accepts (the
    joint rules, e.g. AdaLoRA's target_r <= init_r, are not checked pairwise by load_space)."""
    from vision_peft.sweep_space import load_space, trial_config

    rdata, _, _ = recipe_facts(recipe)
    offered = methods_for(recipe)
    space = tmp_path / "space.yaml"
    space.write_text(build_space(rdata, offered, epochs=1))
    loaded = load_space(space, recipe, preflight=False)
    assert loaded.methods == offered
    for m in offered:
        assert {p.key for p in loaded.conditional[m]} == set(default_search(m, rdata)), m
        for combo in _structural_combos(loaded, m):
            trial_config(rdata, {**loaded.fixed, "adapter.name": m, **combo})  # raises ConfigError on a bad pair


PET_FAMILY = ["flora", "hut", "capaboost", "adalora", "moment_probing", "moment_probing_plus", "lst"]


@pytest.mark.parametrize(
    ("recipe", "only"), [("classification-tiny", None), ("fewshot-aid-1shot", ["lora", *PET_FAMILY])]
)
def test_default_searches_build_on_the_backbone(tmp_path: Path, recipe: str, only: list[str] | None) -> None:
    """Every combination of size choices and targets of the offered methods (all on the tiny ViT; LoRA and the PET
    family on EfficientNet-Lite0) builds a model on the recipe's backbone (random weights): Moment Probing's
    hidden_dim stays within the feature width (64 on the tiny ViT, below the 512 default), a pad leaves an image at
    64², LST's reduction divides every tapped width, methods with targets get groups the backbone has when the recipe
    names none (fewshot-aid-1shot: prompt_map)."""
    from vision_peft.sweep_space import count_trainable, load_space, trial_config

    rdata, _, _ = recipe_facts(recipe)
    offered = [m for m in methods_for(recipe) if only is None or m in only]
    assert only is None or offered == [m for m in methods_for(recipe) if m in only] and len(offered) == len(only)
    space = tmp_path / "space.yaml"
    space.write_text(build_space(rdata, offered, epochs=1))
    loaded = load_space(space, recipe, preflight=False)
    for m in offered:
        for combo in _structural_combos(loaded, m):
            cfg = trial_config(rdata, {**loaded.fixed, "adapter.name": m, **combo})
            if m in NEEDS_A_FILE:  # known gap: the tab has no way to give it its file (reported, not hidden)
                with pytest.raises(ValueError, match=NEEDS_A_FILE[m]):
                    count_trainable(cfg)
                continue
            counts = count_trainable(cfg)
            assert counts["trainable"] > 0, (m, combo)


def test_size_choices_respect_joint_rules_and_the_width() -> None:
    from vision_peft.adapters.adalora import AdaLoRAConfig
    from vision_peft.adapters.moment_probing import MomentProbingConfig

    init_r = 6
    got = size_choices(AdaLoRAConfig, {"init_r": init_r, "target_r": 4}, width=1024)
    assert got["target_r"] and all(v <= init_r for v in got["target_r"]) and 4 in got["target_r"]
    width = 48
    mp = size_choices(MomentProbingConfig, {"heads": 4}, width=width)["hidden_dim"]
    assert mp and all(7 * 4 <= v <= width and v % 4 == 0 for v in mp)


def test_a_bad_combination_is_refused_naming_the_key(tmp_path: Path) -> None:
    """The generated AdaLoRA sub-space with a target_r above init_r added by hand: load_space names the key."""
    from vision_peft.adapters.adalora import AdaLoRAConfig
    from vision_peft.sweep_space import SpaceError, load_space

    recipe = "classification-aid"
    rdata, _, _ = recipe_facts(recipe)
    data = yaml.safe_load(build_space(rdata, ["adalora"], epochs=1))
    assert "adapter.init_r" not in data["adalora"]  # the tab searches target_r below the default init_r
    init_r = AdaLoRAConfig().init_r
    assert all(v <= init_r for v in data["adalora"]["adapter.target_r"])
    data["adalora"]["adapter.target_r"] = [*data["adalora"]["adapter.target_r"], init_r + 4]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpaceError, match=rf"adalora: adapter\.target_r.*target_r={init_r + 4}.*init_r={init_r}"):
        load_space(space, recipe, preflight=False)


def test_a_sweep_recorded_before_the_form_was_kept_reads_it_back_from_its_command_and_space(tmp_path: Path) -> None:
    """Old ``.app_sweeps.json`` records have no ``form``: it is read back from the command line and the space file."""
    import json


    d = tmp_path / "runs" / "sweeps" / "old"
    d.mkdir(parents=True)
    rdata = recipe_facts(RECIPE)[0]
    (d / SPACE_IN).write_text(build_space(rdata, ["lora", "linear"], epochs=3, max_steps=7))
    cmd = [sys.executable, "-m", "vision_peft", "sweep", str(d / "app_recipe.yaml"), "--space", str(d / SPACE_IN),
           "--trials", "5", "--study", "old", "--out", str(d), "--workers", "2", "--device", "cpu", "--no-progress",
           "--timeout", "12.5"]  # fmt: skip
    old = {"id": "old", "recipe": RECIPE, "sweep_dir": str(d), "cmd": cmd, "trials": 5, "status": "done"}
    (tmp_path / "runs" / ".app_sweeps.json").write_text(json.dumps([old]))
    state = _state(tmp_path)
    sw = manager(state).get("old")
    assert sw.form == {}
    assert form_of(sw) == {"recipe": RECIPE, "data": "", "methods": ["lora", "linear"], "trials": 5, "minutes": 12.5,
                           "device": "cpu", "workers": 2, "epochs": 3, "max_steps": 7}  # fmt: skip
    (d / SPACE_IN).write_text("adapter.name: [unclosed")  # an unreadable space: the methods are not guessed
    assert form_of(sw)["methods"] == [] and form_of(sw)["trials"] == 5
    state.jobs.close()
    manager(state).close()
