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
        build_run_config({"task": {"name": "fewshot", "classes": {"base": ["a", "b"], "val": ["b"]}}, "adapter": "vpt"})


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


# -- PER on the support side only (meta-training) and at meta-test -------------------------------------------
def _tiny_model(tmp_path, **task):
    """test_vit at 64 px: a 4×4 patch grid, enough positions that a recombined grid surely mixes its sources."""
    backbone = {"name": "timm:test_vit", "pretrained": False, "image_size": 64}
    cfg = fewshot_cfg(tmp_path, "unused", backbone=backbone, **task)
    return TASKS.get("fewshot").builder(cfg).build_model()


def _grid_shape(model) -> tuple[int, ...]:
    return tuple(model.grid(torch.zeros(1, 3, *model.backbone.input_size)).shape[1:])


def _capture_embed(model, monkeypatch) -> list[torch.Tensor]:
    """Record every batch of grids that reaches the layers above the grid (what prototypes and scores see)."""
    seen: list[torch.Tensor] = []
    orig = model.embed_grid

    def spy(g):
        seen.append(g.detach().clone())
        return orig(g)

    monkeypatch.setattr(model, "embed_grid", spy)
    return seen


def _id_grid(model, ids: list[int]) -> torch.Tensor:
    """Grids of the model's shape whose every entry is the sample's id (survives flips / turns and PER)."""
    shape = _grid_shape(model)
    return torch.tensor(ids, dtype=torch.float32).view(-1, *[1] * len(shape)).expand(len(ids), *shape).clone()


@pytest.mark.parametrize("mode", ["extend", "replace"])
@pytest.mark.parametrize("k_shot", [1, 3])
def test_meta_training_per_stays_on_the_support_side(tmp_path, monkeypatch, mode, k_shot):
    """Queries reach the head bit-identical; every recombined sample is built from support images of its own
    class only (no query patch in a prototype, no support patch in a query); extend keeps the original support."""
    model = _tiny_model(tmp_path, per_mode=mode, per_ratio=0.5, k_shot=k_shot).train()
    way, q = 3, 2
    sl = torch.arange(way).repeat_interleave(k_shot)
    ql = torch.arange(way).repeat_interleave(q)
    s_ids = list(range(len(sl)))
    q_ids = [100 + i for i in range(len(ql))]
    batch = {
        "grid_support": _id_grid(model, s_ids),
        "grid_query": _id_grid(model, q_ids),
        "support_label": sl,
        "query_label": ql,
        "way": torch.tensor(way),
    }
    query_before = batch["grid_query"].clone()
    seen = _capture_embed(model, monkeypatch)
    torch.manual_seed(0)
    model(batch)["loss"].backward()
    (g,) = seen
    n_proto = len(g) - len(ql)
    assert torch.equal(g[n_proto:], query_before) and torch.equal(batch["grid_query"], query_before)
    assert n_proto == (2 if mode == "extend" else 1) * len(sl)
    if mode == "extend":
        assert torch.equal(g[: len(sl)], batch["grid_support"])  # the prototypes' original sources are untouched
    recombined = g[n_proto - len(sl) : n_proto]
    for row, label in zip(recombined, sl.tolist()):
        ids = {int(v) for v in row.unique()}
        assert ids <= {i for i, lab in zip(s_ids, sl.tolist()) if lab == label}  # support of its class only
    if k_shot > 1:
        assert any(len(row.unique()) > 1 for row in recombined)  # it does recombine shots


def test_meta_training_per_pool_mixes_a_shot_with_its_turned_view_in_1shot(tmp_path, monkeypatch):
    model = _tiny_model(tmp_path, per_mode="replace", per_ratio=0.5).train()
    gen = torch.Generator().manual_seed(3)
    gs, gq = torch.randn(2, *_grid_shape(model), generator=gen), torch.randn(4, *_grid_shape(model), generator=gen)
    batch = {"grid_support": gs, "grid_query": gq, "support_label": torch.arange(2)}
    batch["query_label"] = torch.tensor([0, 0, 1, 1])
    seen = _capture_embed(model, monkeypatch)
    torch.manual_seed(1)
    model(batch)
    r = seen[0][:2]
    assert not torch.equal(r, gs)  # 1-shot PER in meta-training is no longer the identity
    m, _ = model.grid_map(r)
    src, _ = model.grid_map(gs)
    views = [
        torch.stack([torch.rot90(x.flip(-1) if f else x, k, (-2, -1)) for f in (0, 1) for k in range(4)]) for x in src
    ]
    for i in range(2):  # each position comes from the shot or one of its dihedral views, and both contribute
        per_pos = (m[i][None] == views[i]).all(1)  # (8, D, h, w) -> (8, h, w)
        assert per_pos.any(0).all() and per_pos[0].any() and not per_pos[0].all()


