"""Point clouds: PointNet (strict real weights, its ModelNet40 head on real ModelNet10 shapes), PointBERT (random
weights, ULIP key layout), PromptLearner token layouts, PointAdapter variants and the PPT scoring/recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vision_peft.config import BackboneConfig, ConfigError, RunConfig
from vision_peft.data.points import PointCloudDataset, scan_point_folder
from vision_peft.recipe import build_run_config


# -- backbones ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pointnet(weights_root: Path):
    from vision_peft.backbones import build_backbone

    return build_backbone(BackboneConfig(name="pointnet")).eval()


def test_pointnet_strict_load_and_modelnet40_head(pointnet, data_root: Path) -> None:
    assert pointnet.kind == "points" and pointnet.embed_dim == 1024
    assert sum(p.numel() for p in pointnet.parameters()) == 819_624
    assert pointnet.data_config["up_axis"] == "y" and pointnet.data_config["num_points"] == 1024
    scan = scan_point_folder(data_root / "modelnet10")
    assert len(scan.splits["test"]) == 708 and len(scan.splits["train"]) == 3991  # counted, see data/README.md
    picked = [s for c in range(10) for s in [x for x in scan.splits["test"] if x.label == c][:1]]  # 1 per class
    ds = PointCloudDataset(picked, 1024, "random", "swap_yz")
    x = torch.stack([ds[i]["points"] for i in range(len(ds))])
    with torch.no_grad():
        pred = pointnet.head_logits(x, scan.classes).argmax(1).numpy()
        assert pointnet(x).shape == (10, 1024)
    assert (pred == np.arange(10)).sum() >= 8, pred  # the 40-way head, restricted to the 10 classes
    with pytest.raises(ValueError, match="not ModelNet40 classes"):
        pointnet.head_logits(x[:1], ["chair", "spaceship"])
    assert pointnet.resolve_targets(["conv5"]) == ["feature_model.conv5"]


def test_pointnet_missing_weights_say_where(tmp_path: Path, monkeypatch) -> None:
    from vision_peft.backbones import WeightsNotFoundError, build_backbone

    monkeypatch.setenv("VISION_PEFT_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="pointnet_classifier_modelnet40.safetensors.*VISION_PEFT_WEIGHTS"):
        build_backbone(BackboneConfig(name="pointnet"))


def test_pointbert_random_forward_and_ulip_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vision_peft.backbones import build_backbone

    bb = build_backbone(BackboneConfig(name="pointbert:tiny", pretrained=False)).eval()
    x = torch.randn(2, 128, 3)
    with torch.no_grad():
        f = bb(x)
        inter = bb.forward_intermediates(x, [-1])
    assert bb.kind == "points" and f.shape == (2, 128) and inter[0].shape == (2, 17, 64)
    assert bb.resolve_targets(["last_stage"])[0].startswith("blocks.blocks.1")
    # a ULIP checkpoint: the point tower under point_encoder., a pc_projection, other towers' keys ignored
    sd = {f"module.point_encoder.{k}": v for k, v in bb.state_dict().items()}
    sd["module.pc_projection"] = torch.randn(128, 32)
    sd["module.open_clip_model.token_embedding.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ulip.safetensors")
    cfg = BackboneConfig(name="pointbert:tiny", weights=str(tmp_path / "ulip.safetensors"))
    loaded = build_backbone(cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), f @ sd["module.pc_projection"])
    del sd["module.point_encoder.norm.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="(?s)does not match the ULIP PointBERT layout.*norm.weight"):
        build_backbone(BackboneConfig(name="pointbert:tiny", weights=str(tmp_path / "bad.safetensors")))
    with pytest.raises(FileNotFoundError, match="ULIP PointBERT checkpoint"):
        build_backbone(BackboneConfig(name="pointbert:tiny"))


# -- prompts and adapters -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from vision_peft.backbones import build_backbone

    return build_backbone(BackboneConfig(name="minilm")).eval()


@pytest.mark.parametrize(
    "position,layout",
    [
        ("end", "[CLS] C0 C1 C2 C3 night stand . [SEP]"),
        ("front", "[CLS] night stand C0 C1 C2 C3 . [SEP]"),
        ("middle", "[CLS] C0 C1 night stand C2 C3 . [SEP]"),
    ],
)
def test_prompt_layouts(minilm, position: str, layout: str) -> None:
    from vision_peft.tasks.pointcloud import PromptLearner

    pl = PromptLearner(minilm, ["night_stand", "bed"], 4, position)
    toks = minilm._tokenizer.convert_ids_to_tokens(pl.input_ids[0].tolist())
    words = [f"C{int(c)}" if c >= 0 else t for t, c in zip(toks, pl.ctx_index[0].tolist())]
    assert " ".join(w for w, m in zip(words, pl.attention_mask[0].tolist()) if m) == layout
    emb = pl()
    assert emb.shape == (2, pl.input_ids.shape[1], 384)
    slot = pl.ctx_index[0].tolist().index(2)
    torch.testing.assert_close(emb[0, slot], pl.ctx[2])  # the context vectors are spliced in
    with torch.no_grad():
        _, feats = minilm.forward_tokens(pl.input_ids, pl.attention_mask, inputs_embeds=emb)
    assert feats.shape == (2, 384)


def test_prompt_template_init_and_open_clip_text() -> None:
    from vision_peft.backbones import build_backbone
    from vision_peft.tasks.pointcloud import PromptLearner

    clip = build_backbone(BackboneConfig(name="open_clip_text:vp-tiny-clip", pretrained=False)).eval()
    pl = PromptLearner(clip, ["chair", "table", "bathtub"], 6, "end", ctx_init="a point cloud of a")
    init_ids = clip.tokenize(["a point cloud of a"])["input_ids"][0, 1:6]
    torch.testing.assert_close(pl.ctx[:5], clip.token_embedding()(init_ids))
    with torch.no_grad():
        _, feats = clip.forward_tokens(pl.input_ids, pl.attention_mask, inputs_embeds=pl())
    assert feats.shape == (3, 32)
    with pytest.raises(ValueError, match="task.n_ctx is 2"):
        PromptLearner(clip, ["chair"], 2, "end", ctx_init="a point cloud of a")


def _cfg(adapter: dict, **task) -> RunConfig:
    return build_run_config(
        {
            "task": {"name": "pointcloud", "n_ctx": 4, **task},
            "backbone": {"name": "pointnet", "pretrained": False},
            "adapter": adapter,
            "train": {"device": "cpu"},
        }
    )


MLP_KEYS = {"backbone.feature_adapters.0."}
LAST_STAGE_KEYS = {"backbone.feature_model.conv5.", "backbone.feature_model.bn5."}
LORA_CONV5_KEYS = {"backbone.feature_model.conv5.parametrizations."}


@pytest.mark.parametrize(
    "adapter,variant,prefixes",
    [  # variant None: the registered PointAdapters; a variant: v1's deprecated task.point_adapter (719a042 runs)
        ({"name": "linear"}, None, set()),
        ({"name": "point_mlp", "hidden": 8}, None, MLP_KEYS),
        ({"name": "point_last_stage"}, None, LAST_STAGE_KEYS),
        ({"name": "lora", "r": 2, "targets": ["conv5"]}, None, LORA_CONV5_KEYS),
        ({"name": "linear"}, "prompts_only", set()),
        ({"name": "linear"}, "residual_mlp", MLP_KEYS),
        ({"name": "linear"}, "last_stage", LAST_STAGE_KEYS),
        ({"name": "lora", "r": 2, "targets": ["conv5"]}, "prompts_only", LORA_CONV5_KEYS),
        ({"name": "lora", "r": 2, "targets": ["conv5"]}, "residual_mlp", LORA_CONV5_KEYS | MLP_KEYS),
    ],
)
def test_adapter_state_holds_only_prompts_adapter_and_head(minilm, monkeypatch, adapter, variant, prefixes) -> None:
    from vision_peft.tasks import TASKS
    from vision_peft.tasks.pointcloud import PointCloudModel

    legacy = {"point_adapter": variant, "adapter_hidden": 8} if variant else {}
    task = TASKS.get("pointcloud").builder(_cfg(adapter, **legacy))
    task.set_classes(["chair", "table", "bed"])
    monkeypatch.setattr(task, "build_text", lambda: minilm)  # reuse the module-scoped MiniLM
    model = task.build_model()
    assert isinstance(model, PointCloudModel)
    keys = set(model.adapter_state_dict())
    assert {"prompt.ctx", "head.weight", "logit_scale"} <= keys
    rest = keys - {"prompt.ctx", "head.weight", "logit_scale"}
    assert all(any(k.startswith(p) for p in prefixes) for k in rest) and bool(rest) == bool(prefixes), sorted(keys)
    assert not any(k.startswith("text.") for k in keys)  # the frozen text encoder is never saved
    model.set_train_mode()
    assert not model.text.training
    batch = task.synthetic_batch(model, 2)
    out = model(batch)
    out["loss"].backward()
    assert out["output"].shape == (2, 3) and model.prompt.ctx.grad.abs().sum() > 0


def test_v1_point_adapter_configs_map_onto_the_registered_adapters() -> None:
    """config.json as 719a042 wrote it (every task field, PointAdapter chosen by task.point_adapter) still builds,
    onto the registered adapter; the run then records the v2 form (adapter section, deprecated fields unset)."""
    from vision_peft.adapters.point_adapter import PointLastStageConfig, PointMLPConfig
    from vision_peft.tasks import TASKS

    def v1(variant: str, adapter: dict, **task) -> dict:
        return {
            "task": {
                "name": "pointcloud", "data_root": "modelnet10", "classes": None, "n_ctx": 4, "ctx_init": None,
                "class_position": "end", "learn_logit_scale": True, "logit_scale_init": 2.6592600,
                "point_adapter": variant, "adapter_hidden": 256, "last_stage_reinit": False, "head_init": "random",
                "label_smoothing": 0.2, "shots": 16, "data_ratio": None, "shot_seed": 0, "val_per_class": 0,
                "num_points": 1024, "sampling": "random", "up_axis": "swap_yz", "extra_columns": "take_xyz",
                "off_points": 0, "aug_scale": [0.8, 1.25], "aug_jitter": 0.01, "aug_rotate": 0.0, "aug_dropout": 0.0,
                "text_backbone": {"name": "minilm"}, **task,
            },
            "backbone": {"name": "pointnet", "pretrained": False},
            "adapter": adapter,
            "train": {"device": "cpu"},
        }  # fmt: skip

    cases = [
        (v1("residual_mlp", {"name": "linear"}, adapter_hidden=64), PointMLPConfig(hidden=64), []),
        (v1("last_stage", {"name": "linear"}, last_stage_reinit=True), PointLastStageConfig(reinit=True), []),
        (v1("prompts_only", {"name": "linear"}), None, []),
        (v1("residual_mlp", {"name": "lora", "r": 2, "targets": ["conv5"]}), None, [PointMLPConfig(hidden=256)]),
    ]
    for data, want, stacked in cases:
        cfg = build_run_config(data)
        before = cfg.adapter
        task = TASKS.get("pointcloud").builder(cfg)
        assert cfg.adapter == (want or before) and task._legacy_adapters == stacked
        assert (cfg.task.point_adapter, cfg.task.adapter_hidden, cfg.task.last_stage_reinit) == (None, None, None)


PPT_BASE = {  # the paper's PPT-Base scoring (tasks/pointcloud-modelnet10-ppt-base.yaml)
    "train_head": False, "head_init": "orthogonal", "normalize_points": False, "learn_logit_scale": False,
}  # fmt: skip


def _model(minilm, monkeypatch, adapter: dict, backbone: str = "pointnet", **task):
    from vision_peft.tasks import TASKS

    cfg = _cfg(adapter, **task)
    cfg.backbone = BackboneConfig(name=backbone, pretrained=False)
    t = TASKS.get("pointcloud").builder(cfg)
    t.set_classes(["chair", "table", "bed"])
    monkeypatch.setattr(t, "build_text", lambda: minilm)
    return t, t.build_model()


def test_ppt_base_freezes_w_pc_and_temperature_and_scores_raw_point_features(minilm, monkeypatch, tmp_path) -> None:
    """PPT-Base: only the prompts train; W_pc is the fixed seeded orthogonal projection (saved, so a reload is
    exact); logits = exp(logit_scale) · (f W_pc) · t_kᵀ with raw point features, in torch and in the export module."""
    from vision_peft.tasks.pointcloud import _PointLogits, fixed_orthogonal

    task, model = _model(minilm, monkeypatch, {"name": "linear"}, **PPT_BASE, head_seed=3)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    w = model.head.weight
    torch.testing.assert_close(w, fixed_orthogonal(384, 1024, 3))
    torch.testing.assert_close(w @ w.t(), torch.eye(384), atol=1e-5, rtol=0)  # orthonormal rows
    assert not torch.allclose(w, fixed_orthogonal(384, 1024, 4))  # the seed matters
    assert {"prompt.ctx", "head.weight", "logit_scale"} <= set(model.adapter_state_dict())  # frozen, still saved
    batch = task.synthetic_batch(model, 2)
    model.eval()
    with torch.no_grad():
        tf = model.class_features()
        raw = model.backbone.forward_features(batch["points"]) @ w.t()
        want = torch.tensor(1 / 0.07) * raw @ tf.t()
        torch.testing.assert_close(model.logits(batch["points"]), want, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(_PointLogits(model)(batch["points"]), want, rtol=1e-4, atol=1e-3)
        f = 10 * torch.randn(2, 1024)  # raw point features are not normalised (norm ≈ 10·√(384/1024) here)
        torch.testing.assert_close(model.project(f), f @ w.t())
        assert _PointLogits(model).normalize_points is False
    model.set_train_mode()
    out = model(batch)
    out["loss"].backward()
    assert model.head.weight.grad is None and model.logit_scale.grad is None
    assert model.prompt.ctx.grad.abs().sum() > 0


def test_ppt_base_on_an_aligned_ulip_pair_is_ulips_frozen_pc_projection(tmp_path: Path) -> None:
    """PointBERT from a ULIP checkpoint (its pc_projection) + an open_clip text tower of the same width: with
    head_init identity and train_head false, W_pc is exactly ULIP's frozen pc_projection and only the prompts train."""
    from safetensors.torch import save_file

    from vision_peft.backbones import build_backbone
    from vision_peft.tasks import TASKS

    bb = build_backbone(BackboneConfig(name="pointbert:tiny", pretrained=False))
    sd = {f"module.point_encoder.{k}": v.contiguous() for k, v in bb.state_dict().items()}
    sd["module.pc_projection"] = torch.randn(128, 32)
    save_file(sd, tmp_path / "ulip.safetensors")
    cfg = build_run_config(
        {
            "task": {"name": "pointcloud", "n_ctx": 4, "num_points": 64, **PPT_BASE, "head_init": "identity",
                     "text_backbone": {"name": "open_clip_text:vp-tiny-clip", "pretrained": False}},
            "backbone": {"name": "pointbert:tiny", "weights": str(tmp_path / "ulip.safetensors")},
            "adapter": {"name": "linear"},
            "train": {"device": "cpu"},
        }
    )  # fmt: skip
    task = TASKS.get("pointcloud").builder(cfg)
    task.set_classes(["chair", "table"])
    model = task.build_model().eval()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    x = torch.randn(2, 64, 3)
    with torch.no_grad():
        want = torch.tensor(1 / 0.07) * (bb.eval()(x) @ sd["module.pc_projection"]) @ model.class_features().t()
        torch.testing.assert_close(model.logits(x), want, rtol=1e-4, atol=1e-4)


