"""Tests for the torch-free image preprocessing (vision_peft.preprocess)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vision_peft.preprocess import (
    RESIZE_MODES,
    image_spec,
    letterbox_params,
    load_image,
    preprocess_batch,
    preprocess_image,
    unletterbox,
    validate_spec,
)

# Identity normalisation: outputs stay in pixel units, so expected values are easy to read.
RAW = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 1.0, "interpolation": "nearest"}


def column_blocks(h: int, w: int, block: int = 10) -> np.ndarray:
    """(h, w, 3) uint8 image whose pixels in column block j (width ``block``) all equal 10 * j."""
    cols = (np.arange(w) // block * 10).astype(np.uint8)
    return np.broadcast_to(cols[None, :, None], (h, w, 3)).copy()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_load_image_converts_modes_to_rgb(tmp_path, mode):
    ext = "tiff" if mode == "CMYK" else "png"
    path = tmp_path / f"img_{mode.replace(';', '')}.{ext}"
    Image.new(mode, (7, 5)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5)
    x = preprocess_image(path, {**RAW, "size": [4, 4]})
    assert x.shape == (3, 4, 4) and x.dtype == np.float32


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((3, 3), 32896, dtype=np.uint16)).save(path)  # 32896 / 257 = 128
    assert np.asarray(load_image(path))[0, 0].tolist() == [128, 128, 128]


def test_rgba_and_grayscale_inputs_match_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    spec = {**RAW, "size": [6, 6], "resize": "squash"}
    rgba = np.concatenate([rgb, np.full((6, 6, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(preprocess_image(rgba, spec), preprocess_image(rgb, spec))
    np.testing.assert_array_equal(preprocess_image(Image.fromarray(rgb), spec), preprocess_image(rgb, spec))
    gray = preprocess_image(rgb[:, :, 0], spec)
    np.testing.assert_array_equal(gray[0], gray[2])


def test_corrupt_file_error_names_file(tmp_path):
    bad = tmp_path / "broken_image.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"broken_image\.jpg.*cannot identify image file.*remove or replace"):
        load_image(bad)


def test_truncated_file_error_names_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut_short.png"
    cut.write_bytes(good.read_bytes()[:400])
    with pytest.raises(ValueError, match=r"cut_short\.png.*truncated.*remove or replace"):
        load_image(cut)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image("nowhere.png")


def test_shorter_then_center_crop_wide_image():
    img = column_blocks(40, 80)  # blocks 0..7 of width 10
    x = preprocess_image(img, {**RAW, "size": [20, 20]})
    assert x.shape == (3, 20, 20)
    # 40x80 -> 20x40 (block width 5), centre crop keeps columns 10..29 = blocks 2..5
    expected = 10 * (np.arange(20) // 5 + 2)
    np.testing.assert_array_equal(x[0, 7], expected)
    np.testing.assert_array_equal(x[:, :, 3], np.full((3, 20), 20.0))


def test_shorter_then_center_crop_tall_image():
    img = column_blocks(40, 80).transpose(1, 0, 2)  # (80, 40): rows in blocks of 10
    x = preprocess_image(img, {**RAW, "size": [20, 20]})
    assert x.shape == (3, 20, 20)
    # 80x40 -> 40x20, centre crop keeps rows 10..29 = blocks 2..5
    np.testing.assert_array_equal(x[0, :, 4], 10 * (np.arange(20) // 5 + 2))


def test_shorter_then_center_crop_rectangular_target():
    x = preprocess_image(column_blocks(40, 40), {**RAW, "size": [20, 10]})
    assert x.shape == (3, 20, 10)
    # 40x40 covers 20x10 at scale 0.5 -> 20x20; crop columns 5..14, nearest reads source column 2c+1
    np.testing.assert_array_equal(x[0, 0], 10 * ((2 * (np.arange(10) + 5) + 1) // 10))


def test_crop_pct_zooms_in():
    img = column_blocks(40, 40)
    x = preprocess_image(img, {**RAW, "size": [20, 20], "crop_pct": 0.5})
    np.testing.assert_array_equal(x[0, 0], 10 * (np.arange(20) // 10 + 1))  # only blocks 1..2 remain


def test_squash_and_layouts():
    img = column_blocks(10, 30)
    chw = preprocess_image(img, {**RAW, "size": [5, 6], "resize": "squash"})
    hwc = preprocess_image(img, {**RAW, "size": [5, 6], "resize": "squash", "layout": "HWC"})
    assert chw.shape == (3, 5, 6) and hwc.shape == (5, 6, 3)
    np.testing.assert_array_equal(chw.transpose(1, 2, 0), hwc)


def test_normalisation_and_bgr():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0], img[..., 2] = 255, 51
    spec = {"size": [4, 4], "resize": "squash", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.25, 0.5]}
    x = preprocess_image(img, spec)
    np.testing.assert_allclose(x[:, 0, 0], [1.0, -2.0, -0.6], atol=1e-6)
    bgr = preprocess_image(img, {**spec, "channel_order": "BGR"})
    np.testing.assert_allclose(bgr[:, 0, 0], [-0.6, -2.0, 1.0], atol=1e-6)


def test_letterbox_pads_and_params_invert():
    img = np.zeros((20, 40, 3), np.uint8)
    img[4:8, 10:14] = 200  # a bright square at rows 4..7, cols 10..13
    spec = {**RAW, "size": [32, 32], "resize": "letterbox", "pad_value": 114}
    x = preprocess_image(img, spec)
    p = letterbox_params((20, 40), (32, 32))
    assert p == {"scale": 0.8, "pad_top": 8, "pad_left": 0, "new_h": 16, "new_w": 32}
    assert (x[:, : p["pad_top"]] == 114).all() and (x[:, p["pad_top"] + p["new_h"] :] == 114).all()
    ys, xs = np.nonzero(x[0] == 200)
    # map the square's centre in the network input back onto the source image
    src_y = (ys.mean() + 0.5 - p["pad_top"]) / p["scale"] - 0.5
    src_x = (xs.mean() + 0.5 - p["pad_left"]) / p["scale"] - 0.5
    assert abs(src_y - 5.5) < 1.0 and abs(src_x - 11.5) < 1.0


def test_letterbox_roundtrip_with_unletterbox():
    src = (30, 50)
    img = np.random.default_rng(1).integers(0, 256, (*src, 3), dtype=np.uint8)
    x = preprocess_image(img, {**RAW, "size": [64, 64], "resize": "letterbox"})
    back = unletterbox(x[0], src, (64, 64))
    assert back.shape == src
    assert np.corrcoef(back.ravel(), img[..., 0].ravel().astype(np.float32))[0, 1] > 0.8
    quarter = unletterbox(np.ones((16, 16), np.float32), src, (64, 64))  # map at 1/4 resolution
    assert quarter.shape == src and np.allclose(quarter, 1.0)


@pytest.mark.parametrize("src", [(1, 1), (7, 300), (300, 7), (224, 224), (123, 457)])
def test_letterbox_params_fit_inside(src):
    p = letterbox_params(src, (224, 160))
    assert 1 <= p["new_h"] <= 224 and 1 <= p["new_w"] <= 160
    assert p["pad_top"] + p["new_h"] <= 224 and p["pad_left"] + p["new_w"] <= 160
    assert p["new_h"] == 224 or p["new_w"] == 160  # one side always fills the target
    assert abs(p["new_h"] / p["scale"] - src[0]) <= 0.5 / p["scale"] + 1e-9


def test_image_spec_from_data_config():
    cfg = {"input_size": [3, 24, 32], "mean": (0.1, 0.2, 0.3), "std": (1, 1, 1), "interpolation": "bicubic"}
    spec = image_spec(cfg)
    assert spec["size"] == [24, 32] and spec["interpolation"] == "bicubic" and spec["mean"] == [0.1, 0.2, 0.3]
    assert spec["resize"] == "shorter_then_center_crop" and spec["channel_order"] == "RGB"
    assert image_spec({**cfg, "crop_pct": 0.875}, resize="letterbox")["crop_pct"] == 1.0
    assert validate_spec(spec) == spec
    with pytest.raises(ValueError, match="input_size"):
        image_spec({"mean": [0, 0, 0], "std": [1, 1, 1]})


def test_spec_validation_messages():
    base = {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]}
    with pytest.raises(ValueError, match=", ".join(RESIZE_MODES)):
        validate_spec({**base, "resize": "stretch"})
    with pytest.raises(ValueError, match="unknown preprocess spec key.*'sise'"):
        validate_spec({**base, "sise": 3})
    with pytest.raises(ValueError, match="missing"):
        validate_spec({"size": [8, 8]})
    with pytest.raises(ValueError, match="interpolation"):
        validate_spec({**base, "interpolation": "lanczos5"})
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((4, 4, 3), np.float32), base)


def test_preprocess_batch():
    imgs = [column_blocks(10, 20), Image.new("L", (9, 13)), column_blocks(30, 30)]
    batch = preprocess_batch(imgs, {**RAW, "size": [8, 8]})
    assert batch.shape == (3, 3, 8, 8) and batch.dtype == np.float32
    with pytest.raises(ValueError, match="no images"):
        preprocess_batch([], {**RAW, "size": [8, 8]})
