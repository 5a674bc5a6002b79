"""Referring segmentation: DETRIS adapters (ViT + CNN, text adapters, dense across depth), data readers (restricted
unpickler, folder, YOLO-seg phrases), bad inputs, metrics, train → predict → export with onnxruntime parity.

Tiny and offline: timm's test_vit / test_efficientnet and the vp-tiny-clip text tower with random weights, 32-64 px.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_peft.config import ConfigError, RunConfig
from vision_peft.data.folder import DatasetError
from vision_peft.data.refer import (
    RefSample,
    RefSegDataset,
    _instance,
    generate_phrases,
    load_refs_pickle,
    read_coco128_seg,
    read_refcoco,
    read_refer_folder,
    split_by_image,
)
from vision_peft.recipe import build_run_config
from vision_peft.tasks import TASKS
from vision_peft.tasks.refseg import seg_metrics

TINY_TEXT = {"name": "open_clip_text:vp-tiny-clip", "pretrained": False}
TINY_ADAPTER = {"name": "detris", "width": 16, "attn_dim": 16, "heads": 2, "text_width": 8}
TINY_HEAD = {"dim": 32, "heads": 4, "ffn": 64, "proj_dim": 8, "decoder_layers": 1, "max_tokens": 8, "augment": "none"}


def write_refer_folder(root: Path, n: int = 6, size: tuple[int, int] = (40, 48)) -> Path:
    """n images with a bright box; masks (one of them at the wrong size); refs.json with phrases."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    h, w = size
    entries = []
    for i in range(n):
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        x0 = 4 + 3 * i
        img[8:24, x0 : x0 + 16] = [220, 40, 40]
        mask = np.zeros((h, w), np.uint8)
        mask[8:24, x0 : x0 + 16] = 255
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        m = Image.fromarray(mask)
        if i == 1:
            m = m.resize((w * 2, h * 2), Image.Resampling.NEAREST)  # wrong size: must be resized, not crash
        m.save(root / "masks" / f"im{i}.png")
        entries.append({"image": f"images/im{i}.png", "mask": f"masks/im{i}.png", "phrases": ["the red box", "red"]})
    (root / "refs.json").write_text(json.dumps(entries))
    return root


def refseg_cfg(data_root: Path, runs: Path, backbone: str = "timm:test_vit", size: int = 32, **adapter) -> RunConfig:
    return build_run_config(
        {
            "task": {
                "name": "refseg",
                "data": "folder",
                "data_root": str(data_root),
                "split": {"train": -1, "test": 2},
                "text_backbone": TINY_TEXT,
                **TINY_HEAD,
            },
            "backbone": {"name": backbone, "pretrained": False, "image_size": size},
            "adapter": {**TINY_ADAPTER, **adapter} if adapter.get("name", "detris") == "detris" else adapter,
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 2, "lr": 1e-3, "device": "cpu", "log_every": 1},
            "output": {"runs_root": str(runs), "name": "rs"},
        }
    )


# -- data --------------------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vision_peft_pwned",))


class _Obj:
    pass


def test_refs_pickle_plain_containers_only(tmp_path: Path) -> None:
    good = [{"ref_id": 1, "ann_id": 5, "image_id": 3, "split": "train", "sentences": [{"sent": "the dog"}]}]
    (tmp_path / "good.p").write_bytes(pickle.dumps(good, protocol=2))
    assert load_refs_pickle(tmp_path / "good.p") == good
    for name, obj in (("evil.p", [_Evil()]), ("obj.p", [_Obj()]), ("set.p", [{"a": {1, 2}}])):
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(DatasetError, match="refusing|plain"):
            load_refs_pickle(tmp_path / name)
    assert not Path("/tmp/vision_peft_pwned").exists()


def test_refcoco_reader_polygons_and_rle(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "images").mkdir()
    (tmp_path / "a.jpg").rename(tmp_path / "images" / "a.jpg")
    inst = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12], [0, 0, 1, 1]]},
            {"id": 11, "image_id": 1, "segmentation": {"size": [20, 30], "counts": [40, 20, 540]}},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    refs = [
        {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "left box"}]},
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "testA", "sentences": [{"sent": "strip"}]},
        {"ref_id": 2, "ann_id": 99, "image_id": 1, "split": "val", "sentences": []},
    ]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    s = read_refcoco(tmp_path)
    assert [x.phrases for x in s] == [["left box"], ["strip"]] and s[1].split == "testA"
    assert len(s[0].polygons) == 1  # the 2-point polygon is dropped
    m0, m1 = s[0].mask((20, 30)), s[1].mask((20, 30))
    assert m0[5, 5] == 1 and m0[15, 20] == 0
    assert m1.sum() == 20 and m1[:, 2].sum() == 20  # column-major run: the third column


