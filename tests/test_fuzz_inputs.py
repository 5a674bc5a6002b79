"""Property-based fuzzing of every reader of user input (issue 18): point files, images and dataset folders,
recipes and dotted overrides.

The property everywhere: a reader either returns a valid value of its documented shape/dtype, or raises its
documented error type (``PointFileError``, ``ValueError`` for images, ``DatasetError``, ``ConfigError``) with a
message naming the input; never another exception, never a hang (hypothesis ``deadline`` plus a hard SIGALRM
watchdog per example) and never a large allocation for a header that merely *claims* a huge size (tracemalloc
sees every numpy buffer). Inputs are random bytes and mutations (truncation, flipped bytes, rewritten header
fields, huge/negative counts, NaN/inf, wrong columns and dtypes) of valid files the tests write themselves; the
unmutated files must read back exactly, so a reader that rejects everything fails too.

Every failure the fuzzer found is kept as an ``@example`` (or a plain test) with the concrete input.
Example counts come from ``fuzz_examples(n)``: n in CI, 50n under ``pytest --fuzz-long``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import struct
import tempfile
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from conftest import fuzz_examples, tiny_recipe
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from vision_peft import pointio
from vision_peft.config import ConfigError
from vision_peft.data.folder import IGNORED, DatasetError, check_image, scan_image_folder
from vision_peft.data.points import scan_point_folder
from vision_peft.data.refer import decode_rle, load_refs_pickle
from vision_peft.pointio import PointFileError, read_points
from vision_peft.preprocess import IMAGE_SUFFIXES, load_image, preprocess_image
from vision_peft.recipe import POLYMORPHIC, build_run_config, load_recipe, parse_overrides

pytestmark = pytest.mark.fuzz

HARD_LIMIT_S = 30  # SIGALRM watchdog per example: a reader still busy after this is a hang
# deadline in ms; too_slow is suppressed because drawing whole image files and dataset trees is slow by design on the
# shared CI CPU (the watchdog and the deadline still bound each example)
FUZZ = dict(database=None, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])


class Hang(Exception):
    """Raised by the watchdog inside a reader that ran past HARD_LIMIT_S."""


@contextlib.contextmanager
def watchdog(seconds: float = HARD_LIMIT_S) -> Iterator[None]:
    """Interrupt the block with :class:`Hang` after ``seconds`` (Python-level loops; C calls end first)."""

    def fire(signum, frame):  # noqa: ANN001
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A fresh temporary folder per example (hypothesis examples cannot share pytest's tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="vp-fuzz-") as d:
        yield Path(d)


def outcome(what: str) -> None:
    """Count an outcome in hypothesis' statistics (``--hypothesis-show-statistics``); a no-op in plain tests."""
    if currently_in_test_context():
        event(what)


def names_input(message: str, path: Path) -> bool:
    return str(path) in message or path.name in message


# =================================================================================================================
# 1. point readers
# =================================================================================================================
def expect_points(path: Path, **kw: Any) -> np.ndarray | None:
    """read_points → a valid (N, 3) finite float32 array, or None after a PointFileError naming the file."""
    try:
        with watchdog():
            arr = read_points(path, **kw)
    except PointFileError as e:
        assert names_input(str(e), path), f"error does not name {path}: {e}"
        outcome("point file refused (PointFileError)")
        return None
    outcome("point file read")
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32, type(arr)
    assert arr.ndim == 2 and arr.shape[1] == 3 and len(arr) >= 1, arr.shape
    assert np.isfinite(arr).all()
    return arr


clouds = (
    st.integers(1, 40)
    .flatmap(
        lambda n: st.lists(
            st.lists(st.floats(-1e4, 1e4, width=32, allow_nan=False), min_size=3, max_size=3), min_size=n, max_size=n
        )
    )
    .map(lambda rows: np.asarray(rows, dtype=np.float32))
)


def pcd_bytes(pts: np.ndarray, binary: bool, extra: int = 0) -> bytes:
    table = np.concatenate([pts, np.ones((len(pts), extra), np.float32)], axis=1)
    fields = "x y z" + "".join(f" e{i}" for i in range(extra))
    k = 3 + extra
    head = (
        "# .PCD v0.7\nVERSION 0.7\n"
        f"FIELDS {fields}\nSIZE {' '.join(['4'] * k)}\nTYPE {' '.join(['F'] * k)}\nCOUNT {' '.join(['1'] * k)}\n"
        f"WIDTH {len(pts)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(pts)}\n"
    )
    if binary:
        return (head + "DATA binary\n").encode() + table.astype("<f4").tobytes()
    return (head + "DATA ascii\n" + "".join(" ".join(repr(float(v)) for v in r) + "\n" for r in table)).encode()


