"""The multilabel task: metrics against hand-computed cases, the coco128-seg labels, the split, and a tiny real run
through train → predict → export → deploy runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_peft.runtimes import multilabel as rt
from vision_peft.tasks import multilabel as ml

# -- average precision (hand-computed) -----------------------------------------------------------------------------


def test_ap_is_mean_precision_at_each_positive() -> None:
    # ranked: + - + -  → precision at the positives 1/1 and 2/3
    assert ml.average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a lone positive at rank 3 → 1/3
    assert ml.average_precision(np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1])) == pytest.approx(1 / 3)
    # every positive first → 1, whatever the input order
    assert ml.average_precision(np.array([0.1, 0.8, 0.9, 0.2]), np.array([0, 1, 1, 0])) == pytest.approx(1.0)
    # ranked: - + - + + → 1/2, 2/4, 3/5
    s, y = np.array([5.0, 4, 3, 2, 1]), np.array([0, 1, 0, 1, 1])
    assert ml.average_precision(s, y) == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)


def test_ap_ties_share_the_precision_at_the_end_of_the_group() -> None:
    # two tied items, one positive: precision 1/2 at the group's end, in either order
    assert ml.average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert ml.average_precision(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    # - (+ +) -: both positives in the tie group ending at rank 3 → 2/3 each (not 1/2 and 2/3)
    assert ml.average_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([0, 1, 1, 0])) == pytest.approx(2 / 3)


def test_weighted_ap_equals_ap_of_the_duplicated_list() -> None:
    # weights [2, 1, 1] = item 0 twice: ranked - - + + → 1/3, 2/4
    w = ml.average_precision(np.array([0.9, 0.8, 0.7]), np.array([0, 1, 1]), np.array([2.0, 1.0, 1.0]))
    assert w == pytest.approx(5 / 12)
    assert ml.average_precision(np.array([0.9, 0.9, 0.8, 0.7]), np.array([0, 0, 1, 1])) == pytest.approx(5 / 12)
    # a positive of weight 3 after a negative: its copies tie, precision 3/4 at the group's end
    assert ml.average_precision(np.array([0.9, 0.8]), np.array([0, 1]), np.array([1.0, 3.0])) == pytest.approx(3 / 4)


def test_ap_without_positives_is_nan_and_map_skips_it() -> None:
    assert np.isnan(ml.average_precision(np.array([0.3, 0.2]), np.array([0, 0])))
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.7, 0.3]])  # (N=3, C=2)
    targets = np.array([[0, 0], [1, 0], [1, 0]])  # class 1 has no positive
    ap = ml.per_class_ap(scores, targets)
    assert ap[0] == pytest.approx((1 / 2 + 2 / 3) / 2) and np.isnan(ap[1])
    assert ml.mean_ap(scores, targets) == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="finite"):
        ml.average_precision(np.array([np.nan, 0.1]), np.array([1, 0]))


def test_ap_matches_the_area_under_the_step_pr_curve() -> None:
    """Independent definition: sum over distinct thresholds of (recall gain) × precision."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 6, 40).astype(float)  # many ties
        y = rng.integers(0, 2, 40)
        if not y.any():
            continue
        area, prev_recall = 0.0, 0.0
        for t in np.unique(s)[::-1]:
            sel = s >= t
            recall, precision = (y[sel].sum()) / y.sum(), y[sel].mean()
            area += (recall - prev_recall) * precision
            prev_recall = recall
        assert ml.average_precision(s, y) == pytest.approx(area)


# -- F1 and the threshold ------------------------------------------------------------------------------------------