def test_compressed_rle_decoded_at_the_image_size(tmp_path: Path) -> None:
    """COCO compressed RLE strings decode without pycocotools, to the image's size when the RLE grid differs."""
    from vision_peft.data.refer import decode_rle, rle_counts_from_string

    # hand-encoded (5-bit groups, 0x20 = more, 0x10 = sign, delta to the run two before from the 4th run on):
    assert rle_counts_from_string("352O") == [3, 5, 2, 4]  # 'O' = 48 + 31: -1, plus the run two before (5)
    assert rle_counts_from_string("T3") == [100]  # 'T' = 48 + 0x20 + 4, then '3': 4 + 3·32
    counts = [40, 20, 540]
    plain = decode_rle({"size": [20, 30], "counts": counts}, (20, 30))
    packed = decode_rle({"size": [20, 30], "counts": "X1d0l`0"}, (20, 30))  # 40 20 540 compressed
    assert rle_counts_from_string("X1d0l`0") == counts and np.array_equal(plain, packed)
    big = decode_rle({"size": [20, 30], "counts": "X1d0l`0"}, (40, 60))  # image twice the RLE grid
    assert big.shape == (40, 60) and big.sum() == 4 * plain.sum() and big[:, 4:6].all()
    with pytest.raises(DatasetError, match="add up to"):
        decode_rle({"size": [20, 30], "counts": [5, 5]}, (20, 30))


def test_annotation_splits_keep_testA_and_testB(tmp_path: Path) -> None:
    """split_source=annotations: testA and testB are their own splits; test (none in RefCOCO) is their union and
    reports each part; RefCOCOg's own test stays itself."""
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    seg = [[2, 2, 12, 2, 12, 12, 2, 12]]
    inst = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
        "annotations": [{"id": k, "image_id": 1, "segmentation": seg} for k in range(4)],
    }
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    names = ["train", "val", "testA", "testB"]
    refs = [
        {"ref_id": k, "ann_id": k, "image_id": 1, "split": n, "sentences": [{"sent": f"{n} one"}, {"sent": "two"}]}
        for k, n in enumerate(names)
    ]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    d = refseg_cfg(tmp_path, tmp_path / "runs").to_dict()
    d["task"].update({"data": "refcoco", "data_root": str(tmp_path), "split_source": "annotations"})
    task = TASKS.get("refseg").builder(build_run_config(d))
    sp = task.split_samples()
    assert list(sp) == ["train", "val", "test", "testA", "testB"]
    assert [s.split for s in sp["test"]] == ["testA", "testB"] and [s.split for s in sp["testA"]] == ["testA"]
    assert task.splits()["testB"] == [("a.jpg#3", "testB one")]

    model = task.build_model()
    data = task.datasets(model)
    assert len(data["testA"]) == 2 and len(data["test"]) == 4  # every sentence of every object
    from vision_peft.engine import eval_loader

    res = task.evaluate(
        model, eval_loader(task, data["test"], task.cfg.train, torch.device("cpu")), torch.device("cpu")
    )
    assert res["n"] == 4 and res["n_objects"] == 2 and set(res["by_split"]) == {"testA", "testB"}
    assert res["by_split"]["testA"]["n"] == 2

    refs[3]["split"] = "test"  # RefCOCOg (umd): its own test split, no testA/testB
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    sp = TASKS.get("refseg").builder(build_run_config(d)).split_samples()
    assert list(sp) == ["train", "val", "test", "testA"] and [s.ref_id for s in sp["test"]] == ["3"]