def ply_bytes(pts: np.ndarray, fmt: str, extra: int = 0, faces: int = 0) -> bytes:
    props = "".join(f"property float {a}\n" for a in ["x", "y", "z"] + [f"e{i}" for i in range(extra)])
    head = f"ply\nformat {fmt} 1.0\nelement vertex {len(pts)}\n{props}"
    if faces:
        head += f"element face {faces}\nproperty list uchar int vertex_indices\n"
    head += "end_header\n"
    table = np.concatenate([pts, np.ones((len(pts), extra), np.float32)], axis=1)
    if fmt == "ascii":
        body = "".join(" ".join(repr(float(v)) for v in r) + "\n" for r in table).encode()
        body += b"".join(b"3 0 0 0\n" for _ in range(faces))
    else:
        bo = "<" if fmt == "binary_little_endian" else ">"
        body = table.astype(bo + "f4").tobytes()
        body += b"".join(struct.pack(bo + "Biii", 3, 0, 0, 0) for _ in range(faces))
    return head.encode() + body


def off_bytes(pts: np.ndarray, faces: bool) -> bytes:
    tris = [(i, (i + 1) % len(pts), (i + 2) % len(pts)) for i in range(len(pts))] if faces and len(pts) >= 3 else []
    out = f"OFF\n{len(pts)} {len(tris)} 0\n" + "".join(" ".join(repr(float(v)) for v in r) + "\n" for r in pts)
    return (out + "".join(f"3 {a} {b} {c}\n" for a, b, c in tris)).encode()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def h5_bytes(data: np.ndarray, label: np.ndarray | None) -> bytes:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("data", data=data)
        if label is not None:
            f.create_dataset("label", data=label)
    return buf.getvalue()


@st.composite
def valid_point_file(draw) -> tuple[str, bytes, np.ndarray]:
    """(file name, bytes, the xyz the reader must return) for every format the readers support."""
    pts = draw(clouds)
    kind = draw(st.sampled_from(["pcd_ascii", "pcd_binary", "ply_ascii", "ply_le", "ply_be", "off", "npy", "npz",
                                 "npz_c", "h5"]))  # fmt: skip
    extra = draw(st.integers(0, 3))
    if kind.startswith("pcd"):
        return "cloud.pcd", pcd_bytes(pts, kind == "pcd_binary", extra), pts
    if kind.startswith("ply"):
        fmt = {"ply_ascii": "ascii", "ply_le": "binary_little_endian", "ply_be": "binary_big_endian"}[kind]
        return "cloud.ply", ply_bytes(pts, fmt, extra, faces=draw(st.integers(0, 2))), pts
    if kind == "off":
        return "mesh.off", off_bytes(pts, faces=draw(st.booleans())), pts
    table = np.concatenate([pts, np.zeros((len(pts), extra), np.float32)], axis=1)
    dtype = draw(st.sampled_from(["<f4", ">f4", "<f8", "<f2"])) if kind != "h5" else "<f4"
    if dtype == "<f2":  # float16 holds only values up to 65504 and 11 bits of mantissa
        table = table.astype(np.float16)
        pts = table[:, :3].astype(np.float32)
    table = table.astype(dtype)
    if kind == "npy":
        return "cloud.npy", npy_bytes(table), pts
    if kind.startswith("npz"):
        return "cloud.npz", npz_bytes({"points": table}, compressed=kind == "npz_c"), pts
    return "shapes.h5", h5_bytes(table[None], np.zeros(1, np.int64)), pts


HUGE = [-1, 0, 2**31, 2**32 + 3, 10**12, 2**63 - 1, 10**30]


