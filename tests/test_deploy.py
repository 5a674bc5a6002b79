"""Tests for the torch-free bundle runtime (vision_peft.deploy).

The bundle is built here with plain torch.onnx.export, not with vision_peft's exporter, so these tests pin the
manifest contract itself (design.md §8).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from vision_peft import deploy
from vision_peft.preprocess import preprocess_batch

LABELS = ["Airport", "Beach", "Forest"]
SPEC = {
    "size": [32, 32],
    "resize": "shorter_then_center_crop",
    "interpolation": "bilinear",
    "scale": 1 / 255,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "channel_order": "RGB",
    "layout": "CHW",
    "pad_value": 0,
}


class TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, len(LABELS))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(image)).mean(dim=(2, 3))  # (B,8,H/2,W/2)->(B,8)
        return self.head(f) * 4.0  # spread the logits so probabilities are not all ~1/3


def write_bundle(folder: Path, model_file: Path, **overrides) -> Path:
    """Writes a bundle folder around an ONNX file, with a correct manifest and hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, folder / "model.onnx")
    manifest = {
        "format": "vision_peft.bundle/1",
        "task": "classification",
        "backbone": "tiny_test_cnn",
        "vision_peft_version": "0.1.0",
        "graphs": {
            "model": {
                "file": "model.onnx",
                "inputs": {"image": {"shape": ["batch", 3, 32, 32], "dtype": "float32"}},
                "outputs": {"logits": {"shape": ["batch", 3], "dtype": "float32", "meaning": "class logits"}},
            }
        },
        "preprocess": {"image": SPEC},
        "labels": LABELS,
        "files": {"model.onnx": hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()},
        "parity": {"note": "written by tests/test_deploy.py"},
    }
    manifest.update(overrides)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, exported ONNX file, bundle folder, list of image paths)."""
    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    onnx_file = root / "tiny.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 32, 32),),
        str(onnx_file),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    bundle = write_bundle(root / "bundle", onnx_file)
    rng = np.random.default_rng(0)
    images = []
    for i, (size, mode) in enumerate([((48, 40), "RGB"), ((30, 64), "L"), ((32, 32), "RGBA"), ((50, 50), "RGB")]):
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        path = root / f"img{i}.png"
        Image.fromarray(arr[..., 0] if mode == "L" else arr, mode if mode != "L" else None).save(path)
        images.append(path)
    return model, onnx_file, bundle, images


def torch_probs(model: torch.nn.Module, images: list) -> np.ndarray:
    x = torch.from_numpy(preprocess_batch(images, SPEC))
    with torch.no_grad():
        return torch.softmax(model(x).double(), dim=-1).numpy()


def test_classify_matches_torch(tiny):
    model, _, bundle_dir, images = tiny
    bundle = deploy.load_bundle(bundle_dir, device="cpu")
    expected = torch_probs(model, images)
    pil = [Image.open(images[0]), Image.open(images[1])]
    for inputs, batch_size in ((images, 16), (images, 3), (pil, 1)):
        results = bundle.classify(inputs, batch_size=batch_size)
        assert len(results) == len(inputs)
        for res, ref in zip(results, expected):
            probs = np.array([res["probs"][label] for label in LABELS])
            assert np.abs(probs - ref).max() < 1e-4
            assert res["index"] == int(ref.argmax()) and res["label"] == LABELS[res["index"]]
            assert res["prob"] == pytest.approx(probs.max()) and probs.sum() == pytest.approx(1.0)


def test_run_named_outputs_and_input_checks(tiny):
    model, _, bundle_dir, _ = tiny
    bundle = deploy.load_bundle(bundle_dir, device="cpu")
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32))  # float64: cast to the graph's float32
    out = bundle.run("model", image=x)
    assert list(out) == ["logits"] and out["logits"].shape == (2, 3)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.astype(np.float32))).numpy()
    assert np.abs(out["logits"] - ref).max() < 1e-4
    with pytest.raises(ValueError, match="missing.*'image'.*unknown.*'pixels'"):
        bundle.run("model", pixels=x)
    with pytest.raises(ValueError, match=r"shape \['batch', 3, 32, 32\]"):
        bundle.run("model", image=x[:, :, :16])
    with pytest.raises(ValueError, match="unknown graph 'decoder'; this bundle has: model"):
        bundle.run("decoder", image=x)


def test_providers_reported(tiny):
    bundle = deploy.load_bundle(tiny[2], device="cpu")
    assert bundle.providers == ["CPUExecutionProvider"]
    assert bundle.graph_providers == {"model": ["CPUExecutionProvider"]}
    auto = deploy.load_bundle(tiny[2])
    assert auto.providers and set(auto.providers) <= set(auto.requested_providers)
    with pytest.raises(ValueError, match="unknown device 'gpu'; valid: auto, cpu, cuda"):
        deploy.load_bundle(tiny[2], device="gpu")


def test_tampered_and_missing_files_refused(tiny, tmp_path):
    bundle_dir = shutil.copytree(tiny[2], tmp_path / "bundle")
    proto = onnx.load(bundle_dir / "model.onnx")
    proto.doc_string = "edited after export"  # still a valid model, but not the exported bytes
    onnx.save(proto, bundle_dir / "model.onnx")
    with pytest.raises(ValueError, match="'model.onnx'.*does not match manifest.json"):
        deploy.load_bundle(bundle_dir, device="cpu")
    assert deploy.load_bundle(bundle_dir, device="cpu", verify=False).providers  # opt-out loads it anyway
    (bundle_dir / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot load graph 'model'.*model.onnx"):
        deploy.load_bundle(bundle_dir, device="cpu", verify=False)
    (bundle_dir / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="'model.onnx'.*missing"):
        deploy.load_bundle(bundle_dir, device="cpu")


def test_unknown_format_refused(tiny, tmp_path):
    bundle_dir = write_bundle(tmp_path / "b", tiny[1], format="vision_peft.bundle/99")
    with pytest.raises(ValueError, match=r"unsupported bundle format 'vision_peft.bundle/99'.*vision_peft.bundle/1"):
        deploy.load_bundle(bundle_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        deploy.load_bundle(tmp_path, device="cpu")


def test_manifest_must_match_graph(tiny, tmp_path):
    graphs = {"model": {"file": "model.onnx", "inputs": {"pixels": {}}, "outputs": {"logits": {}}}}
    with pytest.raises(ValueError, match=r"inputs \['image'\] but manifest.json lists \['pixels'\]"):
        deploy.load_bundle(write_bundle(tmp_path / "b", tiny[1], graphs=graphs), device="cpu")
    two_labels = deploy.load_bundle(write_bundle(tmp_path / "c", tiny[1], labels=["a", "b"]), device="cpu")
    with pytest.raises(ValueError, match=r"shape \[1, 3\] but the manifest lists 2 labels"):
        two_labels.classify(tiny[3][:1])


def test_classify_refuses_other_tasks(tiny, tmp_path):
    bundle = deploy.load_bundle(write_bundle(tmp_path / "b", tiny[1], task="few_shot"), device="cpu")
    with pytest.raises(ValueError, match="classify\\(\\) needs a bundle exported for task 'classification'"):
        bundle.classify(tiny[3])
    assert bundle.run("model", image=np.zeros((1, 3, 32, 32), np.float32))["logits"].shape == (1, 3)


def test_strict_cuda_runs_on_cuda_or_raises(tiny):
    """strict=True either really runs on CUDA (same answers as the CPU) or refuses; it never falls back silently."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = deploy.load_bundle(tiny[2], device="cuda")
    except RuntimeError:
        probe = None  # CPU-only onnxruntime build: device="cuda" refuses outright
    if probe is not None and "CUDAExecutionProvider" in probe.providers:  # CUDA really works here
        strict = deploy.load_bundle(tiny[2], device="cuda", strict=True)
        assert strict.providers[0] == "CUDAExecutionProvider"
        assert strict.graph_providers["model"][0] == "CUDAExecutionProvider"
        cpu = deploy.load_bundle(tiny[2], device="cpu").classify(tiny[3])
        for got, want in zip(strict.classify(tiny[3]), cpu, strict=True):
            assert got["label"] == want["label"] and got["prob"] == pytest.approx(want["prob"], abs=1e-4)
        return
    with pytest.raises(RuntimeError, match="CUDA|onnxruntime-gpu"):
        deploy.load_bundle(tiny[2], device="cuda", strict=True)


