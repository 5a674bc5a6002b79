"""Diffusion task, TAEF2, latent DiT, SaRA / FISH sparse engine, KIND. Tiny models, 16–32 px images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from vision_peft.adapters import apply_adapter
from vision_peft.adapters.kind import KINDConfig, KINDLinear
from vision_peft.adapters.sara import (
    FISHConfig,
    SaRAConfig,
    SparseCheckpointError,
    SparseLinear,
    fisher_scores,
    load_sparse,
    nuclear_penalty,
    optimizer_state_bytes,
    save_sparse,
    select_entries,
)
from vision_peft.backbones.dit import DiT, DiTArch
from vision_peft.tasks.diffusion import (
    DiffusionInputError,
    check_sampling,
    encode_images,
    frechet_distance,
    frechet_pca,
    kid,
    kid_bootstrap,
    list_class_images,
    load_rgb,
)


def tiny_dit(classes: int = 3, seed: int = 0, randomize: bool = True) -> DiT:
    torch.manual_seed(seed)
    m = DiT(DiTArch(depth=1, width=32, heads=2, num_classes=classes))
    if randomize:  # adaLN-Zero starts at zero output; give the gates some weight so gradients flow everywhere
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return m


def dit_loss(m: DiT, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, 4, 4, generator=g)
    return m(x, torch.tensor([1, 200, 500, 900]), torch.tensor([0, 1, 2, 0])).pow(2).mean()


# -- TAEF2 --------------------------------------------------------------------------------------------------
def test_taef2_strict_and_reconstruction_psnr(weights_root, aid_images):
    from vision_peft.backbones.taef2 import load_taef2

    vae = load_taef2()
    assert sum(p.numel() for p in vae.encoder.parameters()) > 1.2e6
    x = load_rgb(aid_images(1, ("Beach",))[0], 128, 16)[None]
    with torch.no_grad():
        z = vae.encode(x)
        r = vae.decode(z)
    assert z.shape == (1, 32, 16, 16)
    psnr = 10 * np.log10(1 / float(((r - x) ** 2).mean()))
    assert psnr > 28.0, psnr  # README: ≈31.6 dB on an AID image; random init gives ≈4 dB
    sd = vae.encoder.state_dict()
    sd.pop("0.bias")
    with pytest.raises(RuntimeError, match="Missing key"):
        vae.encoder.load_state_dict(sd, strict=True)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 12, 12))


# -- DiT + sampler input checks ------------------------------------------------------------------------------
def test_dit_adaln_zero_and_shapes():
    m = tiny_dit(randomize=False)
    out = m(torch.randn(2, 32, 4, 6), torch.tensor([3, 700]), torch.tensor([0, 3]))
    assert out.shape == (2, 32, 4, 6) and float(out.detach().abs().max()) == 0.0  # adaLN-Zero: zero output at init
    with pytest.raises(ValueError, match="patch"):
        m(torch.randn(1, 32, 5, 4), torch.tensor([1]), torch.tensor([0]))


def test_sampling_and_data_validation(tmp_path):
    check_sampling(25, 2.0, 1000)
    for steps, g in ((0, 1.0), (1001, 1.0), (10, -1.0), (10, 50.0), (10, float("nan"))):
        with pytest.raises(DiffusionInputError):
            check_sampling(steps, g, 1000)
    (tmp_path / "a").mkdir()
    with pytest.raises(DiffusionInputError, match="no images"):
        list_class_images(tmp_path, ["a"])
    with pytest.raises(DiffusionInputError, match="does not exist"):
        list_class_images(tmp_path / "nope", ["a"])
    from PIL import Image

    Image.new("RGB", (10, 12)).save(tmp_path / "a" / "small.png")
    with pytest.raises(DiffusionInputError, match="smaller than the smallest latent grid"):
        load_rgb(tmp_path / "a" / "small.png", 32, 16)
    with pytest.raises(DiffusionInputError, match="smaller than"):
        encode_images(None, torch.zeros(1, 3, 8, 8))


def test_frechet_distance_basic():
    rng = np.random.RandomState(0)
    a = rng.randn(200, 4)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 3.0) == pytest.approx(36.0, rel=0.05)


# -- KID and the sample-metric intervals (issue 14) --------------------------------------------------------------
def brute_force_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³, written as the double loops of its definition."""
    d = a.shape[1]

    def k(x, y):
        return (sum(x[i] * y[i] for i in range(d)) / d + 1.0) ** 3

    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_brute_force_double_loop():
    rng = np.random.RandomState(0)
    for m, n, d in ((5, 7, 3), (2, 2, 1), (9, 4, 6)):
        a, b = rng.randn(m, d), rng.randn(n, d) + 0.3
        assert kid(a, b) == pytest.approx(brute_force_kid(a, b), rel=1e-10, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        kid(rng.randn(1, 3), rng.randn(4, 3))
    with pytest.raises(ValueError, match="one width"):
        kid(rng.randn(4, 3), rng.randn(4, 2))


def test_kid_unbiased_for_one_distribution_positive_for_shifted():
    """Two samples of one distribution: KID averages to ≈ 0 (the biased V-statistic, which keeps k(x, x), would be
    clearly positive at this n); a shifted sample gives KID > 0 far outside that noise."""
    rng = np.random.RandomState(1)
    same, biased, shifted = [], [], []
    for _ in range(300):
        a, b, c = rng.randn(20, 16), rng.randn(25, 16), rng.randn(25, 16) + 0.5
        same.append(kid(a, b))
        shifted.append(kid(a, c))
        kaa, kbb, kab = ((x @ y.T / 16 + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
        biased.append(kaa.mean() + kbb.mean() - 2 * kab.mean())
    se = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * se, (np.mean(same), se)
    assert np.mean(biased) > 10 * se  # what the unbiased estimator removes
    assert np.mean(shifted) > 10 * se and np.mean(np.array(shifted) > 0) > 0.95


def test_kid_bootstrap_interval_and_pca_frechet():
    rng = np.random.RandomState(2)
    a, b = rng.randn(60, 8), rng.randn(50, 8)
    v, lo, hi = kid_bootstrap(a, b, n_boot=200, seed=0)
    assert v == pytest.approx(kid(a, b)) and lo <= v <= hi and lo < 0 < hi  # one distribution: 0 inside
    v2, lo2, hi2 = kid_bootstrap(a, b + 1.0, n_boot=200, seed=0)
    assert lo2 > hi and lo2 > 0  # shifted: the interval excludes 0 and the unshifted interval
    # PCA Fréchet: the Fréchet distance of the projected features; ≈ 0 for one distribution when k ≪ n, while the
    # full-width distance at n < d is dominated by the rank-deficient covariances
    from vision_peft.tasks.diffusion_eval import pca_basis

    train = rng.randn(300, 64)
    x, y = rng.randn(40, 64), rng.randn(40, 64)
    basis = pca_basis(train, 4)
    mu, pc = basis
    assert frechet_pca(x, y, basis) == pytest.approx(frechet_distance((x - mu) @ pc, (y - mu) @ pc))
    assert frechet_pca(x, y, basis) < 0.2 * frechet_distance(x, y)
    assert frechet_pca(x, y + 1.0, basis) > 3 * frechet_pca(x, y, basis)
    with pytest.raises(ValueError, match="PCA dimension"):
        pca_basis(train[:4], 8)


def test_wilson_and_seed_intervals():
    from scipy import stats

    from vision_peft.tasks.diffusion_eval import mean_ci, wilson_interval

    lo, hi = wilson_interval(30, 100)
    assert lo < 0.3 < hi and 0 < lo and hi < 1
    lo0, hi0 = wilson_interval(0, 20)
    assert lo0 == pytest.approx(0.0, abs=1e-12) and 0 < hi0 < 0.2  # no hits: still a non-empty interval
    assert (wilson_interval(300, 1000)[1] - wilson_interval(300, 1000)[0]) < hi - lo  # more samples, narrower
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3))


def test_sample_metrics_per_seed_and_pooled(tmp_path):
    """The task's sample metrics: one entry per sample seed (seed 0 = the old noise), mean ± t half-width over them,
    KID and top-1 on the pooled samples; no full-width Fréchet distance."""
    from vision_peft.recipe import build_run_config
    from vision_peft.tasks import TASKS
    from vision_peft.tasks.diffusion_eval import fit_probe, kid
    from vision_peft.tasks.diffusion_task import SEED_STRIDE

    cfg = build_run_config(
        {
            "task": {
                "name": "diffusion",
                "stage": "adapt",
                "classes": ["a", "b"],
                "image_size": 16,
                "samples_per_class": 10,
                "sample_seeds": 3,
                "kid_bootstrap": 50,
                "pca_dim": 4,
            },
            "backbone": {"name": "dit:d1-w32-h2-c2", "pretrained": False},
            "adapter": {"name": "full"},
        }  # fmt: skip
    )
    task = TASKS.get("diffusion").builder(cfg)
    rng = np.random.RandomState(0)
    centres = rng.randn(2, 12) * 2
    tr_y = np.repeat([0, 1], 30)
    task._train_feats = (centres[tr_y] + rng.randn(60, 12), tr_y)
    task._probe = fit_probe(*task._train_feats, 2)
    ys = np.repeat([0, 1], 10)
    real = centres[np.repeat([0, 1], 15)] + rng.randn(30, 12)
    fakes = [centres[ys] + rng.randn(20, 12) + 0.2 * s for s in range(3)]
    r = task.sample_metrics(fakes, ys, real)
    assert [x["seed"] for x in r["per_seed"]] == [cfg.task.eval_seed + SEED_STRIDE * s for s in range(3)]
    assert [x["kid"] for x in r["per_seed"]] == pytest.approx([kid(f, real) for f in fakes])
    assert r["kid_seed_mean"] == pytest.approx(np.mean([kid(f, real) for f in fakes]))
    assert r["kid_seed_ci95_halfwidth"] > 0
    assert r["kid_effnet_lite0"] == pytest.approx(kid(np.concatenate(fakes), real))
    lo, hi = r["kid_ci95"]
    assert lo <= r["kid_effnet_lite0"] <= hi
    assert r["pca_dim"] == 4 and "frechet_pca4_effnet_lite0" in r and not any(k.startswith("frechet_eff") for k in r)
    t_lo, t_hi = r["sample_top1_ci95"]
    assert t_lo <= r["sample_top1"] <= t_hi and r["sample_top1"] > 0.8  # well-separated classes


# -- SaRA / FISH ------------------------------------------------------------------------------------------------
def test_sara_selection_reports_tau_and_count():
    s = {"a": torch.arange(100.0).reshape(10, 10), "b": torch.arange(100.0, 200.0).reshape(10, 10)}
    idx, rep = select_entries(s, 0.1, None, "global", largest=False)
    assert rep["selected"] == 20 and rep["per_tensor"] == {"a": 20, "b": 0} and rep["threshold"] == 19.0
    idx, rep = select_entries(s, 0.1, None, "per_tensor", largest=False)
    assert rep["per_tensor"] == {"a": 10, "b": 10}
    idx, rep = select_entries(s, None, 5.0, "global", largest=False)
    assert rep["selected"] == 5 and rep["threshold"] == 5.0 and idx["a"].tolist() == [0, 1, 2, 3, 4]


def test_sara_sparse_grads_optimizer_state_nuclear_merge(tmp_path):
    m = tiny_dit()
    ref = tiny_dit()
    h = apply_adapter(m, SaRAConfig(fraction=0.1, targets=["blocks_linear"]))
    layers = [m.get_submodule(n) for n in h.touched]
    assert all(isinstance(x, SparseLinear) for x in layers) and h.report["selected"] > 0
    with torch.no_grad():  # unchanged at step 0
        assert torch.allclose(dit_loss(m), dit_loss(ref))
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(x.sparse_values) for x in layers}
    assert sum(p.numel() for p in trainable) == h.report["selected"]
    dit_loss(m).backward()
    for x in layers:
        assert x.weight.grad is None and x.sparse_values.grad.shape == x.sparse_idx.shape
    # optimizer state exists only for the selected entries: a measured fraction equal to the selected one
    opt = torch.optim.AdamW(trainable)
    opt.step()
    dense = [nn.Parameter(x.weight.detach().clone()) for x in layers]
    for p in dense:
        p.grad = torch.ones_like(p)
    dopt = torch.optim.AdamW(dense)
    dopt.step()

    def moment_bytes(o):  # exp_avg + exp_avg_sq (the scalar step counters aside)
        return sum(v.numel() * v.element_size() for s in o.state.values() for v in s.values() if v.dim() > 0)

    selected = sum(x.sparse_idx.numel() for x in layers) / sum(x.weight.numel() for x in layers)
    assert moment_bytes(opt) / moment_bytes(dopt) == pytest.approx(selected, rel=1e-9)
    assert optimizer_state_bytes(opt) < 0.11 * optimizer_state_bytes(dopt)
    # the nuclear-norm penalty on the scattered ΔW reaches p
    opt.zero_grad()
    with torch.no_grad():
        for x in layers:
            x.sparse_values.add_(torch.randn_like(x.sparse_values) * 0.01)
    nuclear_penalty(layers).backward()
    assert layers[0].sparse_values.grad is not None and float(layers[0].sparse_values.grad.abs().sum()) > 0
    # progressive re-selection keeps the trained values (frozen sparse part) and the base weight unchanged
    w_before = layers[0].dense_weight().detach().clone()
    base_before = layers[0].weight.detach().clone()
    layers[0].reselect(opt)
    assert torch.allclose(layers[0].dense_weight(), w_before) and torch.equal(layers[0].weight, base_before)
    assert layers[0].sparse_values not in opt.state or not opt.state[layers[0].sparse_values]
    # explicit checkpoint: indices + values + base hash; reload onto the same base, refuse another base
    save_sparse(tmp_path / "s.safetensors", m, h.touched)
    with torch.no_grad():
        out = m(torch.ones(1, 32, 4, 4), torch.tensor([5]), torch.tensor([1]))
    m2 = tiny_dit()
    h2 = apply_adapter(m2, SaRAConfig(fraction=0.1, targets=["blocks_linear"]))
    load_sparse(tmp_path / "s.safetensors", m2, h2.touched)
    with torch.no_grad():
        assert torch.allclose(m2(torch.ones(1, 32, 4, 4), torch.tensor([5]), torch.tensor([1])), out, atol=1e-6)
    other = tiny_dit(seed=1)
    h3 = apply_adapter(other, SaRAConfig(fraction=0.1, targets=["blocks_linear"]))
    with pytest.raises(SparseCheckpointError, match="other base weights"):
        load_sparse(tmp_path / "s.safetensors", other, h3.touched)
    # merge() to plain dense Linear layers, same outputs
    h.merge()
    assert not any(isinstance(x, SparseLinear) for x in m.modules())
    with torch.no_grad():
        assert torch.allclose(m(torch.ones(1, 32, 4, 4), torch.tensor([5]), torch.tensor([1])), out, atol=1e-5)