@st.composite
def mutation(draw, data: bytes) -> bytes:
    """One or more edits of ``data``: truncate, flip/overwrite bytes, insert/delete a slice, rewrite a number in
    the (text) header to a huge/negative/zero/garbage value, or put nan/inf into a text body."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "number", "nonfinite"]))
        n = len(out)
        if op == "truncate":
            del out[draw(st.integers(0, max(0, n - 1))) :]
        elif op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            out[i] = draw(st.integers(0, 255))
        elif op == "insert":
            i = draw(st.integers(0, n))
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del out[i : i + draw(st.integers(1, 16))]
        elif op in ("number", "nonfinite"):
            text = bytes(out[:400])
            spots = [
                i for i in range(len(text)) if text[i : i + 1].isdigit() and (i == 0 or not text[i - 1 : i].isdigit())
            ]
            if not spots:
                continue
            i = draw(st.sampled_from(spots))
            j = i
            while j < len(out) and out[j : j + 1].isdigit():
                j += 1
            if op == "number":
                new = str(draw(st.sampled_from(HUGE) | st.integers(-5, 100))).encode()
            else:
                new = draw(st.sampled_from([b"nan", b"inf", b"-inf", b"NaN", b"1e999", b"x"]))
            out[i:j] = new
    return bytes(out)


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(150), **FUZZ)
@given(case=valid_point_file(), off_points=st.sampled_from([0, 0, 64]))
def test_valid_point_files_read_back_exactly(case: tuple[str, bytes, np.ndarray], off_points: int) -> None:
    name, raw, pts = case
    with scratch() as d:
        (d / name).write_bytes(raw)
        got = expect_points(d / name, off_points=off_points if name.endswith(".off") else 0)
    assert got is not None, f"a valid {name} was rejected"
    if not (name.endswith(".off") and off_points and b"\n3 " in raw):  # surface samples differ from vertices
        np.testing.assert_array_equal(got, pts)


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(600), **FUZZ)
@given(data=st.data())
def test_mutated_point_files(data: st.DataObject) -> None:
    name, raw, _ = data.draw(valid_point_file())
    bad = data.draw(mutation(raw))
    extra = data.draw(st.sampled_from(["take_xyz", "error"]))
    with scratch() as d:
        (d / name).write_bytes(bad)
        expect_points(d / name, extra_columns=extra, off_points=data.draw(st.sampled_from([0, 16])))


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(150), **FUZZ)
@given(raw=st.binary(max_size=600), ext=st.sampled_from(pointio.POINT_EXTS + (".txt", ".PCD", "")))
def test_random_bytes_as_point_files(raw: bytes, ext: str) -> None:
    with scratch() as d:
        path = d / f"cloud{ext}"
        path.write_bytes(raw)
        expect_points(path)


# -- headers that claim huge sizes must fail before allocating ---------------------------------------------------
def huge_claim(kind: str, n: int) -> tuple[str, bytes]:
    """A small file of ``kind`` whose header claims ``n`` points (the body holds 2)."""
    two = np.ones((2, 3), np.float32)
    if kind == "pcd_binary":
        return "c.pcd", pcd_bytes(two, True).replace(b"POINTS 2", b"POINTS %d" % n)
    if kind == "pcd_ascii":
        return "c.pcd", pcd_bytes(two, False).replace(b"POINTS 2", b"POINTS %d" % n)
    if kind == "ply_le":
        return "c.ply", ply_bytes(two, "binary_little_endian").replace(b"vertex 2", b"vertex %d" % n)
    if kind == "ply_ascii":
        return "c.ply", ply_bytes(two, "ascii").replace(b"vertex 2", b"vertex %d" % n)
    if kind == "off":
        return "c.off", off_bytes(two, False).replace(b"\n2 0 0", b"\n%d 0 0" % n)
    if kind in ("npy", "npz", "npz_c"):
        head = npy_bytes(two)
        new = head.replace(b"(2, 3)", b"(%d, 3)" % n)
        if len(new) != len(head):  # keep the header length a multiple of 64: pad/cut the spaces before '\n'
            hlen = struct.unpack("<H", new[8:10])[0]
            hdr = new[10 : 10 + hlen].rstrip(b" \n")
            hdr = hdr + b" " * ((-(10 + len(hdr) + 1)) % 64) + b"\n"
            new = new[:8] + struct.pack("<H", len(hdr)) + hdr + two.tobytes()
        if kind == "npy":
            return "c.npy", new
        buf = io.BytesIO()
        method = zipfile.ZIP_DEFLATED if kind == "npz_c" else zipfile.ZIP_STORED
        with zipfile.ZipFile(buf, "w", method) as z:
            z.writestr("points.npy", new)
        return "c.npz", buf.getvalue()
    raise AssertionError(kind)


def h5_huge(n: int) -> bytes:
    """An HDF5 file whose 'data' is declared (n, 2048, 3) float32 but never written (chunked fill value)."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("data", shape=(n, 2048, 3), dtype="f4", chunks=(1, 2048, 3))
    return buf.getvalue()


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(60), **FUZZ)
@given(
    kind=st.sampled_from(["pcd_binary", "pcd_ascii", "ply_le", "ply_ascii", "off", "npy", "npz", "npz_c", "h5"]),
    n=st.sampled_from([10**5, 10**7, 10**8, 2**31, 10**10, 10**12]),
)
@example(kind="npy", n=10**8).via("regression: npy header claiming 1e8 points allocated 1.2 GB")
@example(kind="h5", n=10**5).via("regression: HDF5 'data' declared (1e5, 2048, 3) was read whole (2.4 GB)")
def test_huge_claimed_counts_fail_fast(kind: str, n: int) -> None:
    if kind == "h5":
        if n > 10**7:  # HDF5 itself refuses some dimension products; the smaller claims are the interesting ones
            n = 10**7
        name, raw = "c.h5", h5_huge(n)
    else:
        name, raw = huge_claim(kind, n)
    with scratch() as d:
        (d / name).write_bytes(raw)
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            got = expect_points(d / name)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert got is None, f"{kind} claiming {n} points was accepted"
        assert peak < 64 * 2**20, f"{kind} claiming {n} points allocated {peak / 2**20:.0f} MiB before failing"
        assert time.perf_counter() - t0 < 5.0


