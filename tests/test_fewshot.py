"""Few-shot task (MVP): episode sampler, bad inputs, PMF classifier, PER, per-episode reset, end to end on AID."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vision_peft.config import ConfigError, RunConfig
from vision_peft.data.episodes import (
    EpisodeDataset,
    EpisodeSampler,
    ImageCache,
    check_class_split,
    scan_class_split,
)
from vision_peft.data.folder import DatasetError
from vision_peft.recipe import build_run_config
from vision_peft.tasks import TASKS
from vision_peft.tasks.fewshot import CosineHead, classify_episode, prototypes, recombine

SMALL_SPLIT = {
    "base": ["Forest", "Port", "River"],
    "val": ["Beach", "Desert"],
    "novel": ["Airport", "Bridge", "Church"],
}


def _files(n_classes: int = 4, per_class: int = 10) -> dict[str, list[str]]:
    return {f"c{j}": [f"/x/c{j}/{i:03d}.jpg" for i in range(per_class)] for j in range(n_classes)}


def fewshot_cfg(tmp_path: Path, data_root, classes=None, backbone=None, adapter=None, **task) -> RunConfig:
    return build_run_config(
        {
            "task": {
                "name": "fewshot",
                "data_root": str(data_root),
                "classes": classes or SMALL_SPLIT,
                "n_way": 2,
                "k_shot": 1,
                "q_query": 2,
                "train_q_query": 2,
                "train_episodes": 3,
                "val_episodes": 2,
                "test_episodes": 2,
                "finetune_steps": 2,
                **task,
            },
            "backbone": backbone or {"name": "timm:test_vit", "pretrained": False, "image_size": 32},
            "adapter": adapter or {"name": "vpt", "num_tokens": 2},
            "train": {"batch_size": 1, "epochs": 1, "lr": 1e-2, "device": "cpu", "log_every": 1},
            "output": {"runs_root": str(tmp_path / "runs"), "name": "fs"},
        }
    )


# -- sampler ---------------------------------------------------------------------------------------------------
def test_sampler_counts_disjoint_and_deterministic():
    s = EpisodeSampler(_files(), n_way=3, k_shot=2, q_query=4, seed=7)
    ep = s.episode(5)
    assert len(ep.classes) == 3 and len(set(ep.classes)) == 3
    assert len(ep.support) == 3 * 2 and len(ep.query) == 3 * 4
    assert not {p for p, _ in ep.support} & {p for p, _ in ep.query}
    for label, c in enumerate(ep.classes):
        assert all(Path(p).parent.name == c for p, lab in ep.support + ep.query if lab == label)
    again = EpisodeSampler(_files(), n_way=3, k_shot=2, q_query=4, seed=7)
    assert again.episode(5) == ep  # order-independent: episode i depends on (seed, i) only
    assert s.episode(6) != ep and EpisodeSampler(_files(), 3, 2, 4, seed=8).episode(5) != ep
    ways = {len(EpisodeSampler(_files(6), (3, 5), 1, 1).episode(i).classes) for i in range(40)}
    assert ways == {3, 4, 5}


def test_sampler_bad_inputs():
    files = _files()
    files["c2"] = files["c2"][:4]
    with pytest.raises(DatasetError, match=r"class 'c2' has 4 usable images but .* needs 6 \(K \+ Q\)"):
        EpisodeSampler(files, 3, 2, 4)
    with pytest.raises(DatasetError, match=r"5-way episodes need 5 classes but the split has 4"):
        EpisodeSampler(_files(), 5, 1, 1)
    with pytest.raises(DatasetError, match=r"class 'Forest' is listed in both 'base' and 'novel'"):
        check_class_split({"base": ["Forest", "Port"], "novel": ["Forest"]})
    with pytest.raises(ConfigError, match="must be disjoint"):
        build_run_config(
            {"task": {"name": "fewshot", "classes": {"base": ["a", "b"], "val": ["b"]}}, "adapter": "vpt"}
        )


def test_split_class_missing_and_image_modes(tiny_image_folder, tmp_path):
    root = tiny_image_folder(classes=("alpha", "beta", "gamma"), per_class=4, size=(40, 48))
    # mixed sizes: beta's images are 70×30; alpha holds a grayscale and an RGBA PNG
    for p in sorted((root / "beta").iterdir()):
        Image.open(p).convert("RGB").resize((30, 70)).save(p)
    with pytest.raises(DatasetError, match=r"class\(es\) delta of the recipe's split have no folder"):
        scan_class_split(root, {"base": ["alpha", "delta"]})
    files = scan_class_split(root, {"base": ["alpha", "beta"], "novel": ["gamma"]})
    assert sorted(files) == ["base", "novel"] and len(files["base"]["alpha"]) == 4
    spec = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "squash"}
    ds = EpisodeDataset(EpisodeSampler(files["base"], 2, 2, 2), 3, ImageCache(spec), "val")
    item = ds[0]
    assert item["support"].shape == (4, 3, 32, 32) and item["query"].shape == (4, 3, 32, 32)
    assert torch.equal(ds[0]["support"], item["support"])  # fixed evaluation episodes
    assert item["support_label"].tolist() == [0, 0, 1, 1]


# -- PMF classifier, PER ---------------------------------------------------------------------------------------
def test_pmf_classifier_math():
    head = CosineHead(10.0, 0.0)
    assert head.scale.item() == 10.0 and head.bias.item() == 0.0
    assert head.scale.requires_grad and head.bias.requires_grad
    g = torch.Generator().manual_seed(0)
    s, q = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    p = prototypes(s, labels, 3)
    ref = torch.stack([F.normalize(s[labels == c], dim=-1).mean(0) for c in range(3)])
    assert torch.allclose(p, ref, atol=1e-6)
    with torch.no_grad():
        head.bias.fill_(0.25)
        head.scale.fill_(3.0)
    cos = F.normalize(q, dim=-1) @ F.normalize(ref, dim=-1).T
    assert torch.allclose(head(q, p), 3.0 * (cos + 0.25), atol=1e-5)


@pytest.mark.parametrize("layout", ["cnn", "tokens"])
def test_per_keeps_shapes_and_stays_within_class(layout):
    b, positions, c = 6, 12, 5
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    ids = torch.arange(b, dtype=torch.float32)[:, None, None].expand(b, positions, c)  # (B, P, C): value = sample
    if layout == "cnn":
        grid, cdim = ids.transpose(1, 2).reshape(b, c, 3, 4), 1  # (B,P,C)->(B,C,3,4)
    else:
        grid, cdim = ids.clone(), -1  # (B, L, D)
    out = recombine(grid, labels, 1.0, cdim, torch.Generator().manual_seed(0))
    assert out.shape == grid.shape
    src = out.movedim(cdim, -1).reshape(b, positions, c)  # (B, P, C)
    assert torch.equal(src, src[..., :1].expand_as(src))  # whole embeddings move, never channels separately
    src_ids = src[..., 0].long()  # (B, P)
    assert torch.equal(labels[src_ids], labels[:, None].expand(b, positions))  # same class only
    assert (src_ids != torch.arange(b)[:, None]).any()  # it does recombine
    assert torch.equal(src_ids[3], torch.full((positions,), 3))  # a class with one image stays itself
    same = recombine(grid, labels, 0.0, cdim, torch.Generator().manual_seed(0))
    assert torch.equal(same, grid)


# -- model, per-episode reset ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backbone,adapter",
    [
        ({"name": "timm:test_vit", "pretrained": False, "image_size": 32}, {"name": "vpt", "num_tokens": 2}),
        ({"name": "effnet_lite0", "pretrained": False, "image_size": 64}, {"name": "prompt_map", "stage": 2}),
    ],
)
def test_split_forward_equals_backbone(tmp_path, backbone, adapter):
    cfg = fewshot_cfg(tmp_path, "unused", backbone=backbone, adapter=adapter)
    task = TASKS.get("fewshot").builder(cfg)
    model = task.build_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim > 1:
                p.normal_(0, 0.1)  # non-zero prompts must be applied on both paths
        x = torch.randn(3, 3, *model.backbone.input_size)
        ref = F.normalize(model.backbone.forward_features(x), dim=-1)
        assert torch.allclose(model.embed(x), ref, atol=1e-5)
    out = model.train()(task.synthetic_batch(model, 3))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fewshot_requires_a_grid_backbone_and_open_clip_error_names_the_fix(tmp_path):
    """The task declares the grid PER recombines (``requires`` "grid"); exactly the image families whose tiny spec
    builds a backbone with a grid provide it; on open_clip (no grid) the error names the fix, and per_mode=none
    builds."""
    from vision_peft.backbones import BACKBONES, build_backbone
    from vision_peft.config import BackboneConfig

    assert "grid" in TASKS.get("fewshot").requires
    for name, entry in BACKBONES.items():
        if entry.spec is not None and "image" in entry.provides:
            layout = build_backbone(BackboneConfig(**entry.spec)).grid_info().layout
            assert ("grid" in entry.provides) == (layout != "pixels"), f"{name}: grid layout {layout!r}"
    assert "grid" not in BACKBONES.get("open_clip").provides
    clip = {"name": "open_clip:vp-tiny-clip", "pretrained": False, "image_size": 32}
    with pytest.raises(ConfigError, match=r"(?s)'grid'.*open_clip:vp-tiny-clip.*task\.per_mode=none"):
        TASKS.get("fewshot").builder(fewshot_cfg(tmp_path, "unused", backbone=clip)).build_model()
    model = TASKS.get("fewshot").builder(fewshot_cfg(tmp_path, "unused", backbone=clip, per_mode="none")).build_model()
    assert model.layout == "pixels"


def test_prompts_reset_per_episode(tmp_path):
    cfg = fewshot_cfg(tmp_path, "unused")
    model = TASKS.get("fewshot").builder(cfg).build_model().eval()
    g = torch.Generator().manual_seed(1)
    a_s, a_q = torch.randn(2, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    b_s, b_q = torch.randn(2, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    lab = torch.tensor([0, 1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh_b, _ = classify_episode(model, b_s, lab, b_q, 2, steps=3, lr=0.1, seed=1)
    tuned_a, _ = classify_episode(model, a_s, lab, a_q, 2, steps=3, lr=0.1, seed=0)
    untuned_a, _ = classify_episode(model, a_s, lab, a_q, 2, steps=0)
    assert not torch.allclose(tuned_a, untuned_a)  # fine-tuning does change the episode's logits
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored
    after_a_b, _ = classify_episode(model, b_s, lab, b_q, 2, steps=3, lr=0.1, seed=1)
    assert torch.allclose(after_a_b, fresh_b)  # episode A left nothing behind for episode B
    logits, info = classify_episode(model, a_s, lab, a_q, 2, steps=2, lr=0.1, lr_search=[0.0, 0.1])
    assert info["lr"] in (0.0, 0.1) and logits.shape == (4, 2)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size=1"):
        cfg = fewshot_cfg(tmp_path, "unused")
        cfg.train.batch_size = 4
        TASKS.get("fewshot").builder(cfg).build_model()
    with pytest.raises(ConfigError, match="per_mode must be one of"):
        fewshot_cfg(tmp_path, "unused", per_mode="mix")
    assert fewshot_cfg(tmp_path, "unused", per_mode=None).task.per_mode == "none"  # CLI "none" arrives as None


# -- end to end on real AID ------------------------------------------------------------------------------------
def test_meta_train_eval_predict_export_on_aid(aid_root, tmp_path, vp_logging_reset, torch_free):
    from vision_peft.cli import main
    from vision_peft.predict import predict_files
    from vision_peft.train import run

    cfg = fewshot_cfg(tmp_path, aid_root, finetune_lr_search=[0.0, 0.01])
    run_dir = Path(run(cfg, progress=False))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r and "split" not in r] == [1, 2, 3]
    test = next(r for r in lines if r.get("split") == "test")
    assert test["n_episodes"] == 2 and test["finetune_steps"] == 2 and 0 <= test["acc"] <= 1
    info = json.loads((run_dir / "config.json").read_text())
    assert info["parameters"]["head"] == 2 and info["task_state"]["class_split"] == SMALL_SPLIT

    support = tmp_path / "support"
    for c in ("Airport", "Church"):
        (support / c).mkdir(parents=True)
        for f in sorted((aid_root / c).glob("*.jpg"))[:2]:
            shutil.copy(f, support / c / f.name)
    query = sorted((aid_root / "Church").glob("*.jpg"))[5]
    preds = predict_files(run_dir, [support, query], top_k=2)
    assert preds[0]["label"] in ("Airport", "Church") and abs(sum(t["prob"] for t in preds[0]["top"]) - 1) < 1e-5
    with pytest.raises(ValueError, match="support folder"):
        predict_files(run_dir, [query])

    assert main(["export", str(run_dir)]) == 0
    man = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert man["task"] == "fewshot" and man["parity"]["passed"] and man["parity"]["max_abs_diff"] < 1e-4
    meaning = man["graphs"]["embedding"]["outputs"]["embedding"]["meaning"]
    assert "L2-normalised" in meaning
    import onnxruntime as ort

    sess = ort.InferenceSession(str(run_dir / "export" / "embedding.onnx"), providers=["CPUExecutionProvider"])
    emb = sess.run(None, {"image": np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)})[0]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # the torch-free runtime: prototypes from a support set + PMF head (s, b from the manifest) = torch, no tuning
    from vision_peft.deploy import load_bundle
    from vision_peft.predict import load_run
    from vision_peft.preprocess import load_image, preprocess_image
    from vision_peft.tasks.fewshot import classify_episode

    bundle = load_bundle(run_dir / "export", device="cpu")
    sup = {c: sorted((support / c).glob("*.jpg")) for c in ("Airport", "Church")}
    got = bundle.fewshot(sup, [query, sup["Airport"][0]])
    _, task, model, _ = load_run(run_dir)
    spec = task.image_spec(model)

    def load(p):
        return torch.from_numpy(preprocess_image(load_image(p), spec))

    s_img = torch.stack([load(p) for c in sup for p in sup[c]])
    q_img = torch.stack([load(query), load(sup["Airport"][0])])
    logits, _ = classify_episode(model, s_img, torch.tensor([0, 0, 1, 1]), q_img, 2, steps=0)
    ref = torch.softmax(logits.float(), 1).numpy()
    for g, r in zip(got, ref, strict=True):
        assert abs(g["probs"]["Airport"] - r[0]) < 1e-4 and g["label"] == ("Airport", "Church")[int(r.argmax())]
    protos = bundle.prototypes(sup)  # computed once, reused for a fixed class set
    assert bundle.fewshot(protos, [query])[0]["probs"] == pytest.approx(got[0]["probs"], abs=1e-9)
    with pytest.raises(ValueError, match="no images"):
        bundle.fewshot({"Airport": sup["Airport"], "Church": []}, [query])
    with pytest.raises(ValueError, match="is 'fewshot'"):
        bundle.classify([query])
    out = torch_free(
        f"""
        import json
        from vision_peft.deploy import main
        assert main([{str(run_dir / "export")!r}, {str(query)!r}, "--support", {str(support)!r}, "--device", "cpu"]) == 0
        """
    )
    assert json.loads(out.splitlines()[0])["label"] == got[0]["label"]
    from fastapi.testclient import TestClient

    from vision_peft.serve import create_app

    client = TestClient(create_app(run_dir / "export", device="cpu"))
    files = [("support", (p.name, p.read_bytes(), "image/jpeg")) for c in sup for p in sup[c]]
    files.append(("query", (query.name, query.read_bytes(), "image/jpeg")))
    r = client.post("/v1/fewshot", files=files, data={"support_labels": ["Airport", "Airport", "Church", "Church"]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["top"][0]["prob"] == pytest.approx(got[0]["prob"], abs=1e-5)
    r = client.post("/v1/fewshot", files=files, data={"support_labels": ["Airport"]})
    assert r.status_code == 422 and "one class name per support image" in r.json()["detail"]