def test_defaults_keep_the_v1_scoring(minilm, monkeypatch) -> None:
    """A config without the new keys (every run written before them): W_pc and temperature learned, cosine logits."""
    task, model = _model(minilm, monkeypatch, {"name": "linear"})
    t = task.cfg.task
    assert (t.train_head, t.head_init, t.normalize_points, t.learn_logit_scale) == (True, "random", True, True)
    assert model.head.weight.requires_grad and model.logit_scale.requires_grad
    assert model.head_parameters() == [model.head.weight]
    with torch.no_grad():
        f = model.point_features(task.synthetic_batch(model, 2)["points"])
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2))


def test_a_frozen_w_pc_must_be_a_defined_projection() -> None:
    with pytest.raises(ConfigError, match="train_head=false freezes W_pc.*head_init=orthogonal"):
        _cfg({"name": "linear"}, train_head=False)
    with pytest.raises(ConfigError, match="head_init must be one of random, orthogonal, identity"):
        _cfg({"name": "linear"}, head_init="eye")
    _cfg({"name": "linear"}, train_head=False, head_init="identity")  # identity is defined (equal widths)


def test_fixed_orthogonal_is_seeded_and_orthonormal_both_ways() -> None:
    from vision_peft.tasks.pointcloud import fixed_orthogonal

    wide, tall = fixed_orthogonal(8, 20, 0), fixed_orthogonal(20, 8, 0)
    assert wide.shape == (8, 20) and tall.shape == (20, 8)
    torch.testing.assert_close(wide @ wide.t(), torch.eye(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(tall.t() @ tall, torch.eye(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(fixed_orthogonal(8, 20, 0), wide, atol=0, rtol=0)  # deterministic, any RNG state


@pytest.mark.parametrize("reinit", [False, True])
def test_point_ffn_trains_the_last_ffn_only(minilm, monkeypatch, reinit: bool) -> None:
    """PPT-FFN on PointBERT: the last block's fc1/fc2 + norm1/norm2 (PPT's head_type 2) and nothing else of the
    encoder; on PointNet its analogue conv5 + bn5. reinit re-draws them; without it the pretrained values stay."""
    from vision_peft.backbones import build_backbone

    ffn = {"name": "point_ffn", "reinit": reinit}
    _, model = _model(minilm, monkeypatch, ffn, backbone="pointbert:tiny", **PPT_BASE)
    last = "blocks.blocks.1"
    want = [f"{last}.mlp.fc1", f"{last}.mlp.fc2", f"{last}.norm1", f"{last}.norm2"]
    assert sorted(model.adapter.touched) == want
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{w}" for m in want for w in ("weight", "bias")}
    fresh = build_backbone(BackboneConfig(name="pointbert:tiny", pretrained=False))
    same = torch.equal(
        model.backbone.get_submodule(f"{last}.mlp.fc1").weight, fresh.get_submodule(f"{last}.mlp.fc1").weight
    )
    assert same != reinit
    assert {"prompt.ctx", *(f"backbone.{n}" for n in trainable)} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    _, pn = _model(minilm, monkeypatch, ffn, **PPT_BASE)
    assert sorted(pn.adapter.touched) == ["feature_model.bn5", "feature_model.conv5"]


def test_point_ffn_size_on_ulip_pointbert() -> None:
    """At ULIP's width (384) PPT-FFN trains fc1 + fc2 + two norms: 2·(4d² ) + 4d + d + 2·2d = 1,183,104 (PPT's ≈1.2 M)."""
    from vision_peft.adapters import ADAPTERS
    from vision_peft.adapters.point_adapter import PointFFNConfig
    from vision_peft.backbones.pointbert import PointBERT

    bb = PointBERT("").requires_grad_(False)
    ADAPTERS.get("point_ffn").builder(bb, PointFFNConfig())
    d = 384
    assert sum(p.numel() for p in bb.parameters() if p.requires_grad) == 8 * d * d + 5 * d + 4 * d


def test_ppt_recipes_are_the_paper_defaults() -> None:
    from vision_peft.recipe import load_recipe

    base, ffn = load_recipe("pointcloud-modelnet10-ppt-base"), load_recipe("pointcloud-modelnet10-ppt-ffn")
    for cfg in (base, ffn):
        t = cfg.task
        assert (t.n_ctx, t.class_position, t.label_smoothing) == (32, "middle", 0.2)
        assert {k: getattr(t, k) for k in PPT_BASE} == PPT_BASE
    assert base.adapter.name == "linear" and ffn.adapter.name == "point_ffn"


def test_class_list_must_match_the_checkpoint() -> None:
    from vision_peft.tasks import TASKS

    task = TASKS.get("pointcloud").builder(_cfg({"name": "linear"}, classes=["chair", "bed"]))
    with pytest.raises(ConfigError, match="does not match the checkpoint's class list"):
        task.set_classes(["bed", "chair"])


def test_pointcloud_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="class_position must be one of front, middle, end"):
        _cfg({"name": "linear"}, class_position="start")
    with pytest.raises(ConfigError, match="point_adapter must be one of prompts_only, residual_mlp, last_stage"):
        _cfg({"name": "linear"}, point_adapter="ffn")
    with pytest.raises(ConfigError, match="shots or task.data_ratio, not both"):
        _cfg({"name": "linear"}, shots=2, data_ratio=0.5)