# -- NPY/NPZ dtypes and shapes ------------------------------------------------------------------------------------
numpy_arrays = st.one_of(
    st.sampled_from(["<f4", ">f8", "<i2", "|u1", "|b1", "<c8", "<U3", "|S4", "<M8[s]", "<m8[s]", "<f2"]).flatmap(
        lambda dt: st.tuples(st.just(dt), st.lists(st.integers(0, 6), min_size=0, max_size=3))
    ),
)


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(120), **FUZZ)
@given(
    spec=numpy_arrays,
    container=st.sampled_from(["npy", "npz", "npz_two", "h5"]),
    fill=st.sampled_from([0, 1.5, "nan", "inf"]),
)
@example(spec=("<U3", [2, 3]), container="npy", fill=1.5).via("regression: string array of numbers was accepted")
@example(spec=("<M8[s]", [2, 3]), container="npy", fill=0).via("regression: datetime array (TypeError)")
@example(spec=("<f4", [2, 3]), container="h5", fill=0).via("baseline: a valid HDF5 shape reads")
def test_numpy_and_h5_dtypes_and_shapes(spec: tuple[str, list[int]], container: str, fill: Any) -> None:
    dt, shape = spec
    value = float(fill) if isinstance(fill, str) else fill
    try:
        arr = np.full(shape, value).astype(dt)
    except (ValueError, TypeError, OverflowError):
        arr = np.zeros(shape, dtype=dt)
    with scratch() as d:
        if container == "npy":
            path = d / "a.npy"
            path.write_bytes(npy_bytes(arr))
        elif container.startswith("npz"):
            path = d / "a.npz"
            extra = {"other": np.zeros(2)} if container == "npz_two" else {}
            path.write_bytes(npz_bytes({"xyz": arr, **extra}, compressed=False))
        else:
            path = d / "a.h5"
            try:
                path.write_bytes(h5_bytes(arr, None))
            except (TypeError, ValueError):  # h5py cannot store this dtype at all
                return
        got = expect_points(path)
    numeric = np.dtype(dt).kind in "fiub"
    good_shape = (
        len(shape) == 2
        and shape[0] >= 1
        and shape[1] >= 3
        or (container == "h5" and len(shape) == 3 and shape[0] >= 1 and shape[1] >= 1 and shape[2] >= 3)
    )
    finite = fill not in ("nan", "inf") or np.dtype(dt).kind in "iub"
    if got is not None:
        assert numeric and good_shape and finite, f"{dt} {shape} fill={fill} in {container} was accepted"
    elif numeric and good_shape and finite and np.dtype(dt).kind != "b":
        pytest.fail(f"a valid {dt} {shape} array in {container} was rejected")


# -- HDF5 structure and the point-folder scanner ------------------------------------------------------------------
@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(60), **FUZZ)
@given(
    shapes=st.integers(1, 4),
    labels=st.lists(st.integers(-3, 6), min_size=0, max_size=5),
    names=st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="\n\r\x00"), min_size=1, max_size=8),
        min_size=0,
        max_size=4,
    ),  # fmt: skip
    names_raw=st.binary(max_size=40) | st.none(),
    label_kind=st.sampled_from(["dataset", "missing", "group", "strings"]),
)
def test_point_folder_h5_layout(shapes: int, labels: list[int], names: list[str], names_raw: bytes | None,
                                label_kind: str) -> None:  # fmt: skip
    with scratch() as d:
        with h5py.File(d / "ply_data_train0.h5", "w") as f:
            f.create_dataset("data", data=np.ones((shapes, 4, 3), np.float32))
            if label_kind == "dataset":
                f.create_dataset("label", data=np.asarray(labels, np.int64))
            elif label_kind == "group":
                f.create_group("label")
            elif label_kind == "strings":
                f.create_dataset("label", data=np.asarray(["a"] * len(labels), dtype="S1"))
        (d / "shape_names.txt").write_bytes(names_raw if names_raw is not None else "\n".join(names).encode())
        try:
            with watchdog():
                scan = scan_point_folder(d)
        except PointFileError as e:
            assert str(d) in str(e), e
            return
        n_classes = len(scan.classes)
        for split in scan.splits.values():
            for s in split:
                assert 0 <= s.label < n_classes, f"label {s.label} outside the {n_classes} classes of {scan.classes}"
                assert expect_points(Path(s.path.rsplit("[", 1)[0]), index=s.h5_index) is not None


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