def test_sara_nuclear_norm_is_the_handles_extra_loss():
    """SaRA's penalty reaches the engine through ``handle.extra_losses`` (the task adds nothing itself): weighted by
    nuclear_lambda, one seeded random layer per call, differentiable in the sparse values; FISH has none."""
    m = tiny_dit()
    h = apply_adapter(m, SaRAConfig(fraction=0.1, nuclear_lambda=0.5, seed=3))
    layers = [m.get_submodule(n) for n in h.touched]
    with torch.no_grad():
        for x in layers:
            x.sparse_values.add_(torch.randn_like(x.sparse_values) * 0.01)
    gen = torch.Generator().manual_seed(3)
    want = [0.5 * float(nuclear_penalty(layers, gen).detach()) for _ in range(3)]
    got = [h.extra_losses(m) for _ in range(3)]
    assert [set(g) for g in got] == [{"nuclear"}] * 3
    assert [float(g["nuclear"].detach()) for g in got] == pytest.approx(want)
    got[0]["nuclear"].backward()
    assert any(x.sparse_values.grad is not None and float(x.sparse_values.grad.abs().sum()) > 0 for x in layers)
    assert apply_adapter(tiny_dit(), SaRAConfig(fraction=0.1, nuclear_lambda=0.0)).extra_losses(m) == {}


