"""The runtime registry and the bundle contract: dispatch, one record shape, manifest round trip, old bundles.

Bundles here are built with ``onnx.helper`` (a two-node graph), so these tests are fast and need no trained run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from vision_peft import bundle as contract
from vision_peft import deploy
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import (
    LoadTestOptions,
    Runtime,
    method_owner,
    ranked_record,
    ranked_result,
    record_of,
    runtime_for_task,
)

REPO = Path(__file__).resolve().parent.parent
LABELS = ["Airport", "Beach", "Forest"]
SPEC = {"size": [4, 4], "resize": "squash", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 1 / 255}
PANELS = {"ranked_images", "support_query", "ranked_points", "image_phrase_mask", "class_grid"}


def mean_rgb_graph(path: Path) -> Path:
    """An ONNX classifier: image (B, 3, 4, 4) -> logits (B, 3) = 8 × the channel means (so probabilities differ)."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "k"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mean_rgb",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [8.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def old_format_bundle(folder: Path, task: str = "classification") -> Path:
    """A bundle whose manifest is written the way export.py of 719a042 wrote it (dict literal, hashes of every
    file in the folder, ``json.dumps(indent=2, default=str)``), not through vision_peft.bundle."""
    folder.mkdir(parents=True)
    mean_rgb_graph(folder / "model.onnx")
    (folder / "parity.json").write_text(json.dumps({"max_abs_diff": 0.0, "passed": True}, indent=2) + "\n")
    (folder / "preprocess.json").write_text(json.dumps({"image": SPEC}, indent=2) + "\n")
    graph = {
        "file": "model.onnx",
        "inputs": {"image": {"shape": ["batch", 3, 4, 4], "dtype": "float32"}},
        "outputs": {"logits": {"shape": ["batch", 3], "dtype": "float32", "meaning": ""}},
    }
    manifest = {
        "format": "vision_peft.bundle/1",
        "task": task,
        "backbone": "timm:tiny",
        "adapter": "lora",
        "vision_peft_version": "0.1.0",
        "graphs": {"model": graph},
        "preprocess": {"image": SPEC},
        "labels": LABELS,
        "task_info": {},
        "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()},
        "parity": {"max_abs_diff": 0.0, "passed": True},
        "source_run": str(folder.parent.resolve()),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return folder


@pytest.fixture
def images(tmp_path) -> list[Path]:
    out = []
    for i, rgb in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250)]):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (6, 5), rgb).save(path)
        out.append(path)
    return out


# -- the registry ----------------------------------------------------------------------------------------------
def test_every_task_has_a_registered_runtime() -> None:
    from vision_peft.tasks import TASKS

    for name, entry in TASKS.items():
        runtime = entry.builder.runtime if getattr(entry.builder, "runtime", "") else name
        assert runtime in RUNTIMES, f"task {name!r} names runtime {runtime!r}, which RUNTIMES lacks"
        assert RUNTIMES.get(runtime).builder.task == name
        assert runtime_for_task(name) is RUNTIMES.get(runtime).builder


def test_runtimes_declare_the_contract() -> None:
    endpoints, methods = [], []
    for name, entry in RUNTIMES.items():
        rt = entry.builder
        assert issubclass(rt, Runtime) and rt.task and rt.panel in PANELS, name
        assert rt.endpoint.startswith("/v1/") and rt.methods and rt.http_fields, name
        for hook in ("predict_cli", "http"):
            assert getattr(rt, hook) is not getattr(Runtime, hook), f"{name} does not implement {hook}"
        assert rt.load_test_request.__func__ is not Runtime.load_test_request.__func__, name
        assert not inspect.isabstract(rt), f"{name} leaves {sorted(rt.__abstractmethods__)} abstract"
        assert all(callable(getattr(rt, m, None)) for m in rt.methods), name
        endpoints.append(rt.endpoint)
        methods += rt.methods
    assert len(set(endpoints)) == len(endpoints), endpoints
    assert len(set(methods)) == len(methods), methods
    assert runtime_for_task("no_such_task") is None and method_owner("no_such_method") is None


