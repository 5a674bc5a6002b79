"""The HTTP server over an adapter pack: the per-request ``adapter`` query parameter, /info, adding and removing
adapters at run time (validation of uploads), and requests for different adapters interleaved under concurrency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import build_tiny_pack
from vision_peft.deploy import load_bundle
from vision_peft.serve import ServeLimits, create_app

REPO = Path(__file__).resolve().parent.parent
# three pack runs with their own class names and counts (so every answer says whose labels it carries), and one
# more run of the same backbone that joins the pack at run time
RUNS = {"a": ("alpha", "beta", "gamma"), "b": ("delta", "epsilon"), "c": ("f1", "f2", "f3", "f4")}
EXTRA = ("g1", "g2", "g3")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """(pack dir, merged bundle dir of run a, {name: run dir}, (extra .onnx_adapter, extra .adapter.json), images):
    a pack of 3 tiny runs (timm:test_vit 32², LoRA r=2, 2 steps), exported once per module."""
    root = tmp_path_factory.mktemp("serve-pack")
    runs, rec = build_tiny_pack(root, RUNS, EXTRA)
    extra = (root / "extra" / "d.onnx_adapter", root / "extra" / "d.adapter.json")
    assert rec["name"] == "d"
    images = sorted(p for p in (root / "data-a").rglob("*") if p.suffix in (".jpg", ".png"))[:4]
    return root / "pack", root / "merged", runs, extra, images


def _files(images) -> list:
    return [("files", (p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg")) for p in images]


def _client(pack_dir, **limits) -> TestClient:
    return TestClient(create_app(pack_dir, device="cpu", limits=ServeLimits(**limits)))


def _upload(path: Path, meta, name: str | None = None, file_name: str | None = None) -> dict:
    meta_bytes = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    data = path if isinstance(path, bytes) else path.read_bytes()
    out = {"files": {"file": (file_name or "x.onnx_adapter", data, "application/octet-stream"),
                     "meta": ("x.adapter.json", meta_bytes, "application/json")}}  # fmt: skip
    if name is not None:
        out["data"] = {"name": name}
    return out


def test_info_lists_adapters(pack) -> None:
    pack_dir, _, runs, _, _ = pack
    info = _client(pack_dir).get("/info").json()
    assert info["pack"] is True and info["task"] == "classification"
    assert [a["name"] for a in info["adapters"]] == sorted(RUNS)
    for a in info["adapters"]:
        assert a["labels"] == list(RUNS[a["name"]]) and a["n_labels"] == len(RUNS[a["name"]])
        assert a["source_run"] == str(runs[a["name"]].resolve())
        assert a["bytes"] == (pack_dir / f"{a['name']}.onnx_adapter").stat().st_size
        assert a["origin"] == "bundle"
    assert info["labels"] == []  # several adapters: no one label list for the server
    listed = _client(pack_dir).get("/v1/adapters").json()
    assert listed["pack"] is True and listed["adapters"] == info["adapters"]


def test_each_adapter_answers_with_its_labels_and_probabilities(pack) -> None:
    pack_dir, _, _, _, images = pack
    client, ref = _client(pack_dir), load_bundle(pack_dir, device="cpu")
    for name, classes in RUNS.items():
        r = client.post("/v1/classify", files=_files(images), params={"adapter": name, "top_k": len(classes)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == name
        want = ref.classify([str(p) for p in images], adapter=name)
        for got, w in zip(body["results"], want, strict=True):
            assert {t["label"] for t in got["top"]} == set(classes)
            assert got["label"] == w["label"]
            assert np.allclose([t["prob"] for t in got["top"]], [w["probs"][t["label"]] for t in got["top"]], atol=1e-5)


def test_unknown_and_missing_adapter(pack) -> None:
    pack_dir, merged, _, _, images = pack
    client = _client(pack_dir)
    r = client.post("/v1/classify", files=_files(images[:1]), params={"adapter": "nope"})
    assert r.status_code == 404 and all(n in r.json()["detail"] for n in ["'nope'", *RUNS]), r.text
    r = client.post("/v1/classify", files=_files(images[:1]))
    assert r.status_code == 422 and "pass one as the 'adapter' query parameter" in r.json()["detail"], r.text
    one = _client(merged)
    r = one.post("/v1/classify", files=_files(images[:1]), params={"adapter": "a"})
    assert r.status_code == 400 and "merged" in r.json()["detail"], r.text
    r = one.post("/v1/classify", files=_files(images[:1]))
    assert r.status_code == 200 and "adapter" not in r.json()  # merged bundles answer as before
    info = one.get("/info").json()
    assert info["pack"] is False and info["adapters"] == [] and info["labels"] == list(RUNS["a"])
    assert client.get("/health").json()["status"] == "ok"


def test_single_adapter_pack_needs_no_name(pack, tmp_path) -> None:
    """A pack of one adapter answers without the field (its /info labels are that adapter's)."""
    pack_dir, _, _, _, images = pack
    client = _client(pack_dir)
    assert client.delete("/v1/adapters/b").status_code == 200
    assert client.delete("/v1/adapters/c").status_code == 200
    assert client.get("/info").json()["labels"] == list(RUNS["a"])
    r = client.post("/v1/classify", files=_files(images[:1]))
    assert r.status_code == 200 and r.json()["adapter"] == "a", r.text


def test_posted_adapter_is_usable_at_once_and_delete(pack) -> None:
    pack_dir, _, runs, (tensor_file, meta_file), images = pack
    client = _client(pack_dir)
    meta = json.loads(meta_file.read_text())
    r = client.post("/v1/adapters", **_upload(tensor_file, meta))
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["name"] == "d" and rec["labels"] == list(EXTRA) and rec["origin"] == "uploaded"
    assert rec["bytes"] == tensor_file.stat().st_size and rec["source_run"] == str(runs["d"].resolve())
    assert [a["name"] for a in client.get("/info").json()["adapters"]] == [*sorted(RUNS), "d"]
    r = client.post("/v1/classify", files=_files(images), params={"adapter": "d", "top_k": 3})
    assert r.status_code == 200 and r.json()["adapter"] == "d", r.text
    ref = load_bundle(pack_dir, device="cpu")
    ref.add_adapter(tensor_file, meta_file)
    want = ref.classify([str(p) for p in images], adapter="d")
    got = r.json()["results"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert np.allclose([g["prob"] for g in got], [w["prob"] for w in want], atol=1e-5)
    # the same pair again under its own name is a clash, under another name a second adapter
    assert client.post("/v1/adapters", **_upload(tensor_file, meta)).status_code == 409
    assert client.post("/v1/adapters", **_upload(tensor_file, meta, name="d2")).status_code == 201
    # the stored upload lives under the server's own folder, under a generated name
    store = client.app.state.adapter_store
    assert all(p.parent == store.folder and p.name != tensor_file.name for p in store.uploaded.values())
    stored = store.uploaded["d"]
    r = client.delete("/v1/adapters/d")
    assert r.status_code == 200 and "d" not in r.json()["adapters"], r.text
    assert not stored.exists()
    r = client.post("/v1/classify", files=_files(images[:1]), params={"adapter": "d"})
    assert r.status_code == 404 and "known adapters" in r.json()["detail"]
    assert client.delete("/v1/adapters/d").status_code == 404


def test_delete_down_to_the_last_adapter(pack) -> None:
    pack_dir, _, _, _, images = pack
    client = _client(pack_dir)
    assert client.delete("/v1/adapters/zzz").status_code == 404
    for name in ("a", "b"):
        assert client.delete(f"/v1/adapters/{name}").status_code == 200
    r = client.delete("/v1/adapters/c")
    assert r.status_code == 409 and "last adapter" in r.json()["detail"], r.text
    r = client.post("/v1/classify", files=_files(images[:1]), params={"adapter": "c"})
    assert r.status_code == 200 and r.json()["adapter"] == "c"


def _meta_variant(meta: dict, kind: str) -> dict:
    if kind == "hash":
        return {**meta, "backbone_weights_id": "0" * 64}
    if kind == "labels":
        return {**meta, "labels": ["g1", "g2"]}  # the head has 3 rows
    if kind == "format":
        return {k: v for k, v in meta.items() if k != "format"}
    return meta


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("garbage_file", 415, "file (garbage.onnx_adapter)"),
        ("too_large", 413, "file (x.onnx_adapter): larger than"),
        ("meta_not_json", 415, "meta (x.adapter.json): not a JSON adapter record"),
        ("meta_not_a_record", 415, "is not 'vision_peft.adapter/1'"),
        ("other_backbone_hash", 422, "backbone_weights_id"),
        ("labels_vs_head", 422, "classes but the record lists 2 labels"),
        ("name_slash", 400, "form field 'name'"),
        ("name_dotdot", 400, "form field 'name'"),
        ("empty_file", 400, "file (x.onnx_adapter): empty file"),
    ],
)
def test_bad_uploads_are_4xx_and_server_survives(pack, case, status, fragment) -> None:
    pack_dir, _, _, (tensor_file, meta_file), images = pack
    client = _client(pack_dir, max_adapter_bytes=tensor_file.stat().st_size - 1 if case == "too_large" else 2**20)
    meta = json.loads(meta_file.read_text())
    upload = {
        "garbage_file": lambda: _upload(os.urandom(4096), meta, file_name="garbage.onnx_adapter"),
        "too_large": lambda: _upload(tensor_file, meta),
        "meta_not_json": lambda: _upload(tensor_file, b"{not json"),
        "meta_not_a_record": lambda: _upload(tensor_file, _meta_variant(meta, "format")),
        "other_backbone_hash": lambda: _upload(tensor_file, _meta_variant(meta, "hash")),
        "labels_vs_head": lambda: _upload(tensor_file, _meta_variant(meta, "labels")),
        "name_slash": lambda: _upload(tensor_file, meta, name="x/y"),
        "name_dotdot": lambda: _upload(tensor_file, meta, name="..evil"),
        "empty_file": lambda: _upload(b"", meta),
    }[case]()
    r = client.post("/v1/adapters", **upload)
    assert r.status_code == status and fragment in r.json()["detail"], r.text
    assert client.get("/health").json()["status"] == "ok"
    assert [a["name"] for a in client.get("/info").json()["adapters"]] == sorted(RUNS)
    store = client.app.state.adapter_store
    assert store.uploaded == {} and (store.folder is None or not any(store.folder.iterdir()))  # nothing left behind
    assert client.post("/v1/classify", files=_files(images[:1]), params={"adapter": "a"}).status_code == 200


