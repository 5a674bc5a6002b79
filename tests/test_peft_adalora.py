"""AdaLoRA → peft (vision_peft.peft_adalora via ``export_peft``), checked against the real ``peft`` package: a short
AdaLoRA run on the offline recipe classification-tiny (timm:test_vit at 32², AID classes) whose budget masks ranks
exports as a peft ADALORA folder; ``peft.PeftModel.from_pretrained`` on the plain timm model gives the run's logits
on fresh inputs, and the masked triplets are absent from the file. P, Q and the live λ are made larger first (a
few-step λ is at most ~steps × lr under AdamW, which would make any mapping "match" within the parity tolerance);
the masks stay the run's. The reverse: our export and a folder peft trained itself import as adalora runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_IMAGE_SIZE, reset_vision_peft_logging

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

STEPS = 8
ADALORA = {"name": "adalora", "init_r": 3, "target_r": 1, "targets": ["qkv", "mlp"], "tinit": 1, "tfinal": 2,
           "deltaT": 1, "alpha": 6.0}  # fmt: skip


def _train(root: Path, name: str, adapter: dict, backbone: dict | None = None) -> Path:
    from vision_peft.recipe import load_recipe
    from vision_peft.train import run

    over = {"backbone": backbone or {"name": "timm:test_vit", "pretrained": False, "image_size": TINY_IMAGE_SIZE},
            "adapter": adapter, "task": {"split": {"train": 8, "val": 2, "test": 2}},
            "train": {"max_steps": STEPS, "epochs": 20, "batch_size": 4, "lr": 1e-2, "device": "cpu", "log_every": 1},
            "output": {"runs_root": str(root), "name": name}}  # fmt: skip
    try:
        return Path(run(load_recipe("classification-tiny", over), progress=False))
    finally:
        reset_vision_peft_logging()


def _enlarge(run_dir: Path, seed: int = 1, edit=None) -> dict[str, torch.Tensor]:
    """P, Q ~ N(0, 0.3²) and live λ ~ N(0, 1) written back (masked λ stay as trained); returns the new tensors."""
    from vision_peft import checkpoint as ckpt

    sd = ckpt.load_tensors(run_dir / "adapter.safetensors")
    g = torch.Generator().manual_seed(seed)
    for k, v in list(sd.items()):
        if k.endswith(("adalora.lora_A", "adalora.lora_B")):
            sd[k] = torch.randn(v.shape, generator=g) * 0.3
        elif k.endswith("adalora.lora_E"):
            live = sd[k[: -len("lora_E")] + "mask"] > 0
            sd[k] = torch.where(live, torch.randn(v.shape, generator=g), v)
    if edit is not None:
        edit(sd)
    ckpt.save_tensors(run_dir / "adapter.safetensors", sd)
    return sd


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run, its runs root): AdaLoRA init_r 3 → target_r 1 on qkv + mlp, 8 steps, trained masks."""
    root = tmp_path_factory.mktemp("adalora-peft")
    return _train(root, "adalora", ADALORA), root


def _plain_timm(n_classes: int) -> torch.nn.Module:
    """The timm model a peft user builds for our ``timm:test_vit`` runs (random init, seed 0, as our backbone)."""
    from vision_peft.backbones.base import seeded_init

    model = seeded_init(lambda: timm.create_model("test_vit", pretrained=False, num_classes=0,
                                                  img_size=TINY_IMAGE_SIZE))  # fmt: skip
    model.reset_classifier(n_classes)
    return model.eval()