# =================================================================================================================
# 3. recipes and dotted overrides
# =================================================================================================================
MARKER = Path(tempfile.gettempdir()) / "vision_peft_fuzz_code_ran"
TAG_VALUES = [
    f"!!python/object/apply:os.system ['touch {MARKER}']",
    f"!!python/object/apply:subprocess.call [['touch', '{MARKER}']]",
    "!!python/name:os.system",
    "!!python/object:vision_peft.config.TrainConfig {}",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!timestamp 2001-12-14",
    "&a [*a]",
    "*undefined",
    "[1, [2, [3, [4]]]]",
    "{a: 1, b: {c: 2}}",
    ".nan",
    ".inf",
    "-.inf",
    "1e400",
    "0x1F",
    "0o17",
    "1_000",
    "yes",
    "~",
    "'",
    "[",
    "'ünïcødé ✓'",
    "\ud7ff",
    "!!int 12",
    "!!float nope",
]


def field_paths() -> list[str]:
    """Every dotted key a recipe may set: sections and the fields of the default task/adapter config classes."""
    import dataclasses

    from vision_peft.config import BackboneConfig, OutputConfig, TrainConfig

    out = ["task", "adapter", "backbone", "train", "output"]
    for sec, cls in (("backbone", BackboneConfig), ("train", TrainConfig), ("output", OutputConfig)):
        out += [f"{sec}.{f.name}" for f in dataclasses.fields(cls)]
    for sec, reg in POLYMORPHIC.items():
        for name in reg.names():
            cls = reg.get(name).config_cls
            if cls is not None:
                out += [f"{sec}.{f.name}" for f in dataclasses.fields(cls)]
    return sorted(set(out))


FIELD_PATHS = field_paths()
yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["lora", "classification", "cpu", "auto", "none", "timm:test_vit", "fps"]),
)  # fmt: skip
yaml_values = st.recursive(
    yaml_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
# keys of the base recipe's own sections (classification task, LoRA), drawn as often as all other keys together,
# so that a good share of the override lists builds a config and the accept path is fuzzed too
RECIPE_PATHS = sorted(
    {f"{sec}.{k}" for sec, body in tiny_recipe("d", "r").items() for k in body}
    | {k for k in FIELD_PATHS if k.split(".")[0] in ("train", "backbone", "output")}
)
sane_values = st.sampled_from(["1", "2", "0.5", "1e-3", "true", "false", "null", "cpu", "[qkv]", "squash", "x"])
override_keys = (
    st.sampled_from(RECIPE_PATHS)
    | st.sampled_from(RECIPE_PATHS)
    | st.sampled_from(RECIPE_PATHS)
    | st.sampled_from(FIELD_PATHS)
    | st.text(max_size=20)
    | st.lists(st.text(max_size=4), min_size=1, max_size=12).map(".".join)
)
override_values = (
    sane_values
    | sane_values
    | sane_values
    | sane_values
    | st.sampled_from(TAG_VALUES)
    | st.text(max_size=20)
    | yaml_scalars.map(lambda v: json.dumps(v, allow_nan=True))
)


def expect_config(fn: Callable[[], Any], names: str | None = None) -> Any:
    """fn() → a RunConfig that survives the config.json round trip, or None after a ConfigError naming ``names``."""
    from vision_peft.config import RunConfig

    try:
        with watchdog():
            cfg = fn()
    except ConfigError as e:
        if names is not None:
            assert names in str(e), f"error does not name {names}: {e}"
        outcome("config refused (ConfigError)")
        return None
    outcome("config built")
    assert isinstance(cfg, RunConfig)
    again = build_run_config(json.loads(json.dumps(cfg.to_dict(), allow_nan=False)))
    assert again == cfg
    return cfg


def base_recipe() -> dict[str, Any]:
    return tiny_recipe("/nonexistent/data", "/nonexistent/runs")


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(300), **FUZZ)
@given(items=st.lists(st.tuples(override_keys, override_values), min_size=1, max_size=3), dashes=st.booleans())
@example(items=[("train.lr", TAG_VALUES[0])], dashes=True).via("regression: YAML tag in an override → ConstructorError")
@example(items=[("train.lr", "[")], dashes=False).via("regression: unparsable override value → ScannerError")
@example(items=[("train.lr", ".nan")], dashes=False).via("regression: train.lr=.nan built a config")
@example(items=[("adapter.name", "[1]")], dashes=False).via("regression: unhashable adapter name (TypeError)")
def test_dotted_overrides(items: list[tuple[str, str]], dashes: bool) -> None:
    strings = [("--" if dashes else "") + f"{k}={v}" for k, v in items]
    MARKER.unlink(missing_ok=True)
    with scratch() as d:
        recipe = d / "r.yaml"
        recipe.write_text(yaml.safe_dump(base_recipe()))
        expect_config(lambda: load_recipe(str(recipe), strings))
    assert not MARKER.exists(), f"an override executed code: {strings}"


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(150), **FUZZ)
@given(
    text=st.text(max_size=200)
    | st.sampled_from(TAG_VALUES)
    | st.binary(max_size=100).map(lambda b: b.decode("latin-1"))
)
@example(text="- a\n- b\n").via("regression: a recipe that is a YAML list → AttributeError")
@example(text="\udcff").via("regression: a recipe that is not UTF-8 → UnicodeDecodeError")
def test_random_recipe_text(text: str) -> None:
    MARKER.unlink(missing_ok=True)
    with scratch() as d:
        recipe = d / "r.yaml"
        recipe.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        expect_config(lambda: load_recipe(str(recipe), ["train.max_steps=2"]), names=str(recipe))
    assert not MARKER.exists()