def test_cli_prints_json_lines(tiny, capsys):
    assert deploy.main([str(tiny[2]), str(tiny[3][0]), str(tiny[3][1]), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == [str(tiny[3][0]), str(tiny[3][1])]
    assert all(line["label"] in LABELS and 0 < line["prob"] <= 1 for line in lines)
    # the one ranked record (runtimes.base.ranked_record, as `python -m vision_peft predict` prints) + providers
    assert all(set(line) == {"file", "label", "prob", "top", "providers"} for line in lines)
    assert all(line["top"][0] == {"label": line["label"], "prob": line["prob"]} for line in lines)
    assert len(lines[0]["top"]) == len(LABELS)  # --top-k 5 by default, capped by the class count
    assert deploy.main([str(tiny[2]), str(tiny[3][0]), "--device", "cpu", "--top-k", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["top"]) == 1
    assert lines[0]["providers"] == ["CPUExecutionProvider"]
    assert deploy.main([str(tiny[2]), "no_such_image.png", "--device", "cpu"]) == 1
    assert "no_such_image.png" in capsys.readouterr().err


def test_runtime_imports_no_torch(tiny):
    code = textwrap.dedent(
        f"""
        import sys
        import vision_peft.deploy as d
        b = d.load_bundle({str(tiny[2])!r})
        r = b.classify({[str(p) for p in tiny[3]]!r})
        assert len(r) == {len(tiny[3])}, r
        assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))
        print('OK', b.providers)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK")
