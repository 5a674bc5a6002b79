"""peft interop, both ways (vision_peft.peft_interop, CLI ``export --peft`` / ``import-peft``), checked against the
real ``peft`` package: a run exported as a peft folder must give the run's outputs through
``peft.PeftModel.from_pretrained`` on the plain timm / open_clip model, and a LoRA folder peft itself wrote must give
PeftModel's outputs through our imported run. Every LoRA B is made non-zero first (B = 0 would make any mapping
"match"); tiny random-init models at 32×32 keep it fast."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_IMAGE_SIZE, make_run_cfg, reset_vision_peft_logging, write_image_folder

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

TIMM_SETS = ["backbone.pretrained=false", f"backbone.image_size={TINY_IMAGE_SIZE}"]
OC = {"name": "open_clip:vp-tiny-clip", "pretrained": False, "image_size": TINY_IMAGE_SIZE}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("peft")
    write_image_folder(base / "data")
    return base


def _train(work: Path, name: str, **sections) -> Path:
    from vision_peft.train import run

    try:
        return Path(run(make_run_cfg(work / "data", work / "runs", f"output.name={name}", **sections), progress=False))
    finally:
        reset_vision_peft_logging()


def _randomise(run_dir: Path, seed: int = 1, edit=None) -> dict[str, torch.Tensor]:
    """Non-zero random lora_B (and whatever ``edit`` changes) written back into the run's adapter.safetensors."""
    from vision_peft import checkpoint as ckpt

    sd = ckpt.load_tensors(run_dir / "adapter.safetensors")
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.3 if k.endswith("lora_B") else v for k, v in sd.items()}
    if edit is not None:
        edit(sd, g)
    ckpt.save_tensors(run_dir / "adapter.safetensors", sd)
    return sd


@pytest.fixture(scope="module")
def lora_export(work) -> tuple[Path, Path]:
    """(run, peft folder): LoRA r=2 on qkv of timm:test_vit, non-zero B, exported with export_peft."""
    from vision_peft.peft_interop import export_peft

    run_dir = _train(work, "lora-fixture")
    _randomise(run_dir)
    export_peft(run_dir, work / "peft-lora-fixture")
    return run_dir, work / "peft-lora-fixture"


@pytest.fixture(scope="module")
def clip_export(work) -> tuple[Path, Path]:
    """(run, peft folder): LoRA r=2 on qkv (fused MHA) + mlp of open_clip vp-tiny-clip, non-zero B, exported."""
    from vision_peft.peft_interop import export_peft

    run_dir = _train(work, "clip", backbone=OC, adapter={"name": "lora", "r": 2, "targets": ["qkv", "mlp"]})
    _randomise(run_dir)
    export_peft(run_dir, work / "peft-clip")
    return run_dir, work / "peft-clip"


def _images(work: Path) -> list[Path]:
    return sorted((work / "data").rglob("*.*g"))[:4]


def timm_test_vit(n_classes: int) -> torch.nn.Module:
    """The plain timm model a user builds for our ``timm:test_vit`` runs: the same frozen weights (random init, seed 0
    — with pretrained weights this is ``timm.create_model(name, pretrained=True, num_classes=n)``) and a classifier
    of ``n`` classes."""
    from vision_peft.backbones.base import seeded_init

    model = seeded_init(lambda: timm.create_model("test_vit", pretrained=False, num_classes=0,
                                                  img_size=TINY_IMAGE_SIZE))  # fmt: skip
    model.reset_classifier(n_classes)
    return model.eval()


def _ours_vs_peft_timm(run_dir: Path, peft_dir: Path, n_classes: int) -> tuple[float, float]:
    """(max |Δ| of our logits vs PeftModel on timm.create_model(num_classes), max |our logits - frozen logits|)."""
    from vision_peft.predict import load_run

    _, _, model, _ = load_run(run_dir)
    base = timm_test_vit(n_classes)
    frozen = copy.deepcopy(base).eval()
    pm = peft.PeftModel.from_pretrained(base, str(peft_dir)).eval()
    x = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model.head(model.backbone.forward_features(x))
        theirs = pm(x)
        frozen_feats = frozen.forward_head(frozen.forward_features(x), pre_logits=True)
        plain = model.head(frozen_feats)
    return float((ours - theirs).abs().max()), float((ours - plain).abs().max())


