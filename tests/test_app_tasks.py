"""The app's per-task dataset previews (app/previews.py) on the real shared data, and the task-specific predict
panels (app/panels.py) driven through gradio_client on loopback with tiny finished runs of each task."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import test_app  # noqa: E402  (the app fixture and zip helper are shared with the app's main tests)
from conftest import reset_vision_peft_logging, write_image_folder  # noqa: E402
from test_refseg import refseg_cfg, write_refer_folder  # noqa: E402

from app.previews import (  # noqa: E402
    MASK_COLOUR,
    dataset_preview,
    image_grid,
    mask_stats,
    overlay_mask,
    read_refer_samples,
    render_point_file,
    render_points,
    render_views,
)

app_client = test_app.app_client  # module-scoped: the app on loopback + its AppState (runs land in its runs root)
make_zip = test_app.make_zip
MN10_CLASSES = ("chair", "monitor", "toilet")


def _ink(img: Image.Image, background=(255, 255, 255)) -> float:
    """Fraction of pixels that differ from the background."""
    a = np.asarray(img.convert("RGB"))
    return float((a != np.array(background, np.uint8)).any(axis=2).mean())


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def _preview_of(task: str) -> str:
    """The dataset preview kind the registered task declares (what its app tab previews with)."""
    from vision_peft.tasks import TASKS

    return TASKS.get(task).builder.preview


# -- point-cloud previews ------------------------------------------------------------------------------------------
def test_render_modelnet_file_views_and_shapes(data_root: Path) -> None:
    chair = sorted((data_root / "modelnet10" / "chair" / "train").glob("*.pcd"))[0]
    monitor = sorted((data_root / "modelnet10" / "monitor" / "train").glob("*.pcd"))[0]
    views = {v: render_point_file(chair, (v,), 160) for v in ("front", "side", "top", "3/4")}
    for name, img in views.items():
        assert img.size == (160, 160) and img.mode == "RGB"
        assert 0.03 < _ink(img) < 0.9, f"{name} view is blank or fully covered"
        colours = np.unique(np.asarray(img).reshape(-1, 3), axis=0)
        assert len(colours) > 20, "points are depth-shaded, not one flat colour"
    names = list(views)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert _diff(views[a], views[b]) > 1.0, f"the {a} and {b} views look the same"
    assert _diff(views["3/4"], render_point_file(monitor, ("3/4",), 160)) > 1.0  # another shape, another picture
    assert np.array_equal(np.asarray(views["3/4"]), np.asarray(render_point_file(chair, ("3/4",), 160)))
    strip = render_point_file(chair, ("front", "side", "top", "3/4"), 100)
    assert strip.size == (4 * 100 + 3 * 2, 100)


def test_render_points_depth_order_and_bad_arrays() -> None:
    # two points on the camera axis: the nearer (z = +1) one is drawn over the farther one, in the warm colour
    img = np.asarray(render_points(np.array([[0, 0, 1.0], [0, 0, -1.0]]), 64, azim=0, elev=0))
    centre = img[32, 32].astype(int)
    assert centre[0] > centre[2], f"the near point should be warm (red > blue), got {centre}"
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        render_points(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        render_points(np.array([[0, 0, np.nan], [1, 1, 1.0]]))
    with pytest.raises(ValueError, match="unknown view"):
        render_views(np.ones((4, 3)), ("diagonal",))


def test_pointcloud_dataset_preview_one_rendering_per_class(data_root: Path) -> None:
    root = data_root / "modelnet10"
    headers, rows, items = dataset_preview(_preview_of("pointcloud"), root)
    assert headers == ["class", "train", "test"]
    counts = {r[0]: r[1:] for r in rows}
    assert counts["chair"] == [len(list((root / "chair" / s).glob("*.pcd"))) for s in ("train", "test")]
    assert len(rows) == 10 and len(items) == 10
    assert [c.split(" — ")[0] for _, c in items] == [r[0] for r in rows]
    assert all(isinstance(im, Image.Image) and _ink(im) > 0.02 for im, _ in items)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("garbage.pcd", b"this is not a point cloud\n", "PCD header has no DATA line"),
        (
            "short.ply",
            b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nend_header\n1\n2\n3\n",
            "x, y and z",
        ),
        ("empty.off", b"", "is empty"),
        ("flat.npy", None, "column"),
        ("cloud.xyz", b"0 0 0\n", "unknown point-cloud extension"),
    ],
)
def test_malformed_point_file_names_the_file(tmp_path: Path, name: str, content: bytes | None, fragment: str) -> None:
    from vision_peft.data.points import PointFileError

    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((10, 2), np.float32))  # two columns: not xyz
    else:
        path.write_bytes(content)
    with pytest.raises(PointFileError, match=fragment) as err:
        render_point_file(path)
    assert name in str(err.value)


# -- referring-segmentation previews -------------------------------------------------------------------------------
def test_overlay_tints_mask_pixels_only(data_root: Path) -> None:
    from vision_peft.preprocess import load_image

    samples, fmt = read_refer_samples(data_root / "coco128-seg")
    assert fmt == "coco128_seg"
    s = next(x for x in samples if 0.05 < x.mask((100, 100)).mean() < 0.6)
    img = load_image(s.image)
    img.thumbnail((256, 256))
    mask = s.mask((img.height, img.width)).astype(bool)
    out = np.asarray(overlay_mask(img, mask, alpha=0.5, outline=2)).astype(int)
    src = np.asarray(img).astype(int)
    assert np.array_equal(out[~mask], src[~mask]), "pixels outside the mask must not change"
    assert (out[mask] != src[mask]).any(axis=1).mean() > 0.99, "mask pixels must change colour"
    # the outline: mask pixels within 2 steps (4-neighbour) of the background, drawn in the full colour
    h, w = mask.shape
    bg = np.pad(~mask, 2, constant_values=True)
    edge = np.zeros_like(mask)
    for dy in range(-2, 3):
        for dx in range(-2 + abs(dy), 3 - abs(dy)):
            edge |= bg[2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]
    outline, inner = mask & edge, mask & ~edge
    assert outline.any() and inner.any()
    assert (out[outline] == MASK_COLOUR).all()
    blend = 0.5 * src[inner] + 0.5 * np.array(MASK_COLOUR)
    assert np.abs(out[inner] - blend).max() <= 0.5 + 1e-9  # semi-transparent tint inside
    with pytest.raises(ValueError, match="mask is"):
        overlay_mask(img, mask[:-1])


def test_refseg_dataset_preview_coco128_and_folder(data_root: Path, tmp_path: Path) -> None:
    from vision_peft.data.refer import read_coco128_seg

    headers, rows, items = dataset_preview(_preview_of("refseg"), data_root / "coco128-seg")
    samples, _ = read_coco128_seg(data_root / "coco128-seg")
    facts = dict(rows)
    assert headers == ["statistic", "value"] and facts["referred objects"] == len(samples)
    assert 0 < len(items) <= 12
    phrases = {s.phrases[0] for s in samples}
    for im, caption in items:
        assert isinstance(im, Image.Image) and max(im.size) <= 224
        assert caption.split("”")[0].lstrip("“") in phrases
    assert len({c.split(" — ")[1] for _, c in items}) == len(items)  # one target per image first

    folder = write_refer_folder(tmp_path / "refer")
    headers, rows, items = dataset_preview(_preview_of("refseg"), folder)
    assert dict(rows)["format"] == "folder" and items[0][1].startswith("“the red box”")
    red = np.asarray(items[0][0]).reshape(-1, 3)
    assert (red == MASK_COLOUR).all(axis=1).any()  # the target's outline is visible
    with pytest.raises(ValueError, match="not a referring-segmentation dataset"):
        dataset_preview(_preview_of("refseg"), tmp_path)


def test_image_tasks_keep_counts_and_thumbnails(aid_root: Path) -> None:
    headers, rows, items = dataset_preview(_preview_of("fewshot"), aid_root)
    assert headers == ["class", "files"] and len(rows) == 30 and rows[0][1] == 100
    assert all(Path(p).is_file() for p, _ in items)


def test_mask_stats_and_image_grid() -> None:
    m = np.zeros((10, 20), bool)
    m[2:5, 3:9] = True
    st = mask_stats(m, np.where(m, 0.9, 0.1), 0.35)
    assert st["mask_area_px"] == 18 and st["bbox_xyxy"] == [3, 2, 9, 5] and st["image_size"] == [20, 10]
    assert abs(st["mean_prob_in_mask"] - 0.9) < 1e-6 and mask_stats(~np.ones((2, 2), bool))["bbox_xyxy"] is None
    imgs = np.random.default_rng(0).random((6, 16, 16, 3))
    grid = image_grid(imgs, 3, ["Beach", "Forest"])
    assert grid.height == 2 * (128 + 2) + 2 and grid.width > 3 * 128
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        image_grid(imgs[..., 0], 3)


# -- predict panels through gradio_client ----------------------------------------------------------------------------
def _train(cfg) -> Path:
    from vision_peft.train import run

    try:
        return Path(run(cfg, progress=False))
    finally:
        reset_vision_peft_logging()


def _refresh(client, task: str, name: str) -> None:
    """The finished-run dropdown, refreshed as the Refresh button does (the session then accepts ``name``)."""
    update = client.predict(api_name=f"/{task}_runs")
    assert name in str(update)


def _tiny_modelnet(root: Path, data_root: Path) -> Path:
    src = data_root / "modelnet10"
    for c in MN10_CLASSES:
        for split, n in (("train", 2), ("test", 1)):
            (root / c / split).mkdir(parents=True)
            for f in sorted((src / c / split).glob("*.pcd"))[:n]:
                (root / c / split / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def refseg_run(app_client, tmp_path_factory) -> tuple[str, Path]:
    """('rs', data folder): a 2-step refseg run (timm:test_vit + vp-tiny-clip, 32 px) in the app's runs root."""
    state = app_client[1]
    data = write_refer_folder(tmp_path_factory.mktemp("refer") / "data")
    _train(refseg_cfg(data, state.runs_root))
    return "rs", data