def test_every_phrase_is_evaluated_and_old_configs_load(tmp_path: Path) -> None:
    """Evaluation items are (object, phrase) pairs — all phrases (official inference), or the first on request;
    training items stay one per object. A config without task.eval_phrases means 'all'."""
    samples = [RefSample(image="x", phrases=["a", "b", "c"]), RefSample(image="y", phrases=["d"])]
    spec = {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]}
    ds = RefSegDataset(samples, spec, lambda p: (p, p))
    assert len(ds) == 4 and [ds.phrase(k) for k in range(4)] == ["a", "b", "c", "d"]
    assert [ds.sample_index(k) for k in range(4)] == [0, 0, 0, 1]
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.ones((8, 8), np.uint8)
    ds._cache.update({0: (img, mask), 1: (img, mask)})
    assert [ds[k]["input_ids"] for k in range(4)] == ["a", "b", "c", "d"]
    assert len(RefSegDataset(samples, spec, lambda p: p, phrases="first")) == 2
    assert len(RefSegDataset(samples, spec, lambda p: p, train=True)) == 2
    with pytest.raises(ValueError, match="'all' or 'first'"):
        RefSegDataset(samples, spec, lambda p: p, phrases="some")

    d = refseg_cfg(tmp_path, tmp_path).to_dict()
    del d["task"]["eval_phrases"]  # an older run's config.json / recipe
    assert build_run_config(d).task.eval_phrases == "all"
    d["task"]["eval_phrases"] = "every"
    with pytest.raises(ConfigError, match="eval_phrases"):
        build_run_config(d)
    d["task"].update({"eval_phrases": "all", "augment": "crop"})
    with pytest.raises(ConfigError, match="task.augment must be flip"):
        build_run_config(d)


def test_coco128_recipe_augmentation_never_crops(data_root: Path, caplog) -> None:
    """The coco128 recipe's augmentation keeps every instance in the picture (generated phrases stay true):
    the augmented mask is the letterboxed one, possibly mirrored; a cropping preset is warned about."""
    from vision_peft.data.refer_dataset import FlipAugment, letterbox_pair, swap_left_right
    from vision_peft.preprocess import load_image
    from vision_peft.recipe import load_recipe

    repo = Path(__file__).resolve().parent.parent
    cfg = load_recipe(str(repo / "tasks" / "refseg-coco128.yaml"), [f"task.data_root={data_root / 'coco128-seg'}"])
    task = TASKS.get("refseg").builder(cfg)
    spec = {"size": [96, 96], "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear"}
    aug = task.train_augment(spec)
    assert isinstance(aug, FlipAugment)
    samples = [s for s in task.samples() if "left" in s.phrases[0]][:3]
    ds = RefSegDataset(samples, spec, lambda p: (p, p), aug, train=True)
    flips = set()
    for i, s in enumerate(samples):
        img = load_image(s.image)
        _, ref = letterbox_pair(img, s.mask((img.height, img.width)), (96, 96))
        for epoch in range(6):
            ds.set_epoch(epoch)
            it = ds[i]
            m = it["mask"].numpy().astype(np.uint8)
            flipped = not np.array_equal(m, ref)
            assert np.array_equal(m, ref[:, ::-1] if flipped else ref)  # nothing cut away, nothing rescaled
            assert it["input_ids"] in ([swap_left_right(p) for p in s.phrases] if flipped else s.phrases)
            flips.add(flipped)
    assert flips == {True, False}

    task.cfg.task.augment = "light"
    with caplog.at_level(logging.WARNING, logger="vision_peft"):
        task.train_augment(spec)
    assert "crop" in caplog.text and "task.augment=flip" in caplog.text


def test_folder_reader_mask_size_mismatch(tmp_path: Path, caplog) -> None:
    root = write_refer_folder(tmp_path / "d")
    with caplog.at_level(logging.WARNING, logger="vision_peft"):
        s = read_refer_folder(root)
    assert "differs" in caplog.text and s[1].mask((40, 48)).shape == (40, 48)
    with pytest.raises(DatasetError, match="im1.png.*mask_mismatch"):
        read_refer_folder(root, mask_mismatch="error")


def test_formats_come_from_the_dataset_registry(tmp_path: Path, data_root: Path) -> None:
    """task.data names a DATASETS entry (short or registry name); a folder's layout is recognised."""
    from vision_peft.data import DATASETS
    from vision_peft.data.refer import REFER_FORMATS, detect_refer_format, read_refer, refer_format_names

    root = write_refer_folder(tmp_path / "d")
    assert {"folder", "coco128_seg", "refcoco"} <= set(refer_format_names())
    assert all("refer" in DATASETS.get(name).provides for name in REFER_FORMATS.values())
    short_read, _ = read_refer("folder", root, mask_mismatch="resize", min_area=0.5)
    long_read, stats = read_refer("refer_folder", root)
    assert [s.ref_id for s in short_read] == [s.ref_id for s in long_read] and len(long_read) == 6 and stats == {}
    assert detect_refer_format(root) == ("folder", {})
    assert detect_refer_format(tmp_path) is None
    assert detect_refer_format(data_root / "coco128-seg") == ("coco128_seg", {})
    with pytest.raises(DatasetError, match="unknown referring-segmentation format 'image_folder'; known: folder"):
        read_refer("image_folder", root)
    with pytest.raises(ConfigError, match="task.data must be one of .*coco128_seg"):
        refseg_cfg(root, tmp_path / "runs").task.__class__(data="voc")


