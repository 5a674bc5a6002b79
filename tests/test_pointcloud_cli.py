"""Point clouds: train → predict → export through the CLI on real ModelNet10 files, then the bundle through
onnxruntime, the torch-free runtime and the HTTP server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vision_peft.data.points import preprocess_points, read_points


# -- end to end through the CLI on real ModelNet10 files ---------------------------------------------------------
def cli(capsys, *args: str) -> str:
    """Run ``python -m vision_peft <args>`` in-process (same code path, no interpreter start-up); returns stdout."""
    from vision_peft.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    assert rc == 0, f"{args}: {out.err[-3000:]}"
    return out.out


def test_train_predict_export_on_modelnet10(
    tmp_path: Path, data_root: Path, weights_root: Path, capsys, vp_logging_reset, torch_free
) -> None:
    src = data_root / "modelnet10"
    classes = ["chair", "monitor", "toilet"]
    data = tmp_path / "mn10"
    for c in classes:  # a few real shapes per class (links), so the run takes seconds
        for split, n in (("train", 3), ("test", 2)):
            (data / c / split).mkdir(parents=True)
            for f in sorted((src / c / split).glob("*.pcd"))[:n]:
                (data / c / split / f.name).symlink_to(f)
    runs = tmp_path / "runs"
    cli(
        capsys,
        "train",
        "pointcloud-modelnet10",
        f"--task.data_root={data}",
        "--task.shots=2",
        "--task.num_points=256",
        f"--output.runs_root={runs}",
        "--output.name=pc",
        "--train.epochs=1",
        "--train.max_steps=2",
        "--train.batch_size=4",
        "--train.device=cpu",
        "--no-progress",
    )
    run = runs / "pc"
    info = json.loads((run / "config.json").read_text())
    assert info["task_state"]["classes"] == classes and info["task_state"]["text_backbone"]["spec"] == "minilm"
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 6 and len(split["test"]) == 6
    from vision_peft.checkpoint import load_tensors

    keys = set(load_tensors(run / "adapter.safetensors"))
    assert keys == {"prompt.ctx", "head.weight", "logit_scale"} | {
        f"backbone.feature_adapters.0.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    }
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["test"]["n"] == 6

    files = split["test"][:2]
    preds = [json.loads(ln) for ln in cli(capsys, "predict", str(run), *files).splitlines()]
    assert [p["file"] for p in preds] == files and all(p["label"] in classes for p in preds)
    assert all(abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4 for p in preds)

    rep = json.loads(cli(capsys, "export", str(run), "--bundle", str(tmp_path / "bundle")))
    assert rep["max_abs_diff"] < 1e-4 and all(e["logits_top1_agreement"] == 1.0 for e in rep["per_batch"])
    rep8 = json.loads(cli(capsys, "export", str(run), "--bundle", str(tmp_path / "bundle8"), "--int8"))["int8"]
    assert rep8["fp32_top1"] == pytest.approx(final["test"]["top1"])  # the fp32 graph scores what torch scored
    assert rep8["metric_change"]["top1"] == pytest.approx(rep8["int8_top1"] - rep8["fp32_top1"])
    assert 0 <= rep8["prediction_agreement"] <= 1 and rep8["bytes_int8"] < rep8["bytes_fp32"]  # quantised = smaller
    man = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert man["labels"] == classes and man["graphs"]["model"]["inputs"]["points"]["shape"] == ["batch", 256, 3]
    pre = man["preprocess"]["points"]
    assert pre["num_points"] == 256 and pre["up_axis"]["rule"] == "swap_yz"
    assert pre["sampling"]["rule"] == "random" and pre["normalize"]["rule"] == "center_unit_sphere"

    # the bundle alone (onnxruntime + numpy + our documented preprocessing) reproduces the torch prediction
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = preprocess_points(read_points(files[0]), 256, "random", "swap_yz", np.random.default_rng(0))
    logits = sess.run(["logits"], {"points": x[None]})[0][0]
    assert man["labels"][int(logits.argmax())] == preds[0]["label"]

    # the torch-free runtime reads the files itself and matches torch's predict
    from vision_peft.deploy import load_bundle

    got = load_bundle(tmp_path / "bundle", device="cpu").classify_points(files)
    for g, p in zip(got, preds, strict=True):
        assert g["label"] == p["label"] and abs(g["prob"] - p["prob"]) < 1e-4
    out = torch_free(
        f"""
        from vision_peft.deploy import main
        assert main([{str(tmp_path / "bundle")!r}, *{files!r}, "--device", "cpu"]) == 0
        """
    )
    assert [json.loads(x)["label"] for x in out.splitlines()[:2]] == [p["label"] for p in preds]

    # the HTTP server's point endpoint: same answer; bad files are 4xx naming the upload; other endpoints 409
    from fastapi.testclient import TestClient

    from vision_peft.serve import create_app

    client = TestClient(create_app(tmp_path / "bundle", device="cpu"))
    r = client.post("/v1/points", files=[("files", (Path(f).name, Path(f).read_bytes())) for f in files])
    assert r.status_code == 200, r.text
    assert [x["label"] for x in r.json()["results"]] == [p["label"] for p in preds]
    r = client.post("/v1/points", files=[("files", ("broken.off", b"OFF\n3 1 0\n0 0 nan\n1 1 1\n"))])
    assert r.status_code == 422 and "broken.off" in r.json()["detail"]
    r = client.post("/v1/points", files=[("files", ("cloud.xyz", b"0 0 0\n"))])
    assert r.status_code == 415 and "cloud.xyz" in r.json()["detail"]
    r = client.post("/v1/classify", files=[("files", ("a.png", b"x", "image/png"))])
    assert r.status_code == 409 and "/v1/points" in r.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"