# -- ours → peft ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_a", [True, False])
def test_export_lora_timm_loads_in_peft_with_equal_logits(work, train_a) -> None:
    from vision_peft.peft_interop import export_peft

    run_dir = _train(work, f"lora-a{int(train_a)}", adapter={"name": "lora", "r": 2, "targets": ["qkv", "mlp"],
                                                             "train_a": train_a, "alpha": 3.0})  # fmt: skip
    _randomise(run_dir)
    out = work / f"peft-lora-a{int(train_a)}"
    summary = export_peft(run_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 2 and conf["lora_alpha"] == 3
    assert conf["modules_to_save"] == ["head"] and conf["base_model_name_or_path"] == "timm:test_vit"
    diff, effect = _ours_vs_peft_timm(run_dir, out, 3)
    assert effect > 1e-2  # the adapter changes the outputs: equality below is not trivially true
    assert diff < 1e-5
    assert summary["parity"]["max_abs_diff"] < 1e-5 and summary["parity"]["adapter_effect"] > 1e-2


def test_export_dora_pruned_ranks_map_to_rank_pattern(work) -> None:
    """Dynamic-rank DoRA: layers with different live ranks (one pruned to 0) are exact through rank_pattern."""
    from vision_peft.peft_interop import export_peft

    run_dir = _train(work, "dora", adapter={"name": "dora", "r": 2, "targets": ["qkv"]})

    live: list[int] = []

    def edit(sd, g):
        masks = sorted(k for k in sd if k.endswith(".mask"))
        for i, k in enumerate(masks):  # live ranks 3, 1, 0, 3, 1, 0 … of k = 3 components
            sd[k] = (torch.arange(sd[k].numel()) < [3, 1, 0][i % 3]).float()
            live.append(int(sd[k].sum()))
        for k in sd:
            if k.endswith("lora_c"):
                sd[k] = 1 + torch.rand(sd[k].shape, generator=g)

    _randomise(run_dir, edit=edit)
    out = work / "peft-dora"
    summary = export_peft(run_dir, out)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert set(summary["ranks"]) == {1, 3}
    assert conf["rank_pattern"]  # the ranks that differ from r
    assert len(conf["target_modules"]) == sum(1 for k in live if k > 0)  # layers pruned to rank 0 are left out
    diff, effect = _ours_vs_peft_timm(run_dir, out, 3)
    assert effect > 1e-2 and diff < 1e-5


def test_export_open_clip_fused_mha_loads_in_peft(work, clip_export) -> None:
    """open_clip's fused in_proj_weight update through peft's LoRA MultiheadAttention layer (+ MLP Linears)."""
    import open_clip

    from vision_peft.peft_interop import HEAD_NAME
    from vision_peft.predict import load_run

    run_dir, out = clip_export
    _, _, model, _ = load_run(run_dir)
    from vision_peft.backbones.base import seeded_init

    base = seeded_init(lambda: open_clip.create_model("vp-tiny-clip", pretrained=None,
                                                      force_image_size=TINY_IMAGE_SIZE))  # fmt: skip
    frozen = copy.deepcopy(base).eval()
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    head = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / HEAD_NAME))
    x = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.backbone.forward_features(x)
        theirs = pm.encode_image(x)
        effect = float((ours - frozen.encode_image(x)).abs().max())
        logits = model.head(ours)
        their_logits = theirs @ head["weight"].T + head["bias"]
    assert effect > 1e-2
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((logits - their_logits).abs().max()) < 1e-4


def test_multilabel_run_round_trips_with_its_threshold(work, data_root) -> None:
    """A multilabel run (COCO128 categories): logits equal through PeftModel; the decision threshold, which peft has
    no field for, travels in the weights' metadata and comes back on import."""
    from vision_peft import checkpoint as ckpt
    from vision_peft.peft_import import import_peft
    from vision_peft.peft_interop import export_peft
    from vision_peft.predict import load_run

    task = {"name": "multilabel", "data_root": str(data_root / "coco128-seg"), "augment": "none"}
    run_dir = _train(work, "ml", task=task, train={"max_steps": 1, "batch_size": 16})

    def edit(sd, g):
        sd["threshold"] = torch.tensor(0.37, dtype=torch.float64)

    _randomise(run_dir, edit=edit)
    n = len(load_run(run_dir)[1].classes)
    summary = export_peft(run_dir, work / "peft-ml")
    diff, effect = _ours_vs_peft_timm(run_dir, work / "peft-ml", n)
    assert effect > 1e-2 and diff < 1e-5 and summary["parity"]["max_abs_diff"] < 1e-5
    back = import_peft(work / "peft-ml", "timm:test_vit", "multilabel", work / "runs" / "ml-imported",
                       overrides=[*TIMM_SETS, f"task.data_root={data_root / 'coco128-seg'}"])  # fmt: skip
    assert back["threshold"] == pytest.approx(0.37)
    assert float(ckpt.load_tensors(work / "runs" / "ml-imported" / "adapter.safetensors")["threshold"]) == 0.37


