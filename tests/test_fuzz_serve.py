"""Property-based fuzzing of the HTTP endpoints of a real ``python -m vision_peft serve`` process (issue 18) over
the tiny pack, also under concurrent requests while adapters are added and removed.

The properties every fuzzer here checks, and the example counts: see ``tests/surface_support.py``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fuzz_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from surface_support import (
    DEEP,
    EXTRA,
    FUZZ,
    JSON_VALUE,
    REPO,
    RUNS,
    build_artifacts,
    event,
    mutate_tree,
)

# duplicates are written on purpose (zipfile warns when it writes one)
pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """The tiny exported pack of :func:`surface_support.build_artifacts`, built once for this module."""
    return build_artifacts(tmp_path_factory)


# ================================================================================================================
# 3. the HTTP endpoints of a real `python -m vision_peft serve` process (the pack above)
# ================================================================================================================
HTTP_TIMEOUT = 30.0  # seconds per request: an answer later than this is a hang
PATHS = ["/health", "/info", "/v1/classify", "/v1/classify", "/v1/classify", "/v1/fewshot", "/v1/points",
         "/v1/segment", "/v1/generate", "/v1/adapters", "/v1/adapters", "/v1/adapters/zz", "/v1/adapters/%2e%2e",
         "/v1/adapters/..%2f..%2fetc", "/v1/adapters/" + "x" * 3000, "/", "/docs", "/openapi.json", "/v1/",
         "/v1/classify/", "/v1/classify%00", "/%ff%fe", "/v1/clas sify", "/" + "a/" * 500, "/v1/ädäpters"]  # fmt: skip
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
FIELDS = ["files", "files", "file", "meta", "name", "support", "query", "support_labels", "phrase", "adapter", "top_k"]
CTYPES = ["image/jpeg", "image/png", "application/octet-stream", "application/json", "text/plain", "", "x/y",
          "multipart/form-data", "image/jpeg; charset=utf-8", "\u00e9/\u00e8", None]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(artifacts):
    """A real server process over the pack (``python -m vision_peft serve``), shared by the module; its stderr is
    kept in a file so that the tests can check it never logged a traceback."""
    import httpx

    port = _free_port()
    log = artifacts["root"] / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vision_peft", "serve", str(artifacts["pack"]), "--port", str(port),
             "--device", "cpu"],
            env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=artifacts["root"],
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=HTTP_TIMEOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield {"proc": proc, "client": client, "base": base, "log": log, "port": port}
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _image_bytes(artifacts, which: int) -> bytes:
    return artifacts["images"][which % len(artifacts["images"])].read_bytes()


@st.composite
def payloads(draw, artifacts) -> bytes:
    kind = draw(st.sampled_from(["image", "image", "truncated", "random", "empty", "json", "adapter", "meta", "big",
                                 "png_bomb"]))  # fmt: skip
    if kind == "image":
        return _image_bytes(artifacts, draw(st.integers(0, 9)))
    if kind == "truncated":
        raw = _image_bytes(artifacts, 0)
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return b""
    if kind == "json":
        return json.dumps(draw(JSON_VALUE)).encode()
    if kind == "adapter":
        return artifacts["extra"][0].read_bytes()
    if kind == "meta":
        return json.dumps(mutate_tree(draw(st.data()), json.loads(artifacts["extra"][1].read_text()))).encode()
    if kind == "big":
        return b"\xff\xd8" + b"\0" * (10 * 2**20 + 10)  # just over the server's per-file limit
    return _png_bomb()


@functools.cache
def _png_bomb() -> bytes:
    """A decompression bomb: a small PNG that decodes to 400 megapixels (built once)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def requests_(draw, artifacts) -> dict:
    """One HTTP request: method, path, query, and a body that is empty, raw bytes with a content type, a JSON value,
    a well- or ill-formed multipart form (random fields, file names, part types and contents)."""
    method = draw(st.sampled_from(["POST"] * 12 + METHODS))
    target = draw(st.integers(0, 9))
    if target < 5:
        path = "/v1/classify"
    elif target < 7:
        path = "/v1/adapters" if draw(st.integers(0, 3)) else f"/v1/adapters/{draw(st.text(max_size=12))}"
    elif target < 9:
        path = draw(st.sampled_from(PATHS))
    else:
        path = "/" + draw(st.text(alphabet=st.characters(codec="ascii", min_codepoint=33), max_size=30))
        path = path.replace("?", "").replace("#", "")
    if method == "DELETE" and path.rstrip("/") in ("/v1/adapters/a", "/v1/adapters/b"):
        path = "/v1/adapters/zz"  # the pack's own adapters stay (the concurrency test removes and restores them)
    params = {}
    for key in draw(st.lists(st.sampled_from(["adapter", "top_k", "x", "adapter"]), max_size=3)):
        params[key] = draw(st.sampled_from(["a", "b", "zz", "", "0", "-1", "99", "1e9", "nan", "ä", "../a", "1"])
                           | st.text(max_size=20))  # fmt: skip
    body = draw(st.sampled_from(["none", "raw", "json", "multipart", "multipart", "multipart", "broken_multipart"]))
    if path == "/v1/classify" and draw(st.booleans()):
        body = "classify_form"  # the endpoint's own field with mostly real images: reaches the runtime
    elif path == "/v1/adapters" and draw(st.booleans()):
        body = "adapter_form"  # the upload's own fields: a real or damaged pair
    if body in ("classify_form", "adapter_form"):
        method = "POST"
    req = {"method": method, "path": path, "params": params, "body": body}
    if body == "classify_form":
        parts = []
        for _ in range(draw(st.integers(1, 4))):
            payload = (
                _image_bytes(artifacts, draw(st.integers(0, 9)))
                if draw(st.integers(0, 2))
                else draw(payloads(artifacts))
            )
            names = st.sampled_from(["x.jpg"] * 4 + ["x.png", "", "../x.jpg", "é.png"]) | st.text(max_size=20)
            ctype = draw(st.sampled_from(["image/jpeg"] * 4 + ["image/png", "text/plain"]))
            parts.append(("files", (draw(names), payload, ctype)))
        req["files"], req["data"], req["body"] = parts, {}, "multipart"
        if draw(st.integers(0, 3)):
            params["adapter"] = draw(st.sampled_from(sorted(RUNS)))
    elif body == "adapter_form":
        tensor = artifacts["extra"][0].read_bytes()
        if draw(st.booleans()):
            tensor = tensor[: draw(st.integers(0, len(tensor)))]
        meta = json.loads(artifacts["extra"][1].read_text())
        meta = mutate_tree(draw(st.data()), meta) if draw(st.booleans()) else meta
        req["files"] = [("file", ("d.onnx_adapter", tensor, "application/octet-stream")),
                        ("meta", ("d.adapter.json", json.dumps(meta).encode(), "application/json"))]  # fmt: skip
        req["data"] = {"name": draw(st.text(max_size=12))} if draw(st.booleans()) else {}
        req["body"] = "multipart"
    if body == "raw":
        req["content"] = draw(payloads(artifacts))
        ctype = draw(st.sampled_from([c for c in CTYPES if c] + ["multipart/form-data; boundary=x"]))
        req["headers"] = {"content-type": ctype.encode()}  # bytes: httpx sends them as they are (UTF-8 too)
    elif body == "json":  # serialised here: NaN / Infinity go out as the literals httpx's own encoder refuses
        req["headers"] = {"content-type": b"application/json"}
        value = draw(JSON_VALUE | st.fixed_dictionaries({"classes": JSON_VALUE, "n": JSON_VALUE, "steps": JSON_VALUE}))
        req["content"] = json.dumps(value).encode()
    elif body == "multipart":
        files, data = [], {}
        for _ in range(draw(st.integers(0, 5))):
            field = draw(st.sampled_from(FIELDS) | st.text(max_size=10))
            if draw(st.integers(0, 3)) == 0:
                data[field] = draw(st.text(max_size=30))
                continue
            fname = draw(
                st.sampled_from(
                    [
                        "x.jpg",
                        "x.png",
                        "../../etc/passwd",
                        "",
                        "a" * 1000 + ".jpg",
                        "é.jpg",
                        "x.onnx_adapter",
                        "x.adapter.json",
                        "x",
                    ]
                )
                | st.text(max_size=20)
            )
            ctype = draw(st.sampled_from(CTYPES))
            part = (fname, draw(payloads(artifacts))) if ctype is None else (fname, draw(payloads(artifacts)), ctype)
            files.append((field, part))
        if draw(st.integers(0, 9)) == 0:  # more files than the server's limit (32)
            files += [("files", (f"{i}.jpg", _image_bytes(artifacts, i), "image/jpeg")) for i in range(33)]
        req["files"], req["data"] = files, data
    elif body == "broken_multipart":
        boundary = draw(st.sampled_from(["b", "", "x" * 200, "é"]))
        req["headers"] = {"content-type": f"multipart/form-data; boundary={boundary}".encode()}
        good = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n'
        req["content"] = draw(
            st.sampled_from(
                [good, good + _image_bytes(artifacts, 0)[:100], b"--b--", b"--b\r\n\r\n--b--\r\n", b"garbage"]
            )
            | st.binary(max_size=200)
        )
    return req


