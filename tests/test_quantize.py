"""Static int8 / fp16 bundle graphs (vision_peft.quantize through export_run and the CLI) on a tiny AID run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vision_peft import quantize
from vision_peft.cli import main as cli_main


@pytest.fixture(scope="module")
def qrun(tmp_path_factory, aid_root):
    """(run dir, manifest) of a seconds-long classification run exported with static int8 and fp16."""
    from vision_peft.export import export_run
    from vision_peft.recipe import load_recipe
    from vision_peft.train import run

    root = tmp_path_factory.mktemp("quant")
    cfg = load_recipe("classification-tiny", {"output": {"runs_root": str(root), "name": "run"}})
    run_dir = run(cfg, progress=False)
    return run_dir, export_run(run_dir, run_dir / "bundle", int8="static", fp16=True, calib=8)


def test_static_int8_agrees_with_fp32_on_calibration_like_inputs(qrun) -> None:
    from vision_peft.predict import load_run

    run_dir, man = qrun
    assert {"model", "model_int8_static", "model_fp16"} <= set(man["graphs"])
    entry = man["graphs"]["model_int8_static"]
    assert entry["variant_of"] == "model" and entry["file"] in man["files"]
    _, task, model, _ = load_run(run_dir, "cpu")
    x, files = quantize.calibration_images(task, model, 6, seed=1)  # train images, preprocessed as at deploy
    assert x.shape[0] == 6 and len(set(files)) == 6
    ref = quantize.session(run_dir / "bundle" / "model.onnx").run(None, {"image": x})[0]
    got = quantize.session(run_dir / "bundle" / entry["file"]).run(None, {"image": x})[0]
    # tolerance: int8 activations step ~ range/255 per layer; stated as 0.25 of the logits' range
    assert np.abs(ref - got).max() <= 0.25 * (ref.max() - ref.min())
    # top-1 must agree wherever fp32's top-2 margin exceeds twice the error (a random-init model has near ties)
    top2 = np.sort(ref, 1)[:, -2:]
    sure = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(ref - got).max(1)
    assert (ref.argmax(1) == got.argmax(1))[sure].all()


def test_variant_reports_are_consistent(qrun) -> None:
    _, man = qrun
    for key in ("int8_static", "fp16"):
        rep = man["parity"][key]
        for b in ("batch1", "batch8"):
            lat = rep["latency"][b]
            assert lat["fp32_ms"] > 0 and lat[f"{key}_ms"] > 0
            assert lat["ratio"] == pytest.approx(lat[f"{key}_ms"] / lat["fp32_ms"])
        assert rep["metric_change"]["top1"] == pytest.approx(rep[key]["top1"] - rep["fp32"]["top1"])
        assert rep["fp32"]["n"] == rep[key]["n"] > 0 and 0 <= rep["prediction_agreement"] <= 1
        assert rep[f"bytes_{key}"] < rep["bytes_fp32"]
    assert man["parity"]["int8_static"]["calibration"]["images"] == 8
    fp16 = man["parity"]["fp16"]["parity"]
    assert fp16["passed"] and fp16["max_abs_diff"] <= quantize.FP16_ATOL + quantize.FP16_RTOL * fp16["max_abs_ref"]


def test_deploy_runs_a_variant(qrun) -> None:
    from vision_peft.deploy import load_bundle

    run_dir, _ = qrun
    b = load_bundle(run_dir / "bundle", device="cpu")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    base = b.run("model", image=x)["logits"]
    b.use_graph("model_fp16")
    assert b.sessions["model"] is b.sessions["model_fp16"]
    assert np.abs(b.run("model", image=x)["logits"] - base).max() < 0.05
    with pytest.raises(ValueError, match="--graph 'nope'"):
        b.use_graph("nope")


def test_bare_int8_is_dynamic_and_old_bundle_loads(qrun, tmp_path, capsys) -> None:
    from vision_peft.cli import build_parser
    from vision_peft.deploy import load_bundle

    assert build_parser().parse_args(["export", "r", "--int8"]).int8 == "dynamic"
    assert build_parser().parse_args(["export", "r", "--int8", "static"]).int8 == "static"
    run_dir, _ = qrun
    assert cli_main(["export", str(run_dir), "--bundle", str(tmp_path / "b8"), "--int8"]) == 0
    rep = json.loads(capsys.readouterr().out)["int8"]
    assert rep["method"] == "onnxruntime quantize_dynamic QInt8"
    assert rep["metric_change"]["top1"] == pytest.approx(rep["int8_top1"] - rep["fp32_top1"])
    man = json.loads((tmp_path / "b8" / "manifest.json").read_text())
    assert set(man["graphs"]) == {"model", "model_int8"}
    # a bundle as exported before variants existed: no variant_of, no int8_static/fp16 reports
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "b8", old)
    m = json.loads((old / "manifest.json").read_text())
    m["graphs"]["model_int8"].pop("variant_of")
    (old / "manifest.json").write_text(json.dumps(m))
    b = load_bundle(old, device="cpu")
    assert set(b.sessions) == {"model", "model_int8"}
    assert b.run("model_int8", image=np.zeros((1, 3, 64, 64), np.float32))["logits"].shape == (1, 3)


def test_bad_options_name_the_fix(qrun, capsys) -> None:
    run_dir, _ = qrun
    assert cli_main(["export", str(run_dir), "--int8", "static", "--calib", "0"]) == 2
    assert "--calib must be a positive" in capsys.readouterr().err
    assert cli_main(["export", str(run_dir), "--int8", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "--int8 mode 'bogus'" in err and "dynamic, static" in err
    with pytest.raises(quantize.QuantizeError, match="calibration method"):
        quantize.check_options("static", False, 8, "median")


def test_static_int8_without_train_images_is_refused() -> None:
    class NoData:
        name = "pointcloud"

        def splits(self):
            return {"train": [(np.zeros((4, 3)), 0)]}

    with pytest.raises(quantize.QuantizeError, match="--int8 static.*use --int8 dynamic"):
        quantize.calibration_images(NoData(), None, 4, seed=0)
