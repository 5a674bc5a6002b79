"""Point arrays: the check every point reader ends with (:func:`to_xyz`: numbers, finite, (N, 3+) → (N, 3) float32),
and the readers of the numpy and HDF5 containers (NPY, NPZ, HDF5); numpy only, no torch. :mod:`vision_peft.pointio`
re-exports everything here and dispatches on the file extension.

Nothing is ever unpickled; an NPY header is checked against the file size before any data is read (a header
claiming 10^12 points fails at once), NPY data is memory-mapped, and NPZ members and HDF5 datasets above
``MAX_ARRAY_BYTES`` are refused unread. Bad input raises :class:`PointFileError` naming the file and the fix.
"""

from __future__ import annotations

import io
import logging
import math
import tokenize
from pathlib import Path

import numpy as np

log = logging.getLogger("vision_peft")

MAX_ARRAY_BYTES = 2 * 2**30  # an NPZ member or HDF5 dataset larger than this (uncompressed) is refused unread


class PointFileError(ValueError):
    """A point file that cannot be used as given; the message names the file and the fix."""


def to_xyz(arr: np.ndarray, path: Path, extra_columns: str, names: list[str] | None = None) -> np.ndarray:
    """Validate an (N, C) numeric array and keep x, y, z (as float32; the end of every reader)."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iuf":
        raise PointFileError(
            f"{path} holds a {arr.dtype} array; point coordinates must be integers or floats (re-export the file)"
        )
    if arr.size == 0:
        raise PointFileError(f"{path} holds no points (empty file); re-export it or remove it from the dataset")
    if arr.ndim != 2:
        raise PointFileError(f"{path}: expected an (N, 3) array of xyz points, got shape {arr.shape}")
    if arr.shape[1] < 3:
        raise PointFileError(
            f"{path} has {arr.shape[1]} column(s) per point; point clouds need at least x, y, z (3 columns)"
        )
    if arr.shape[1] > 3:
        cols = ", ".join(names) if names else f"{arr.shape[1]} columns"
        if extra_columns == "error":
            raise PointFileError(
                f"{path} has {arr.shape[1]} columns per point ({cols}), not xyz; drop the extra columns "
                "(e.g. rgb or normals) or set task.extra_columns=take_xyz to use the first three"
            )
        log.warning("%s has %d columns per point (%s): using the first three as x, y, z", path, arr.shape[1], cols)
        arr = arr[:, :3]
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf: reported below
        arr = np.array(arr, dtype=np.float32)  # a copy: never a view into a memory-mapped file
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise PointFileError(
            f"{path} has {int(bad.sum())} point(s) with NaN/inf coordinates (first at row {int(np.argmax(bad))}), "
            "values beyond the float32 range included; remove those points from the file (or re-export it)"
        )
    return arr


# what numpy's NPY header parser raises for a corrupt header (it tokenizes and literal_evals the header text)
NPY_HEADER_ERRORS = (ValueError, EOFError, SyntaxError, TypeError, KeyError, AttributeError, OverflowError,
                     RecursionError, tokenize.TokenError)  # fmt: skip


def _npy_header(fp, path: Path, available: int) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Shape, dtype and Fortran order of the NPY stream at ``fp``, checked against the ``available`` bytes."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"NPY format version {version} is not supported")
    except NPY_HEADER_ERRORS as e:
        raise PointFileError(f"{path} is not a readable numpy file ({e}); re-save it with numpy.save") from None
    if dtype.hasobject:
        raise PointFileError(f"{path} holds Python objects ({dtype}); point files must hold plain numbers")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise PointFileError(f"{path}: the NPY header gives the shape {shape}; dimensions must be non-negative")
    need = math.prod(shape) * dtype.itemsize
    if need > available - fp.tell():
        raise PointFileError(
            f"{path}: the NPY header claims shape {shape} of {dtype} ({need} bytes) but the file holds only "
            f"{max(0, available - fp.tell())} bytes of data; the file is truncated or corrupt"
        )
    return shape, dtype, fortran


def _read_npz(path: Path) -> np.ndarray:
    """The point array of an NPZ archive (key ``points``, ``xyz`` or ``data``, or its only array)."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as z:
            members = {i.filename[:-4]: i for i in z.infolist() if i.filename.endswith(".npy")}
            keys = sorted(members)
            key = next((k for k in ("points", "xyz", "data") if k in members), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise PointFileError(f"{path}: NPZ keys are {keys}; name the point array 'points' (or keep only one)")
            info = members[key]
            if info.file_size > MAX_ARRAY_BYTES:
                raise PointFileError(
                    f"{path}: NPZ array {key!r} is {info.file_size} bytes uncompressed, above the "
                    f"{MAX_ARRAY_BYTES}-byte limit (vision_peft.pointarrays.MAX_ARRAY_BYTES)"
                )
            with z.open(info) as fp:
                head = io.BytesIO(fp.read(65536 + 16))  # magic + the largest header numpy writes
                shape, dtype, fortran = _npy_header(head, path, info.file_size)
                data = head.read() + fp.read()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as e:
        raise PointFileError(f"{path} is not a readable NPZ archive ({type(e).__name__}: {e})") from None
    count = math.prod(shape)
    if len(data) < count * dtype.itemsize:
        raise PointFileError(f"{path}: NPZ array {key!r} is truncated ({len(data)} of {count * dtype.itemsize} bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")


def read_numpy(path: Path, extra_columns: str = "take_xyz") -> np.ndarray:
    """NPY (an (N, C) array) or NPZ (key ``points``, ``xyz`` or ``data``, or its only array).

    The header is checked against the file size before any data is read (a header claiming 10^12 points fails at
    once), NPY data is memory-mapped and only x, y, z are copied out, and nothing is ever unpickled.
    """
    size = path.stat().st_size
    if size == 0:
        raise PointFileError(f"{path} is empty; re-export it or remove it from the dataset")
    with path.open("rb") as fp:
        magic = fp.read(6)
        fp.seek(0)
        if magic.startswith(b"PK"):
            return to_xyz(_read_npz(path), path, extra_columns)
        if magic != b"\x93NUMPY":
            raise PointFileError(f"{path} is not a numpy .npy/.npz file (it starts with {magic!r})")
        shape, dtype, _ = _npy_header(fp, path, size)
    if math.prod(shape) == 0:
        raise PointFileError(f"{path} holds no points (shape {shape}); re-export it or remove it from the dataset")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PointFileError(f"{path} is not a readable numpy file ({type(e).__name__}: {e})") from None
    return to_xyz(arr, path, extra_columns)


def _h5_dataset(f, key: str, path: Path, kinds: str):
    """``f[key]`` checked: a dataset (not a group) of a numeric kind in ``kinds``, under MAX_ARRAY_BYTES."""
    import h5py

    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise PointFileError(f"{path}: HDF5 '{key}' is a {type(ds).__name__}, not a dataset")
    if ds.dtype.kind not in kinds:
        raise PointFileError(f"{path}: HDF5 '{key}' holds {ds.dtype}; it must hold numbers")
    if ds.size * ds.dtype.itemsize > MAX_ARRAY_BYTES:
        raise PointFileError(
            f"{path}: HDF5 '{key}' is {ds.shape} of {ds.dtype} ({ds.size * ds.dtype.itemsize} bytes), above the "
            f"{MAX_ARRAY_BYTES}-byte limit (vision_peft.pointarrays.MAX_ARRAY_BYTES); split the file"
        )
    return ds


def _open_h5(path: Path):
    try:
        import h5py
    except ImportError:
        raise PointFileError(f"{path}: reading HDF5 needs h5py; pip install h5py") from None
    if path.stat().st_size == 0:
        raise PointFileError(f"{path} is empty; re-export it or remove it from the dataset")
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PointFileError(f"{path} is not a readable HDF5 file ({e})") from None


def read_h5(path: Path, index: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """HDF5 with ``data`` (S, N, C) and optionally ``label`` (S,) / (S, 1).

    Args:
        path: the file.
        index: read only shape ``index`` of ``data`` (then ``data`` is (1, N, C)); None reads every shape.

    Returns:
        (data, labels int64 or None).
    """
    try:
        with _open_h5(path) as f:
            if "data" not in f:
                raise PointFileError(f"{path}: HDF5 datasets are {list(f.keys())}; point clouds must be in 'data'")
            ds = _h5_dataset(f, "data", path, "iuf")
            if ds.ndim not in (2, 3) or ds.shape[0] == 0:
                raise PointFileError(f"{path}: 'data' must be (shapes, points, 3+), got {ds.shape}")
            n_shapes = 1 if ds.ndim == 2 else ds.shape[0]
            if index is not None and not 0 <= index < n_shapes:
                raise PointFileError(f"{path} holds {n_shapes} shapes; index {index} is out of range")
            if ds.ndim == 2:
                data = np.asarray(ds[...])[None]
            else:
                data = np.asarray(ds[...] if index is None else ds[index : index + 1])
            label = None
            if "label" in f:
                lab = np.asarray(_h5_dataset(f, "label", path, "iuf")[...]).reshape(-1)
                if lab.dtype.kind == "f" and not (np.isfinite(lab).all() and (lab == np.round(lab)).all()):
                    raise PointFileError(f"{path}: HDF5 'label' holds non-integer values")
                if len(lab) != n_shapes:
                    raise PointFileError(f"{path}: 'label' has {len(lab)} entries for {n_shapes} shapes in 'data'")
                label = lab.astype(np.int64)
    except (OSError, KeyError, RuntimeError, TypeError) as e:  # h5py's errors for corrupt metadata or data
        raise PointFileError(f"{path} is not a readable HDF5 file ({type(e).__name__}: {e})") from None
    if data.ndim != 3 or data.shape[1] == 0:
        raise PointFileError(f"{path}: 'data' must be (shapes, points, 3+), got {data.shape}")
    return data, label
