"""Adapter packs (issue 15 item 1–2, design.md §8): one base graph + one ``.onnx_adapter`` per run.

Built from real trained tiny runs (timm ``test_vit`` + LoRA at 32×32 on generated images, a few steps), plus one
generated case per task from the registries (the contract tests' builders): every adapter through the pack graph
must reproduce its own run's PyTorch model, and everything that cannot share a graph is refused with the run and
the field named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_run_cfg, reset_vision_peft_logging, write_image_folder

from vision_peft import packfile
from vision_peft.deploy import load_bundle
from vision_peft.deploy import main as deploy_main
from vision_peft.export import ExportError, export_run
from vision_peft.pack import export_adapter_for, export_pack
from vision_peft.predict import load_run

TOL = 1e-4


def _train(base: Path, name: str, classes: tuple[str, ...], *dotted: str, **sections) -> Path:
    from vision_peft.train import run

    data = write_image_folder(base / f"data-{len(classes)}", classes=classes)
    cfg = make_run_cfg(
        data, base / "runs", f"output.name={name}", "train.max_steps=3", "train.lr=0.05", *dotted, **sections
    )
    try:
        return Path(run(cfg, progress=False))
    finally:
        reset_vision_peft_logging()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny finished runs: two class counts and two LoRA alphas (same layout), plus runs that must be refused."""
    base = tmp_path_factory.mktemp("pack-runs")
    two, three = ("alpha", "beta"), ("alpha", "beta", "gamma")
    return {
        "a": _train(base, "a", two),
        "b": _train(base, "b", three, "adapter.alpha=4"),  # another class count and another LoRA scale
        "c": _train(base, "c", three, "train.seed=7"),
        "rank4": _train(base, "rank4", two, "adapter.r=4"),
        "linear": _train(base, "linear", two, adapter={"name": "linear"}),
        "big": _train(base, "big", two, "backbone.image_size=48"),
        "lbox": _train(base, "lbox", three, "task.resize=letterbox"),  # same graph, its own preprocessing
    }


@pytest.fixture(scope="module")
def pack(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "pack"
    export_pack([runs["a"], runs["b"]], out)
    return out


def _images(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 44, 3), dtype=np.uint8) for _ in range(n)]


def _torch_probs(run_dir: Path, images: list[np.ndarray]) -> np.ndarray:
    """The run's own PyTorch probabilities for raw images (the manifest's preprocessing, shared with deploy)."""
    from vision_peft.preprocess import preprocess_batch

    _, task, model, _ = load_run(run_dir)
    spec = task.export_spec(model)
    x = torch.from_numpy(preprocess_batch(images, spec.preprocess["image"]))
    with torch.no_grad():
        return torch.softmax(model.logits(x), 1).numpy()


def test_pack_layout_and_manifest(pack, runs):
    import os

    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in pack.iterdir()}
    assert modes and all(m == 0o666 & ~umask for m in modes.values()), modes  # a server user must read every file
    man = json.loads((pack / "manifest.json").read_text())
    assert man["format"] == "vision_peft.bundle/2" and sorted(man["adapters"]) == ["a", "b"]
    graph = man["graphs"]["model"]
    assert list(graph["inputs"]) == ["image"]  # adapter tensors are overridable inputs, not data inputs
    inputs = graph["adapter_inputs"]
    assert inputs["head.weight"]["shape"][0] == "classes" and inputs["head.bias"]["shape"] == ["classes"]
    scales = [k for k in inputs if k.endswith("lora.scale")]
    assert scales and all(inputs[k]["shape"] == [1] for k in scales)  # alpha / r is an input, per adapter
    for name, rec in man["adapters"].items():
        assert rec["source_run"] == str(runs[name].resolve())
        assert {rec["file"], rec["meta_file"]} <= set(man["files"])  # hashed like every bundle file
        assert rec["parity"]["passed"] and rec["parity"]["max_abs_diff"] < TOL
        assert rec["parity"]["via"] == "RunOptions.add_active_adapter"
    assert man["adapters"]["a"]["labels"] == ["alpha", "beta"]
    assert man["adapters"]["b"]["labels"] == ["alpha", "beta", "gamma"]
    tensors = packfile.read_tensors(pack / "b.onnx_adapter")
    assert set(tensors) == set(inputs)
    assert tensors["head.weight"].shape[0] == 3
    scale_b = float(tensors[scales[0]][0])
    assert scale_b == pytest.approx(4 / 2) and float(packfile.read_tensors(pack / "a.onnx_adapter")[scales[0]][0]) == 8