def test_task_module_runs_the_documented_tools_cli():
    """``python -m vision_peft.tasks.diffusion base|sample|export|fisher`` (README) still parses its commands."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "vision_peft.tasks.diffusion", "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(cmd in out.stdout for cmd in ("base", "sample", "export", "fisher"))


def test_fish_uses_fisher_scores(tmp_path):
    from safetensors.torch import save_file

    m = tiny_dit()
    names = m.resolve_targets(["blocks_linear"])
    g = torch.Generator().manual_seed(0)  # one batch of 4 examples: fisher_scores splits it (per-example Fisher)
    batch = {"x": torch.randn(4, 32, 4, 4, generator=g), "t": torch.tensor([1, 200, 500, 900]),
             "y": torch.tensor([0, 1, 2, 0])}  # fmt: skip
    sc = fisher_scores(m, names, lambda b: m(b["x"], b["t"], b["y"]).pow(2).mean(), [batch])
    assert all(sc[n].shape == m.get_submodule(n).weight.shape for n in names)
    save_file(sc, str(tmp_path / "f.safetensors"))
    m.requires_grad_(False)
    h = apply_adapter(m, FISHConfig(fraction=0.05, fisher_file=str(tmp_path / "f.safetensors")))
    lay = m.get_submodule(names[0])
    top = sc[names[0]].reshape(-1).topk(5).indices
    assert torch.isin(top, lay.sparse_idx).all() and h.report["selected"] > 0


# -- KIND -------------------------------------------------------------------------------------------------------
def test_kind_pretrain_gates_and_transfer():
    m = tiny_dit(classes=4)
    m.requires_grad_(False)
    h = apply_adapter(m, KINDConfig(mode="pretrain", learngene_rank=8, tailor_rank=2, groups=2))
    assert h.touched[0] == ""  # pre-training trains the whole DiT (touched lists it, then the KIND layers)
    layers = h.touched[1:]
    assert layers and all(isinstance(m.get_submodule(n), KINDLinear) for n in layers)
    lay = m.get_submodule(layers[0])
    assert isinstance(lay, KINDLinear) and all(p.requires_grad for p in m.parameters())
    g = lay.gate(torch.tensor([0, 1, 2, 4]))  # class 4 = null: no tailor
    assert g.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]
    x = torch.randn(2, 32, 4, 4)
    m(x, torch.tensor([10, 20]), torch.tensor([0, 0])).pow(2).mean().backward()  # only group 0 classes
    assert float(lay.s_t.grad[2:].abs().sum()) == 0.0 and float(lay.s_t.grad[:2].abs().sum()) > 0
    assert float(lay.s_g.grad.abs().sum()) > 0  # learngenes learn from every class
    # transfer on a KIND-pre-trained checkpoint: learngenes frozen (base weight), new tailors trainable
    from vision_peft.adapters.kind import kind_pretrained_state

    sd, extra = kind_pretrained_state(m, layers)
    base = DiT(m.arch)
    base.load_state_dict(sd)
    base.extra_tensors = extra
    base.requires_grad_(False)
    h2 = apply_adapter(base, KINDConfig(mode="transfer", tailor_rank=2, groups=3, tailor_init="mean"))
    names = {n for n, p in base.named_parameters() if p.requires_grad}
    assert names and all(n.rsplit(".", 1)[1] in ("u_t", "s_t", "v_t") for n in names)
    assert base.get_submodule(h2.touched[0]).s_t.numel() == 6
    with pytest.raises(ValueError, match="KIND-pre-trained"):
        apply_adapter(tiny_dit(), KINDConfig(mode="transfer", tailor_init="mean"))
    # the class-conditioning hook: the backbone's forward hands y to the gates; on_classes follows a new class table
    base(x, torch.tensor([10, 20]), torch.tensor([1, 2]))
    assert base.kind_y.tolist() == [1, 2]
    base.reset_classes(5)
    h2.on_classes(["a", "b", "c", "d", "e"])
    assert base.get_submodule(h2.touched[0]).num_classes == 5
    # merge_and_unload: plain Linear layers with the learngene products, the tailors as kind.* tensors
    sd_want, extra_want = kind_pretrained_state(m, layers)
    extra = h.merge_and_unload()
    assert set(extra) == set(extra_want) and all(torch.equal(extra[k], extra_want[k]) for k in extra)
    assert all(type(m.get_submodule(n)) is nn.Linear for n in layers)
    assert set(m.state_dict()) == set(sd_want) and all(torch.equal(m.state_dict()[k], v) for k, v in sd_want.items())


# -- task end to end: pretrain → base checkpoint → SaRA adapt → sample grid → ONNX + onnxruntime sampler ----------
def test_diffusion_pretrain_adapt_sample_export(tmp_path, tiny_image_folder, weights_root, monkeypatch, torch_free):
    from vision_peft.deploy import load_bundle
    from vision_peft.diffusion_tools import export_diffusion, sample_run, write_base_checkpoint
    from vision_peft.predict import load_run
    from vision_peft.recipe import build_run_config
    from vision_peft.train import run

    data = tiny_image_folder(classes=("a", "b", "c"), per_class=3, size=(20, 24))
    common = {
        "train": {"max_steps": 2, "batch_size": 4, "device": "cpu", "log_every": 1, "epochs": 5},
        "output": {"runs_root": str(tmp_path / "runs")},
    }
    task = {"name": "diffusion", "data_root": str(data), "image_size": 16, "train_per_class": 2,
            "eval_per_class": 1, "flip": False, "prediction": "v"}  # fmt: skip
    pre = build_run_config(
        {
            **common,
            "task": {**task, "stage": "pretrain", "classes": ["a", "b"]},
            "backbone": {"name": "dit:d1-w32-h2-c2", "pretrained": False},
            "adapter": {"name": "full"},
        }
    )
    pre.output.name = "pre"
    base = write_base_checkpoint(run(pre, progress=False))
    ad = build_run_config(
        {
            **common,
            "task": {**task, "stage": "adapt", "classes": ["b", "c"]},
            "backbone": {"name": f"dit:{base}"},
            "adapter": {"name": "sara", "fraction": 0.2, "reselect_step": 1},
        }
    )
    ad.output.name = "sara"
    rd = run(ad, progress=False)
    _, _, model, _ = load_run(rd)
    with pytest.raises(DiffusionInputError, match="outside the trained classes"):
        model.sample(torch.tensor([2]), steps=2)
    a = model.sample(torch.tensor([0, 1]), steps=3, guidance=1.5, seed=7)
    b = model.sample(torch.tensor([0, 1]), steps=3, guidance=1.5, seed=7)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)  # deterministic DDIM
    assert sample_run(rd, ["c"], 2, tmp_path / "g.png", steps=2).is_file()
    with pytest.raises(DiffusionInputError, match="not trained"):
        sample_run(rd, ["zebra"], 1, tmp_path / "g2.png", steps=2)
    from vision_peft.cli import main as cli_main

    assert cli_main(["export", str(rd), "--bundle", str(tmp_path / "onnx")]) == 0  # one summary per graph
    man = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert set(export_diffusion(rd, tmp_path / "onnx2")["graphs"]) == {"denoiser", "decoder"}
    assert man["parity"]["merge_max_abs_diff"] < 1e-4
    assert set(man["graphs"]) == {"denoiser", "decoder"} and man["parity"]["passed"]
    assert all(r["passed"] and r["max_abs_diff"] < 1e-3 for r in man["parity"]["graphs"].values())
    bundle = load_bundle(tmp_path / "onnx", device="cpu")  # torch-free runtime (numpy DDIM + two graphs)
    noise = np.random.RandomState(0).standard_normal((2, 32, 2, 2)).astype(np.float32)
    img = bundle.generate(["b", "c"], steps=3, guidance=1.5, noise=noise)
    with pytest.raises(ValueError, match="outside the trained set"):
        bundle.generate(["a"], steps=2)  # "a" was a pre-training class, not an adapted one
    with pytest.raises(ValueError, match="steps"):
        bundle.generate(["b"], steps=0)
    with pytest.raises(ValueError, match="guidance"):
        bundle.generate(["b"], guidance=float("nan"))
    assert bundle.generate(["c"], steps=2, seed=3).shape == (1, 3, 16, 16)
    out = torch_free(
        f"""
        from vision_peft.deploy import main
        assert main([{str(tmp_path / "onnx")!r}, "b", "c", "--n", "2", "--steps", "2", "--out", {str(tmp_path / "g.png")!r}]) == 0
        """
    )
    assert '"n_per_class": 2' in out and (tmp_path / "g.png").is_file()
    from fastapi.testclient import TestClient

    from vision_peft.serve import ServeLimits, create_app

    client = TestClient(create_app(tmp_path / "onnx", device="cpu", limits=ServeLimits(max_images=4, max_steps=5)))
    r = client.post("/v1/generate", json={"classes": ["b", "c"], "n": 2, "steps": 2})
    assert r.status_code == 200 and r.json()["n_per_class"] == 2 and r.json()["grid_png_base64"]
    for body, code in (({"classes": ["zebra"], "steps": 2}, 422), ({"classes": ["b"], "n": 5}, 422),
                       ({"classes": ["b"], "steps": 50}, 422), ({"classes": "b"}, 422)):  # fmt: skip
        assert client.post("/v1/generate", json=body).status_code == code, body
    assert client.get("/health").json()["errors"] == 3  # the schema error (classes: str) never reaches the handler
    ref = model.sample(torch.tensor([0, 1]), steps=3, guidance=1.5, noise=torch.from_numpy(noise)).numpy()
    assert img.shape == (2, 3, 16, 16) and np.abs(img - ref).max() < 2e-3  # numpy+onnxruntime sampler parity


def test_fish_task_level_fisher_then_adapt(tmp_path, fish_recipe, weights_root):
    """FISH end to end through the task: Fisher scores of the base DiT on the recipe's data, then a sparse
    adaptation run whose trainable entries are the top-Fisher ones (the fraction asked for), then export."""

    from vision_peft.checkpoint import load_tensors
    from vision_peft.diffusion_tools import compute_fisher
    from vision_peft.export import export_run
    from vision_peft.recipe import build_run_config
    from vision_peft.train import run

    recipe, adapt = fish_recipe()
    scores = load_tensors(compute_fisher(str(recipe), tmp_path / "fisher.safetensors", batches=2))
    assert scores and all(float(v.min()) >= 0 for v in scores.values())  # squared gradients
    assert any(float(v.max()) > 0 for v in scores.values())
    from vision_peft.config import ConfigError
    from vision_peft.tasks import TASKS

    with pytest.raises(ConfigError, match="pre-trained to predict 'eps'"):  # a v run on an ε base is refused
        wrong = build_run_config({**adapt, "task": {**adapt["task"], "prediction": "v"}})
        TASKS.get("diffusion").builder(wrong).build_model()
    rd = run(build_run_config(adapt), progress=False)
    info = json.loads((rd / "config.json").read_text())
    total = sum(v.numel() for v in scores.values())
    trainable = info["parameters"]["trainable"] - info["parameters"]["head"]
    assert abs(trainable - 0.05 * total) <= len(scores) + 1  # the asked fraction of the scored entries
    saved = load_tensors(rd / "adapter.safetensors")
    tau = float(torch.quantile(torch.cat([v.flatten() for v in scores.values()]), 0.9))
    checked = 0
    for name, sc in scores.items():  # the trained entries are among the highest-Fisher ones, globally
        key = f"backbone.{name.removesuffix('.weight')}.sparse_idx"
        if key in saved and saved[key].numel():
            assert float(sc.flatten()[saved[key].long()].min()) >= tau, name
            checked += 1
    assert checked > 0, sorted(saved)[:8]
    assert export_run(rd, tmp_path / "bundle")["parity"]["passed"]