def test_adapter_count_limit(pack) -> None:
    pack_dir, _, _, (tensor_file, meta_file), _ = pack
    client = _client(pack_dir, max_adapters=len(RUNS))
    r = client.post("/v1/adapters", **_upload(tensor_file, json.loads(meta_file.read_text())))
    assert r.status_code == 409 and "max_adapters" in r.json()["detail"], r.text
    assert client.delete("/v1/adapters/a").status_code == 200
    assert client.post("/v1/adapters", **_upload(tensor_file, json.loads(meta_file.read_text()))).status_code == 201


def test_adapters_cannot_change_on_a_merged_bundle(pack) -> None:
    _, merged, _, (tensor_file, meta_file), _ = pack
    client = _client(merged)
    r = client.post("/v1/adapters", **_upload(tensor_file, json.loads(meta_file.read_text())))
    assert r.status_code == 409 and "merged" in r.json()["detail"], r.text
    assert client.delete("/v1/adapters/a").status_code == 409


def test_concurrent_requests_over_adapters_while_one_is_added_and_one_removed(pack) -> None:
    """Threads request a, b, c and d while d is added and b removed: no 5xx; every 200 carries the adapter asked
    for and that adapter's probabilities; a, c always answer; b and d answer 200 or 404 (before / after)."""
    pack_dir, _, _, (tensor_file, meta_file), images = pack
    ref = load_bundle(pack_dir, device="cpu")
    ref.add_adapter(tensor_file, meta_file)
    files = [str(images[0])]
    want = {n: ref.classify(files, adapter=n)[0]["probs"] for n in [*RUNS, "d"]}
    labels = {**RUNS, "d": EXTRA}
    client = _client(pack_dir)
    answers: list[tuple[str, int, dict]] = []
    lock = threading.Lock()
    start = threading.Barrier(5)

    def worker(k: int) -> None:
        start.wait()
        for i in range(12):
            name = "abcd"[(k + i) % 4]
            r = client.post("/v1/classify", files=_files(images[:1]), params={"adapter": name, "top_k": 2})
            with lock:
                answers.append((name, r.status_code, r.json()))

    def admin() -> None:
        start.wait()
        r1 = client.post("/v1/adapters", **_upload(tensor_file, json.loads(meta_file.read_text())))
        r2 = client.delete("/v1/adapters/b")
        with lock:
            answers.append(("admin", r1.status_code, {}))
            answers.append(("admin", r2.status_code, {}))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)] + [threading.Thread(target=admin)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert [s for n, s, _ in answers if n == "admin"] == [201, 200]
    assert len(answers) == 4 * 12 + 2 and all(s < 500 for _, s, _ in answers)
    for name, status, body in answers:
        if name == "admin":
            continue
        if name in ("a", "c"):
            assert status == 200, body
        else:
            assert status in (200, 404), body
        if status == 200:
            assert body["adapter"] == name
            res = body["results"][0]
            assert {t["label"] for t in res["top"]} <= set(labels[name])
            assert res["prob"] == pytest.approx(want[name][res["label"]], abs=1e-5)
    assert client.get("/health").json()["status"] == "ok"
    assert [a["name"] for a in client.get("/info").json()["adapters"]] == ["a", "c", "d"]


def test_load_test_spreads_over_adapters(pack, tmp_path) -> None:
    """bench/load_test.py --adapters all against a real pack server process: every adapter gets requests, the
    malformed ones (incl. an unknown adapter) are 4xx, the server survives."""
    pack_dir, _, _, _, images = pack
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in images:
        if p.suffix == ".jpg":
            shutil.copy(p, inputs / p.name)
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load_test.py"), str(pack_dir), "--inputs", str(inputs),
         "--levels", "1", "4", "--requests", "24", "--bad-every", "4", "--threads", "1", "--adapters", "all"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "survived malformed requests mid-load: True" in res.stdout
    per = [ln for ln in res.stdout.splitlines() if ln.startswith("requests per adapter:")]
    assert per, res.stdout
    counts = json.loads(per[0].split(":", 1)[1])
    assert set(counts) == set(RUNS) and all(v > 0 for v in counts.values())


def test_request_in_flight_finishes_after_its_adapter_is_removed(pack) -> None:
    """A request already inside adapter b's runtime when b is removed still answers with b."""
    pack_dir, _, _, _, images = pack
    client = _client(pack_dir)
    view = client.app.state.adapter_store.bundle.select("b")  # the view the endpoint will get (cached per adapter)
    inside, release = threading.Event(), threading.Event()
    original = view.runtime.http

    def slow_http(request):
        inside.set()
        assert release.wait(60)
        return original(request)

    view.runtime.http = slow_http
    answer: dict = {}

    def request() -> None:
        r = client.post("/v1/classify", files=_files(images[:1]), params={"adapter": "b", "top_k": 2})
        answer.update(status=r.status_code, body=r.json())

    t = threading.Thread(target=request)
    t.start()
    assert inside.wait(60)
    assert client.delete("/v1/adapters/b").status_code == 200
    release.set()
    t.join(60)
    assert answer["status"] == 200, answer
    assert answer["body"]["adapter"] == "b" and {x["label"] for x in answer["body"]["results"][0]["top"]} == set(
        RUNS["b"]
    )
    r = client.post("/v1/classify", files=_files(images[:1]), params={"adapter": "b"})
    assert r.status_code == 404