@pytest.fixture(scope="module")
def pointcloud_run(app_client, tmp_path_factory, data_root: Path) -> tuple[str, Path]:
    """('pc', data folder): a 1-step PPT run (random PointNet + vp-tiny-clip, 64 points) on 3 ModelNet10 classes."""
    from vision_peft.recipe import build_run_config

    state = app_client[1]
    data = _tiny_modelnet(tmp_path_factory.mktemp("mn10") / "data", data_root)
    cfg = build_run_config(
        {
            "task": {
                "name": "pointcloud",
                "data_root": str(data),
                "num_points": 64,
                "n_ctx": 2,
                "adapter_hidden": 8,
                "text_backbone": {"name": "open_clip_text:vp-tiny-clip", "pretrained": False},
            },
            "backbone": {"name": "pointnet", "pretrained": False},
            "adapter": {"name": "linear"},
            "train": {"epochs": 1, "max_steps": 1, "batch_size": 6, "device": "cpu", "log_every": 1},
            "output": {"runs_root": str(state.runs_root), "name": "pc"},
        }
    )
    _train(cfg)
    return "pc", data


def test_classification_preview_and_label_panel_unchanged(app_client, tiny_run: Path, aid_root: Path, tmp_path) -> None:
    import shutil

    from gradio_client import handle_file

    client, state, _, _ = app_client
    zipped = test_app.aid_zip(tmp_path, aid_root, n=4)
    _, counts, gallery = client.predict(handle_file(str(zipped)), "", api_name="/classification_upload")
    assert counts["headers"] == ["class", "files"]
    assert {r[0]: r[1] for r in counts["data"]} == dict.fromkeys(("Beach", "Forest", "Port"), 4)
    assert len(gallery) == 3
    shutil.copytree(tiny_run, state.runs_root / "cls")
    _refresh(client, "classification", "cls")
    image = sorted((tiny_run.parent.parent / "data" / "beta").iterdir())[0]
    preds, label = client.predict("cls", [handle_file(str(image))], api_name="/classification_predict")
    assert preds[0]["label"] in ("alpha", "beta", "gamma") and label["label"] == preds[0]["label"]
    # Monte Carlo samples on a LoRA run: a readable refusal in the page, and the panel keeps working
    with pytest.raises(Exception, match="sampled latent"):
        client.predict("cls", [handle_file(str(image))], 8, api_name="/classification_predict")
    again, _ = client.predict("cls", [handle_file(str(image))], 0, api_name="/classification_predict")
    assert again == preds