def test_each_adapter_reproduces_its_run(pack, runs):
    b = load_bundle(pack, device="cpu")
    assert b.is_pack and b.adapters == ["a", "b"]
    images = _images()
    for name in ("a", "b"):
        res = b.classify(images, adapter=name)
        want = _torch_probs(runs[name], images)
        got = np.array([[r["probs"][c] for c in b.select(name).labels] for r in res])
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4, name
    # the two adapters really differ (a pack that ignored its adapter inputs would give one answer)
    pa = np.array([list(r["probs"].values())[:2] for r in b.classify(images, adapter="a")])
    pb = np.array([list(r["probs"].values())[:2] for r in b.classify(images, adapter="b")])
    assert np.abs(pa - pb).max() > 1e-3


def test_pack_equals_merged_bundles(pack, runs, tmp_path):
    b = load_bundle(pack, device="cpu")
    images = _images(4, seed=1)
    for name in ("a", "b"):
        export_run(runs[name], tmp_path / name)
        merged = load_bundle(tmp_path / name, device="cpu")
        assert merged.adapters == [] and not merged.is_pack
        m = np.array([list(r["probs"].values()) for r in merged.classify(images)])
        p = np.array([list(r["probs"].values()) for r in b.classify(images, adapter=name)])
        assert np.abs(m - p).max() < 1e-4 and (m.argmax(1) == p.argmax(1)).all()
        with pytest.raises(ValueError, match="merged bundle"):
            merged.classify(images, adapter=name)


def test_adapter_selection_errors(pack):
    b = load_bundle(pack, device="cpu")
    with pytest.raises(ValueError, match=r"holds 2 adapters \(a, b\); pass adapter="):
        b.classify(_images(1))
    with pytest.raises(ValueError, match="unknown adapter 'zz'.*known adapters: a, b"):
        b.classify(_images(1), adapter="zz")
    with pytest.raises(ValueError, match="unknown adapter"):
        b.adapter_info("zz")
    assert b.adapter_info("a")["labels"] == ["alpha", "beta"]
    assert b.select("b").labels == ["alpha", "beta", "gamma"] and b.labels == []


def test_add_remove_adapter_at_runtime(pack, runs, tmp_path):
    meta = export_adapter_for(runs["c"], pack, tmp_path / "c-adapter", name="c")
    assert meta["parity"]["passed"] and meta["name"] == "c"
    b = load_bundle(pack, device="cpu")
    name = b.add_adapter(tmp_path / "c-adapter" / "c.onnx_adapter", tmp_path / "c-adapter" / "c.adapter.json")
    assert name == "c" and b.adapters == ["a", "b", "c"]
    images = _images()
    got = np.array([list(r["probs"].values()) for r in b.classify(images, adapter="c")])
    assert np.abs(got - _torch_probs(runs["c"], images)).max() < 1e-4
    with pytest.raises(ValueError, match="already has an adapter named 'c'"):
        b.add_adapter(tmp_path / "c-adapter" / "c.onnx_adapter", tmp_path / "c-adapter" / "c.adapter.json")
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="is not allowed"):
            b.add_adapter(tmp_path / "c-adapter" / "c.onnx_adapter", tmp_path / "c-adapter" / "c.adapter.json", bad)
    view = b.select("c")
    b.remove_adapter("c")
    assert b.adapters == ["a", "b"]
    assert len(view.classify(images)) == 3  # a request that already holds the adapter finishes
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        b.classify(images, adapter="c")
    b.remove_adapter("b")
    with pytest.raises(ValueError, match="last adapter"):
        b.remove_adapter("a")
    assert b.classify(images)[0]["label"] in ("alpha", "beta")  # one adapter left: it is the default