def test_meta_test_per_really_recombines_in_1shot(tmp_path, monkeypatch):
    """PER at meta-test: each pseudo-query's PER copy differs from the view it came from and from the shot, and
    takes every position from one of them (before, with one pseudo-query per class, it returned its input)."""
    model = _tiny_model(tmp_path, per_mode="extend", per_ratio=0.5, finetune_pseudo_per_class=1).eval()
    gen = torch.Generator().manual_seed(0)
    shape = _grid_shape(model)
    gs, gq = torch.randn(3, *shape, generator=gen), torch.randn(6, *shape, generator=gen)
    labels = torch.arange(3)
    seen = _capture_embed(model, monkeypatch)
    classify_episode(model, gs, labels, gq, 3, steps=2, lr=0.01, seed=0, grids=True, pseudo_per_class=1)
    g = seen[0]  # step 1: support (3) + pseudo-query views (3) + their PER copies (3)
    assert len(g) == 9 and torch.equal(g[:3], gs)
    views, per = g[3:6], g[6:9]
    for i in range(3):
        assert not torch.equal(per[i], views[i]) and not torch.equal(per[i], gs[i]) and not torch.equal(views[i], gs[i])
        from_view = (per[i] == views[i]).all(-1)  # (h, w): whole embeddings move
        from_shot = (per[i] == gs[i]).all(-1)
        assert (from_view | from_shot).all()
    model.finetune_per = False
    seen.clear()
    classify_episode(model, gs, labels, gq, 3, steps=1, lr=0.01, seed=0, grids=True, pseudo_per_class=1)
    assert len(seen[0]) == 6  # no PER copies with task.finetune_per: false


def test_per_refuses_a_single_view_class(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"(?s)finetune_per.*single support view.*finetune_augment=dihedral"):
        fewshot_cfg(tmp_path, "unused", finetune_augment="none")
    with pytest.raises(ConfigError, match=r"(?s)1-shot meta-training.*augment=none.*task.augment=dihedral"):
        fewshot_cfg(tmp_path, "unused", augment="none")
    assert fewshot_cfg(tmp_path, "unused", finetune_augment="none", finetune_per=False).task.finetune_per is False
    assert fewshot_cfg(tmp_path, "unused", augment="none", k_shot=2).task.augment == "none"
    model = _tiny_model(tmp_path).eval()
    shape = _grid_shape(model)
    gs, gq = torch.randn(2, *shape), torch.randn(2, *shape)
    monkeypatch.setattr(model, "can_augment_grid", lambda g: False)  # e.g. a non-square grid: no dihedral views
    with pytest.raises(ConfigError, match=r"(?s)meta-test fine-tuning.*class\(es\) \[0, 1\].*single view"):
        classify_episode(model, gs, torch.arange(2), gq, 2, steps=1, lr=0.01, grids=True)
    two = torch.tensor([0, 0, 1, 1])  # two shots per class recombine without views
    classify_episode(model, torch.randn(4, *shape), two, gq, 2, steps=1, lr=0.01, grids=True)


def test_lr_search_needs_a_held_out_shot(tmp_path):
    """1-shot: no search (the old "held-out" set was an augmented copy of the training shot); the fallback lr
    (0 = PMF's rule: no fine-tuning, or task.finetune_lr) is used. >= 2 shots: searched on the last shot."""
    model = _tiny_model(tmp_path).eval()
    g = torch.Generator().manual_seed(0)
    s, q = torch.randn(2, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)
    lab = torch.tensor([0, 1])
    untuned, _ = classify_episode(model, s, lab, q, 2, steps=0)
    logits, info = classify_episode(model, s, lab, q, 2, steps=2, lr=0.1, lr_search=[0.01, 0.1])
    assert info == {"lr": 0.0, "lr_source": "no held-out shot"} and torch.allclose(logits, untuned)
    fixed, _ = classify_episode(model, s, lab, q, 2, steps=2, lr=0.1)
    logits, info = classify_episode(model, s, lab, q, 2, steps=2, lr=0.1, lr_search=[0.01, 0.1], no_holdout_lr=0.1)
    assert info["lr"] == 0.1 and torch.allclose(logits, fixed) and not torch.allclose(fixed, untuned)
    s2 = torch.randn(4, 3, 64, 64, generator=g)
    _, info = classify_episode(model, s2, torch.tensor([0, 0, 1, 1]), q, 2, steps=2, lr_search=[0.0, 0.1])
    assert info["lr_source"] == "search" and info["lr"] in (0.0, 0.1)
    cfg = fewshot_cfg(tmp_path, "unused", finetune_lr=0.03)
    assert cfg.task.finetune_no_holdout_lr == 0.0
    cfg = fewshot_cfg(tmp_path, "unused", finetune_lr=0.03, finetune_lr_fallback="finetune_lr")
    assert cfg.task.finetune_no_holdout_lr == 0.03