def test_export_pvera_linear_loads_in_peft(work) -> None:
    """PVeRA on Linear layers → peft's PveraConfig (shared projections saved, λ per layer), equal logits in eval."""
    from vision_peft.peft_interop import export_peft

    run_dir = _train(work, "pvera", adapter={"name": "pvera", "r": 4, "targets": ["qkv"]})

    def edit(sd, g):
        for k in sd:
            if k.endswith("lambda_b") or k.endswith("lambda_d"):
                sd[k] = torch.randn(sd[k].shape, generator=g) * 0.3

    _randomise(run_dir, edit=edit)
    out = work / "peft-pvera"
    summary = export_peft(run_dir, out)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "PVERA" and conf["save_projection"] and summary["peft_type"] == "PVERA"
    diff, effect = _ours_vs_peft_timm(run_dir, out, 3)
    assert effect > 1e-2 and diff < 1e-5


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"adapter": {"name": "vpt", "num_tokens": 2}}, "adapter 'vpt' cannot be written as a peft adapter"),
        (
            {"adapter": {"name": "pvera", "r": 2, "targets": ["model.patch_embed.proj"]}},
            "peft's PVeRA adapts nn.Linear",
        ),
        ({"adapter": {"name": "linear"}}, "linear probe"),
        ({"adapter": {"name": "lora", "r": 2, "targets": ["model.patch_embed.proj"]}}, "weight space"),
        ({"backbone": OC, "adapter": {"name": "lora", "r": 2, "targets": ["qkv", "attn_out"]}}, "twice"),
    ],
)
def test_export_refuses_what_peft_cannot_represent(work, sections, needle) -> None:
    from vision_peft.peft_interop import PeftInteropError, export_peft

    name = sections["adapter"]["name"] + ("-" + sections["adapter"]["targets"][-1] if "targets" in sections["adapter"]
                                          else "")  # fmt: skip
    run_dir = _train(work, f"refuse-{name}", **sections)
    if sections["adapter"]["name"] == "lora":
        _randomise(run_dir)  # a zero update would have nothing to refuse
    with pytest.raises(PeftInteropError, match="merged ONNX bundle|export") as e:
        export_peft(run_dir, work / f"never-{name}")
    assert needle in str(e.value) and str(run_dir) in str(e.value)
    assert not (work / f"never-{name}").exists()


# -- peft → ours ---------------------------------------------------------------------------------------------------
def _peft_folder(work: Path, name: str, n_classes: int = 3, **lora) -> Path:
    """A LoRA adapter that peft itself creates and saves on timm test_vit (random non-zero B and head)."""

    model = timm_test_vit(n_classes)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["qkv", "fc1"], "modules_to_save": ["head"], **lora}
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_run_predicts_like_peftmodel_and_exports(work, rslora) -> None:
    from vision_peft.peft_import import import_peft
    from vision_peft.predict import predict_files

    src = _peft_folder(work, f"hf-{int(rslora)}", use_rslora=rslora)
    run_dir = work / "runs" / f"imported-{int(rslora)}"
    summary = import_peft(src, "timm:test_vit", "classification", run_dir,
                          overrides=[*TIMM_SETS, f"task.data_root={work / 'data'}"])  # fmt: skip
    depth = len(timm.create_model("test_vit", pretrained=False, img_size=TINY_IMAGE_SIZE).blocks)
    assert summary["classes"] == ["alpha", "beta", "gamma"] and summary["targets"] == 2 * depth  # qkv + fc1
    assert "Imported from the peft LoRA adapter folder" in (run_dir / "README.md").read_text()
    diff, effect = _ours_vs_peft_timm(run_dir, src, 3)
    assert effect > 1e-2 and diff < 1e-5
    # predict reads it like any run; its probabilities are PeftModel's softmax
    from PIL import Image

    from vision_peft.predict import load_run

    imgs = _images(work)
    recs = predict_files(run_dir, imgs, top_k=3)
    cfg, task, model, _ = load_run(run_dir)
    from vision_peft.preprocess import image_spec, preprocess_batch

    x = torch.from_numpy(
        preprocess_batch([str(p) for p in imgs], image_spec(model.backbone.data_config, resize=cfg.task.resize))
    )
    base = timm_test_vit(3)
    pm = peft.PeftModel.from_pretrained(base, str(src)).eval()
    with torch.no_grad():
        probs = pm(x).softmax(-1)
    for rec, p in zip(recs, probs, strict=True):
        assert rec["label"] == task.classes[int(p.argmax())]
        assert abs(rec["prob"] - float(p.max())) < 1e-4
    assert Image.open(imgs[0])  # the inputs are real image files
    # and the imported run goes back out through export --peft
    back = work / f"back-{int(rslora)}"
    from vision_peft.peft_interop import export_peft

    export_peft(run_dir, back)
    assert _ours_vs_peft_timm(run_dir, back, 3)[0] < 1e-5


