"""End to end through the CLI on real AID images: train → eval → predict → export → torch-free deploy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vision_peft.rundir import RunInfo

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-m", "vision_peft", *args], env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert res.returncode == 0, f"{args}: {res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, aid_root: Path) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    res = cli("train", "classification-tiny", f"--output.runs_root={root}", "--output.name=run", "--no-progress")
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    assert run_dir == root / "run"
    return run_dir


def test_eval_matches_final_metrics(tiny_run: Path) -> None:
    from vision_peft.recipe import load_recipe

    task = load_recipe("classification-tiny").task
    n_test = task.split["test"] * len(task.classes)  # the stratified split takes this many per class
    out = json.loads(cli("eval", str(tiny_run), "--split", "test", "--device", "cpu").stdout)
    final = json.loads((tiny_run / "final_metrics.json").read_text())
    assert out["n"] == final["test"]["n"] == n_test
    assert out["top1"] == pytest.approx(final["test"]["top1"])


def test_predict_export_deploy_agree(tiny_run: Path, aid_root: Path) -> None:
    split = json.loads((tiny_run / "split.json").read_text())
    images = split["test"][:4]
    preds = [json.loads(ln) for ln in cli("predict", str(tiny_run), *images).stdout.splitlines()]
    classes = RunInfo.read(tiny_run).classes
    assert [p["file"] for p in preds] == images and all(p["label"] in classes for p in preds)

    bundle = tiny_run / "bundle"
    rep = json.loads(cli("export", str(tiny_run), "--bundle", str(bundle)).stdout)
    assert rep["max_abs_diff"] < 1e-4
    assert [e["batch"] for e in rep["per_batch"]] == [1, 3]
    assert all(e["logits_top1_agreement"] == 1.0 for e in rep["per_batch"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "vision_peft.bundle/1" and manifest["labels"] == classes
    assert manifest["preprocess"]["image"]["size"] == [64, 64]
    assert set(manifest["files"]) >= {"model.onnx", "parity.json"}

    # the deploy runtime, in a fresh interpreter that must never import torch
    code = (
        "import json, sys\n"
        "import vision_peft.deploy as d\n"
        f"b = d.load_bundle({str(bundle)!r}, device='cpu', strict=True)\n"
        f"out = b.classify({images!r})\n"
        "assert 'torch' not in sys.modules, 'deploy imported torch'\n"
        "print(json.dumps({'providers': b.providers, 'out': out}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["providers"] == ["CPUExecutionProvider"]
    for p, g in zip(preds, got["out"]):
        assert g["label"] == p["label"]
        assert g["prob"] == pytest.approx(p["prob"], abs=1e-4)


def test_export_refuses_failed_parity(tiny_run: Path) -> None:
    """A zero tolerance cannot be met by float arithmetic: the export must refuse and write nothing."""
    from vision_peft.export import ExportError, export_run

    out = tiny_run / "strict-bundle"
    with pytest.raises(ExportError, match="disagrees"):
        export_run(tiny_run, out, atol=0.0, rtol=0.0)
    assert not out.exists()
    assert not [p for p in tiny_run.iterdir() if p.name.startswith(".export-")]


def test_list_reads_the_registries() -> None:
    out = cli("list", "adapters").stdout
    from vision_peft.adapters import ADAPTERS

    assert [ln.split()[0] for ln in out.splitlines()] == ADAPTERS.names()


def test_resume_flag_rejects_overrides(tiny_run: Path) -> None:
    res = cli("train", "--resume", str(tiny_run), "--train.lr=1", check=False)
    assert res.returncode == 2 and "give no recipe or overrides" in res.stderr


def test_final_test_false_never_touches_test(tmp_path: Path, aid_root: Path, tiny_run: Path) -> None:
    res = cli("train", "classification-tiny", f"--output.runs_root={tmp_path}", "--output.name=nt",
              "--train.final_test=false", "--no-progress")  # fmt: skip
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert "val" in final and "test" not in final
    assert all(json.loads(ln).get("split") != "test" for ln in (run_dir / "metrics.jsonl").read_text().splitlines())
    # the same seed and recipe: val equals the run that did evaluate test; test is still there to evaluate once
    assert final["val"] == json.loads((tiny_run / "final_metrics.json").read_text())["val"]
    out = json.loads(cli("eval", str(run_dir), "--split", "test", "--device", "cpu").stdout)
    assert out["n"] == json.loads((tiny_run / "final_metrics.json").read_text())["test"]["n"]