def test_refseg_panel_overlay_and_stats(app_client, refseg_run) -> None:
    from gradio_client import handle_file

    client, state, _, _ = app_client
    name, data = refseg_run
    _refresh(client, "refseg", name)
    image = data / "images" / "im0.png"
    overlay_path, stats = client.predict(name, handle_file(str(image)), "the red box", api_name="/refseg_predict")
    got = Image.open(overlay_path).convert("RGB")
    assert got.size == Image.open(image).size == (48, 40)
    assert stats["phrase"] == "the red box" and stats["image_size"] == [48, 40]
    assert stats["mask_area_px"] == round(stats["area_fraction"] * 48 * 40) and 0 <= stats["max_prob"] <= 1
    # the panel shows exactly the run's mask over the image (PNG: lossless)
    _, task, model, _ = state.model(name)
    res = task.predict_mask(model, str(image), "the red box", "cpu")
    assert stats["mask_area_px"] == int(res["mask"].sum())
    assert np.array_equal(np.asarray(got), np.asarray(overlay_mask(res["image"], res["mask"])))
    with pytest.raises(Exception, match="type a referring phrase"):
        client.predict(name, handle_file(str(image)), "  ", api_name="/refseg_predict")
    with pytest.raises(Exception, match="choose a finished run"):
        client.predict(None, handle_file(str(image)), "the red box", api_name="/refseg_predict")