def test_phrase_rules() -> None:
    sq = lambda x, y, s: np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]])  # noqa: E731
    one = generate_phrases([_instance("dog", [sq(0.1, 0.1, 0.3)])])
    assert one == [(0, ["the dog", "dog"])]
    two = dict(generate_phrases([_instance("dog", [sq(0.05, 0.1, 0.4)]), _instance("dog", [sq(0.6, 0.5, 0.2)])]))
    assert two[0][0] == "the dog on the left" and "the larger of the two dogs" in two[0]
    assert two[1][0] == "the dog on the right" and "the smaller of the two dogs" in two[1]
    three = dict(generate_phrases([_instance("person", [sq(x, 0.2, 0.15)]) for x in (0.05, 0.4, 0.75)]))
    assert three[0][0] == "the leftmost person" and three[1][0] == "the second person from the left"
    assert three[2][0] == "the rightmost person"
    tiny = generate_phrases([_instance("cup", [sq(0.1, 0.1, 0.05)])])  # area 0.0025 < min_area
    assert tiny == []
    same = generate_phrases([_instance("cat", [sq(0.1, 0.1, 0.3)]), _instance("cat", [sq(0.15, 0.12, 0.3)])])
    assert same == []  # nothing singles either cat out


def test_yolo_seg_bad_polygons_and_empty_images(tmp_path: Path, caplog) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "images" / f"{name}.jpg")
    (tmp_path / "labels" / "a.txt").write_text(
        "16 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n"  # a dog
        "16 0.6 0.2 0.7\n"  # two points: dropped
        "0 -0.2 0.1 0.9 0.1 1.3 0.9\n"  # a person, out of range: clipped
        "85 0.1 0.1 0.2 0.2 0.3 0.1\n"  # class id beyond COCO-80: counted as a bad line
    )
    (tmp_path / "labels" / "b.txt").write_text("")  # no instances; c has no label file at all
    with caplog.at_level(logging.WARNING, logger="vision_peft"):
        samples, st = read_coco128_seg(tmp_path)
    assert st["images_without_instances"] == 2 and st["dropped_polygons"] == 1 and st["clipped_polygons"] == 1
    assert st["bad_lines"] == 1 and sorted(s.phrases[0] for s in samples) == ["the dog", "the person"]
    assert "fewer than 3 points" in caplog.text and "outside [0, 1]" in caplog.text
    m = samples[0].mask((32, 32))
    assert m.dtype == np.uint8 and m.max() == 1
    sp = split_by_image(samples, {"train": -1, "test": 0})
    assert len(sp["train"]) == 2


def test_flip_swaps_left_and_right() -> None:
    from vision_peft.augment import build_augment

    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = 255
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :10] = 1
    ds = RefSegDataset(
        [RefSample(image="unused", phrases=["the leftmost dog on the left"])],
        {"size": [32, 32], "mean": [0, 0, 0], "std": [1, 1, 1]},
        lambda p: (torch.zeros(1), torch.zeros(1)),
        build_augment("light", (32, 32)),
        train=True,
    )
    ds._cache[0] = (img, mask)
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        ds.tokenize = lambda p: (p, p)  # capture the phrase
        it = ds[0]
        white_left = bool(it["image"][:, :, :6].mean() > it["image"][:, :, -6:].mean())
        mask_left = bool(it["mask"][:, :8].mean() > it["mask"][:, -8:].mean())
        assert white_left == mask_left
        want = "the leftmost dog on the left" if white_left else "the rightmost dog on the right"
        assert it["input_ids"] == want
        seen.add(white_left)
    assert seen == {True, False}