# -- various-way various-shot, cross-domain, recipes ----------------------------------------------------------
def test_sampler_various_shot():
    s = EpisodeSampler(_files(6, 12), (3, 5), (1, 4), 3, seed=2)
    ks, ways = set(), set()
    for i in range(60):
        ep = s.episode(i)
        counts = np.bincount([lab for _, lab in ep.support])
        assert len(set(counts.tolist())) == 1  # one K per episode, for every class
        assert np.bincount([lab for _, lab in ep.query]).tolist() == [3] * len(ep.classes)
        assert not {p for p, _ in ep.support} & {p for p, _ in ep.query}
        ks.add(int(counts[0]))
        ways.add(len(ep.classes))
    assert ks == {1, 2, 3, 4} and ways == {3, 4, 5}
    assert s.k_shot == (1, 4) and EpisodeSampler(_files(), 2, 3, 1).k_shot == 3
    with pytest.raises(DatasetError, match=r"4-shot 3-query episode needs 7"):
        EpisodeSampler(_files(4, 6), 2, (1, 4), 3)
    with pytest.raises(ConfigError, match=r"k_shot_max \(1\) must be >= task.k_shot \(2\)"):
        build_run_config({"task": {"name": "fewshot", "k_shot": 2, "k_shot_max": 1}, "adapter": "vpt"})


def test_cross_domain_roots_meta_train_on_one_test_on_another(tiny_image_folder, tmp_path, vp_logging_reset):
    """base / val classes come from task.meta_train_root, novel classes from task.test_root (structural: no
    second remote-sensing dataset is offline, so two tiny folders stand in for the two domains)."""
    from vision_peft.train import run

    src = tiny_image_folder(classes=("a1", "a2", "a3", "a4", "a5", "a6"), per_class=5, name="domain_a")
    dst = tiny_image_folder(classes=("b1", "b2", "b3"), per_class=5, name="domain_b")
    split = {"base": ["a1", "a2", "a3"], "val": ["a4", "a5", "a6"], "novel": ["b1", "b2", "b3"]}
    cfg = fewshot_cfg(
        tmp_path, "nowhere", classes=split, meta_train_root=str(src), test_root=str(dst), k_shot_max=2, n_way_max=3
    )
    task = TASKS.get("fewshot").builder(cfg)
    samplers = task.samplers()
    assert all(Path(p).is_relative_to(src) for sp in ("base", "val") for c in samplers[sp].files.values() for p in c)
    assert all(Path(p).is_relative_to(dst) for c in samplers["novel"].files.values() for p in c)
    run_dir = Path(run(cfg, progress=False))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = next(r for r in lines if r.get("split") == "test")
    assert test["n_episodes"] == 2 and 0 <= test["acc"] <= 1
    info = json.loads((run_dir / "config.json").read_text())
    assert info["config"]["task"]["test_root"] == str(dst) and info["task_state"]["k_shot"] == [1, 2]
    bad = fewshot_cfg(tmp_path, "nowhere", classes={**split, "novel": ["b1", "a1x"]}, meta_train_root=str(src),
                      test_root=str(dst))  # fmt: skip
    with pytest.raises(DatasetError, match=r"a1x of the recipe's split have no folder"):
        TASKS.get("fewshot").builder(bad).samplers()
    same = fewshot_cfg(tmp_path, src, classes={"base": ["a1", "a2"], "novel": ["a3", "a4"]}).task.split_roots()
    assert set(same.values()) == {Path(src)}  # without the new keys: everything from data_root, as before


def test_recipes_load_and_old_configs_get_the_defaults():
    from vision_peft.recipe import load_recipe

    for recipe in sorted(Path(__file__).resolve().parent.parent.glob("tasks/fewshot-*.yaml")):
        cfg = load_recipe(recipe.stem)
        assert cfg.task.name == "fewshot"
    vw = load_recipe("fewshot-aid-vwvs").task
    assert vw.way == (3, 7) and vw.shot == (1, 5)
    old = build_run_config({"task": {"name": "fewshot", "k_shot": 5}, "adapter": "vpt"}).task  # pre-issue keys only
    assert (old.meta_train_root, old.test_root, old.k_shot_max) == (None, None, None)
    assert old.finetune_per and old.finetune_augment == "dihedral" and old.finetune_lr_fallback == "zero"
