"""SaRA / FISH as their papers define them: per-example Fisher, a nuclear-norm penalty that does not act at ΔW = 0,
every tensor eligible (configurable), a re-selection hook that goes away, and old runs / fisher files still loading.
Tiny DiTs, 16 px images."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks

from vision_peft.adapters import apply_adapter
from vision_peft.adapters.sara import (
    FISHConfig,
    SaRAConfig,
    SparseCheckpointError,
    SparseLinear,
    SparseTensor,
    eligible_tensors,
    fisher_scores,
    load_sparse,
    nuclear_norm,
    save_sparse,
    sparse_holders,
)
from vision_peft.backbones.dit import DiT, DiTArch


def tiny_dit(classes: int = 3, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(DiTArch(depth=1, width=32, heads=2, num_classes=classes))
    with torch.no_grad():  # adaLN-Zero starts at zero output: give every tensor some weight so gradients flow
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.requires_grad_(False)


def examples(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 32, 4, 4, generator=g),
        "t": torch.randint(0, 1000, (n,), generator=g),
        "y": torch.randint(0, 3, (n,), generator=g),
        "target": torch.randn(n, 32, 4, 4, generator=g),
    }


def mean_loss(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return (m(b["x"], b["t"], b["y"]) - b["target"]).pow(2).mean()


# -- FISH: per-example Fisher --------------------------------------------------------------------------------
def test_fisher_is_the_mean_of_per_example_squared_gradients():
    """fisher_scores (vmap and loop) equals a brute-force per-example computation; the old estimate (the squared
    gradient of the batch-mean loss) does not."""
    m = tiny_dit()
    names = ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.adaLN.weight", "blocks.0.mlp.fc1"]
    ex = examples(10)
    brute = {n: 0.0 for n in names}
    for i in range(10):  # brute force: one example at a time, plain autograd
        w = [m.get_parameter(n if n.endswith(("weight", "bias")) else n + ".weight") for n in names]
        for t in w:
            t.requires_grad_(True)
        gs = torch.autograd.grad(mean_loss(m, {k: v[i : i + 1] for k, v in ex.items()}), w)
        for t in w:
            t.requires_grad_(False)
        for n, g in zip(names, gs, strict=True):
            brute[n] = brute[n] + g**2 / 10
    batches = [{k: v[:4] for k, v in ex.items()}, {k: v[4:] for k, v in ex.items()}]  # 4 + 6 examples
    for method, chunk in (("vmap", 3), ("loop", 16)):
        sc = fisher_scores(m, names, lambda b: mean_loss(m, b), batches, method=method, chunk=chunk)
        assert set(sc) == set(names)
        for n in names:
            assert torch.allclose(sc[n], brute[n], rtol=1e-4, atol=1e-10), (method, n)
    assert sc["blocks.0.mlp.fc1"].shape == m.blocks[0].mlp.fc1.weight.shape  # a module name = its Linear weight
    assert not any(p.requires_grad for p in m.parameters())  # flags restored
    w = m.blocks[0].attn.qkv.weight.requires_grad_(True)
    g_mean = torch.autograd.grad(mean_loss(m, ex), w)[0]
    w.requires_grad_(False)
    assert not torch.allclose(g_mean**2, brute["blocks.0.attn.qkv.weight"], rtol=0.1)  # the old formula is off
    # an opaque item (here a seed) is one example whose loss loss_fn returns: the mean-loss batch as one "example"
    old = fisher_scores(m, names, lambda seed: mean_loss(m, ex), [0], method="loop")
    assert torch.allclose(old["blocks.0.attn.qkv.weight"], g_mean**2)


def test_fisher_rejects_unknown_names_and_methods():
    m = tiny_dit()
    with pytest.raises(ValueError, match="neither a parameter nor an nn.Linear"):
        fisher_scores(m, ["blocks.0.norm1"], lambda b: mean_loss(m, b), [examples(2)])
    with pytest.raises(ValueError, match="vmap or loop"):
        fisher_scores(m, ["final.weight"], lambda b: mean_loss(m, b), [examples(2)], method="jacobian")


def test_fish_reads_old_and_new_fisher_files_alike(tmp_path):
    """An older fisher file (Linear module names as keys, no metadata) selects the same entries as the same scores
    under parameter names; a file lacking a tensor or of another shape is refused with the command to fix it."""
    from safetensors.torch import save_file

    m = tiny_dit()
    entries = eligible_tensors(m, ["blocks_linear"], "linear")
    g = torch.Generator().manual_seed(1)
    scores = {mod: torch.rand(getattr(m.get_submodule(mod), pn).shape, generator=g) for _, mod, pn in entries}
    save_file(scores, str(tmp_path / "old.safetensors"))
    save_file({f"{k}.weight": v for k, v in scores.items()}, str(tmp_path / "new.safetensors"))
    idx = []
    for f in ("old", "new"):
        mm = tiny_dit()
        apply_adapter(mm, FISHConfig(fraction=0.1, fisher_file=str(tmp_path / f"{f}.safetensors")))
        idx.append({n: mm.get_submodule(n).sparse_idx.clone() for _, n, _ in entries})
    assert all(torch.equal(idx[0][n], idx[1][n]) for n in idx[0])
    with pytest.raises(ValueError, match="lacks scores for .*bias.*diffusion_tools fisher"):
        apply_adapter(
            tiny_dit(), FISHConfig(fraction=0.1, eligible="all", fisher_file=str(tmp_path / "old.safetensors"))
        )
    save_file({k: v[:1] for k, v in scores.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="another backbone"):
        apply_adapter(tiny_dit(), FISHConfig(fraction=0.1, fisher_file=str(tmp_path / "bad.safetensors")))


def test_fisher_command_is_per_example_over_n_samples(tmp_path, fish_recipe, weights_root):
    """``diffusion_tools fisher RECIPE --samples N``: N per-example squared gradients of the base DiT's eligible
    tensors (biases and adaLN with ``eligible: all``), recorded in the file's metadata; the older ``--batches``
    still means N = batches × batch_size; a FISH run trains the top-Fisher entries of every eligible tensor."""
    from safetensors import safe_open

    from vision_peft.checkpoint import load_tensors
    from vision_peft.diffusion_tools import main
    from vision_peft.recipe import build_run_config
    from vision_peft.train import run

    recipe, adapt = fish_recipe("all")
    out = tmp_path / "fisher.safetensors"
    main(["fisher", str(recipe), "--samples", "6", "--chunk", "4", "--out", str(out)])
    with safe_open(str(out), "pt") as f:
        md, keys = f.metadata(), set(f.keys())
    assert md["format"] == "vision_peft.fisher/2" and md["samples"] == "6" and md["eligible"] == "all"
    assert {"blocks.0.attn.qkv.bias", "blocks.0.adaLN.weight", "blocks.0.adaLN.bias", "final.bias"} <= keys
    main(["fisher", str(recipe), "--batches", "2", "--out", str(tmp_path / "f2.safetensors")])
    with safe_open(str(tmp_path / "f2.safetensors"), "pt") as f:
        assert f.metadata()["samples"] == "8"  # 2 batches x batch_size 4
    scores = load_tensors(out)
    rd = run(build_run_config(adapt), progress=False)
    saved = load_tensors(rd / "adapter.safetensors")
    assert any(".parametrizations.bias.0.sparse_idx" in k for k in saved)  # biases are trained too
    tau = float(
        torch.cat([v.flatten() for v in scores.values()])
        .topk(round(0.05 * sum(map(torch.numel, scores.values()))))
        .values[-1]
    )
    for key, sc in scores.items():
        mod, pn = key.rsplit(".", 1)
        k = f"backbone.{mod}.sparse_idx" if pn == "weight" else f"backbone.{mod}.parametrizations.{pn}.0.sparse_idx"
        if k in saved and saved[k].numel():
            assert float(sc.flatten()[saved[k].long()].min()) >= tau, key


# -- nuclear norm ----------------------------------------------------------------------------------------------
def _train(cfg: SaRAConfig, steps: int) -> list[list[torch.Tensor]]:
    """Sparse values after each of ``steps`` AdamW steps on fixed batches (the penalty via handle.extra_losses)."""
    m = tiny_dit()
    h = apply_adapter(m, cfg)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    out = []
    for s in range(steps):
        loss = mean_loss(m, examples(4, seed=s))
        loss = loss + sum(h.extra_losses(m).values(), torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        h.step_fn(s + 1, steps)
        out.append([p.detach().clone() for p in params])
    return out


def test_nuclear_penalty_leaves_the_first_steps_unchanged():
    """At ΔW = 0 the penalty's gradient is zero (the minimum-norm subgradient), so step 1 equals the unpenalised
    step; with ``nuclear_start`` the first steps equal it exactly and the penalty acts afterwards."""
    z = torch.zeros(6, 4, requires_grad=True)
    torch.linalg.matrix_norm(z, ord="nuc").backward()
    assert float(z.grad.abs().sum()) > 0  # the old formula: an arbitrary U Vᵀ at ΔW = 0
    z.grad = None
    nuclear_norm(z).backward()
    assert float(z.grad.abs().sum()) == 0.0
    x = torch.randn(6, 4, dtype=torch.float64)
    assert float(nuclear_norm(x)) == pytest.approx(float(torch.linalg.matrix_norm(x, ord="nuc")), rel=1e-5)
    lowrank = (torch.randn(6, 1) @ torch.randn(1, 4)).requires_grad_(True)
    nuclear_norm(lowrank).backward()  # rank 1: the gradient is u1 v1ᵀ, nothing on the null directions
    assert torch.linalg.matrix_rank(lowrank.grad) == 1

    plain = _train(SaRAConfig(fraction=0.2, nuclear_lambda=0.0), 4)
    at0 = _train(SaRAConfig(fraction=0.2, nuclear_lambda=1.0), 4)
    late = _train(SaRAConfig(fraction=0.2, nuclear_lambda=1.0, nuclear_start=2), 4)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
    assert same(plain[0], at0[0]) and not same(plain[1], at0[1])  # step 1 untouched, then the penalty acts
    assert same(plain[0], late[0]) and same(plain[1], late[1]) and not same(plain[2], late[2])


# -- eligible tensors, re-selection, merge, checkpoints --------------------------------------------------------
def test_eligible_all_trains_biases_and_adaln_and_merges(tmp_path):
    """``eligible: all`` selects among every tensor of the targeted modules (Linear weights and biases, adaLN, the
    class table), with one global quantile; the model is unchanged at step 0, gradients reach the bias entries,
    re-selection covers every tensor, save/load and merge round-trip, other base weights are refused."""
    m, ref = tiny_dit(), tiny_dit()
    h = apply_adapter(m, SaRAConfig(fraction=0.1, eligible="all", targets=["*"]))
    entries = eligible_tensors(ref, ["*"], "all")
    total = sum(getattr(ref.get_submodule(mod), pn).numel() for _, mod, pn in entries)
    assert h.report["total"] == total == sum(p.numel() for p in ref.parameters())
    assert h.report["selected"] == round(0.1 * total)
    assert {"blocks.0.attn.qkv.bias", "blocks.0.adaLN", "blocks.0.adaLN.bias", "y_embed.weight"} <= set(
        h.report["per_tensor"]
    )
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == h.report["selected"]
    ex = examples(4)
    with torch.no_grad():
        assert torch.equal(mean_loss(m, ex), mean_loss(ref, ex))
    bias = m.blocks[0].attn.qkv.parametrizations.bias[0]
    assert isinstance(bias, SparseTensor) and isinstance(m.blocks[0].attn.qkv, SparseLinear)
    mean_loss(m, ex).backward()
    assert bias.sparse_values.grad is not None and float(bias.sparse_values.grad.abs().sum()) > 0
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.05)
    holders = sparse_holders(m, h.touched)
    assert len(holders) == sum(1 for c in h.report["per_tensor"].values() if c)  # one holder per selected tensor
    save_sparse(tmp_path / "s.safetensors", m, h.touched)
    with torch.no_grad():
        want = mean_loss(m, ex)
    m2 = tiny_dit()
    h2 = apply_adapter(m2, SaRAConfig(fraction=0.1, eligible="all", targets=["*"]))
    load_sparse(tmp_path / "s.safetensors", m2, h2.touched)
    with torch.no_grad():
        assert torch.equal(mean_loss(m2, ex), want)
    other = tiny_dit(seed=1)
    h3 = apply_adapter(other, SaRAConfig(fraction=0.1, eligible="all", targets=["*"]))
    with pytest.raises(SparseCheckpointError, match="other base weights"):
        load_sparse(tmp_path / "s.safetensors", other, h3.touched)
    from vision_peft.adapters.sara import reselect

    reselect(m, h.touched)  # every tensor, same count, the model unchanged by the re-selection itself
    with torch.no_grad():
        assert torch.allclose(mean_loss(m, ex), want, atol=1e-6)
    assert all(bool(hold.sparse_reselected) for hold, _ in holders)
    h.merge()
    assert all(type(mod) in (nn.Linear, nn.Embedding, nn.LayerNorm) or not list(mod.parameters(recurse=False))
               for mod in m.modules())  # fmt: skip
    assert not any(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert torch.allclose(mean_loss(m, ex), want, atol=1e-6)


def test_reselection_hook_is_removed_after_it_fires():
    n0 = len(_global_optimizer_post_hooks)
    m = tiny_dit()
    h = apply_adapter(m, SaRAConfig(fraction=0.2, reselect_step=2, nuclear_lambda=0.0, eligible="all"))
    assert len(_global_optimizer_post_hooks) == n0 + 1
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    first = sparse_holders(m, h.touched)[0][0]
    for s in range(3):
        opt.zero_grad()
        mean_loss(m, examples(4, s)).backward()
        opt.step()
        h.step_fn(s + 1, 3)
        assert bool(first.sparse_reselected) == (s >= 1)
        assert len(_global_optimizer_post_hooks) == (n0 + 1 if s < 1 else n0)
    assert h.report["reselected_at"] == 2 and h.hook is None
    h2 = apply_adapter(tiny_dit(), SaRAConfig(fraction=0.2, reselect_step=5))
    h2.merge()  # merging (export) removes a hook that never fired
    assert len(_global_optimizer_post_hooks) == n0


def test_config_rule_for_eligible_and_validation():
    assert SaRAConfig().eligible == "linear" and FISHConfig().eligible == "linear"  # a missing key: Linear-only
    with pytest.raises(ValueError, match="eligible must be one of"):
        SaRAConfig(eligible="everything")
    with pytest.raises(ValueError, match="nuclear_start"):
        SaRAConfig(nuclear_start=-1)
    m = tiny_dit()
    h = apply_adapter(m, SaRAConfig(fraction=0.1))  # linear: only Linear weights, the old layout
    assert all(isinstance(m.get_submodule(n), SparseLinear) for n in h.touched)
    assert not any("parametrizations" in k for k in m.state_dict())


# -- old run directories -------------------------------------------------------------------------------------
OLD_SPARSE_KEYS = {
    "sparse_idx",
    "sparse_values",
    "sparse_frozen_idx",
    "sparse_frozen_values",
    "sparse_frozen_count",
    "sparse_reselected",
    "sparse_base_hash",
}  # fmt: skip  (the layout written before `eligible`)


def test_old_sara_run_dir_keeps_loading_with_the_same_outputs(tmp_path, tiny_image_folder, weights_root):
    """A SaRA run whose config.json has none of the new keys (eligible, nuclear_start) loads as the Linear-only
    adapter it was, with the old tensor layout, and samples exactly as before; a run with ``eligible: all``,
    ``nuclear_start`` and re-selection loads and exports with parity."""
    from vision_peft.checkpoint import load_tensors
    from vision_peft.diffusion_tools import write_base_checkpoint
    from vision_peft.export import export_run
    from vision_peft.predict import load_run
    from vision_peft.recipe import build_run_config
    from vision_peft.train import run

    data = tiny_image_folder(classes=("a", "b", "c"), per_class=3, size=(20, 24))
    task = {"name": "diffusion", "data_root": str(data), "image_size": 16, "train_per_class": 2,
            "eval_per_class": 1, "flip": False}  # fmt: skip
    common = {"train": {"max_steps": 3, "batch_size": 4, "device": "cpu", "log_every": 1, "epochs": 5},
              "output": {"runs_root": str(tmp_path / "runs")}}  # fmt: skip
    pre = build_run_config({**common, "task": {**task, "stage": "pretrain", "classes": ["a", "b"]},
                            "backbone": {"name": "dit:d1-w32-h2-c2", "pretrained": False},
                            "adapter": {"name": "full"}})  # fmt: skip
    pre.output.name = "pre"
    base = write_base_checkpoint(run(pre, progress=False))
    n0 = len(_global_optimizer_post_hooks)
    runs = {}
    for name, adapter in (("old", {"name": "sara", "fraction": 0.2, "reselect_step": 1}),
                          ("all", {"name": "sara", "fraction": 0.2, "reselect_step": 2, "eligible": "all",
                                   "nuclear_start": 1, "targets": ["blocks.*", "final_adaLN", "final"]})):  # fmt: skip
        cfg = build_run_config({**common, "task": {**task, "stage": "adapt", "classes": ["b", "c"]},
                                "backbone": {"name": f"dit:{base}"}, "adapter": adapter})  # fmt: skip
        cfg.output.name = name
        runs[name] = run(cfg, progress=False)
    assert len(_global_optimizer_post_hooks) == n0  # both runs' re-selection hooks are gone
    noise = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(0))
    _, _, model, _ = load_run(runs["old"])
    want = model.sample(torch.tensor([0, 1]), steps=2, noise=noise)
    cfg_file = runs["old"] / "config.json"
    info = json.loads(cfg_file.read_text())
    for k in ("eligible", "nuclear_start"):
        info["config"]["adapter"].pop(k)
    cfg_file.write_text(json.dumps(info))
    _, _, model, _ = load_run(runs["old"])
    assert torch.equal(model.sample(torch.tensor([0, 1]), steps=2, noise=noise), want)
    saved = load_tensors(runs["old"] / "adapter.safetensors")
    sparse = {k.rsplit(".", 1)[1] for k in saved if ".sparse_" in k}
    assert sparse == OLD_SPARSE_KEYS and not any("parametrizations" in k for k in saved)
    _, _, model, _ = load_run(runs["all"])
    assert any(".parametrizations." in k for k in model.adapter_state_dict())
    assert bool(sparse_holders(model.backbone, model.adapter.touched)[0][0].sparse_reselected)
    assert export_run(runs["all"], tmp_path / "bundle")["parity"]["passed"]