def test_metrics_miou_vs_oiou() -> None:
    m = seg_metrics(np.array([90, 0, 10]), np.array([100, 10, 1000]))  # IoU 0.9, 0.0, 0.01
    assert m["mIoU"] == pytest.approx((0.9 + 0.0 + 0.01) / 3) and m["oIoU"] == pytest.approx(100 / 1110)
    assert m["Prec@0.5"] == pytest.approx(1 / 3) and m["Prec@0.8"] == pytest.approx(1 / 3)
    assert m["Prec@0.9"] == 0.0  # IoU exactly 0.9 does not count: the official code compares iou > t
    assert set(m) == {"mIoU", "oIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9"}
    tie = seg_metrics(np.array([50, 7, 0]), np.array([100, 10, 0]))  # IoU 0.5 (tie), 0.7 (tie), both empty
    assert tie["Prec@0.5"] == pytest.approx(1 / 3) and tie["Prec@0.7"] == 0.0
    assert tie["mIoU"] == pytest.approx(1.2 / 3)  # an empty prediction of an empty target counts 0, as DETRIS/LAVT


def test_bootstrap_resamples_images_and_pairs_rows() -> None:
    """Sentences of one image stay together; the paired difference of a model with itself is exactly 0."""
    from vision_peft.tasks.refseg_metrics import bootstrap_metrics, paired_bootstrap

    groups = ["a"] * 10 + ["b"] * 10  # image a: every sentence perfect, image b: every sentence wrong
    inter = np.array([100] * 10 + [0] * 10)
    union = np.array([100] * 20)
    boot = bootstrap_metrics(groups, inter, union, n_boot=400, seed=1)
    assert boot["n_images"] == 2 and boot["n_sentences"] == 20 and boot["mIoU"]["value"] == pytest.approx(0.5)
    assert boot["mIoU"]["ci95"] == [0.0, 1.0]  # only whole images are drawn: 0, 0.5 or 1, never 0.45 or 0.55
    from vision_peft.tasks import refseg_metrics as rm

    w = rm._resample_weights(2, 400, 1)
    vals = rm._metrics_from_sums(w @ rm._image_sums(np.array(groups), inter, union, np.array(["a", "b"], object)))
    assert set(np.round(vals["mIoU"], 9)) <= {0.0, 0.5, 1.0}
    same = paired_bootstrap(groups, inter, union, inter, union, n_boot=200)
    assert all(same[m]["diff"] == 0.0 and same[m]["ci95"] == [0.0, 0.0] for m in ("mIoU", "oIoU", "Prec@0.5"))
    better = paired_bootstrap(groups, inter, union, inter // 2, union, n_boot=200)  # a beats b on image a only
    assert better["mIoU"]["diff"] == pytest.approx(0.25) and better["mIoU"]["ci95"][0] >= 0.0
    with pytest.raises(ValueError, match="same, aligned sentences"):
        paired_bootstrap(groups, inter, union, inter[:5], union[:5])


# -- adapters ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backbone,size,extra",
    [
        ("timm:test_vit", 32, {}),
        ("timm:test_vit", 32, {"dense_across_depth": True}),
        ("timm:test_efficientnet", 64, {"dense_across_depth": True}),
    ],
)
def test_detris_starts_as_identity_then_adapts(tmp_path: Path, backbone: str, size: int, extra: dict) -> None:
    cfg = refseg_cfg(tmp_path, tmp_path, backbone, size, **extra)
    task = TASKS.get("refseg").builder(cfg)
    model = task.build_model().eval()
    cond = model.backbone.text_conditioning
    assert len(cond.visual) >= 2 and len(cond.text) >= 1
    b = task.synthetic_batch(model, 2)
    with torch.no_grad():
        adapted = model.backbone.forward_intermediates(b["image"], model.indices)
        cond.remove()  # plain frozen backbone
        plain = model.backbone.forward_intermediates(b["image"], model.indices)
    for a, p in zip(adapted, plain):
        assert torch.allclose(a, p, atol=1e-6)  # zero-initialised W2: the frozen encoders at step 0

    model = task.build_model()
    model.set_train_mode()
    out = model(b)
    out["loss"].backward()
    cond = model.backbone.text_conditioning
    assert all(a.up.weight.grad is not None and a.up.weight.grad.abs().sum() > 0 for a in cond.visual)
    assert all(t.up.weight.grad.abs().sum() > 0 for t in cond.text)  # text adapters receive gradient
    assert all(p.grad is None for p in model.text.parameters())  # the text encoder stays frozen
    if extra.get("dense_across_depth"):
        assert cond.visual[-1].fuse.weight.shape[1] == 16 * len(cond.visual)
    sd = model.adapter_state_dict()
    assert sd and all(k.startswith(("backbone.text_conditioning.", "head.")) for k in sd), sorted(sd)[:5]