def test_imported_run_evaluates_and_exports_onnx(work, capsys) -> None:
    """An imported run is a run: ``eval`` on the recipe's data and the merged ONNX ``export`` (parity-gated)."""
    from vision_peft.cli import main
    from vision_peft.export import export_run
    from vision_peft.peft_import import import_peft

    src = _peft_folder(work, "hf-eval")
    run_dir = work / "runs" / "imported-eval"
    import_peft(src, "timm:test_vit", "classification", run_dir,
                overrides=[*TIMM_SETS, f"task.data_root={work / 'data'}", "task.split={train: 2, val: 1, test: 1}"])  # fmt: skip
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    assert "top1" in json.loads(capsys.readouterr().out)
    man = export_run(run_dir, work / "imported-bundle")
    assert man["parity"]["passed"] and man["labels"] == ["alpha", "beta", "gamma"]


def test_import_open_clip_roundtrip(work, clip_export) -> None:
    """Our open_clip export imported again: the fused-MHA layout both ways, the head from vision_peft_head."""
    from vision_peft.peft_import import import_peft
    from vision_peft.predict import load_run

    src = clip_export[1]
    run_dir = work / "runs" / "clip-imported"
    import_peft(src, "open_clip:vp-tiny-clip", "classification", run_dir,
                overrides=["backbone.pretrained=false", f"backbone.image_size={TINY_IMAGE_SIZE}"])  # fmt: skip
    x = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    _, _, a, _ = load_run(clip_export[0])
    _, _, b, _ = load_run(run_dir)
    with torch.no_grad():
        assert float((a.logits(x) - b.logits(x)).abs().max()) < 1e-5