def test_refseg_dataset_preview_in_the_app(app_client) -> None:
    client = app_client[0]
    path, table, gallery = client.predict(None, "coco128-seg", api_name="/refseg_folder")
    assert path.endswith("coco128-seg") and table["headers"] == ["statistic", "value"]
    assert dict(table["data"])["format"] == "coco128_seg"
    assert 0 < len(gallery) <= 12 and all(g["caption"].startswith("“") for g in gallery)


def test_pointcloud_panel_class_probabilities_and_rendering(app_client, pointcloud_run, tmp_path: Path) -> None:
    from gradio_client import handle_file

    client, state, _, _ = app_client
    name, data = pointcloud_run
    _refresh(client, "pointcloud", name)
    shape = sorted((data / "monitor" / "test").glob("*.pcd"))[0]
    label, pred, render_path = client.predict(name, handle_file(str(shape)), api_name="/pointcloud_predict")
    assert pred["label"] in MN10_CLASSES and label["label"] == pred["label"]
    assert abs(sum(t["prob"] for t in pred["top"]) - 1) < 1e-4 and len(pred["top"]) == 3
    import torch

    _, task, model, _ = state.model(name)
    direct = task.predict(model, [str(shape)], torch.device("cpu"))[0]
    assert direct["label"] == pred["label"] and abs(direct["prob"] - pred["prob"]) < 1e-6
    picture = Image.open(render_path).convert("RGB")
    assert picture.size == (4 * 200 + 3 * 2, 200) and _ink(picture) > 0.02
    assert np.array_equal(
        np.asarray(picture), np.asarray(render_point_file(shape, ("front", "side", "top", "3/4"), 200))
    )
    # a malformed upload: a readable error naming the file, and the server keeps serving
    bad = tmp_path / "broken_shape.pcd"
    bad.write_bytes(b"# .PCD v0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 10\nDATA binary\n\x00\x01")
    with pytest.raises(Exception, match=r"broken_shape\.pcd.*truncated"):
        client.predict(name, handle_file(str(bad)), api_name="/pointcloud_predict")
    assert client.predict(name, handle_file(str(shape)), api_name="/pointcloud_predict")[1]["label"] == pred["label"]


def test_pointcloud_dataset_zip_preview_in_the_app(app_client, pointcloud_run, tmp_path: Path) -> None:
    from gradio_client import handle_file

    client = app_client[0]
    _, data = pointcloud_run
    entries = {f"mn/{p.relative_to(data)}": p.read_bytes() for p in sorted(data.rglob("*.pcd"))}
    path, table, gallery = client.predict(
        handle_file(str(make_zip(tmp_path / "mn.zip", entries))), "", api_name="/pointcloud_upload"
    )
    assert table["headers"] == ["class", "train", "test"]
    assert {r[0]: r[1:] for r in table["data"]} == {c: [2, 1] for c in MN10_CLASSES}
    assert [g["caption"].split(" — ")[0] for g in gallery] == list(MN10_CLASSES)
    assert all(
        _ink(Image.open(g["image"]["path"] if isinstance(g["image"], dict) else g["image"])) > 0.02 for g in gallery
    )


