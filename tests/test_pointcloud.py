"""Point clouds: readers (every format, every bad input), preprocessing, PointNet (strict real weights, its
ModelNet40 head on real ModelNet10 shapes), PointBERT (random weights, ULIP key layout), PromptLearner token
layouts, PointAdapter variants, and train → predict → export through the CLI on real ModelNet10 files."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vision_peft.config import BackboneConfig, ConfigError, RunConfig
from vision_peft.data.points import (
    PointAugment,
    PointCloudDataset,
    PointFileError,
    PointSample,
    convert_up_axis,
    farthest_point_sample,
    few_shot_subset,
    normalize_unit_sphere,
    preprocess_points,
    read_points,
    sample_points,
    scan_point_folder,
)
from vision_peft.recipe import build_run_config

RNG = np.random.default_rng(0)
PTS = RNG.normal(size=(40, 3)).astype(np.float32)


# -- writers for generated files --------------------------------------------------------------------------------
def write_pcd(path: Path, pts: np.ndarray, binary: bool, fields: str = "x y z") -> Path:
    n, c = pts.shape
    head = (
        f"# .PCD v0.7\nVERSION 0.7\nFIELDS {fields}\nSIZE {' '.join(['4'] * c)}\nTYPE {' '.join(['F'] * c)}\n"
        f"COUNT {' '.join(['1'] * c)}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\n"
        f"DATA {'binary' if binary else 'ascii'}\n"
    )
    body = (
        pts.astype("<f4").tobytes() if binary else "".join(" ".join(f"{v:.7g}" for v in r) + "\n" for r in pts).encode()
    )
    path.write_bytes(head.encode() + body)
    return path


def write_ply(path: Path, pts: np.ndarray, fmt: str, extra: bool = False) -> Path:
    props = ["x", "y", "z"] + (["red", "green", "blue"] if extra else [])
    head = f"ply\nformat {fmt} 1.0\nelement vertex {len(pts)}\n"
    head += "".join(f"property float {p}\n" if p in "xyz" else f"property uchar {p}\n" for p in props)
    head += "element face 0\nproperty list uchar int vertex_indices\nend_header\n"
    if fmt == "ascii":
        rows = [" ".join(f"{v:.7g}" for v in r) + (" 10 20 30" if extra else "") for r in pts]
        path.write_bytes(head.encode() + ("\n".join(rows) + "\n").encode())
    else:
        rec = b"".join(struct.pack("<fff", *r) + (b"\x0a\x14\x1e" if extra else b"") for r in pts)
        path.write_bytes(head.encode() + rec)
    return path


def write_off(path: Path, pts: np.ndarray) -> Path:
    faces = [(0, 1, 2), (1, 2, 3)]
    text = f"OFF\n{len(pts)} {len(faces)} 0\n" + "".join(" ".join(f"{v:.7g}" for v in r) + "\n" for r in pts)
    text += "".join(f"3 {a} {b} {c}\n" for a, b, c in faces)
    path.write_text(text)
    return path


def write_h5(path: Path, data: np.ndarray, label: np.ndarray | None) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f["data"] = data
        if label is not None:
            f["label"] = label.reshape(-1, 1)
    return path


@pytest.fixture
def every_format(tmp_path: Path) -> dict[str, Path]:
    np.savez(tmp_path / "p.npz", points=PTS)
    np.save(tmp_path / "p.npy", PTS)
    return {
        "pcd_ascii": write_pcd(tmp_path / "a.pcd", PTS, binary=False),
        "pcd_binary": write_pcd(tmp_path / "b.pcd", PTS, binary=True),
        "off": write_off(tmp_path / "m.off", PTS),
        "ply_ascii": write_ply(tmp_path / "a.ply", PTS, "ascii"),
        "ply_binary": write_ply(tmp_path / "b.ply", PTS, "binary_little_endian"),
        "npy": tmp_path / "p.npy",
        "npz": tmp_path / "p.npz",
        "h5": write_h5(tmp_path / "p.h5", np.stack([PTS * 2, PTS]), np.array([3, 1])),
    }


# -- readers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pcd_ascii", "pcd_binary", "off", "ply_ascii", "ply_binary", "npy", "npz", "h5"])
def test_every_format_reads_the_same_points(fmt: str, every_format: dict[str, Path]) -> None:
    got = read_points(every_format[fmt], index=1)
    assert got.dtype == np.float32 and got.shape == (40, 3)
    np.testing.assert_allclose(got, PTS, rtol=1e-5, atol=1e-6)


def test_off_surface_sampling(every_format: dict[str, Path]) -> None:
    pts = read_points(every_format["off"], off_points=500)
    assert pts.shape == (500, 3) and np.isfinite(pts).all()


def test_h5_folder_layout(tmp_path: Path) -> None:
    write_h5(tmp_path / "ply_data_train0.h5", np.stack([PTS] * 4), np.array([0, 1, 2, 1]))
    write_h5(tmp_path / "ply_data_test0.h5", np.stack([PTS] * 2), np.array([2, 0]))
    (tmp_path / "shape_names.txt").write_text("cup\nbowl\nvase\n")
    scan = scan_point_folder(tmp_path)
    assert scan.classes == ["cup", "bowl", "vase"] and len(scan.splits["train"]) == 4
    sub = scan_point_folder(tmp_path, ["vase", "cup"])
    assert [s.label for s in sub.splits["test"]] == [0, 1]
    ds = PointCloudDataset(sub.splits["test"], 32, "random", "none")
    assert ds[0]["points"].shape == (32, 3)


@pytest.mark.parametrize("ext", [".pcd", ".off", ".ply", ".npy", ".npz", ".h5", ".xyz"])
def test_empty_file_is_named(tmp_path: Path, ext: str) -> None:
    f = tmp_path / f"empty{ext}"
    f.write_bytes(b"")
    with pytest.raises(PointFileError, match="empty|unknown point-cloud extension") as e:
        read_points(f)
    assert str(f) in str(e.value)


def test_nan_and_inf_are_refused_with_the_row(tmp_path: Path) -> None:
    bad = PTS.copy()
    bad[7, 1] = np.nan
    bad[9, 0] = np.inf
    for f in (write_pcd(tmp_path / "n.pcd", bad, binary=True), write_ply(tmp_path / "n.ply", bad, "ascii")):
        with pytest.raises(PointFileError, match=r"2 point\(s\) with NaN/inf coordinates \(first at row 7\)") as e:
            read_points(f)
        assert str(f) in str(e.value) and "remove those points" in str(e.value)


def test_extra_columns_take_xyz_or_error(tmp_path: Path, caplog) -> None:
    rgb = np.concatenate([PTS, RNG.random((40, 3)).astype(np.float32)], axis=1)
    files = [
        write_pcd(tmp_path / "c.pcd", rgb, binary=True, fields="x y z r g b"),
        write_ply(tmp_path / "c.ply", PTS, "binary_little_endian", extra=True),
        tmp_path / "c.npy",
    ]
    np.save(files[2], rgb)
    for f in files:
        with caplog.at_level(logging.WARNING, logger="vision_peft"):
            caplog.clear()
            np.testing.assert_allclose(read_points(f), PTS, rtol=1e-5)
        assert "x, y, z" in caplog.text or "first three" in caplog.text
        with pytest.raises(PointFileError, match="extra_columns=take_xyz") as e:
            read_points(f, extra_columns="error")
        assert str(f) in str(e.value)
    np.save(tmp_path / "two.npy", PTS[:, :2])
    with pytest.raises(PointFileError, match="2 column"):
        read_points(tmp_path / "two.npy")


def test_unknown_extension_and_unsupported_pcd(tmp_path: Path) -> None:
    (tmp_path / "p.xyz").write_text("0 0 0\n")
    with pytest.raises(PointFileError, match=r"unknown point-cloud extension '.xyz'; supported: .pcd"):
        read_points(tmp_path / "p.xyz")
    f = write_pcd(tmp_path / "c.pcd", PTS, binary=True)
    f.write_bytes(f.read_bytes().replace(b"DATA binary", b"DATA binary_compressed"))
    with pytest.raises(PointFileError, match="binary_compressed.*not supported"):
        read_points(f)
    write_h5(tmp_path / "nolab.h5", PTS[None], None)
    with pytest.raises(PointFileError, match="out of range"):
        read_points(tmp_path / "nolab.h5", index=3)


def test_too_few_points_resample_with_replacement_and_say_so(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vision_peft"):
        out = sample_points(PTS[:10], 64, "random", np.random.default_rng(0), name="tiny.pcd")
    assert out.shape == (64, 3) and "tiny.pcd has 10 points, fewer than the 64 required" in caplog.text
    assert "with replacement" in caplog.text
    assert {tuple(r) for r in out} == {tuple(r) for r in PTS[:10]}  # every original point kept, duplicates added


# -- preprocessing ------------------------------------------------------------------------------------------------
def test_normalise_up_axis_and_sampling() -> None:
    p = normalize_unit_sphere(PTS * 7 + 3)
    np.testing.assert_allclose(p.mean(0), 0, atol=1e-5)
    assert np.linalg.norm(p, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    z_up = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(convert_up_axis(z_up, "swap_yz"), [[0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(convert_up_axis(z_up, "none"), z_up)
    with pytest.raises(ValueError, match="unknown up-axis rule"):
        convert_up_axis(z_up, "x_up")
    line = np.linspace(0, 1, 101, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    idx = farthest_point_sample(line, 3, start=0)
    assert sorted(idx.tolist()) == [0, 50, 100]  # the ends and the middle
    fps = sample_points(line, 3, "fps", np.random.default_rng(0))
    assert fps.shape == (3, 3)
    out = preprocess_points(PTS, 16, "random", "swap_yz", np.random.default_rng(0))
    assert out.shape == (16, 3) and np.linalg.norm(out, axis=1).max() == pytest.approx(1.0, abs=1e-6)


def test_augmentation_is_seeded_per_sample_and_epoch(tmp_path: Path) -> None:
    aug = PointAugment(scale=(0.8, 1.25), jitter=0.01, rotate=180.0, dropout=0.5)
    a = aug(PTS, np.random.default_rng(3))
    np.testing.assert_array_equal(a, aug(PTS, np.random.default_rng(3)))
    assert not np.allclose(a, PTS)
    rot = PointAugment(scale=(1.0, 1.0), jitter=0.0, rotate=90.0)(PTS, np.random.default_rng(0))
    np.testing.assert_allclose(rot[:, 1], PTS[:, 1], atol=1e-6)  # rotation about y keeps the up coordinate
    np.testing.assert_allclose(
        np.linalg.norm(rot[:, [0, 2]], axis=1), np.linalg.norm(PTS[:, [0, 2]], axis=1), rtol=1e-5
    )
    np.save(tmp_path / "s.npy", PTS)
    samples = [PointSample(str(tmp_path / "s.npy"), 0)] * 2
    ds = PointCloudDataset(samples, 32, "random", "none", augment=aug, seed=5)
    x0 = ds[0]["points"]
    assert torch.equal(x0, ds[0]["points"]) and not torch.equal(x0, ds[1]["points"])
    ds.set_epoch(1)
    assert not torch.equal(x0, ds[0]["points"])
    ds.set_epoch(0)
    assert torch.equal(x0, ds[0]["points"])  # a resumed epoch draws the same augmentation


def test_few_shot_subset_is_seeded_and_stratified() -> None:
    samples = [PointSample(str(i), i % 3) for i in range(30)]
    a = few_shot_subset(samples, 2, None, 0, 3)
    assert [s.label for s in a] == [0, 0, 1, 1, 2, 2] and a == few_shot_subset(samples, 2, None, 0, 3)
    assert a != few_shot_subset(samples, 2, None, 1, 3)
    assert len(few_shot_subset(samples, None, 0.5, 0, 3)) == 15
    with pytest.raises(PointFileError, match="11 shots requested"):
        few_shot_subset(samples, 11, None, 0, 3)


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


# -- end to end through the CLI on real ModelNet10 files ---------------------------------------------------------
def cli(capsys, *args: str) -> str:
    """Run ``python -m vision_peft <args>`` in-process (same code path, no interpreter start-up); returns stdout."""
    from vision_peft.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    assert rc == 0, f"{args}: {out.err[-3000:]}"
    return out.out


def test_train_predict_export_on_modelnet10(
    tmp_path: Path, data_root: Path, weights_root: Path, capsys, vp_logging_reset, torch_free
) -> None:
    src = data_root / "modelnet10"
    classes = ["chair", "monitor", "toilet"]
    data = tmp_path / "mn10"
    for c in classes:  # a few real shapes per class (links), so the run takes seconds
        for split, n in (("train", 3), ("test", 2)):
            (data / c / split).mkdir(parents=True)
            for f in sorted((src / c / split).glob("*.pcd"))[:n]:
                (data / c / split / f.name).symlink_to(f)
    runs = tmp_path / "runs"
    cli(
        capsys,
        "train",
        "pointcloud-modelnet10",
        f"--task.data_root={data}",
        "--task.shots=2",
        "--task.num_points=256",
        f"--output.runs_root={runs}",
        "--output.name=pc",
        "--train.epochs=1",
        "--train.max_steps=2",
        "--train.batch_size=4",
        "--train.device=cpu",
        "--no-progress",
    )
    run = runs / "pc"
    info = json.loads((run / "config.json").read_text())
    assert info["task_state"]["classes"] == classes and info["task_state"]["text_backbone"]["spec"] == "minilm"
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 6 and len(split["test"]) == 6
    from vision_peft.checkpoint import load_tensors

    keys = set(load_tensors(run / "adapter.safetensors"))
    assert keys == {"prompt.ctx", "head.weight", "logit_scale"} | {
        f"backbone.feature_adapters.0.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    }
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["test"]["n"] == 6

    files = split["test"][:2]
    preds = [json.loads(ln) for ln in cli(capsys, "predict", str(run), *files).splitlines()]
    assert [p["file"] for p in preds] == files and all(p["label"] in classes for p in preds)
    assert all(abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4 for p in preds)

    rep = json.loads(cli(capsys, "export", str(run), "--bundle", str(tmp_path / "bundle")))
    assert rep["max_abs_diff"] < 1e-4 and all(e["logits_top1_agreement"] == 1.0 for e in rep["per_batch"])
    rep8 = json.loads(cli(capsys, "export", str(run), "--bundle", str(tmp_path / "bundle8"), "--int8"))["int8"]
    assert rep8["fp32_top1"] == pytest.approx(final["test"]["top1"])  # the fp32 graph scores what torch scored
    assert rep8["metric_change"]["top1"] == pytest.approx(rep8["int8_top1"] - rep8["fp32_top1"])
    assert 0 <= rep8["prediction_agreement"] <= 1 and rep8["bytes_int8"] < rep8["bytes_fp32"]  # quantised = smaller
    man = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert man["labels"] == classes and man["graphs"]["model"]["inputs"]["points"]["shape"] == ["batch", 256, 3]
    pre = man["preprocess"]["points"]
    assert pre["num_points"] == 256 and pre["up_axis"]["rule"] == "swap_yz"
    assert pre["sampling"]["rule"] == "random" and pre["normalize"]["rule"] == "center_unit_sphere"

    # the bundle alone (onnxruntime + numpy + our documented preprocessing) reproduces the torch prediction
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = preprocess_points(read_points(files[0]), 256, "random", "swap_yz", np.random.default_rng(0))
    logits = sess.run(["logits"], {"points": x[None]})[0][0]
    assert man["labels"][int(logits.argmax())] == preds[0]["label"]

    # the torch-free runtime reads the files itself and matches torch's predict
    from vision_peft.deploy import load_bundle

    got = load_bundle(tmp_path / "bundle", device="cpu").classify_points(files)
    for g, p in zip(got, preds, strict=True):
        assert g["label"] == p["label"] and abs(g["prob"] - p["prob"]) < 1e-4
    out = torch_free(
        f"""
        from vision_peft.deploy import main
        assert main([{str(tmp_path / "bundle")!r}, *{files!r}, "--device", "cpu"]) == 0
        """
    )
    assert [json.loads(x)["label"] for x in out.splitlines()[:2]] == [p["label"] for p in preds]

    # the HTTP server's point endpoint: same answer; bad files are 4xx naming the upload; other endpoints 409
    from fastapi.testclient import TestClient

    from vision_peft.serve import create_app

    client = TestClient(create_app(tmp_path / "bundle", device="cpu"))
    r = client.post("/v1/points", files=[("files", (Path(f).name, Path(f).read_bytes())) for f in files])
    assert r.status_code == 200, r.text
    assert [x["label"] for x in r.json()["results"]] == [p["label"] for p in preds]
    r = client.post("/v1/points", files=[("files", ("broken.off", b"OFF\n3 1 0\n0 0 nan\n1 1 1\n"))])
    assert r.status_code == 422 and "broken.off" in r.json()["detail"]
    r = client.post("/v1/points", files=[("files", ("cloud.xyz", b"0 0 0\n"))])
    assert r.status_code == 415 and "cloud.xyz" in r.json()["detail"]
    r = client.post("/v1/classify", files=[("files", ("a.png", b"x", "image/png"))])
    assert r.status_code == 409 and "/v1/points" in r.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"
