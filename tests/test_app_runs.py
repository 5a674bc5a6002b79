"""The Runs tab and the Start form without a browser: rows of real tiny CLI runs, a sweep trial and damaged
directories; the states derived from the files, a live process and the job list; the overlaid curves; the Start
form showing (and training) exactly the recipe; the command that reproduces an app run."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.runs_tab import curve_figure, curves, keep_selection, run_colours, summarise_all, table  # noqa: E402

RECIPE = "classification-tiny"
REPO = Path(__file__).resolve().parents[1]


def cli_train(runs_root: Path, name: str, *overrides: str) -> Path:
    """A real tiny run through ``python -m vision_peft train`` (a point per step for the curves)."""
    cmd = [sys.executable, "-m", "vision_peft", "train", str(REPO / "tasks" / f"{RECIPE}.yaml"), "--no-progress",
           f"--output.runs_root={runs_root}", f"--output.name={name}", "--train.log_every=1", *overrides]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return runs_root / name


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def last_eval(run: Path, split: str) -> dict:
    return [r for r in records(run) if r.get("split") == split][-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, aid_root: Path) -> dict[str, Path]:
    """Two real runs, a sweep trial (a real run's files in ``sweeps/<name>/trials/0``, pruned), an interrupted run and
    damaged folders, all in one runs root."""
    root = tmp_path_factory.mktemp("runs") / "runs"
    a = cli_train(root, "tiny-a")
    b = cli_train(root, "tiny-b", "--train.lr=0.005", "--train.epochs=3")
    sweep = root / "sweeps" / "s"
    shutil.copytree(a, sweep / "trials" / "0")
    shutil.copy(REPO / "tasks" / f"{RECIPE}.yaml", sweep / "recipe.yaml")
    (sweep / "trials" / "0" / "sweep_trial.json").write_text(json.dumps({"state": "pruned", "reason": "pruner"}))
    cut = shutil.copytree(b, root / "cut")
    (cut / "final_metrics.json").unlink()  # killed before the end: no final metrics, nothing writes it
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # a line cut short
    (root / "bad-json").mkdir()
    shutil.copy(a / "metrics.jsonl", root / "bad-json")
    (root / "bad-json" / "config.json").write_text('{"format": "vision_peft.run/1", "config": ')
    (root / "bad-bytes").mkdir()
    shutil.copy(a / "config.json", root / "bad-bytes")
    (root / "bad-bytes" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (root / "no-config").mkdir()
    (root / "wrong-type").mkdir()
    (root / "wrong-type" / "config.json").write_text("[1, 2]")
    return {"root": root, "a": a, "b": b, "trial": sweep / "trials" / "0", "cut": cut}


def _rows(root: Path, jobs=()) -> dict:
    return {r.name: r for r in summarise_all(root, list(jobs))}


def test_rows_of_real_runs_match_their_files(runs) -> None:
    rows = _rows(runs["root"])
    for name in ("tiny-a", "tiny-b"):
        run, r = runs[name[-1]], rows[name]
        cfg = json.loads((run / "config.json").read_text())
        final = json.loads((run / "final_metrics.json").read_text())
        assert (r.task, r.backbone, r.adapter) == (cfg["config"]["task"]["name"], cfg["backbone"]["spec"],
                                                   cfg["config"]["adapter"]["name"])  # fmt: skip
        assert (r.trainable, r.trainable_no_head) == (cfg["parameters"]["trainable"],
                                                      cfg["parameters"]["trainable_no_head"])  # fmt: skip
        assert r.trainable > r.trainable_no_head > 0  # the head is trained too
        metric = next(k for k in last_eval(run, "val") if k not in ("step", "split"))
        assert r.metric == metric
        assert r.val == last_eval(run, "val")[metric] and r.test == last_eval(run, "test")[metric]
        assert r.duration == final["timing"]["train_seconds"] and r.state == "done"
    df = table(list(rows.values()))
    assert list(df["run"]).count("tiny-a") == 1 and df.shape[1] == 11
    row = df[df["run"] == "tiny-b"].iloc[0]
    assert row["trainable"] == rows["tiny-b"].trainable and row["state"] == "done"


def test_sweep_trial_interrupted_and_damaged_dirs_get_honest_rows(runs) -> None:
    rows = _rows(runs["root"])
    trial = rows["sweeps/s/trials/0"]
    assert trial.state == "pruned" and trial.val == last_eval(runs["trial"], "val")[trial.metric]
    assert "sweeps" not in rows and "sweeps/s" not in rows  # a sweep folder is not a run
    cut = rows["cut"]
    assert cut.state == "interrupted" and cut.val == last_eval(runs["b"], "val")[cut.metric]
    assert cut.duration is not None and cut.duration >= 0  # config.json's write to the last step record
    assert (
        rows["bad-json"].state.startswith("unreadable: ") and "config.json is not valid JSON" in rows["bad-json"].state
    )
    assert rows["bad-bytes"].state.startswith("unreadable: metrics.jsonl")
    assert rows["bad-bytes"].task == "classification"  # what could be read is still shown
    assert rows["no-config"].state.startswith("unreadable: no config.json")
    assert rows["wrong-type"].state.startswith("unreadable: ") and "JSON object" in rows["wrong-type"].state


def test_a_live_process_holding_train_log_is_running_and_job_states_win(runs, tmp_path: Path) -> None:
    from app.jobs import Job

    cut = runs["cut"]
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys,time; f=open({str(cut / 'train.log')!r}, 'a'); print(1, flush=True); "
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "1"
        r = _rows(runs["root"])["cut"]
        assert r.state == "running" and r.active
        assert r.duration >= time.time() - (cut / "config.json").stat().st_mtime - 5  # measured to now
    finally:
        holder.kill()
        holder.wait()
    assert _rows(runs["root"])["cut"].state == "interrupted"
    queued = Job("q-1", "classification", "cpu", str(tmp_path / "q.yaml"), str(runs["root"] / "q-1"), ["python"])
    stopped = Job("cut", "classification", "cpu", "", str(cut), ["python"], status="stopped")
    rows = _rows(runs["root"], [queued, stopped])
    assert rows["q-1"].state == "queued" and rows["cut"].state == "stopped"
    assert keep_selection(["gone", "tiny-a"], list(rows.values())) == ["tiny-a"]
    assert keep_selection([], list(rows.values())) == ["q-1"]  # nothing kept: the active runs


def test_curves_overlay_one_run_per_colour(runs) -> None:
    rows = list(summarise_all(runs["root"]))
    loss, metric, name = curves(rows, ["tiny-a", "tiny-b", "bad-json"])
    for key in ("a", "b"):
        recs = records(runs[key])
        steps = [r["step"] for r in recs if "split" not in r]
        vals = [r for r in recs if r.get("split") == "val"]
        assert list(loss[loss["run"] == f"tiny-{key}"]["step"]) == steps and len(steps) > 2
        assert list(metric[metric["run"] == f"tiny-{key}"]["value"]) == [r[name] for r in vals]
    assert set(loss["run"]) == {"tiny-a", "tiny-b"}  # the unreadable run adds no curve
    fig = curve_figure(rows, ["tiny-a", "tiny-b"])
    for ax in fig.axes:  # both panels: one line per run, each its own colour, named in the legend
        assert [ln.get_label() for ln in ax.lines] == ["tiny-a", "tiny-b"]
        assert ax.lines[0].get_color() != ax.lines[1].get_color()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tiny-a", "tiny-b"]
    assert curve_figure(rows, []) is None and len(set(map(str, run_colours(25)))) == 25


# -- through the served app -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(runs):
    from gradio_client import Client

    from app.main import AppState, build_app

    state = AppState(runs["root"], runs["root"].parent / "uploads")
    demo = build_app(state)
    demo.queue()
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield Client(demo.local_url, verbose=False), state
    demo.close()
    state.jobs.close()


def test_runs_endpoints(client, runs) -> None:
    c, _ = client
    grid, pick, figure, summary, *_ = c.predict(api_name="/runs_refresh")
    names = [row[0] for row in grid["data"]]
    assert {"tiny-a", "tiny-b", "sweeps/s/trials/0", "bad-json"} <= set(names)
    assert "unreadable" in summary and "done" in summary
    figure, chosen = c.predict(["tiny-a", "tiny-b"], api_name="/runs_curves")
    assert chosen == ["tiny-a", "tiny-b"] and figure["type"] == "matplotlib" and figure["plot"]


def test_start_form_shows_and_trains_exactly_the_recipe(client, runs) -> None:
    from app.main import recipe_form
    from vision_peft.recipe import build_run_config, find_recipe

    c, state = client
    raw = yaml.safe_load(find_recipe(RECIPE).read_text())
    want = {"backbone": raw["backbone"]["name"], "adapter": raw["adapter"]["name"], "epochs": raw["train"]["epochs"],
            "batch_size": raw["train"]["batch_size"], "lr": raw["train"]["lr"], "device": raw["train"]["device"]}  # fmt: skip
    form = recipe_form(RECIPE, ["cpu"])
    assert {k: form[k] for k in want} == want and form["max_steps"] is None  # the recipe sets no cap
    assert recipe_form(RECIPE, ["cpu", "cuda:0"])["device"] == "cpu"  # the recipe asks for cpu
    shown = c.predict(RECIPE, api_name="/classification_recipe")
    values = [v["value"] if isinstance(v, dict) else v for v in shown]
    assert values == [form[k] for k in ("backbone", "adapter", "device", "epochs", "batch_size", "lr", "max_steps")]
    # Start with the form as shown: the run trains exactly the recipe (logging every step aside)
    job, command = c.predict(RECIPE, *values, "", api_name="/classification_start")
    job_id = job if isinstance(job, str) else job["value"]
    deadline = time.time() + 600
    while state.jobs.get(job_id).status not in ("done", "failed", "stopped") and time.time() < deadline:
        time.sleep(0.3)
    j = state.jobs.get(job_id)
    assert j.status == "done", state.jobs.progress(job_id)["log"]
    trained = json.loads((Path(j.run_dir) / "config.json").read_text())["config"]
    recipe = build_run_config({**raw, "output": {}}).to_dict()
    for section in ("task", "backbone", "adapter"):
        assert trained[section] == recipe[section], section
    assert {k: v for k, v in trained["train"].items() if k != "log_every"} == {
        k: v for k, v in recipe["train"].items() if k != "log_every"
    }
    # the command that reproduces it: the run's own recipe.yaml once train wrote it (else the app's recipe file)
    written = Path(j.run_dir) / "recipe.yaml"
    target = written if written.is_file() else Path(j.recipe)
    assert j.command_line == shlex.join(["python", "-m", "vision_peft", "train", str(target)])
    assert shlex.split(j.command_line)[-1] == str(target) and target.is_file()
    if written.is_file():  # written by train (merged with the recipe-writing branch): it resolves to the same run
        again = build_run_config({**yaml.safe_load(written.read_text()), "output": {}}).to_dict()
        assert all(again[s] == trained[s] for s in ("task", "backbone", "adapter"))
    assert _rows(runs["root"], state.jobs.list())[job_id].state == "done"