def _ours_vs_peft(run_dir: Path, peft_dir: Path, seed: int = 7) -> tuple[float, float, float]:
    """(max |Δ| ours vs PeftModel logits, max |ours|, max |ours − frozen|) on 5 fresh random inputs."""
    from vision_peft.predict import load_run

    _, task, model, _ = load_run(run_dir)
    base = _plain_timm(len(task.classes))
    frozen = copy.deepcopy(base)
    pm = peft.PeftModel.from_pretrained(base, str(peft_dir)).eval()
    x = torch.randn(5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model.logits(x)
        plain = model.head(frozen.forward_head(frozen.forward_features(x), pre_logits=True))
        return float((ours - pm(x)).abs().max()), float(ours.abs().max()), float((ours - plain).abs().max())


def _our_layers(run_dir: Path) -> dict[str, torch.nn.Module]:
    from vision_peft.adapters.adalora import AdaLoRATriplets
    from vision_peft.predict import load_run

    _, _, model, _ = load_run(run_dir)
    return {n.removeprefix("model.").removesuffix(".adalora"): m for n, m in model.backbone.named_modules()
            if isinstance(m, AdaLoRATriplets)}  # fmt: skip


def test_trained_masks_prune_ranks_and_masked_lambda_is_zero(adalora_run) -> None:
    run_dir, _ = adalora_run
    layers = _our_layers(run_dir)
    ranks = [t.rank for t in layers.values()]
    assert sum(ranks) == ADALORA["target_r"] * len(layers) < ADALORA["init_r"] * len(layers)
    assert all(float(t.lora_E.detach()[t.mask == 0].abs().sum()) == 0.0 for t in layers.values())


def test_export_adalora_loads_in_peft_with_equal_logits_and_masked_ranks_absent(adalora_run) -> None:
    from safetensors import safe_open

    from vision_peft.peft_interop import PARITY_ATOL, export_peft

    run_dir, root = adalora_run
    _enlarge(run_dir)
    out = root / "peft-adalora"
    summary = export_peft(run_dir, out)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "ADALORA" and conf["init_r"] == 3 and conf["target_r"] == 1
    assert conf["lora_alpha"] == 6.0 and conf["total_step"] == STEPS and conf["modules_to_save"] == ["head"]
    layers = _our_layers(run_dir)
    assert sorted(conf["target_modules"]) == sorted(layers)
    assert conf["rank_pattern"] == {f"{n}.lora_E": [bool(v) for v in (t.mask > 0).tolist()] for n, t in layers.items()}
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for n, t in layers.items():
        live = t.mask > 0
        key = f"base_model.model.{n}"
        assert saved[f"{key}.lora_E"].shape == (t.rank, 1) and saved[f"{key}.lora_A"].shape[0] == t.rank
        assert saved[f"{key}.lora_B"].shape[1] == t.rank, f"{n}: masked triplets must be absent from the file"
        torch.testing.assert_close(saved[f"{key}.lora_A"], t.lora_A[live].detach())
        torch.testing.assert_close(saved[f"{key}.lora_B"], t.lora_B[:, live].detach())
        # λ carries peft's (init_r + 1e-5) / init_r
        torch.testing.assert_close(saved[f"{key}.lora_E"][:, 0], t.lora_E[live].detach() * (3 + 1e-5) / 3)
    assert any(t.rank == 0 for t in layers.values()) or summary["triplets"] < 3 * len(layers)
    diff, biggest, effect = _ours_vs_peft(run_dir, out)
    assert effect > 1e-2, "the adapter must change the logits, else equality is trivially true"
    assert diff <= PARITY_ATOL * max(1.0, biggest)
    assert summary["peft_type"] == "ADALORA" and summary["parity"]["max_abs_diff"] <= PARITY_ATOL * max(1.0, biggest)
    assert summary["masked_but_nonzero"] == 0 and summary["triplets"] == sum(t.rank for t in layers.values())


def test_masked_triplet_with_nonzero_lambda_is_exported_with_it(adalora_run) -> None:
    """A run that ends between allocations can hold a masked λ ≠ 0; the run uses it, so the export keeps it."""
    from vision_peft.peft_interop import PARITY_ATOL, export_peft

    run_dir, root = adalora_run
    copy_dir = root / "adalora-moved"
    import shutil

    shutil.copytree(run_dir, copy_dir)
    moved: list[str] = []

    def revive(sd: dict[str, torch.Tensor]) -> None:
        for k in sorted(sd):
            if k.endswith("adalora.mask") and bool((sd[k] == 0).any()):
                e = k[: -len("mask")] + "lora_E"
                sd[e][int((sd[k] == 0).nonzero()[0])] = 0.7
                moved.append(k)
                return

    _enlarge(copy_dir, seed=2, edit=revive)
    assert moved, "the fixture's budget left no masked triplet"
    summary = export_peft(copy_dir, root / "peft-moved")
    assert summary["masked_but_nonzero"] == 1
    diff, biggest, _ = _ours_vs_peft(copy_dir, root / "peft-moved")
    assert diff <= PARITY_ATOL * max(1.0, biggest)


def test_open_clip_adalora_on_mlp_exports_with_the_head_file(tmp_path) -> None:
    """open_clip: AdaLoRA on the tower's MLP Linears → encode_image of the PeftModel on the whole CLIP model."""
    from vision_peft.peft_interop import HEAD_NAME, PARITY_ATOL, export_peft

    bb = {"name": "open_clip:vp-tiny-clip", "pretrained": False, "image_size": TINY_IMAGE_SIZE}
    run_dir = _train(tmp_path, "clip-adalora-mlp", {**ADALORA, "targets": ["mlp"]}, backbone=bb)
    _enlarge(run_dir)
    summary = export_peft(run_dir, tmp_path / "peft")
    assert summary["peft_type"] == "ADALORA" and (tmp_path / "peft" / HEAD_NAME).is_file()
    assert summary["parity"]["compared"].startswith("image features") and summary["parity"]["adapter_effect"] > 1e-2
    assert summary["parity"]["max_abs_diff"] <= PARITY_ATOL * max(1.0, summary["parity"]["max_abs_output"])
    assert all(n.startswith("visual.") for n in summary["rank_per_module"])


def test_weight_space_adalora_is_refused_with_the_reason(tmp_path) -> None:
    """AdaLoRA on open_clip's fused MHA (qkv = in_proj_weight, weight space): peft's AdaLoRA has no MHA layer."""
    from vision_peft.peft_interop import PeftInteropError, export_peft

    bb = {"name": "open_clip:vp-tiny-clip", "pretrained": False, "image_size": TINY_IMAGE_SIZE}
    run_dir = _train(tmp_path, "clip-adalora", {**ADALORA, "targets": ["qkv"]}, backbone=bb)
    with pytest.raises(PeftInteropError, match="weight space.*MultiheadAttention") as e:
        export_peft(run_dir, tmp_path / "never")
    assert "export" in str(e.value) and str(run_dir) in str(e.value)
    assert not (tmp_path / "never").exists()


# -- peft → ours -----------------------------------------------------------------------------------------------------
IMPORT_SETS = ["backbone.pretrained=false", f"backbone.image_size={TINY_IMAGE_SIZE}"]


def _imported_vs_peft(run_dir: Path, peft_dir: Path) -> tuple[float, float, float]:
    """(max |Δ| imported run vs PeftModel logits, max |ours|, max |ours − frozen|) on 5 fresh random inputs."""
    return _ours_vs_peft(run_dir, peft_dir, seed=11)


def test_exported_adalora_imports_back_with_its_masks(adalora_run) -> None:
    from vision_peft.peft_import import import_peft
    from vision_peft.peft_interop import PARITY_ATOL, export_peft

    run_dir, root = adalora_run
    _enlarge(run_dir, seed=3)
    export_peft(run_dir, root / "peft-rt")
    summary = import_peft(root / "peft-rt", "timm:test_vit", "classification-tiny", root / "imported-rt",
                          overrides=IMPORT_SETS)  # fmt: skip
    assert summary["adapter"] == "adalora" and summary["init_r"] == 3 and summary["classes_from"].endswith("metadata")
    ours, back = _our_layers(run_dir), _our_layers(root / "imported-rt")
    assert sorted(ours) == sorted(back)
    for n, t in ours.items():
        torch.testing.assert_close(back[n].mask, t.mask)
        live = t.mask > 0
        assert float(back[n].lora_A.detach()[~live].abs().sum()) == 0.0  # absent from the file: zeros
        torch.testing.assert_close(back[n].lora_E.detach(), t.lora_E.detach())
    diff, biggest, effect = _imported_vs_peft(root / "imported-rt", root / "peft-rt")
    assert effect > 1e-2 and diff <= PARITY_ATOL * max(1.0, biggest)


@pytest.fixture(scope="module")
def peft_trained(tmp_path_factory) -> tuple[Path, dict]:
    """A peft AdaLoraModel trained by peft itself (6 steps, update_and_allocate, masks from its RankAllocator)."""
    root = tmp_path_factory.mktemp("peft-made")
    base = _plain_timm(3)
    pcfg = peft.AdaLoraConfig(init_r=3, target_r=1, lora_alpha=4, target_modules=["qkv", "fc1"], total_step=6,
                              tinit=1, tfinal=2, deltaT=1, modules_to_save=["head"])  # fmt: skip
    pm = peft.get_peft_model(base, pcfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        x = torch.randn(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
        loss = torch.nn.functional.cross_entropy(pm(x), torch.randint(0, 3, (4,), generator=g))
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(str(root / "peft"))
    return root, json.loads((root / "peft" / "adapter_config.json").read_text())


def test_peft_trained_adalora_imports_with_equal_logits(peft_trained) -> None:
    from vision_peft.peft_import import import_peft
    from vision_peft.peft_interop import PARITY_ATOL

    root, conf = peft_trained
    pattern = conf["rank_pattern"]
    assert pattern and any(not all(v) for v in pattern.values()), "peft's allocation must have masked triplets"
    summary = import_peft(root / "peft", "timm:test_vit", "classification-tiny", root / "imported",
                          classes=["Beach", "Forest", "Port"], overrides=IMPORT_SETS)  # fmt: skip
    assert summary["parity"]["max_abs_diff"] <= PARITY_ATOL * max(1.0, summary["parity"]["max_abs_output"])
    back = _our_layers(root / "imported")
    assert "Imported from the peft AdaLoRA adapter folder" in (root / "imported" / "README.md").read_text()
    assert {f"{n}.lora_E": [bool(v) for v in (t.mask > 0).tolist()] for n, t in back.items()} == pattern
    diff, biggest, effect = _imported_vs_peft(root / "imported", root / "peft")
    assert effect > 1e-3 and diff <= PARITY_ATOL * max(1.0, biggest)


def test_rank_pattern_that_does_not_fit_the_tensors_is_refused(peft_trained, tmp_path) -> None:
    import shutil

    from vision_peft.peft_import import import_peft
    from vision_peft.peft_interop import PeftInteropError

    root, conf = peft_trained
    shutil.copytree(root / "peft", tmp_path / "peft")
    key = next(k for k, v in sorted(conf["rank_pattern"].items()) if not all(v))
    conf["rank_pattern"][key] = [True] * len(conf["rank_pattern"][key])  # a higher rank than the file holds
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(PeftInteropError, match=r"adapter_model\.safetensors.*do not fit"):
        import_peft(tmp_path / "peft", "timm:test_vit", "classification-tiny", tmp_path / "run",
                    classes=["Beach", "Forest", "Port"], overrides=IMPORT_SETS)  # fmt: skip
    assert not (tmp_path / "run").exists()