def test_f1_micro_macro_by_hand() -> None:
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4]])
    targets = np.array([[1, 0], [0, 1], [1, 1]])
    # at 0.5: predictions [[1,0],[1,1],[0,0]]; class 0: TP 1 FP 1 FN 1 → F1 1/2; class 1: TP 1 FP 0 FN 1 → 2/3
    f = ml.f1_scores(probs, targets, 0.5)
    assert f["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))  # TP 2, FP 1, FN 2
    assert f["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert f["precision"] == pytest.approx(2 / 3) and f["recall"] == pytest.approx(2 / 4)
    # the decision is prob >= threshold: at exactly 0.6 the 0.6 still counts as present
    assert rt.present(probs, 0.6).tolist() == [[True, False], [True, True], [False, False]]


def test_threshold_maximises_micro_f1_exactly() -> None:
    probs, targets = np.array([[0.3], [0.2]]), np.array([[1], [0]])
    # predict the top 1 → F1 1; the top 2 → 2/3: halfway between 0.3 and 0.2
    assert ml.choose_threshold(probs, targets) == pytest.approx(0.25)
    # 0.9+ | 0.6+ 0.6- | 0.2-: top 1 → 2/3, top 3 (the tie together) → 4/5, all → 4/6: halfway between 0.6 and 0.2
    probs, targets = np.array([[0.9], [0.6], [0.6], [0.2]]), np.array([[1], [1], [0], [0]])
    assert ml.choose_threshold(probs, targets) == pytest.approx(0.4)
    assert ml.f1_scores(probs, targets, 0.4)["micro_f1"] == pytest.approx(4 / 5)
    # pooled over categories (micro): everything positive → predict all, threshold half the lowest probability
    probs, targets = np.array([[0.8, 0.1], [0.4, 0.3]]), np.ones((2, 2))
    assert ml.choose_threshold(probs, targets) == pytest.approx(0.05)
    # ties in F1 go to the lower threshold: + - - + → top 1: 2/3, top 2: 1/2, top 3: 2/5, all: 4/6 = 2/3
    probs, targets = np.array([[0.9], [0.7], [0.5], [0.3]]), np.array([[1], [0], [0], [1]])
    assert ml.choose_threshold(probs, targets) == pytest.approx(0.15)
    # and 0.5 without any positive
    assert ml.choose_threshold(np.array([[0.9], [0.5]]), np.array([[0], [0]])) == 0.5


def test_threshold_search_beats_every_grid_point() -> None:
    rng = np.random.default_rng(1)
    probs, targets = rng.random((30, 7)).round(2), rng.integers(0, 2, (30, 7))
    best = ml.f1_scores(probs, targets, ml.choose_threshold(probs, targets))["micro_f1"]
    assert all(ml.f1_scores(probs, targets, t)["micro_f1"] <= best + 1e-12 for t in np.linspace(0, 1, 1001))


# -- runtime (numpy) -----------------------------------------------------------------------------------------------


def test_sigmoid_is_stable_and_exact() -> None:
    x = np.array([-1000.0, -3.0, 0.0, 2.0, 1000.0])
    with np.errstate(all="raise"):
        p = rt.sigmoid(x)
    np.testing.assert_allclose(p[1:4], 1 / (1 + np.exp(-x[1:4])), rtol=1e-12)
    assert 0.0 <= p[0] < 1e-20 and p[-1] == 1.0


def test_record_lists_present_labels_most_likely_first() -> None:
    rec = rt.multilabel_record("a.jpg", np.array([0.2, 0.9, 0.5, 0.6]), ["w", "x", "y", "z"], 0.5, top_k=2)
    assert rec["label"] == "x" and rec["prob"] == pytest.approx(0.9)
    assert [t["label"] for t in rec["top"]] == ["x", "z"]
    assert rec["labels"] == ["x", "z", "y"] and rec["threshold"] == 0.5
    assert rt.multilabel_record("b.jpg", np.array([0.1, 0.2]), ["p", "q"], 0.5, 5)["labels"] == []


# -- data ----------------------------------------------------------------------------------------------------------


def _yolo_folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / "images" / f"{stem}.jpg")
    tri = "0.1 0.1 0.5 0.1 0.3 0.4"
    (root / "labels" / "a.txt").write_text(f"0 {tri}\n0 {tri}\n16 {tri}\n")  # person ×2, dog
    (root / "labels" / "b.txt").write_text(f"2 {tri}\n80 {tri}\n5 0.1 0.1 0.2 0.2\nxx {tri}\n\n")  # car; 3 bad lines
    return root  # c has no label file: negative for every category


def test_reads_categories_per_image(tmp_path: Path) -> None:
    got = ml.read_yolo_image_labels(_yolo_folder(tmp_path / "y"))
    assert [(Path(g.image).name, g.categories) for g in got] == [("a.jpg", (0, 16)), ("b.jpg", (2,)), ("c.jpg", ())]


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    root = _yolo_folder(tmp_path / "y")
    (root / "images" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ml.DatasetError, match=r"image 1 of y \(b.jpg\) is unreadable"):
        ml.read_yolo_image_labels(root)


def test_coco128_seg_labels_and_split(data_root: Path) -> None:
    images = ml.read_yolo_image_labels(data_root / "coco128-seg")
    assert len(images) == 100
    by_id = {im.image_id: im for im in images}
    # COCO train2017 image 9: bowls, oranges and broccoli
    assert [ml.COCO80[c] for c in by_id["000000000009"].categories] == ["bowl", "orange", "broccoli"]
    task = ml.MultiLabelTask(_cfg(data_root, "unused"))
    assert task.classes[0] == "person" and "bowl" in task.classes and "zebra" not in task.classes  # zebra: 1 image
    splits = task.splits()
    files = {k: {p for p, _ in v} for k, v in splits.items()}
    assert {k: len(v) for k, v in files.items()} == {"train": 50, "val": 20, "test": 30}
    assert not (files["train"] & files["test"]) and not (files["val"] & files["test"])
    assert not (files["train"] & files["val"])
    assert ml.MultiLabelTask(_cfg(data_root, "unused")).splits() == splits  # deterministic in the seed
    row = dict(splits["train"] + splits["val"] + splits["test"])[by_id["000000000009"].image]
    assert "orange" not in task.classes  # in 1 image only (min_images 3): not a category of the task
    assert [task.classes[k] for k, v in enumerate(row) if v] == ["bowl", "broccoli"]


def test_config_refuses_unknown_category_and_choice() -> None:
    with pytest.raises(ml.ConfigError, match="unknown \\['zebras'\\]"):
        ml.MultiLabelConfig(classes=["person", "zebras"])
    with pytest.raises(ml.ConfigError, match="task.resize must be one of"):
        ml.MultiLabelConfig(resize="crop")


# -- a tiny real run -----------------------------------------------------------------------------------------------


def _cfg(data_root: Path, runs_root: Path | str, **train):
    from vision_peft.recipe import build_run_config

    return build_run_config(
        {
            "task": {"name": "multilabel", "data_root": str(data_root / "coco128-seg"), "augment": "none"},
            "backbone": {"name": "timm:test_vit", "pretrained": False, "image_size": 32},
            "adapter": {"name": "lora", "r": 2, "targets": ["qkv"]},
            "train": {"epochs": 1, "max_steps": 3, "batch_size": 16, "lr": 1e-3, "device": "cpu", **train},
            "output": {"runs_root": str(runs_root), "name": "ml"},
        }
    )


def test_val_selects_the_threshold_test_uses_it(data_root: Path) -> None:
    task = ml.MultiLabelTask(_cfg(data_root, "unused"))
    model = task.build_model()
    data = task.datasets(model)
    loader = torch.utils.data.DataLoader(data["val"], batch_size=8)
    res = task.evaluate(model, loader, torch.device("cpu"))
    assert list(res)[0] == "map" and res["n"] == 20
    assert float(model.threshold) == res["threshold"] == ml.choose_threshold(*_probs(model, data["val"]))
    model.threshold.fill_(0.123)
    test = task.evaluate(model, torch.utils.data.DataLoader(data["test"], batch_size=8), torch.device("cpu"))
    assert test["threshold"] == pytest.approx(0.123) and float(model.threshold) == pytest.approx(0.123)


def _probs(model, ds) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        x = torch.stack([ds[i]["image"] for i in range(len(ds))])
        y = np.stack([ds[i]["label"].numpy() for i in range(len(ds))])
        return torch.sigmoid(model.logits(x)).numpy(), y


def test_train_predict_export_deploy(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    from vision_peft.checkpoint import load_tensors
    from vision_peft.predict import predict_files
    from vision_peft.train import run

    run_dir = run(_cfg(data_root, tmp_path), progress=False)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    thr = final["val"]["threshold"]
    assert final["test"]["threshold"] == thr and 0.0 <= final["test"]["map"] <= 1.0
    assert float(load_tensors(run_dir / "adapter.safetensors")["threshold"]) == pytest.approx(thr)
    info = json.loads((run_dir / "config.json").read_text())
    assert info["task_state"]["classes"][0] == "person"
    files = [p for p, _ in ml.MultiLabelTask(_cfg(data_root, tmp_path)).splits()["test"][:3]]
    recs = predict_files(run_dir, files, top_k=3)
    assert [r["file"] for r in recs] == files and all(r["threshold"] == pytest.approx(thr) for r in recs)
    assert all(len(r["top"]) == 3 and set(r["labels"]) <= set(info["task_state"]["classes"]) for r in recs)
    _export_and_deploy(run_dir, files, thr)
    capsys.readouterr()
    from vision_peft import deploy

    assert deploy.main([str(run_dir / "export"), *files[:2], "--top-k", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["file"] for x in lines] == files[:2] and [x["labels"] for x in lines] == [r["labels"] for r in recs[:2]]


def _export_and_deploy(run_dir: Path, files: list[str], thr: float) -> None:
    """Export → bundle (threshold in task_info) → deploy runtime, deploy CLI and HTTP endpoint agree with torch."""
    from fastapi.testclient import TestClient

    from vision_peft import deploy
    from vision_peft.export import export_run
    from vision_peft.predict import predict_files
    from vision_peft.serve import create_app

    manifest = export_run(run_dir)
    assert manifest["task"] == "multilabel" and manifest["task_info"]["threshold"] == pytest.approx(thr)
    bundle = deploy.load_bundle(run_dir / "export")
    n = len(bundle.labels)
    torch_recs = predict_files(run_dir, files, top_k=n)
    for r, t in zip(bundle.multilabel(files), torch_recs, strict=True):
        assert max(abs(r["probs"][e["label"]] - e["prob"]) for e in t["top"]) < 1e-5
        assert r["labels"] == t["labels"] and r["threshold"] == pytest.approx(thr)
    client = TestClient(create_app(run_dir / "export", device="cpu"))
    with open(files[0], "rb") as f:
        resp = client.post("/v1/multilabel?top_k=2", files=[("files", ("a.jpg", f.read(), "image/jpeg"))])
    assert resp.status_code == 200, resp.text
    rec = resp.json()["results"][0]
    assert rec["file"] == "a.jpg" and len(rec["top"]) == 2 and rec["labels"] == torch_recs[0]["labels"]
    assert client.post("/v1/classify", files=[("files", ("a.jpg", b"x", "image/jpeg"))]).status_code == 409