def test_text_adapters_on_minilm_and_no_adapter_baseline(tmp_path: Path) -> None:
    cfg = refseg_cfg(tmp_path, tmp_path)
    data = cfg.to_dict()
    data["task"]["text_backbone"] = {"name": "minilm", "pretrained": False}
    data["adapter"] = {**TINY_ADAPTER, "visual": False}
    task = TASKS.get("refseg").builder(build_run_config(data))
    model = task.build_model()
    assert len(model.backbone.text_conditioning.text) == 3  # MiniLM blocks 1, 3, 5
    model.set_train_mode()
    model(task.synthetic_batch(model, 2))["loss"].backward()
    assert all(t.up.weight.grad.abs().sum() > 0 for t in model.backbone.text_conditioning.text)
    assert not any(k.startswith("text.") for k in model.adapter_state_dict())

    data["adapter"] = {"name": "linear"}
    task = TASKS.get("refseg").builder(build_run_config(data))
    model = task.build_model()
    assert all(k.startswith("head.") for k in model.adapter_state_dict())


def test_phrases_too_long_or_empty(tmp_path: Path, caplog) -> None:
    task = TASKS.get("refseg").builder(refseg_cfg(tmp_path, tmp_path))
    model = task.build_model()
    tok = task.tokenizer(model)
    with caplog.at_level(logging.WARNING, logger="vision_peft"):
        ids, am = tok("the very long phrase about the person standing on the left of the red car")
        e_ids, e_am = tok("")
    assert ids.shape == (8,) and am.sum() == 8 and int(ids[-1]) == 49407  # truncated, <eot> kept
    assert "truncated" in caplog.text and "empty referring phrase" in caplog.text
    assert int(e_am.sum()) == 2 and e_ids.shape == (8,)
    with torch.no_grad():
        out = model.eval().logits(torch.randn(1, 3, 32, 32), e_ids[None], e_am[None])
    assert torch.isfinite(out).all()


# -- end to end --------------------------------------------------------------------------------------------------
def test_train_predict_export_parity(tmp_path: Path, monkeypatch, vp_logging_reset) -> None:
    from vision_peft.export import export_run, ort_session
    from vision_peft.predict import load_run
    from vision_peft.train import run

    root = write_refer_folder(tmp_path / "data")
    run_dir = run(refseg_cfg(root, tmp_path / "runs"), progress=False)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert set(final["test"]) >= {"mIoU", "oIoU", "Prec@0.5", "Prec@0.9"}
    assert final["test"]["n"] == 4 and final["test"]["n_objects"] == 2  # 2 test objects × 2 phrases each
    split = json.loads((run_dir / "split.json").read_text())
    imgs = {k: {p.split("#")[0] for p in v} for k, v in split.items()}
    assert not imgs["train"] & imgs["test"]  # image-level split

    _, task, model, _ = load_run(run_dir)
    monkeypatch.chdir(tmp_path)
    rec = task.predict(model, [f"{root}/images/im0.png::the red box"], torch.device("cpu"))[0]
    assert Path(rec["mask"]).is_file() and Image.open(rec["mask"]).size == (48, 40)
    with pytest.raises(ValueError, match="IMAGE::PHRASE"):
        task.predict(model, [f"{root}/images/im0.png"], torch.device("cpu"))

    man = export_run(run_dir, tmp_path / "bundle", exporter="torchscript")
    graph = man["graphs"]["refseg"]
    assert set(graph["inputs"]) == {"image", "input_ids", "attention_mask"}
    assert graph["inputs"]["input_ids"]["dtype"] == "int64"
    assert man["preprocess"]["image"]["resize"] == "letterbox" and man["preprocess"]["mask_logits"]["stride"] == 4
    assert man["parity"]["passed"]
    sess = ort_session(tmp_path / "bundle" / graph["file"])
    agree = task.onnx_agreement(lambda feed: sess.run(None, feed)[0], model)
    # the open_clip tower's BPE tokenizer travels as tokenizer.json: the torch-free runtime tokenizes like training
    from vision_peft.deploy import load_bundle

    bundle = load_bundle(tmp_path / "bundle", device="cpu")
    for phrase in ("the red box", "The  RED box, left!", "café ünïcode 3 boxes"):
        ids, am = bundle.tokenize(phrase)
        ref_ids, ref_am = task.tokenizer(model)(phrase)
        assert ids.tolist() == ref_ids.tolist() and am.tolist() == ref_am.tolist(), phrase
    img0 = root / "images" / "im0.png"
    assert (
        np.abs(
            bundle.segment(img0, "the red box")["prob"] - task.predict_mask(model, img0, "the red box")["prob"]
        ).max()
        < 1e-3
    )
    assert agree["logits_max_abs_diff"] < 1e-3 and agree["mask_iou_torch_vs_onnx_mean"] > 0.99

    # the frozen text encoder's weights are checked too (their hash is in config.json's task_state)
    from vision_peft.checkpoint import CheckpointError

    cfg_file = Path(run_dir) / "config.json"
    info = json.loads(cfg_file.read_text())
    info["task_state"]["text_backbone"]["weights_id"] = "0" * 64
    cfg_file.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="text_backbone"):
        load_run(run_dir)


