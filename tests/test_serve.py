"""The HTTP server over a bundle: endpoints, input validation, survival after bad requests, no torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from vision_peft.deploy import load_bundle
from vision_peft.serve import ServeLimits, create_app

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client(tiny_cls_bundle):
    _, bundle = tiny_cls_bundle
    return TestClient(create_app(bundle, device="cpu", limits=ServeLimits(max_file_bytes=200_000, max_files=4)))


def _img(path: str) -> tuple[str, bytes, str]:
    return (Path(path).name, Path(path).read_bytes(), "image/jpeg")


def test_health_and_info(client, tiny_cls_bundle) -> None:
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["task"] == "classification" and info["labels"] == ["Beach", "Forest", "Port"]
    assert info["providers"] == ["CPUExecutionProvider"]
    assert set(info["graphs"]) == {"model", "model_int8"}


def test_classify_matches_runtime(client, tiny_cls_bundle) -> None:
    run_dir, bundle = tiny_cls_bundle
    files = json.loads((run_dir / "split.json").read_text())["test"][:3]
    r = client.post("/v1/classify", files=[("files", _img(f)) for f in files], params={"top_k": 2})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    want = load_bundle(bundle, device="cpu").classify(files)
    assert [x["label"] for x in res] == [w["label"] for w in want]
    assert np.allclose([x["prob"] for x in res], [w["prob"] for w in want], atol=1e-5)
    assert all(len(x["top"]) == 2 for x in res)


@pytest.mark.parametrize(
    ("files", "params", "status", "fragment"),
    [
        ([("files", ("junk.jpg", b"\x00not an image", "image/jpeg"))], {}, 400, "junk.jpg: not a readable image"),
        ([("files", ("notes.txt", b"hello", "text/plain"))], {}, 415, "notes.txt: content type text/plain"),
        ([("files", ("empty.png", b"", "image/png"))], {}, 400, "empty.png: empty file"),
        ([("files", ("big.jpg", b"\xff" * 300_000, "image/jpeg"))], {}, 413, "big.jpg: larger than"),
        ([("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(5)], {}, 413, "limit is 4"),
        ([("files", ("a.jpg", b"x", "image/jpeg"))], {"top_k": 99}, 422, "top_k must lie in 1..3"),
    ],
)
def test_bad_requests_are_4xx_and_server_survives(client, tiny_cls_bundle, files, params, status, fragment) -> None:
    r = client.post("/v1/classify", files=files, params=params)
    assert r.status_code == status and fragment in r.json()["detail"], r.text
    run_dir, _ = tiny_cls_bundle
    good = json.loads((run_dir / "split.json").read_text())["test"][0]
    assert client.post("/v1/classify", files=[("files", _img(good))]).status_code == 200


def test_missing_field_and_decompression_bomb(client, tiny_cls_bundle) -> None:
    assert client.post("/v1/classify").status_code == 422
    from PIL import Image

    small = TestClient(create_app(tiny_cls_bundle[1], device="cpu", limits=ServeLimits(max_pixels=1000)))
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    r = small.post("/v1/classify", files=[("files", ("huge.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
    assert small.get("/health").json()["errors"] == 1


def test_server_imports_no_torch(tiny_cls_bundle) -> None:
    _, bundle = tiny_cls_bundle
    code = (
        "import sys\n"
        "from vision_peft.serve import create_app\n"
        f"create_app({str(bundle)!r}, device='cpu')\n"
        "assert 'torch' not in sys.modules, 'serve imported torch'\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]


def test_int8_bundle_reports_metric_change(tiny_cls_bundle) -> None:
    _, bundle = tiny_cls_bundle
    man = json.loads((bundle / "manifest.json").read_text())
    q = man["parity"]["int8"]
    assert q["fp32"]["n"] == q["int8"]["n"] == 12
    assert q["metric_change"]["top1"] == pytest.approx(q["int8"]["top1"] - q["fp32"]["top1"])
    assert 0.0 <= q["prediction_agreement"] <= 1.0
    assert q["bytes_int8"] < q["bytes_fp32"]
    b = load_bundle(bundle, device="cpu")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert b.run("model_int8", image=x)["logits"].shape == (2, 3)
    assert json.loads((bundle / "preprocess.json").read_text()) == man["preprocess"]


def test_load_test_survives_malformed_requests(tiny_cls_bundle, aid_root: Path) -> None:
    """bench/load_test.py against a real server process: good requests 200, malformed ones 4xx, server alive."""
    _, bundle = tiny_cls_bundle
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load_test.py"), str(bundle), "--inputs", str(aid_root / "Beach"),
         "--levels", "1", "4", "--requests", "20", "--bad-every", "4", "--threads", "1"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "→ /v1/classify" in res.stdout and "survived malformed requests mid-load: True" in res.stdout
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 4 |")]
    assert len(rows) == 2 and all(r.split("|")[3].strip() == "5 (5)" for r in rows), rows  # every 4th of 20
