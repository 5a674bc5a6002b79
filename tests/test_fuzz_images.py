"""Property-based fuzzing of the image readers (issue 18): images of every format and mode, mutated and
random bytes, PNGs that claim huge dimensions, the dataset-folder scanner, the RefCOCO refs pickle (restricted
unpickler) and RLE masks, and the preprocess spec a bundle's manifest carries.

The properties every fuzzer here checks, and the example counts: see ``tests/fuzz_support.py``.
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import fuzz_examples
from fuzz_support import (
    FUZZ,
    mutation,
    names_input,
    outcome,
    scratch,
    watchdog,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vision_peft.data.folder import IGNORED, DatasetError, check_image, scan_image_folder
from vision_peft.data.refer import decode_rle, load_refs_pickle
from vision_peft.preprocess import IMAGE_SUFFIXES, load_image, preprocess_image

pytestmark = pytest.mark.fuzz

# =================================================================================================================
# 2. images and dataset folders
# =================================================================================================================
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".webp": "WEBP"}
MODES = {"PNG": ["RGB", "L", "RGBA", "P", "I;16", "1", "LA"], "JPEG": ["RGB", "L", "CMYK"], "BMP": ["RGB", "L", "P"],
         "TIFF": ["RGB", "L", "RGBA", "CMYK", "I;16", "F", "I"], "WEBP": ["RGB", "RGBA"]}  # fmt: skip


@st.composite
def valid_image(draw) -> tuple[str, bytes]:
    ext = draw(st.sampled_from(sorted(IMAGE_FORMATS)))
    fmt = IMAGE_FORMATS[ext]
    mode = draw(st.sampled_from(MODES[fmt]))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32) * 255)
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 1000, (h, w), dtype=np.int32))
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    exif = None
    if fmt in ("JPEG", "PNG", "TIFF", "WEBP") and draw(st.booleans()):
        ex = Image.Exif()
        ex[0x0112] = draw(st.integers(0, 9))  # orientation tag, including out-of-range values
        exif = ex.tobytes()
    img.save(buf, fmt, **({"exif": exif} if exif else {}))
    return ext, buf.getvalue()


def expect_image(path: Path) -> Image.Image | None:
    """load_image → an RGB image that preprocesses to finite float32, or None after a ValueError naming the file."""
    try:
        with watchdog():
            img = load_image(path)
    except ValueError as e:
        assert names_input(str(e), path), f"error does not name {path}: {e}"
        outcome("image refused (ValueError)")
        return None
    outcome("image read")
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1
    spec = {"size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "letterbox"}
    x = preprocess_image(img, spec)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all()
    return img


def check_agrees(path: Path) -> None:
    """The scanner's check (check_image) accepts exactly what load_image can read: a file that passes the scan
    must not crash training later."""
    loaded = expect_image(path)
    with watchdog():
        reason = check_image(path)
    if reason is None:
        assert loaded is not None, f"check_image accepted {path} but load_image refuses it"
    else:
        assert isinstance(reason, str) and reason
        assert loaded is None, f"check_image refused {path} ({reason}) but load_image reads it"


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(80), **FUZZ)
@given(case=valid_image())
def test_valid_images_load(case: tuple[str, bytes]) -> None:
    ext, raw = case
    with scratch() as d:
        (d / f"img{ext}").write_bytes(raw)
        assert expect_image(d / f"img{ext}") is not None
        assert check_image(d / f"img{ext}") is None


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(400), **FUZZ)
@given(data=st.data())
def test_mutated_images(data: st.DataObject) -> None:
    ext, raw = data.draw(valid_image())
    bad = data.draw(mutation(raw))
    ext = data.draw(st.sampled_from([ext, ext, ".png", ".jpg", ".JPG", ".tiff"]))  # sometimes the wrong extension
    with scratch() as d:
        (d / f"img{ext}").write_bytes(bad)
        check_agrees(d / f"img{ext}")


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(100), **FUZZ)
@given(raw=st.binary(max_size=400), ext=st.sampled_from(IMAGE_SUFFIXES))
def test_random_bytes_as_images(raw: bytes, ext: str) -> None:
    with scratch() as d:
        (d / f"x{ext}").write_bytes(raw)
        check_agrees(d / f"x{ext}")


def png_claiming(w: int, h: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose IHDR (with a correct CRC) claims ``w`` x ``h`` pixels; the IDAT holds one tiny zlib stream."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(40), **FUZZ)
@given(w=st.integers(0, 2**31 - 1), h=st.integers(0, 2**31 - 1), depth=st.sampled_from([1, 8, 16]),
       colour=st.sampled_from([0, 2, 3, 4, 6]))  # fmt: skip
@example(w=100_000, h=100_000, depth=8, colour=2).via(
    "regression: decompression bomb escaped as DecompressionBombError"
)
@example(w=116, h=554_296, depth=1, colour=0).via("regression: a 69-byte PNG decoded into a 116x554296 image")
def test_png_claiming_huge_dimensions_fails_fast(w: int, h: int, depth: int, colour: int) -> None:
    with scratch() as d:
        path = d / "bomb.png"
        path.write_bytes(png_claiming(w, h, depth, colour))
        t0 = time.perf_counter()
        check_agrees(path)
        assert time.perf_counter() - t0 < 5.0
        if w * h > 100_000:  # more than 69 bytes can encode even at 1 bit per pixel
            assert expect_image(path) is None


# -- the folder scanner -------------------------------------------------------------------------------------------
file_names = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=24).filter(
    lambda s: s not in (".", "..") and len(s.encode()) <= 200
)


@st.composite
def dataset_tree(draw) -> dict[str, list[tuple[str, str, bytes]]]:
    """{class folder: [(file name, kind, bytes)]} with valid images, garbage, empty and truncated files, images
    under the wrong extension, odd unicode names, ignored OS files and sub-folders. Half of the trees give every
    class one valid image first (and have two classes or more), so that successful scans are fuzzed as well."""
    usable = draw(st.booleans())
    classes = draw(st.lists(file_names, min_size=2 if usable else 0, max_size=4, unique_by=lambda s: s))
    if usable:
        classes = [c.lstrip(".") or "c" for c in classes]  # visible class folders
        classes = list(dict.fromkeys(classes))
    tree: dict[str, list[tuple[str, str, bytes]]] = {}
    for c in classes:
        files = []
        if usable:
            ext, raw = draw(valid_image())
            files.append((f"good{ext}", "image", raw))
        for i in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["image", "image", "garbage", "empty", "truncated", "wrong_ext", "ignored",
                                         "folder", "odd_name"]))  # fmt: skip
            ext, raw = draw(valid_image())
            stem = f"f{i}"
            if kind == "garbage":
                raw = draw(st.binary(min_size=1, max_size=64))
            elif kind == "empty":
                raw = b""
            elif kind == "truncated":
                raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
            elif kind == "wrong_ext":
                ext = draw(st.sampled_from([".txt", ".gif", "", ".jpg.bak"]))
            elif kind == "ignored":
                stem, ext, raw = draw(st.sampled_from(sorted(IGNORED))), "", b"\0junk"
            elif kind == "odd_name":
                stem = f"{i}" + draw(file_names).replace(".", "_")[:20]
            files.append((stem + ext, kind, raw))
        tree[c] = files
    return tree


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(60), **FUZZ)
@given(tree=dataset_tree(), policy=st.sampled_from(["skip", "fail"]))
def test_scan_image_folder(tree: dict[str, list[tuple[str, str, bytes]]], policy: str) -> None:
    with scratch() as d:
        root = d / "data"
        root.mkdir()
        for c, files in tree.items():
            (root / c).mkdir()
            for name, kind, raw in files:
                if kind == "folder":
                    (root / c / name).mkdir(exist_ok=True)
                elif not (root / c / name).exists():
                    (root / c / name).write_bytes(raw)
        # the oracle: what load_image reads, under an image extension, outside the ignored names
        good: set[str] = set()
        bad: set[str] = set()
        for c in tree:
            for p in sorted((root / c).iterdir()):
                if not p.is_file() or p.name.lower() in IGNORED:
                    continue
                ok = p.suffix.lower() in IMAGE_SUFFIXES and expect_image(p) is not None
                (good if ok else bad).add(str(p))
        try:
            with watchdog():
                scan = scan_image_folder(root, bad_files=policy)
        except DatasetError as e:
            assert str(root) in str(e), e
            outcome("dataset refused (DatasetError)")
            return
        outcome(f"dataset scanned ({policy})")
        visible = [c for c in tree if not c.startswith(".")]
        assert len(visible) >= 2 and scan.classes == sorted(visible)
        got = {p for p, _ in scan.samples}
        in_classes = {p for p in good if Path(p).parent.name in visible}
        assert got == in_classes
        if policy == "skip":
            assert {p for p, _ in scan.bad} == {p for p in bad if Path(p).parent.name in visible}
        else:
            assert not [p for p in bad if Path(p).parent.name in visible], "bad_files=fail let a bad file through"
        for p, label in scan.samples:
            assert scan.classes[label] == Path(p).parent.name


# -- the RefCOCO refs pickle (restricted unpickler) and RLE masks -------------------------------------------------
@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(150), **FUZZ)
@given(raw=st.binary(max_size=300) | st.builds(lambda b: b"\x80\x04" + b, st.binary(max_size=200)))
@example(raw=b"cos\nsystem\n(S'true'\ntR.").via("a protocol-0 os.system call is refused")
@example(raw=b"\x95\x00\x00\x00\x00\x00\x00\x00\x80").via("regression: FRAME length 2**63 -> OverflowError")
@example(raw=b"Nr\x00\x00\x00\x10.").via("regression: memo index 2**28 -> the C unpickler cleared GBs (Hang)")
def test_refs_pickle_random_bytes(raw: bytes) -> None:
    with scratch() as d:
        path = d / "refs(unc).p"
        path.write_bytes(raw)
        try:
            with watchdog():
                refs = load_refs_pickle(path)
        except DatasetError as e:
            assert str(path) in str(e)
            return
        assert isinstance(refs, list) and all(isinstance(r, dict) for r in refs)


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(100), **FUZZ)
@given(counts=st.lists(st.integers(-5, 40), max_size=8) | st.text(max_size=12) | st.binary(max_size=12),
       h=st.integers(0, 6), w=st.integers(0, 6))  # fmt: skip
def test_rle_masks(counts: Any, h: int, w: int) -> None:
    try:
        with watchdog():
            mask = decode_rle({"counts": counts, "size": [h, w]}, (h, w))
    except DatasetError:
        return
    assert mask.shape == (h, w) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}


TIFF_SHORT_STRIP = (
    b"II*\x00\x08\x00\x00\x00\x0b\x00\x00\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x01\x01\x04\x00"
    b"\x01\x00\x00\x00\x01\x00\x00\x00\x02\x01\x03\x00\x04\x00\x00\x00\x92\x00\x00\x00\x03\x01\x03\x00"
    b"\x01\x00\x00\x00\x01\x00\x00\x00\x06\x01\x03\x00\x01\x00\x00\x00\x02\x00\x00\x00\x11\x01\x04\x00"
    b"\x01\x00\x00\x00\x9a\x00\x00\x00\x15\x01\x03\x00\x01\x00\x00\x00\x04\x00\x00\x00\x16\x01\x04\x00"
    b"\x01\x00\x00\x00\x01\x00\x00\x00\x17\x01\x04\x00\x01\x00\x00\x00\x04\x00\x00\x00\x1c\x01\x03\x00"
    b"\x01\x00\x00\x00\x01\x00\x00\x00R\x01\x03\x00\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00"
    b"\x08\x00\x08\x00\x08\x00\x08\x00"
)


def test_tiff_decoder_value_error_names_the_file(tmp_path: Path) -> None:
    """A mutated TIFF (found by test_mutated_images): Pillow raised a bare 'buffer is not large enough'."""
    (tmp_path / "short.tif").write_bytes(TIFF_SHORT_STRIP)
    check_agrees(tmp_path / "short.tif")
    assert expect_image(tmp_path / "short.tif") is None


def test_decompression_bomb_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(ValueError, match=r"bomb\.png is unreadable.*MAX_IMAGE_PIXELS"):
        load_image(path)
    reason = check_image(path)
    assert reason is not None and "decompression bomb" in reason


@pytest.mark.parametrize(
    "rle", [{"counts": b"\x80", "size": [0, 0]}, {"counts": [-1, 2], "size": [1, 1]}, {"counts": ["a"], "size": [1, 1]},
            {"counts": [10**12], "size": [10**6, 10**6]}, {"counts": [1], "size": "1x1"}],
)  # fmt: skip
def test_rle_regressions(rle: dict) -> None:
    """Undecodable bytes (UnicodeDecodeError), negative and non-integer runs (ValueError from np.repeat / int),
    a 10^12-pixel mask (would allocate 1 TB), a size that is not [H, W]."""
    with pytest.raises(DatasetError, match="RLE"):
        decode_rle(rle, (1, 1))


# -- the preprocess spec (it travels in a bundle's manifest.json, so deploy reads it from a file) ----------------
spec_values = st.one_of(
    st.sampled_from([[6, 5], 4, [8, 8], [0.5, 0.5, 0.5], [0.2, 0.3, 0.4], 0.25, 1 / 255, 0, [0, 0, 0], 0.875, 1.0]),
    st.sampled_from([[6, 5], 4, [8, 8], [0.5, 0.5, 0.5], [0.2, 0.3, 0.4], 0.25, 1 / 255, 0, [0, 0, 0], 0.875, 1.0]),
    st.sampled_from([[6, 5], 4, [8, 8], [0.5, 0.5, 0.5], [0.2, 0.3, 0.4], 0.25, 1 / 255, 0, [0, 0, 0], 0.875, 1.0]),
    st.sampled_from([[6, 5], 4, [8, 8], [0.5, 0.5, 0.5], [0.2, 0.3, 0.4], 0.25, 1 / 255, 0, [0, 0, 0], 0.875, 1.0]),
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.one_of(st.integers(-3, 40), st.floats(-2, 300), st.text(max_size=3), st.none()), max_size=4),
    st.sampled_from(["squash", "letterbox", "shorter_then_center_crop", "bicubic", "nearest", "BGR", "HWC"]),
)  # fmt: skip


VALID_SPEC = {  # per key, values that validate (so that accepted specs are fuzzed through preprocessing too)
    "size": [[6, 5], 4, [1, 9]], "mean": [[0.5, 0.5, 0.5], 0.4, [0, 1, 2]], "std": [[0.2, 0.3, 0.4], 0.25, [1, 2, 3]],
    "resize": ["squash", "letterbox", "shorter_then_center_crop"], "interpolation": ["bicubic", "nearest", "bilinear"],
    "scale": [1 / 255, 1, 0.5], "channel_order": ["RGB", "BGR"], "layout": ["CHW", "HWC"],
    "pad_value": [0, 114, [1, 2, 3]], "crop_pct": [1.0], "extra": [1],
}  # fmt: skip
spec_changes = st.dictionaries(
    st.sampled_from(sorted(VALID_SPEC)), st.booleans(), max_size=3
).flatmap(lambda keys: st.fixed_dictionaries({k: st.sampled_from(VALID_SPEC[k]) if ok else spec_values
                                              for k, ok in keys.items()}))  # fmt: skip


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(200), **FUZZ)
@given(changes=spec_changes, drop=st.sets(st.sampled_from(("size", "mean", "std")), max_size=1))
def test_preprocess_spec(changes: dict[str, Any], drop: set[str]) -> None:
    """validate_spec → a spec that preprocesses an image to finite float32 of its size, or a ValueError naming
    the key; never another exception."""
    from vision_peft.preprocess import validate_spec

    spec: dict[str, Any] = {"size": [6, 5], "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], **changes}
    for k in drop:
        spec.pop(k, None)
    try:
        with watchdog():
            full = validate_spec(spec)
    except ValueError as e:
        assert any(k in str(e) for k in (*changes, *drop)), f"error names no key: {e}"
        outcome("spec refused (ValueError)")
        return
    outcome("spec accepted")
    json.dumps(full, allow_nan=False)  # it must fit a manifest
    x = preprocess_image(np.full((7, 9, 3), 100, np.uint8), full)
    h, w = full["size"]
    assert x.shape == ((3, h, w) if full["layout"] == "CHW" else (h, w, 3)) and np.isfinite(x).all()


@pytest.mark.parametrize(
    "change",
    [{"size": None}, {"mean": None}, {"pad_value": None}, {"crop_pct": None}, {"interpolation": ["a"]},
     {"mean": [math.nan] * 3}, {"scale": math.inf}, {"size": [True, True]}, {"crop_pct": 6.270090596256277e-135},
     {"size": [10**6, 10**6]}, {"mean": 6.805647186300698e37}, {"std": 1e-46}],
    ids=["size_none", "mean_none", "pad_none", "crop_none", "interp_list", "mean_nan", "scale_inf", "size_bool",
         "crop_tiny", "size_huge", "mean_overflows_f32", "std_zero_in_f32"],
)  # fmt: skip
def test_preprocess_spec_regressions(change: dict[str, Any]) -> None:
    """TypeError (None / a list where a number or name belongs: found by test_preprocess_spec), and specs that were
    accepted and produced NaN/inf inputs (mean NaN, scale inf) or a 1x1 input from booleans."""
    from vision_peft.preprocess import validate_spec

    (key,) = change
    with pytest.raises(ValueError, match=key):
        validate_spec({"size": [6, 5], "mean": [0.5] * 3, "std": [0.2] * 3, **change})