@st.composite
def mutated_recipe(draw) -> dict[str, Any]:
    """The tiny recipe with values replaced, keys added and deleted, and sections swapped for other shapes."""
    data: Any = base_recipe()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "add", "delete", "section", "other_method"]))
        sec = draw(st.sampled_from(sorted(data)))
        if op == "set" and isinstance(data[sec], dict) and data[sec]:
            data[sec][draw(st.sampled_from(sorted(data[sec])))] = draw(yaml_values)
        elif op == "add" and isinstance(data[sec], dict):
            data[sec][draw(st.sampled_from([k.split(".")[-1] for k in FIELD_PATHS]) | st.text(max_size=8))] = draw(
                yaml_values
            )
        elif op == "delete":
            del data[sec]
            if not data:
                break
        elif op == "section":
            data[sec] = draw(yaml_values)
        elif op == "other_method":
            reg = POLYMORPHIC[draw(st.sampled_from(sorted(POLYMORPHIC)))]
            data[[k for k, r in POLYMORPHIC.items() if r is reg][0]] = {"name": draw(st.sampled_from(reg.names()))}
    return data


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(250), **FUZZ)
@given(data=mutated_recipe())
def test_mutated_recipes(data: dict[str, Any]) -> None:
    with scratch() as d:
        recipe = d / "r.yaml"
        recipe.write_text(yaml.safe_dump(data, allow_unicode=True))
        expect_config(lambda: load_recipe(str(recipe)), names=str(recipe))
    expect_config(lambda: build_run_config(data))


@pytest.mark.fuzz
@settings(max_examples=fuzz_examples(200), **FUZZ)
@given(section=st.sampled_from(sorted(POLYMORPHIC)), data=st.data())
def test_every_registered_config_class_with_random_values(section: str, data: st.DataObject) -> None:
    """Each task/adapter config class (their __post_init__ validation) with random values for its fields."""
    import dataclasses

    reg = POLYMORPHIC[section]
    name = data.draw(st.sampled_from(reg.names()))
    cls = reg.get(name).config_cls
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "name"] if cls is not None else []
    recipe = base_recipe()
    recipe[section] = {"name": name}
    if fields:
        for key in data.draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
            recipe[section][key] = data.draw(yaml_values)
    expect_config(lambda: build_run_config(recipe))


def test_parse_overrides_keeps_plain_values() -> None:
    """The happy path the fuzz targets start from: typed values, nesting, `--` prefixes."""
    assert parse_overrides(["--train.lr=5e-4", "adapter.r=4", "task.classes=[a, b]", "output.name="]) == {
        "train": {"lr": "5e-4"},  # YAML 1.1 reads 5e-4 as a string; the float field converts it
        "adapter": {"r": 4},
        "task": {"classes": ["a", "b"]},
        "output": {"name": ""},
    }


def test_nan_learning_rate_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        build_run_config({**base_recipe(), "train": {"lr": math.nan}})


