"""The CLI imports what a command needs and nothing heavier: ``--help``, ``list``, ``eval``, ``predict`` and
``export`` never load optuna, sqlalchemy, matplotlib, gradio or TensorBoard; ``sweep`` and ``leaderboard`` load
optuna when they run (their parsers do not); ``train`` loads TensorBoard only when the run writes events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe, write_image_folder

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("optuna", "sqlalchemy", "matplotlib", "gradio", "tensorboard", "torch.utils.tensorboard")
WRAPPER = """
import json, sys
from vision_peft.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:  # --help and argparse errors
    rc = e.code
heavy = json.loads(sys.argv[2])
loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))
print("\\nMODULES " + json.dumps({"rc": rc, "loaded": loaded}))
"""


def _cli(argv: list[str], timeout: float = 300) -> tuple[int, set[str], str]:
    """Run ``vision_peft.cli.main(argv)`` in a fresh interpreter: (exit code, heavy packages loaded, output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(argv), json.dumps(HEAVY)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    line = next((ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("MODULES ")), None)
    assert line is not None, f"{argv} died before reporting its modules:\n{res.stderr[-3000:]}"
    rep = json.loads(line[len("MODULES ") :])
    heavy = {h for h in HEAVY for m in rep["loaded"] if m == h or m.startswith(h + ".")}
    return rep["rc"], heavy, res.stdout + res.stderr


def _image(run_dir: Path) -> Path:
    """One image of the data the session's tiny run trained on (conftest.tiny_run: <base>/data, <base>/runs/tiny)."""
    return next(p for p in sorted((run_dir.parents[1] / "data").rglob("*")) if p.suffix in (".png", ".jpg"))


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["train", "--help"]], ids=" ".join)
def test_light_commands_import_nothing_heavy(argv: list[str]) -> None:
    rc, heavy, out = _cli(argv)
    assert rc == 0, out[-3000:]
    assert not heavy, f"`python -m vision_peft {' '.join(argv)}` imported {sorted(heavy)}"


@pytest.mark.parametrize("cmd", ["eval", "predict", "export"])
def test_run_commands_import_nothing_heavy(cmd: str, tiny_run: Path, tmp_path: Path) -> None:
    argv = {
        "eval": ["eval", str(tiny_run), "--split", "val"],
        "predict": ["predict", str(tiny_run), str(_image(tiny_run)), "--top-k", "2"],
        "export": ["export", str(tiny_run), "--bundle", str(tmp_path / "bundle")],
    }[cmd]
    rc, heavy, out = _cli(argv)
    assert rc == 0, out[-3000:]
    assert not heavy, f"`python -m vision_peft {cmd}` imported {sorted(heavy)}"
    if cmd == "export":
        assert (tmp_path / "bundle" / "manifest.json").is_file()


def test_sweep_and_leaderboard_help_still_work_without_optuna() -> None:
    for sub, flag in (("sweep", "--space"), ("leaderboard", "--storage")):
        rc, heavy, out = _cli([sub, "--help"])
        assert rc == 0 and flag in out, out[-3000:]
        assert not heavy, f"`{sub} --help` imported {sorted(heavy)}"


def test_leaderboard_loads_optuna_when_it_runs(tmp_path: Path) -> None:
    """The detector sees optuna when a command does need it: a leaderboard of a folder without a study."""
    rc, heavy, out = _cli(["leaderboard", str(tmp_path)])
    assert rc == 2 and f"{tmp_path} holds no study.db" in out, out[-3000:]
    assert {"optuna", "sqlalchemy"} <= heavy, heavy


@pytest.mark.parametrize("tensorboard", [False, True])
def test_train_imports_tensorboard_only_when_it_writes_events(tensorboard: bool, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(data, tmp_path / "runs")))
    rc, heavy, out = _cli(["train", str(recipe), f"--train.tensorboard={str(tensorboard).lower()}", "--no-progress"])
    assert rc == 0, out[-3000:]
    events = list((tmp_path / "runs" / "tiny" / "tensorboard").glob("events.out.tfevents.*"))
    assert bool(events) is tensorboard, events
    assert ("tensorboard" in heavy) is tensorboard, f"train.tensorboard={tensorboard}: loaded {sorted(heavy)}"
    assert not heavy - {"tensorboard", "torch.utils.tensorboard"}, f"train imported {sorted(heavy)}"