def test_runtimes_import_no_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import vision_peft.runtimes, vision_peft.bundle, vision_peft.deploy, vision_peft.serve
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm'))
        assert not bad, bad
        print('OK')
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0 and res.stdout.startswith("OK"), res.stderr[-2000:]


# -- one prediction record ----------------------------------------------------------------------------------------
def test_one_ranked_record_shape() -> None:
    from vision_peft.tasks import ranked_prediction

    probs = np.array([0.2, 0.5, 0.3])
    rec = ranked_record("a.jpg", probs, LABELS, 2)
    assert rec == {
        "file": "a.jpg",
        "label": "Beach",
        "prob": 0.5,
        "top": [{"label": "Beach", "prob": 0.5}, {"label": "Forest", "prob": 0.3}],
    }
    assert ranked_prediction("a.jpg", probs, LABELS, 2) == rec  # the torch side's predict() record
    assert record_of("a.jpg", ranked_result(LABELS, probs), 2) == rec  # from a Bundle.classify() result
    tie = ranked_record("b.jpg", [0.4, 0.4, 0.2], LABELS, 3)
    assert [t["label"] for t in tie["top"]] == LABELS  # ties keep label order


def test_cli_and_server_print_the_same_record(tmp_path, images) -> None:
    from fastapi.testclient import TestClient

    from vision_peft.serve import create_app

    folder = old_format_bundle(tmp_path / "b")
    assert deploy.main([str(folder), str(images[0]), "--device", "cpu", "--top-k", "2"]) == 0
    client = TestClient(create_app(folder, device="cpu"))
    r = client.post("/v1/classify", files=[("files", (str(images[0]), images[0].read_bytes()))], params={"top_k": 2})
    assert r.status_code == 200, r.text
    served = r.json()["results"][0]
    b = deploy.load_bundle(folder, device="cpu")
    want = record_of(str(images[0]), b.classify([images[0]])[0], 2)
    assert set(served) == set(want) and served["label"] == want["label"] == "Airport"
    assert [t["label"] for t in served["top"]] == [t["label"] for t in want["top"]]


# -- the manifest contract ------------------------------------------------------------------------------------------
def test_manifest_round_trip(tmp_path) -> None:
    folder = tmp_path / "b"
    folder.mkdir()
    mean_rgb_graph(folder / "model.onnx")
    (folder / "tokenizer.json").write_text("{}")
    graph = {"file": "model.onnx", "inputs": {"image": {"shape": ["batch", 3, 4, 4], "dtype": "float32"}},
             "outputs": {"logits": {"shape": ["batch", 3], "dtype": "float32", "meaning": "logits"}}}  # fmt: skip
    manifest = contract.build_manifest(
        folder,
        task="classification",
        backbone="timm:tiny",
        adapter="lora",
        graphs={"model": graph},
        preprocess={"image": SPEC},
        labels=LABELS,
        task_info={},
        parity={"passed": True},
        source_run=str(tmp_path),
    )
    contract.write_manifest(folder, manifest)
    umask = os.umask(0)
    os.umask(umask)
    mode = (folder / contract.MANIFEST).stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, f"manifest.json written {oct(mode)}: a server running as another user cannot read it"
    assert list(manifest)[:2] == ["format", "task"] and manifest["format"] == contract.BUNDLE_FORMAT
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json"}
    assert manifest["files"]["model.onnx"] == contract.sha256_file(folder / "model.onnx")
    assert contract.read_manifest(folder) == manifest == deploy.read_manifest(folder)
    contract.verify_files(folder, manifest)
    assert not list(folder.glob(".manifest-*"))  # the atomic write left no temporary file
    (folder / "tokenizer.json").write_text('{"changed": 1}')
    with pytest.raises(ValueError, match="'tokenizer.json'.*does not match manifest.json"):
        contract.verify_files(folder, manifest)
    assert contract.dtype_name("tensor(float)") == "float32" and contract.dtype_name("tensor(int64)") == "int64"
    assert contract.numpy_dtype("tensor(bool)") is np.bool_ and contract.numpy_dtype("tensor(string)") is None
    with pytest.raises(ValueError, match="outside the bundle"):
        contract.member(folder, "../x.onnx")