def test_deploy_runtime_segments_like_torch(tmp_path: Path, weights_root: Path, vp_logging_reset, torch_free) -> None:
    """MiniLM text (its tokenizer.json ships in the bundle): the torch-free runtime tokenizes, runs the graph and
    undoes the letterbox; its mask matches torch's predict_mask."""
    from vision_peft.deploy import load_bundle
    from vision_peft.export import export_run
    from vision_peft.predict import load_run
    from vision_peft.train import run

    root = write_refer_folder(tmp_path / "data")
    d = refseg_cfg(root, tmp_path / "runs").to_dict()
    d["task"]["text_backbone"] = {"name": "minilm"}
    cfg = build_run_config(d)
    run_dir = run(cfg, progress=False)
    man = export_run(run_dir, tmp_path / "bundle", exporter="torchscript")
    assert "tokenizer.json" in man["files"] and man["task_info"]["tokenizer_file"] == "tokenizer.json"
    bundle = load_bundle(tmp_path / "bundle", device="cpu")
    _, task, model, _ = load_run(run_dir)
    ids, am = bundle.tokenize("the red box")
    ref_ids, ref_am = task.tokenizer(model)("the red box")
    assert ids.tolist() == ref_ids.tolist() and am.tolist() == ref_am.tolist()
    long = " ".join(["box"] * 200)
    with pytest.warns(RuntimeWarning, match="truncated"):
        ids, am = bundle.tokenize(long)
    assert ids.tolist() == task.tokenizer(model)(long)[0].tolist()  # same truncation rule as training
    image = root / "images" / "im0.png"
    got = bundle.segment(image, "the red box")
    ref = task.predict_mask(model, image, "the red box")
    assert got["mask"].shape == ref["mask"].shape == (40, 48)
    assert np.abs(got["prob"] - ref["prob"]).max() < 1e-3
    with pytest.raises(ValueError, match="is 'refseg'"):
        bundle.generate(["a"])
    out = torch_free(
        f"""
        from vision_peft.deploy import main
        assert main([{str(tmp_path / "bundle")!r}, {str(image) + "::the red box"!r}, "--out", {str(tmp_path / "m")!r}]) == 0
        """
    )
    rec = json.loads(out.splitlines()[0])
    assert abs(rec["area_fraction"] - got["area_fraction"]) < 1e-9 and Path(rec["mask"]).is_file()

    import base64
    import io as _io

    from fastapi.testclient import TestClient

    from vision_peft.serve import create_app

    client = TestClient(create_app(tmp_path / "bundle", device="cpu"))
    r = client.post(
        "/v1/segment", files={"file": ("im0.png", image.read_bytes(), "image/png")}, data={"phrase": "the red box"}
    )
    assert r.status_code == 200, r.text
    served = np.asarray(Image.open(_io.BytesIO(base64.b64decode(r.json()["mask_png_base64"])))) > 127
    assert served.shape == (40, 48) and np.array_equal(served, got["mask"])
    r = client.post("/v1/segment", files={"file": ("x.png", b"not an image", "image/png")}, data={"phrase": "a"})
    assert r.status_code == 400 and "x.png" in r.json()["detail"]
    assert client.post("/v1/segment", files={"file": ("im0.png", image.read_bytes(), "image/png")}).status_code == 422