def _peft_clip_folder(work: Path, name: str, out_proj: bool) -> Path:
    """A LoRA on the fused MHA of open_clip's image tower, created and saved by peft itself (random in_proj B; the
    out_proj B non-zero only with ``out_proj``), plus our head file for 3 classes."""
    import open_clip
    from safetensors.torch import save_file

    from vision_peft.backbones.base import seeded_init
    from vision_peft.peft_interop import HEAD_NAME

    model = seeded_init(lambda: open_clip.create_model("vp-tiny-clip", pretrained=None,
                                                       force_image_size=TINY_IMAGE_SIZE))  # fmt: skip
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=r"visual\..*\.attn"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n and (out_proj or "out_proj" not in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(str(out))
    width = model.visual.output_dim
    save_file({"weight": torch.randn(3, width, generator=g), "bias": torch.zeros(3)}, str(out / HEAD_NAME))
    return out, pm


def test_import_open_clip_mha_from_peft(work) -> None:
    from vision_peft.peft_import import import_peft
    from vision_peft.peft_interop import PeftInteropError
    from vision_peft.predict import load_run

    sets = ["backbone.pretrained=false", f"backbone.image_size={TINY_IMAGE_SIZE}"]
    src, pm = _peft_clip_folder(work, "hf-clip", out_proj=False)
    run_dir = work / "runs" / "clip-from-peft"
    import_peft(src, "open_clip:vp-tiny-clip", "classification", run_dir, classes=["a", "b", "c"], overrides=sets)
    _, _, model, _ = load_run(run_dir)
    x = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours, theirs = model.backbone.forward_features(x), pm.eval().encode_image(x)
        with pm.disable_adapter():
            frozen = pm.encode_image(x)
    assert float((ours - frozen).abs().max()) > 1e-2
    assert float((ours - theirs).abs().max()) < 1e-4
    bad, _ = _peft_clip_folder(work, "hf-clip-out", out_proj=True)
    with pytest.raises(PeftInteropError, match="out_proj has a non-zero LoRA update"):
        import_peft(bad, "open_clip:vp-tiny-clip", "classification", work / "runs" / "bad-clip", classes=["a", "b", "c"],
                    overrides=sets)  # fmt: skip


def test_cli_export_and_import_peft(work, lora_export, capsys) -> None:
    from vision_peft.cli import main

    run_dir = lora_export[0]
    assert main(["export", str(run_dir), "--peft", str(work / "cli-peft")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parity"]["max_abs_diff"] < 1e-5 and (work / "cli-peft" / "adapter_config.json").is_file()
    dest = work / "runs" / "cli-imported"
    args = ["import-peft", str(work / "cli-peft"), "--backbone", "timm:test_vit", "--task", "classification",
            "--out", str(dest), "--classes", "alpha,beta,gamma", *sum((["--set", s] for s in TIMM_SETS), [])]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["run"] == str(dest)
    assert main(["predict", str(dest), str(_images(work)[0])]) == 0
    assert main(args) == 2  # the run directory now exists
    assert "already holds a run" in capsys.readouterr().err


# -- bad input ---------------------------------------------------------------------------------------------------
def _imp(src: Path, work: Path, backbone: str = "timm:test_vit", name: str = "bad", **kw):
    from vision_peft.peft_import import import_peft

    kw.setdefault("classes", ["alpha", "beta", "gamma"])
    return import_peft(src, backbone, "classification", work / "runs" / name, overrides=TIMM_SETS, **kw)


def _edited(work: Path, name: str, change) -> Path:
    src = _peft_folder(work, name)
    conf = json.loads((src / "adapter_config.json").read_text())
    change(conf)
    (src / "adapter_config.json").write_text(json.dumps(conf))
    return src


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda c: c.update(base_model_name_or_path="timm/vit_base_patch16_224"), "another base model"),
        (lambda c: c.update(target_modules=["no_such_layer"]), "match no module"),
        (lambda c: c.update(target_modules=["proj"]), "nn.Linear and fused"),  # patch_embed.proj is a Conv2d
        (lambda c: c.update(peft_type="IA3"), "not LORA"),
        (lambda c: c.update(use_dora=True), "use_dora"),
        (lambda c: c.update(bias="all"), "bias"),
        (lambda c: c.update(r=8), "rank 4 but"),
        (lambda c: c.update(modules_to_save=None), "no classification head"),
        (lambda c: c.update(modules_to_save=["head", "norm"]), "modules_to_save"),
        (lambda c: c.update(rank_pattern={"blocks\\.0\\.attn\\.qkv": 2}), "rank"),
    ],
)
def test_import_refuses_bad_config(work, change, needle) -> None:
    from vision_peft.peft_interop import PeftInteropError

    src = _edited(work, "bad-conf", change)
    with pytest.raises(PeftInteropError) as e:
        _imp(src, work)
    assert needle in str(e.value) and "adapter_" in str(e.value)
    assert not (work / "runs" / "bad").exists()


def test_import_refuses_bad_files(work) -> None:
    from vision_peft.peft_interop import PeftInteropError

    src = _peft_folder(work, "bad-files")
    with pytest.raises(PeftInteropError, match="another model size"):
        _imp(src, work, backbone="timm:vit_tiny_patch16_224")
    with pytest.raises(PeftInteropError, match="class"):  # a 3-class head for 2 classes
        _imp(src, work, classes=["a", "b"])
    (src / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PeftInteropError, match="not a readable safetensors file"):
        _imp(src, work)
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(PeftInteropError, match="never unpickles"):
        _imp(src, work)
    (src / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftInteropError, match="adapter_config.json is not valid JSON"):
        _imp(src, work)
    (src / "adapter_config.json").unlink()
    with pytest.raises(PeftInteropError, match="adapter_config.json is missing"):
        _imp(src, work)
    with pytest.raises(PeftInteropError, match="not a timm or open_clip"):
        _imp(_peft_folder(work, "bad-bb"), work, backbone="effnet_lite0")
    assert not (work / "runs" / "bad").exists()


def test_import_refuses_weights_of_another_backbone_hash(work, lora_export) -> None:
    """A folder our export wrote records the run's weight hash: other weights under the same name are refused."""
    from vision_peft.peft_import import import_peft
    from vision_peft.peft_interop import PeftInteropError

    src = lora_export[1]
    with pytest.raises(PeftInteropError, match="with weights .* but timm:test_vit loads weights"):
        import_peft(src, "timm:test_vit", "classification", work / "runs" / "bad-hash", classes=["a", "b", "c"],
                    overrides=["backbone.pretrained=false", "backbone.image_size=48"])  # fmt: skip