def _answer_ok(r, req: dict) -> None:
    """Every answer: not a 5xx, no traceback text, and a 4xx carries a JSON 'detail'."""
    text = r.text if req["method"] != "HEAD" else ""
    assert r.status_code < 500, f"{r.status_code} for {req['method']} {req['path']}: {text[:500]}"
    assert "Traceback" not in text and 'File "/' not in text, text[:800]
    if 400 <= r.status_code < 500 and req["method"] != "HEAD":
        body = r.json()
        assert isinstance(body, dict) and "detail" in body, text[:300]


def _server_alive(server) -> None:
    assert server["proc"].poll() is None, "the server process died: " + server["log"].read_text()[-3000:]
    assert server["client"].get("/health").json()["status"] == "ok"


def _cleanup_added(server) -> None:
    """Remove adapters a fuzzed POST /v1/adapters added (the pack's own a and b stay)."""
    for rec in server["client"].get("/v1/adapters").json()["adapters"]:
        if rec["name"] not in RUNS:
            server["client"].delete(f"/v1/adapters/{rec['name']}")


@settings(max_examples=fuzz_examples(120), **FUZZ, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data())
def test_fuzz_http(artifacts, server, data) -> None:
    """Random methods, paths, queries and bodies against the real server: a 2xx or a 4xx with a JSON error, within
    HTTP_TIMEOUT, and the process answers /health afterwards."""
    import httpx

    req = data.draw(requests_(artifacts), label="request")
    kwargs = {k: req[k] for k in ("params", "headers", "content", "json", "files", "data") if req.get(k) is not None}
    if not kwargs.get("files"):
        kwargs.pop("files", None)
        if not kwargs.get("data"):
            kwargs.pop("data", None)
    try:
        r = server["client"].request(req["method"], req["path"], **kwargs)
    except httpx.TimeoutException:
        pytest.fail(f"no answer within {HTTP_TIMEOUT} s (a hang): {req['method']} {req['path']}")
    except httpx.InvalidURL:
        event("http: URL refused by the client")
        return
    event(f"http {r.status_code}")
    _answer_ok(r, req)
    _server_alive(server)
    if req["path"].startswith("/v1/adapters") and r.status_code == 201:
        _cleanup_added(server)