def test_adapter_pairs_that_do_not_fit_are_refused(pack, runs, tmp_path):
    b = load_bundle(pack, device="cpu")
    meta = json.loads((pack / "a.adapter.json").read_text())
    tensors = packfile.read_tensors(pack / "a.onnx_adapter")
    cases = {
        "backbone_weights_id": ({**meta, "backbone_weights_id": "0" * 64}, tensors),
        "task": ({**meta, "task": "multilabel"}, tensors),
        "missing tensor": (meta, {k: v for k, v in tensors.items() if k != "head.bias"}),
        "has shape": (meta, {**tensors, next(k for k in tensors if "lora_B" in k): np.zeros((192, 4), np.float32)}),
        "is float64": (meta, {**tensors, "head.bias": tensors["head.bias"].astype(np.float64)}),
        "labels": ({**meta, "labels": ["x", "y", "z"]}, tensors),
    }
    for what, (m, t) in cases.items():
        path = packfile.write_tensors(tmp_path / "bad.onnx_adapter", t)
        m = {**m, "tensors": packfile.tensor_specs(t)}
        with pytest.raises(packfile.AdapterFileError) as err:
            b.add_adapter(path, m, name="bad")
        assert what.split()[-1] in str(err.value) and "bad.onnx_adapter" in str(err.value), (what, err.value)
    (tmp_path / "garbage.onnx_adapter").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(packfile.AdapterFileError, match="not a readable onnxruntime adapter file"):
        b.add_adapter(tmp_path / "garbage.onnx_adapter", meta, name="g")
    with pytest.raises(packfile.AdapterFileError, match="format"):
        b.add_adapter(pack / "a.onnx_adapter", {"name": "x"}, name="x")
    assert b.adapters == ["a", "b"]  # nothing was added by a refusal


def test_damaged_pack_refused_at_load(pack, tmp_path):
    bad = tmp_path / "pack"
    shutil.copytree(pack, bad)
    tensors = packfile.read_tensors(bad / "a.onnx_adapter")
    tensors["head.weight"] = np.zeros((2, 5), np.float32)  # another width than the graph's head input
    packfile.write_tensors(bad / "a.onnx_adapter", tensors)
    with pytest.raises(ValueError, match="does not match manifest.json"):  # the hash check comes first
        load_bundle(bad, device="cpu")
    with pytest.raises(packfile.AdapterFileError, match=r"a.onnx_adapter.*'head.weight' has shape \[2, 5\]"):
        load_bundle(bad, device="cpu", verify=False)  # and the shape check refuses it at load, not at a request


def test_runs_that_cannot_share_a_graph_are_refused(runs, tmp_path):
    cases = {
        "rank4": "tensor 'backbone.model.blocks.0.attn.qkv.lora.lora_A' is [4, 64]",
        "linear": "adapter.name is 'linear'",
        "big": "backbone weights_id",  # a random-init ViT at another size has other (position) weights
    }
    for key, msg in cases.items():
        with pytest.raises(ExportError) as err:
            export_pack([runs["a"], runs[key]], tmp_path / key)
        assert msg in str(err.value) and str(runs[key]) in str(err.value), err.value
        assert not (tmp_path / key).exists()  # nothing is written
    with pytest.raises(ExportError, match="repeat"):
        export_pack([runs["a"], runs["b"]], tmp_path / "dup", names=["x", "x"])
    with pytest.raises(ExportError, match="is not allowed"):
        export_pack([runs["a"]], tmp_path / "slash", names=["../evil"])
    export_run(runs["a"], tmp_path / "merged")
    with pytest.raises(ExportError, match="merged bundle, not a pack"):
        export_adapter_for(runs["b"], tmp_path / "merged")
    export_pack([runs["a"]], tmp_path / "p")
    with pytest.raises(ExportError, match="its adapter.name is 'linear', the pack's 'lora'"):
        export_adapter_for(runs["linear"], tmp_path / "p")
    with pytest.raises(ExportError, match="backbone weights_id"):
        export_adapter_for(runs["big"], tmp_path / "p")


