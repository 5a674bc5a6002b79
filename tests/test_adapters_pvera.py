"""PVeRA specifics (the registry-generated invariants are in test_adapters_generated.py): sampling in training and
determinism in eval, two trained vectors per layer and the shared projections saved once, a run that trains,
reloads and exports, Monte Carlo prediction and its calibration benchmark, the pointwise-conv path, bad configs,
and LoRA / PVeRA parity with Hugging Face peft."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from adapter_cases import apply, backbone, randomise_trainable, x_input
from torch import nn

from vision_peft.adapters import apply_adapter


# -- PVeRA specifics --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["timm:test_vit", "timm:test_efficientnet"])
def test_pvera_samples_in_training_and_is_deterministic_in_eval(spec: str) -> None:
    for sample in (True, False):
        _, bb, handle, _ = apply("pvera", spec, sample=sample)
        assert handle.report["sampled_layers"] == (len(handle.touched) - handle.report["weight_space_layers"]) * sample
        randomise_trainable(bb, std=1.0)
        x = x_input(seed=5)
        with torch.no_grad():
            bb.train()
            a, b = bb.forward_features(x), bb.forward_features(x)
            bb.eval()
            c, d = bb.forward_features(x), bb.forward_features(x)
        assert torch.equal(c, d), "inference must use z = μ"
        if sample:
            assert (a - b).abs().max() > 1e-4, f"training forwards on {spec} did not sample the latent"
        else:
            assert torch.equal(a, b)


def test_pvera_trains_two_vectors_per_layer_and_saves_shared_projections_once(run_cfg) -> None:
    from vision_peft.tasks import build_adapted_backbone
    from vision_peft.tasks.classification import ClassifierModel

    cfg = run_cfg(adapter={"name": "pvera", "r": 4, "targets": ["qkv", "mlp"]})
    bb, handle, base = build_adapted_backbone(cfg)
    trainable = {n: p for n, p in bb.named_parameters() if p.requires_grad}
    want = 0
    for name in handle.touched:
        out_features = bb.get_submodule(name).out_features
        want += 2 * 4 + out_features
        assert trainable[f"{name}.pvera.lambda_d"].shape == (8,)
        assert trainable[f"{name}.pvera.lambda_b"].shape == (out_features,)
        assert float(trainable[f"{name}.pvera.lambda_b"].detach().abs().max()) == 0.0  # the step-0 identity
    assert sum(p.numel() for p in trainable.values()) == want
    fan_in = max(bb.get_submodule(n).in_features for n in handle.touched)
    fan_out = max(bb.get_submodule(n).out_features for n in handle.touched)
    assert handle.report["shared_A"] == [8, fan_in] and handle.report["shared_B"] == [fan_out, 4]
    model = ClassifierModel(bb, handle, num_classes=3, dropout=0.0, smoothing=0.0)
    model.mark_base(base)
    sd = model.adapter_state_dict()
    shared = [k for k in sd if "pvera_shared" in k]
    assert shared == ["backbone.pvera_shared.A", "backbone.pvera_shared.B"], shared
    assert not [k for k in sd if k.startswith("backbone.") and "pvera" not in k], "pretrained tensors were saved"
    # the same seed gives the same projections; another seed other ones (and its checkpoint is refused)
    bb2, _, _ = build_adapted_backbone(cfg)
    assert torch.equal(bb.pvera_shared.A, bb2.pvera_shared.A)
    other, _, _ = build_adapted_backbone(
        run_cfg(adapter={"name": "pvera", "r": 4, "targets": ["qkv", "mlp"], "seed": 1})
    )
    assert not torch.equal(bb.pvera_shared.A, other.pvera_shared.A)


def test_pvera_run_trains_reloads_and_exports(run_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    from vision_peft.export import export_run
    from vision_peft.predict import load_run
    from vision_peft.train import run

    cfg = run_cfg("train.max_steps=3", "train.lr=5e-2", adapter={"name": "pvera", "r": 4, "targets": ["qkv"]})
    run_dir = run(cfg, progress=False)
    _, _, model, _ = load_run(run_dir)
    lambdas = [p for n, p in model.named_parameters() if n.endswith("lambda_b")]
    assert lambdas and any(float(p.detach().abs().max()) > 0 for p in lambdas), "training left every λ_b at zero"
    manifest = export_run(run_dir, batch_sizes=(1, 2))
    parity = json.loads((Path(run_dir) / "export" / "parity.json").read_text())
    assert manifest["files"] and parity["max_abs_diff"] < 1e-4

    # Monte Carlo prediction through the sampled latent (PVeRA's confidence estimates)
    from vision_peft.predict import predict_files

    image = str(sorted(Path(cfg.task.data_root).rglob("*.png"))[0])
    plain = predict_files(run_dir, [image], top_k=3)[0]
    assert predict_files(run_dir, [image], top_k=3)[0] == plain, "inference without --mc-samples must be deterministic"
    assert "mc" not in plain
    mc = predict_files(run_dir, [image], top_k=3, mc_samples=16)[0]
    assert mc["mc"]["samples"] == 16 and 0 < mc["mc"]["top1_agreement"] <= 1
    assert all(e["prob_std"] >= 0 for e in mc["top"]) and any(e["prob_std"] > 0 for e in mc["top"])
    assert sum(e["prob"] for e in mc["top"]) <= 1 + 1e-6 and mc["top"][0]["prob"] >= mc["top"][-1]["prob"]
    assert predict_files(run_dir, [image], top_k=3, mc_samples=16)[0] != mc, "the latent was not sampled"

    # the calibration benchmark runs on it (deterministic vs MC on the run's test split)
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("pvera_calibration")
    out = Path(run_dir) / "calibration.json"
    assert bench.main([str(run_dir), "--samples", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"pvera deterministic", "pvera mc"}
    assert res["modes"]["pvera mc"]["n"] == len(json.loads((Path(run_dir) / "split.json").read_text())["test"])
    d = res["mc_minus_deterministic"]
    assert d["nll_ci95"][0] <= d["nll"] <= d["nll_ci95"][1]


def test_calibration_metrics_on_known_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import numpy as np

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("pvera_calibration")
    right = np.array([True, True, False, False])
    assert bench.auroc(np.array([0.9, 0.8, 0.3, 0.2]), right) == 1.0  # confidence separates perfectly
    assert bench.auroc(np.array([0.2, 0.3, 0.8, 0.9]), right) == 0.0
    assert bench.auroc(np.array([0.5, 0.5, 0.5, 0.5]), right) == 0.5  # ties: chance
    # 10 predictions at confidence 0.7 with 7 right: calibrated; the same at 0.9 confidence: ECE 0.2
    correct = np.array([True] * 7 + [False] * 3)
    assert bench.ece(np.full(10, 0.7), correct) == pytest.approx(0.0)
    assert bench.ece(np.full(10, 0.9), correct) == pytest.approx(0.2)


def test_mc_prediction_refuses_models_without_a_sampled_latent(run_cfg) -> None:
    from vision_peft.predict import predict_files
    from vision_peft.train import run

    cfg = run_cfg("train.max_steps=1")  # LoRA
    run_dir = run(cfg, progress=False)
    image = str(sorted(Path(cfg.task.data_root).rglob("*.png"))[0])
    with pytest.raises(ValueError, match="needs an adapter trained with a sampled latent"):
        predict_files(run_dir, [image], mc_samples=4)


def test_pvera_rejects_bad_configs() -> None:
    from vision_peft.adapters.pvera import PVeRAConfig

    with pytest.raises(ValueError, match="r=0"):
        PVeRAConfig(r=0)
    with pytest.raises(ValueError, match="lambda_d_init must be non-zero"):
        PVeRAConfig(lambda_d_init=0.0)
    with pytest.raises(ValueError, match="matched no Linear, Conv"):
        apply_adapter(backbone("timm:test_vit"), PVeRAConfig(targets=["model.norm"]))


@pytest.mark.parametrize("method", ["lora", "pvera"])
def test_matches_hf_peft(method: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our LoRA and PVeRA against Hugging Face peft's as the reference: eval forward, train-mode gradients (PVeRA's
    sampled latent included: both draw the same ε) and one AdamW step, with non-zero B / λ_b."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    from lora_vs_peft import main

    rc = main(["--method", method, "--model", "test_vit", "--image-size", "32", "--rank", "8", "--threads", "1",
               "--steps", "1", "--warmup", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "parity OK" in out
    effect = float(out.split("effect on output vs frozen: ")[1].split()[0])
    assert effect > 1e-3, "the adapter did not change the output, so the parity check proved nothing"


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 10, 1, stride=2), nn.Conv1d(6, 10, 1)], ids=["conv2d-stride2", "conv1d"])
def test_pvera_pointwise_conv_path_equals_its_weight_update(conv: nn.Module) -> None:
    """The sampled 1×1-conv side path (eval: z = μ) equals the conv with W0 + ΔW, strides and Conv1d included."""
    from vision_peft.adapters.pvera import PVeRAConfig, apply_pvera

    class Tiny(nn.Module):
        spec = "tiny-conv"

        def __init__(self) -> None:
            super().__init__()
            self.conv = copy.deepcopy(conv)

        def resolve_targets(self, targets: list[str]) -> list[str]:
            return ["conv"]

    net = Tiny().eval().requires_grad_(False)
    handle = apply_pvera(net, PVeRAConfig(r=4, targets=["conv"]))
    assert handle.report["sampled_layers"] == 1
    randomise_vectors = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.conv.pvera.lambda_b.copy_(torch.randn(10, generator=randomise_vectors))
        net.conv.pvera.lambda_d.copy_(torch.randn(8, generator=randomise_vectors))
    x = torch.randn(2, 6, 9, 7) if isinstance(conv, nn.Conv2d) else torch.randn(2, 6, 11)
    with torch.no_grad():
        got = net.conv(x)
        w = conv.weight + net.conv.pvera.delta().view_as(conv.weight)
        op = torch.nn.functional.conv2d if isinstance(conv, nn.Conv2d) else torch.nn.functional.conv1d
        want = op(x, w, conv.bias, stride=conv.stride)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    handle.merge()
    with torch.no_grad():
        assert (net.conv(x) - want).abs().max() < 1e-5 and not hasattr(net.conv, "pvera")