def test_http_adapter_meta_nested_too_deep(artifacts, server) -> None:
    """POST /v1/adapters with an .adapter.json nested deeper than json's recursion limit: a RecursionError in the
    server's json.loads was a 500 (the meta part of a multipart upload, found by the loader fuzzing above)."""
    tensor_file = artifacts["extra"][0]
    files = {"file": (tensor_file.name, tensor_file.read_bytes(), "application/octet-stream"),
             "meta": ("deep.adapter.json", DEEP, "application/json")}  # fmt: skip
    r = server["client"].post("/v1/adapters", files=files)
    assert r.status_code == 415 and "meta (deep.adapter.json): not a JSON adapter record" in r.json()["detail"], r.text
    _server_alive(server)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (b"image/jpeg", b"\x08\x00\x00\x00TORT\xb8\xc7\xff\xff"),  # non-UTF-8 bytes echoed in the 422 -> 500
        (b"text/plain", b"\xb8\xc7"),
        (b"application/json", b"NaN"),  # a NaN echoed in the 422 -> 'Out of range float values' -> 500
        (b"application/json", b'{"classes": ["a"], "n": 1e400}'),  # infinity, the same
    ],
)
def test_http_validation_errors_with_unencodable_input(server, content_type, body) -> None:
    """Found by test_fuzz_http: FastAPI's own validation handler answered 500 (and logged a traceback) when the
    rejected body could not be encoded back into its JSON error (POST /v1/generate, the JSON endpoint)."""
    r = server["client"].post("/v1/generate", content=body, headers={"content-type": content_type})
    assert r.status_code == 422 and isinstance(r.json()["detail"], list), r.text
    _server_alive(server)


def test_http_raw_socket_abuse(server) -> None:
    """Requests httpx will not send: a body shorter than its Content-Length (then the client hangs up), a header line
    of 100 kB, a non-HTTP greeting, a request line of garbage; the server keeps answering /health."""
    cases = [
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,  # a TLS ClientHello
        b"\xff\xfe garbage \r\n\r\n",
        b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\nzz\r\n",
    ]
    for raw in cases:
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            try:
                answer = s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 5"), answer[:300]
        _server_alive(server)