def test_adapters_keep_their_own_preprocessing(runs, tmp_path):
    export_pack([runs["a"], runs["lbox"]], tmp_path / "p")
    b = load_bundle(tmp_path / "p", device="cpu")
    assert b.select("lbox").preprocess["image"]["resize"] == "letterbox"
    assert b.select("a").preprocess["image"]["resize"] == "squash"
    images = _images(3, seed=2)
    for name in ("a", "lbox"):
        got = np.array([list(r["probs"].values()) for r in b.classify(images, adapter=name)])
        assert np.abs(got - _torch_probs(runs[name], images)).max() < 1e-4, name
    man = json.loads((tmp_path / "p" / "manifest.json").read_text())
    other = {"image": {**man["preprocess"]["image"], "size": [64, 64]}}
    assert "size is [64, 64]" in packfile.preprocess_conflict(man["preprocess"], other)
    assert packfile.preprocess_conflict(man["preprocess"], {"points": {}}).startswith("preprocess covers inputs")
    meta = {**b.adapter_info("a"), "preprocess": other}
    with pytest.raises(packfile.AdapterFileError, match="size is"):
        b.add_adapter(tmp_path / "p" / "a.onnx_adapter", meta, name="a64")


def test_deploy_cli_adapter_flag(pack, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(_images(1)[0]).save(img)
    assert deploy_main([str(pack), str(img), "--device", "cpu", "--adapter", "b"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["adapter"] == "b" and line["label"] in ("alpha", "beta", "gamma") and len(line["top"]) == 3
    assert deploy_main([str(pack), str(img), "--device", "cpu"]) == 1
    assert "pass adapter=<name>" in capsys.readouterr().err


def test_cli_export_pack(runs, tmp_path, capsys):
    from vision_peft.cli import main

    out = tmp_path / "cli-pack"
    assert main(["export", str(runs["a"]), str(runs["c"]), "--pack", "--bundle", str(out), "--names", "x,y"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "vision_peft.bundle/2" and sorted(summary["adapters"]) == ["x", "y"]
    assert summary["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    with pytest.raises(SystemExit, match="--pack"):
        main(["export", str(runs["a"]), str(runs["c"])])


def test_pack_runtime_is_torch_free(pack, torch_free):
    torch_free(
        f"""
        import numpy as np
        from vision_peft.deploy import load_bundle
        b = load_bundle({str(pack)!r}, device="cpu")
        x = [np.zeros((40, 40, 3), np.uint8)]
        assert b.adapters == ["a", "b"], b.adapters
        assert len(b.classify(x, adapter="b")[0]["probs"]) == 3
        """
    )


# -- one generated case per task ----------------------------------------------------------------------------------
def _contract_pack_case(task_name: str, tmp_path: Path):
    import test_contracts as tc

    for case in tc.export_candidates(task_name):
        if case.adapter not in ("full",):
            break
    else:
        pytest.skip(f"{task_name}: no packable case")
    models, run_dirs = [], []
    for i in range(2):
        cfg = tc.run_config(case, tmp_path / f"r{i}" / "runs")
        task, model = tc.build(case, cfg)
        tc.perturb_trainable(model, seed=1 + i)
        models.append((task, model, task.synthetic_batch(model, tc.BATCH)))
        run_dirs.append(tc.write_run(tmp_path / f"r{i}" / "run", cfg, task, model))
    return tc, case, models, run_dirs


def _task_names() -> list[str]:
    import test_contracts as tc

    return tc.EXPORT_TASKS


@pytest.mark.slow
@pytest.mark.parametrize("task_name", _task_names())
def test_every_task_packs(task_name: str, tmp_path: Path) -> None:
    """Per task: two runs of one case (different trained values) → pack (TorchScript, dynamo where it cannot
    trace) → the torch-free loader → each adapter's graph outputs equal that run's torch graph outputs."""
    tc, case, models, run_dirs = _contract_pack_case(task_name, tmp_path)
    try:
        man = export_pack(run_dirs, tmp_path / "pack", names=["p0", "p1"], exporter="torchscript", batch_sizes=(1, 2))
    except ExportError as e:
        if "exporter failed" not in str(e):
            raise
        man = export_pack(run_dirs, tmp_path / "pack", names=["p0", "p1"], batch_sizes=(1, 2))
    assert man["format"] == "vision_peft.bundle/2" and man["task"] == case.task
    b = load_bundle(tmp_path / "pack", device="cpu")
    assert b.adapters == ["p0", "p1"]
    runtime_methods = b.select("p0").runtime.methods
    assert all(callable(getattr(b, m)) for m in runtime_methods)
    outs = []
    for (task, model, batch), name in zip(models, ["p0", "p1"], strict=True):
        spec = task.export_spec(model)
        view = b.select(name)
        per_graph = {}
        for graph in [spec, *(spec.extra_graphs or [])]:
            graph.module.eval()
            feed = tc.graph_feed(graph, batch)
            with torch.no_grad():
                ref = graph.module(*feed.values())
            ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
            got = view.run(graph.graph_name, **{k: v.numpy() for k, v in feed.items()})
            for out_name, r in zip(graph.output_names, ref, strict=True):
                r = r.float().numpy()
                diff = float(np.abs(r - got[out_name]).max()) if r.size else 0.0
                assert got[out_name].shape == r.shape and diff <= tc.RUNTIME_TOL * (1 + float(np.abs(r).max())), (
                    f"{case.id}: adapter {name} graph {graph.graph_name}.{out_name} differs from torch by {diff:.3g}"
                )
                per_graph[f"{graph.graph_name}.{out_name}"] = r
        outs.append(per_graph)
    spread = {k: float(np.abs(outs[0][k] - outs[1][k]).max()) for k in outs[0]}
    adapted = [f"{g}.{o}" for g, e in man["graphs"].items() if e.get("adapter_inputs") for o in e["outputs"]]
    degenerate = all(not np.abs(outs[i][k]).any() for i in (0, 1) for k in adapted)  # e.g. an adaLN-zero DiT
    print(case.id, "outputs differ between the runs:", spread, "(all-zero outputs)" if degenerate else "")
    assert degenerate or any(spread[k] > 1e-6 for k in adapted), f"{case.id}: both adapters give one answer {spread}"


def test_adapter_name_rule():
    for good in ("a", "aid-v2", "run_3.1"):
        assert packfile.check_name(good) == good
    for bad in ("", "../a", "a/b", "a\\b", ".a", "-a", "a" * 65, "a..b"):
        with pytest.raises(packfile.AdapterFileError):
            packfile.check_name(bad)


def test_write_tensors_is_atomic_and_round_trips(tmp_path):
    t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array([2.0], np.float32)}
    p = packfile.write_tensors(tmp_path / "x.onnx_adapter", t)
    back = packfile.read_tensors(p)
    assert set(back) == {"w", "s"} and np.array_equal(back["w"], t["w"]) and back["s"].shape == (1,)
    assert [f.name for f in tmp_path.iterdir()] == ["x.onnx_adapter"]  # no temporary file left behind