def test_fewshot_panel_support_zip_and_queries(app_client, aid_root: Path, tmp_path: Path) -> None:
    from gradio_client import handle_file
    from test_fewshot import fewshot_cfg

    client, state, _, _ = app_client
    cfg = fewshot_cfg(tmp_path, aid_root, train_episodes=1, val_episodes=1, test_episodes=0)
    cfg.output.runs_root, cfg.output.name = str(state.runs_root), "fs"
    _train(cfg)
    _refresh(client, "fewshot", "fs")
    support = {
        f"sup/{c}/{f.name}": f.read_bytes()
        for c in ("Beach", "Forest")
        for f in sorted((aid_root / c).glob("*.jpg"))[:2]
    }
    queries = [sorted((aid_root / c).glob("*.jpg"))[-1] for c in ("Beach", "Forest")]
    preds, label, gallery = client.predict(
        "fs",
        handle_file(str(make_zip(tmp_path / "support.zip", support))),
        "",
        [handle_file(str(q)) for q in queries],
        api_name="/fewshot_predict",
    )
    assert [Path(p["file"]).name for p in preds] == [q.name for q in queries]
    assert all(p["label"] in ("Beach", "Forest") and abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4 for p in preds)
    assert label["label"] == preds[0]["label"] and len(gallery) == 2
    assert gallery[0]["caption"].startswith(preds[0]["label"])
    with pytest.raises(Exception, match="support set"):
        client.predict("fs", None, "", [handle_file(str(queries[0]))], api_name="/fewshot_predict")


def test_diffusion_panel_generates_a_seeded_grid(app_client, tmp_path: Path) -> None:
    from vision_peft.recipe import build_run_config

    client, state, _, _ = app_client
    data = write_image_folder(tmp_path / "imgs", ("a", "b"), per_class=3, size=(20, 24))
    task = {"name": "diffusion", "stage": "pretrain", "data_root": str(data), "classes": ["a", "b"]}
    task.update(image_size=16, train_per_class=2, eval_per_class=1, flip=False, sample_steps=3, guidance=1.5)
    cfg = build_run_config(
        {
            "task": task,
            "backbone": {"name": "dit:d1-w32-h2-c2", "pretrained": False},
            "adapter": {"name": "full"},
            "train": {"epochs": 1, "max_steps": 1, "batch_size": 4, "device": "cpu", "log_every": 1},
            "output": {"runs_root": str(state.runs_root), "name": "dif"},
        }
    )
    _train(cfg)
    _refresh(client, "diffusion", "dif")
    classes, steps, guidance = client.predict("dif", api_name="/diffusion_classes")
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in classes["choices"]] == ["a", "b"]
    assert (steps, guidance) == (3, 1.5)
    grid_path, info = client.predict("dif", ["b"], 2, 3, 1.5, 7, api_name="/diffusion_predict")
    grid = Image.open(grid_path).convert("RGB")
    assert info == {"classes": ["b"], "per_class": 2, "steps": 3, "guidance": 1.5, "seed": 7, "image_size": [16, 16]}
    assert grid.height == 128 + 4 and grid.width > 2 * 128
    again, _ = client.predict("dif", ["b"], 2, 3, 1.5, 7, api_name="/diffusion_predict")
    other, _ = client.predict("dif", ["b"], 2, 3, 1.5, 8, api_name="/diffusion_predict")
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(again).convert("RGB")))  # deterministic DDIM
    assert not np.array_equal(np.asarray(grid), np.asarray(Image.open(other).convert("RGB")))
    all_classes, info = client.predict("dif", [], 1, 2, 1.0, 0, api_name="/diffusion_predict")
    assert info["classes"] == ["a", "b"] and Image.open(all_classes).height == 2 * (128 + 2) + 2


def test_multilabel_tab_predicts_with_no_app_edit(app_client, data_root: Path) -> None:
    """The multi-label task (added after the app dispatched through the registries) predicts in its tab: the
    ranked-images panel its runtime declares, the categories present and the top classes."""
    from gradio_client import handle_file
    from test_multilabel import _cfg

    client, state, _, _ = app_client
    _train(_cfg(data_root, state.runs_root))  # run "ml": 3 steps, timm:test_vit + LoRA on coco128-seg
    _refresh(client, "multilabel", "ml")
    image = sorted((data_root / "coco128-seg" / "images").glob("*.jpg"))[0]
    preds, label = client.predict("ml", [handle_file(str(image))], 0, api_name="/multilabel_predict")
    import torch

    _, task, model, _ = state.model("ml")
    direct = task.predict(model, [str(image)], torch.device("cpu"), top_k=5)[0]
    assert preds[0]["labels"] == direct["labels"] and preds[0]["threshold"] == direct["threshold"]
    assert [t["label"] for t in preds[0]["top"]] == [t["label"] for t in direct["top"]] and len(direct["top"]) == 5
    assert label["label"] == preds[0]["label"] == direct["label"]