# ================================================================================================================
# 4. concurrency: the real server under concurrent requests while adapters are added and removed at run time
# ================================================================================================================
def _upload_pair(tensor_file: Path, meta_file: Path, name: str | None = None) -> dict:
    out = {"files": {"file": (tensor_file.name, tensor_file.read_bytes(), "application/octet-stream"),
                     "meta": (meta_file.name, meta_file.read_bytes(), "application/json")}}  # fmt: skip
    if name is not None:
        out["data"] = {"name": name}
    return out


@settings(max_examples=fuzz_examples(3), **FUZZ, suppress_health_check=[HealthCheck.too_slow])
@given(workers=st.integers(2, 6), per_worker=st.integers(4, 10), cycles=st.integers(1, 3), seed=st.integers(0, 99))
def test_concurrent_requests_while_adapters_change(artifacts, server, workers, per_worker, cycles, seed) -> None:
    """Worker threads (own connections) classify with adapters a, b, d (and a bad name) while an admin thread adds
    d, removes b, re-uploads b's own pair and removes d, ``cycles`` times: no 5xx; every 200 carries the adapter asked
    for, its labels and its probabilities (from a torch-free reference load); a always answers 200, b and d 200 or
    404 (removed at that moment), the bad name 404; the admin's calls all succeed; the pack ends as it started."""
    import httpx

    from vision_peft.deploy import load_bundle

    ref = load_bundle(artifacts["pack"], device="cpu")
    ref.add_adapter(*artifacts["extra"])
    image = artifacts["images"][0]
    want = {n: ref.classify([str(image)], adapter=n)[0]["probs"] for n in [*RUNS, "d"]}
    labels = {**RUNS, "d": EXTRA}
    pack = artifacts["pack"]
    answers: list[tuple[str, int, dict]] = []
    admin: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(workers + 1)
    rng = np.random.default_rng(seed)
    plans = [[["a", "b", "d", "a", "zz"][int(k)] for k in rng.integers(0, 5, per_worker)] for _ in range(workers)]
    files = [("files", (image.name, image.read_bytes(), "image/png" if image.suffix == ".png" else "image/jpeg"))]

    def worker(plan: list[str]) -> None:
        with httpx.Client(base_url=server["base"], timeout=HTTP_TIMEOUT) as c:
            start.wait()
            for name in plan:
                r = c.post("/v1/classify", files=files, params={"adapter": name, "top_k": 2})
                with lock:
                    answers.append((name, r.status_code, r.json() if r.status_code != 500 else {"text": r.text}))

    def administrator() -> None:
        with httpx.Client(base_url=server["base"], timeout=HTTP_TIMEOUT) as c:
            start.wait()
            for _ in range(cycles):
                steps = [("add d", lambda: c.post("/v1/adapters", **_upload_pair(*artifacts["extra"]))),
                         ("remove b", lambda: c.delete("/v1/adapters/b")),
                         ("add b", lambda: c.post("/v1/adapters", **_upload_pair(pack / "b.onnx_adapter",
                                                                                  pack / "b.adapter.json"))),
                         ("remove d", lambda: c.delete("/v1/adapters/d"))]  # fmt: skip
                for what, call in steps:
                    r = call()
                    with lock:
                        admin.append((what, r.status_code, r.text[:300]))

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    threads.append(threading.Thread(target=administrator))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert [(w, s) for w, s, _ in admin] == [(w, 201 if w.startswith("add") else 200) for w, _, _ in admin], admin
    assert len(admin) == 4 * cycles and len(answers) == workers * per_worker
    for name, status, body in answers:
        event(f"concurrent {name}: {status}")
        assert status < 500, body
        if name == "a":
            assert status == 200, body
        elif name == "zz":
            assert status == 404, body
        else:
            assert status in (200, 404), body
        if status == 200:
            res = body["results"][0]
            assert body["adapter"] == name and {t["label"] for t in res["top"]} <= set(labels[name]), body
            assert abs(res["prob"] - want[name][res["label"]]) < 1e-5, (name, res, want[name])
    assert sorted(a["name"] for a in server["client"].get("/v1/adapters").json()["adapters"]) == sorted(RUNS)
    _server_alive(server)


def test_server_never_logged_a_traceback(server) -> None:
    """After the fuzzing above (module order), the server's stderr holds no traceback (uvicorn logs one per 500)."""
    _server_alive(server)
    log = server["log"].read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