def test_yaml_tag_override_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match="train.lr"):
        parse_overrides([f"train.lr=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()
    assert not os.path.exists(marker)


# =================================================================================================================
# regressions: the concrete inputs the fuzzer found (each broke a reader before its fix)
# =================================================================================================================
def _npz_with_member(member: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("points.npy", member)
    return buf.getvalue()


def _npy_with_header(text: bytes) -> bytes:
    hdr = text + b" " * ((-(10 + len(text) + 1)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr


_GOOD_NPZ = _npz_with_member(npy_bytes(np.zeros((1, 3), np.float32)))
_PCD_HEAD = b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 1\nHEIGHT 1\nPOINTS 1\n"
_PLY_HEAD = b"ply\nformat ascii 1.0\n"
POINT_REGRESSIONS = {
    # NpzFile's lazy member read sat outside the try: zip errors escaped (OSError, BadZipFile, EOFError)
    # mutated NPZ (found by test_mutated_point_files): NpzFile's lazy member read sat outside the try, so zip errors
    # escaped: OSError [Errno 22] (a local-header size of 2**64-1), EOFError; plus bad magic and truncation
    "npz_oserror": (
        "c.npz",
        (
            b"PK\x03\x04\x00\x00\x00\x00\x00\x00\x00!\x00\xc2Xp\xfc\xff\xff\xff\xff\xff\xff\xff\xff\n\x00\x14"
            b"\x00points.npy\x01\x00\x10\x00\x8c\x00\x00\x00\x00\x00\x00\x00\x8c\x00\x00\x00\x00\x00\x00\x00"
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }               "
            b"                                           \n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00PK"
            b"\x01\x02-\x03-\x00\x00\x00\x00\x00\x00\x00!\x00\xc2Xp\xfc\x8c\x00\x00\x00\x8c\x00\x00\x00\n\x00"
            b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\x00\x00\x00\x00points.npyPK\x05\x06\x00\x00\x00"
            b"\x00\x01\x00\x01\x008\x00\x00\x00\xc8\x00\x00\x00\x00\x00"
        ),
    ),
    "npz_eoferror": (
        "c.npz",
        (
            b"PK\x03\x04-\x00\x00\x00\x00\x00\x00\x00!\x00\xc2Xp\xfc\xff\xff\xff\xff\xff\xff\xff\xff\n\x00\x14"
            b"\x01points.npy\x01\x00\x10\x00\x8c\x00\x00\x00\x00\x00\x00\x00\x8c\x00\x00\x00\x00\x00\x00\x00"
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }               "
            b"                                           \n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00PK"
            b"\x01\x02-\x03-\x00\x00\x00\x00\x00\x00\x00!\x00\xc2Xp\xfc\x8c\x00\x00\x00\x8c\x00\x00\x00\n\x00"
            b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\x00\x00\x00\x00points.npyPK\x05\x06\x00\x00\x00"
            b"\x00\x01\x00\x01\x008\x00\x00\x00\xc8\x00\x00\x00\x00\x00"
        ),
    ),
    "npz_bad_magic": ("c.npz", b"PK\x03\x05" + _GOOD_NPZ[4:]),
    "npz_truncated": ("c.npz", _GOOD_NPZ[: len(_GOOD_NPZ) // 2]),
    # PLY header lines with too few tokens or a non-number count: IndexError / ValueError
    "ply_property_two_tokens": (
        "c.ply",
        _PLY_HEAD + b"element vertex 1\nproperty float x\nproperty float y\n"
        b"property float z\nproperty e1\nend_header\n0 0 0 1\n",
    ),  # fmt: skip
    "ply_element_no_count": (
        "c.ply",
        _PLY_HEAD + b"element property float x\nproperty float y\nproperty float z\nend_header\n0.0 0.0 0.0\n",
    ),  # fmt: skip
    "ply_element_nul": (
        "c.ply",
        _PLY_HEAD + b"element vertex\x001\nproperty float x\nproperty float y\n"
        b"property float z\nend_header\n0.0 0.0 0.0\n",
    ),  # fmt: skip
    "ply_no_newline_after_end_header": ("c.ply", _PLY_HEAD + b"element vertex 1\nproperty float x\nend_header"),
    # PCD ascii value that is not a number: a bare ValueError not naming the file
    "pcd_ascii_nul": ("c.pcd", _PCD_HEAD + b"DATA ascii\n\x00.0 0.0 0.0\n"),
    "pcd_data_no_value": ("c.pcd", _PCD_HEAD + b"DATA\n"),
    "pcd_negative_points": ("c.pcd", _PCD_HEAD.replace(b"POINTS 1", b"POINTS -1") + b"DATA binary\n" + b"\0" * 12),
    "pcd_count_zero": ("c.pcd", _PCD_HEAD.replace(b"COUNT 1 1 1", b"COUNT 0 1 1") + b"DATA binary\n" + b"\0" * 12),
    "pcd_ascii_truncated": ("c.pcd", _PCD_HEAD.replace(b"POINTS 1", b"POINTS 3") + b"DATA ascii\n1 2 3\n"),
    # numpy's header parser tokenizes the header: an unterminated dict raised tokenize.TokenError
    # found by the long run: a negative dimension made numpy's memmap raise OverflowError
    "npy_negative_dimension": ("c.npy", npy_bytes(np.zeros((13, 3), np.float32)).replace(b"(13, 3)", b"(13, -3)")),
    "npy_header_unterminated": ("c.npy", _npy_with_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3")),
    # a string array of numbers was parsed into points; datetimes raised TypeError
    "npy_strings": ("c.npy", npy_bytes(np.full((2, 3), "1.5"))),
    "npy_datetime": ("c.npy", npy_bytes(np.zeros((2, 3), "<M8[s]"))),
    # OFF: only comments (IndexError), faces naming missing vertices (IndexError) with off_points
    "off_only_comments": ("c.off", b"# nothing\n#\n"),
    "off_face_out_of_range": ("c.off", b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n"),
    "off_face_not_a_number": ("c.off", b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 x 2\n"),
    "off_flat_faces": ("c.off", b"OFF\n3 1 0\n0 0 0\n0 0 0\n0 0 0\n3 0 1 2\n"),
}


@pytest.mark.parametrize("case", sorted(POINT_REGRESSIONS))
def test_point_regressions(case: str, tmp_path: Path) -> None:
    name, raw = POINT_REGRESSIONS[case]
    (tmp_path / name).write_bytes(raw)
    assert expect_points(tmp_path / name, off_points=16) is None, f"{case} was accepted"


def test_h5_corrupt_metadata_is_a_point_file_error(tmp_path: Path) -> None:
    """Flipping bytes of the local heap made h5py raise RuntimeError ('bad local heap signature')."""
    raw = bytearray(h5_bytes(np.ones((1, 4, 3), np.float32), np.zeros(1, np.int64)))
    heap = raw.find(b"HEAP")
    assert heap > 0
    raw[heap : heap + 4] = b"\xff\xff\xff\xff"
    (tmp_path / "c.h5").write_bytes(bytes(raw))
    assert expect_points(tmp_path / "c.h5") is None


def test_h5_reads_only_the_shape_asked_for(tmp_path: Path) -> None:
    """read_points on a (2000, 2048, 3) HDF5 file allocates one shape, not the whole 49 MB dataset."""
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f.create_dataset("data", shape=(2000, 2048, 3), dtype="f4", chunks=(1, 2048, 3), fillvalue=0.5)
    tracemalloc.start()
    try:
        got = read_points(tmp_path / "big.h5", index=1999)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (2048, 3) and (got == 0.5).all()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB for one 24 KiB shape"
    with pytest.raises(PointFileError, match=r"index 2000 is out of range"):
        read_points(tmp_path / "big.h5", index=2000)


@pytest.mark.parametrize(
    "case",
    ["strings", "group", "outside", "names_not_utf8", "names_empty"],
)
def test_point_folder_regressions(case: str, tmp_path: Path) -> None:
    """h5 labels of strings (ValueError) or a group (TypeError), labels outside shape_names.txt (accepted), a
    non-UTF-8 shape_names.txt (UnicodeDecodeError)."""
    with h5py.File(tmp_path / "ply_data_train0.h5", "w") as f:
        f.create_dataset("data", data=np.ones((1, 4, 3), np.float32))
        if case == "strings":
            f.create_dataset("label", data=np.asarray([b"a"]))
        elif case == "group":
            f.create_group("label")
        else:
            f.create_dataset("label", data=np.asarray([5 if case == "outside" else 0]))
    names = {"names_not_utf8": b"\x80\n", "names_empty": b""}.get(case, b"chair\ntable\n")
    (tmp_path / "shape_names.txt").write_bytes(names)
    with pytest.raises(PointFileError) as e:
        scan_point_folder(tmp_path)
    assert str(tmp_path) in str(e.value)


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


RECIPE_REGRESSIONS = {
    "list_document": b"- a\n- b\n",  # AttributeError in apply_overrides
    "not_utf8": b"\xff\xfe task: x\n",  # UnicodeDecodeError
    "bare_float_tag": b"!!float",  # IndexError inside PyYAML
    "bad_float_tag": b"!!float ;",  # ValueError inside PyYAML
    "name_is_a_list": yaml.safe_dump({**base_recipe(), "adapter": {"name": [1]}}).encode(),  # TypeError (unhashable)
    "name_is_null": yaml.safe_dump({**base_recipe(), "adapter": {"name": None}}).encode(),  # TypeError in difflib
    "section_is_a_list": yaml.safe_dump({**base_recipe(), "adapter": [1, 2]}).encode(),  # AttributeError .get
}


@pytest.mark.parametrize("case", sorted(RECIPE_REGRESSIONS))
def test_recipe_regressions(case: str, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(RECIPE_REGRESSIONS[case])
    with pytest.raises(ConfigError) as e:
        load_recipe(str(recipe), ["adapter.r=4"])
    assert str(recipe) in str(e.value)


@pytest.mark.parametrize(
    "override",
    [f"train.lr=!!python/object/apply:os.system ['touch {MARKER}']", "train.lr=[", "adapter=!!float nope",
     "train.lr=.nan", "train.warmup_steps=.inf", "adapter.name=[1]", 'backbone.weights="\\uD800\\uDC00"',
     "train..lr=1", "task.data_root=!!binary aGVsbG8="],
)  # fmt: skip
def test_override_regressions(override: str, tmp_path: Path) -> None:
    """Tags (ConstructorError, never code), unparsable values (ParserError; ValueError inside PyYAML), NaN lr
    (accepted), an unhashable name (TypeError), lone surrogates (not UTF-8), empty key parts, bytes."""
    MARKER.unlink(missing_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe()))
    with pytest.raises(ConfigError) as e:
        load_recipe(str(recipe), [override])
    key = override.split("=", 1)[0].rsplit(".", 1)[-1]
    assert key in str(e.value), e.value
    assert not MARKER.exists()


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
