"""<run_dir>/recipe.yaml reproduces the run: training from it gives the same resolved config into a new run dir."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import tiny_recipe, write_image_folder

from vision_peft import rundir


def test_recipe_yaml_round_trips_overrides(tmp_path: Path, vp_logging_reset) -> None:
    from vision_peft.cli import main

    data = write_image_folder(tmp_path / "data")
    src = tmp_path / "src.yaml"
    src.write_text(yaml.safe_dump(tiny_recipe(data, tmp_path / "runs1")))
    assert main(["train", str(src), "--train.lr=0.0025", "--no-progress"]) == 0
    first = tmp_path / "runs1" / "tiny"
    recipe = first / rundir.RECIPE_FILE
    assert yaml.safe_load(recipe.read_text())["output"]["name"] is None
    assert main(["train", str(recipe), f"--output.runs_root={tmp_path / 'runs2'}", "--no-progress"]) == 0
    (second,) = (tmp_path / "runs2").iterdir()
    a, b = (json.loads((d / rundir.CONFIG_FILE).read_text())["config"] for d in (first, second))
    assert a["train"]["lr"] == b["train"]["lr"] == 0.0025
    assert {k: v for k, v in a.items() if k != "output"} == {k: v for k, v in b.items() if k != "output"}
    assert main(["train", str(recipe), "--no-progress"]) == 0  # in the same runs root: a new folder, no clobber
    assert len(list((tmp_path / "runs1").iterdir())) == 2 and rundir.is_finished(first)