def test_task_checks_of_the_runtime_run_at_read(tmp_path) -> None:
    folder = old_format_bundle(tmp_path / "b")
    man = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**man, "labels": ["a", "a", "b"]}))
    contract.read_manifest(folder)  # structure only
    with pytest.raises(ValueError, match=r"duplicate labels \['a'\]"):
        deploy.read_manifest(folder)  # + the classification runtime's label check


def test_old_format_bundle_loads_verifies_and_predicts(tmp_path, images, capsys) -> None:
    folder = old_format_bundle(tmp_path / "old")
    b = deploy.load_bundle(folder, device="cpu")  # verify=True: every sha256 checked
    assert type(b.runtime) is RUNTIMES.get("classification").builder
    res = b.classify(images)
    assert [r["label"] for r in res] == LABELS  # red, green, blue images
    x = np.broadcast_to(
        np.array([[1, 0, 0], [0, 0, 1]], np.float32)[:, :, None, None], (2, 3, 4, 4)
    )  # (2,3)->(2,3,4,4)
    assert np.allclose(b.run("model", image=x)["logits"], [[8, 0, 0], [0, 0, 8]])
    assert deploy.main([str(folder), *map(str, images), "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == LABELS and all(len(line["top"]) == 3 for line in lines)


# -- dispatch of Bundle methods --------------------------------------------------------------------------------------
def test_bundle_exposes_only_its_runtimes_methods(tmp_path) -> None:
    b = deploy.load_bundle(old_format_bundle(tmp_path / "c"), device="cpu")
    assert "classify" in dir(b) and "generate" not in dir(b)
    with pytest.raises(ValueError, match=r"generate\(\) needs a bundle exported for task 'diffusion'.*use classify"):
        b.generate(["Beach"])
    with pytest.raises(ValueError, match=r"segment\(\) needs a bundle exported for task 'refseg'"):
        b.segment("x.jpg", "a dog")
    assert not hasattr(b, "no_such_method")
    other = deploy.load_bundle(old_format_bundle(tmp_path / "d", task="some_new_task"), device="cpu")
    assert other.runtime is None
    with pytest.raises(ValueError, match=r"call run\(graph_name, \*\*inputs\) with the graphs \['model'\]"):
        other.classify([])
    assert deploy.main([str(tmp_path / "d"), "x", "--device", "cpu"]) == 1


def test_deploy_cli_has_every_runtimes_options() -> None:
    parser = deploy.cli_parser()
    flags = {f for action in parser._actions for f in action.option_strings}
    for _, entry in RUNTIMES.items():
        for arg in entry.builder.cli_args:
            assert set(arg.flags) <= flags, arg.flags


def test_server_has_every_endpoint_and_409_names_the_right_one(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from vision_peft.serve import create_app

    client = TestClient(create_app(old_format_bundle(tmp_path / "b"), device="cpu"))
    routes = {r.path for r in client.app.routes}
    assert {e.builder.endpoint for _, e in RUNTIMES.items()} <= routes
    r = client.post("/v1/generate", json={"classes": ["Beach"]})
    assert r.status_code == 409 and "/v1/classify" in r.json()["detail"] and "'diffusion'" in r.json()["detail"]
    r = client.post("/v1/segment", files={"file": ("a.jpg", b"x", "image/jpeg")}, data={"phrase": "a"})
    assert r.status_code == 409 and "/v1/classify" in r.json()["detail"]


# -- load-test requests ----------------------------------------------------------------------------------------------
def test_every_runtime_builds_load_test_requests(tmp_path) -> None:
    root = tmp_path / "inputs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (i * 100, 0, 0)).save(root / c / f"{i}.jpg")
    (root / "a" / "cube.off").write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    options = LoadTestOptions(labels=("a", "b"))
    for name, entry in RUNTIMES.items():
        work = entry.builder.load_test_request(root, options)
        assert work.route == entry.builder.endpoint, name
        good = work.good(3)
        assert good and ("files" in good or "json" in good), name
        bad = [work.malformed(k) for k in range(3)]
        assert all(b != good for b in bad), name
