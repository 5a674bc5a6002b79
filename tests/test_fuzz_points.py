"""Property-based fuzzing of the point readers (issue 18): every point format, headers that claim huge
sizes, NPY/NPZ/HDF5 dtypes and shapes, the point-folder scanner; then the concrete point inputs the fuzzer found.

The properties every fuzzer here checks, and the example counts: see ``tests/fuzz_support.py``.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import fuzz_examples
from fuzz_support import (
    FUZZ,
    h5_bytes,
    mutation,
    names_input,
    npy_bytes,
    npz_bytes,
    off_bytes,
    outcome,
    pcd_bytes,
    ply_bytes,
    scratch,
    watchdog,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vision_peft import pointio
from vision_peft.data.points import scan_point_folder
from vision_peft.pointio import PointFileError, read_points

pytestmark = pytest.mark.fuzz


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
