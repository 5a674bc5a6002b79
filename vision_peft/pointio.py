"""Point-cloud readers, normalisation, fixed-size sampling and augmentation: numpy only, no torch.

This module is part of the torch-free deployment runtime (``vision_peft.deploy`` reads point files with it);
``vision_peft.data.points`` re-exports it and adds the torch datasets.

Formats: PCD (``DATA ascii`` and ``DATA binary``), OFF (mesh vertices, or points sampled on the faces), PLY
(``ascii``, ``binary_little_endian``, ``binary_big_endian``; the ``vertex`` element), NPY / NPZ, and HDF5 files
holding ``data`` (S, N, C) and ``label`` (S,) or (S, 1) arrays (the ModelNet40 ``ply_data_*.h5`` layout). The array
containers (NPY, NPZ, HDF5), :class:`PointFileError` and the xyz check every reader ends with live in
:mod:`vision_peft.pointarrays`, re-exported here.

Every reader returns an (N, 3) float32 array of xyz. Bad input raises :class:`PointFileError` naming the file and
the fix: empty files, NaN/inf coordinates, wrong column counts (xyzrgb / xyz+normals → the first three columns are
taken with a warning, or an error when ``extra_columns="error"``), unknown extensions, binary_compressed PCD,
non-numeric dtypes, truncated or corrupt files. No other exception type leaves a reader (``tests/test_fuzz_points.py``
fuzzes them). A header that claims more data than the file holds fails before anything is allocated; NPY data is
memory-mapped; NPZ members and HDF5 datasets above ``MAX_ARRAY_BYTES`` are refused unread, and ``read_points`` reads
one shape of an HDF5 file, not the whole dataset.

Preprocessing (the order every path uses — training, eval, predict and the ONNX manifest):
1. up-axis conversion ``swap_yz`` (z-up files → the y-up convention of the PointNet weights: swap columns 1 and 2);
2. fixed-size sampling to ``num_points`` (``random`` subset, or ``fps`` farthest-point sampling; a cloud with fewer
   points is resampled *with replacement* and a warning says so);
3. centring on the centroid and scaling by the largest point norm (unit sphere);
4. training only: augmentation (scale, jitter, rotation about the up axis, point dropout), seeded per
   (seed, epoch, sample) so a resumed run draws the same augmentation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision_peft.pointarrays import (  # noqa: F401  (re-exported: pointio stays the one import for point files)
    MAX_ARRAY_BYTES,
    PointFileError,
    read_h5,
    read_numpy,
    to_xyz,
)

log = logging.getLogger("vision_peft")

POINT_EXTS = (".pcd", ".off", ".ply", ".npy", ".npz", ".h5", ".hdf5")
UP_AXIS_RULES = ("none", "swap_yz")
SAMPLING_RULES = ("random", "fps")


MAX_PCD_COUNT = 4096  # the largest COUNT (values per field) a PCD header may give


# -- readers --------------------------------------------------------------------------------------------------
def _read_text_lines(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    if not text.strip():
        raise PointFileError(f"{path} is empty; re-export it or remove it from the dataset")
    return text.splitlines()


def _count(value: str, what: str, path: Path) -> int:
    """A non-negative integer header field, or a PointFileError naming the field."""
    try:
        n = int(value)
    except ValueError:
        raise PointFileError(f"{path}: {what} is {value[:40]!r}, not a whole number; the header is corrupt") from None
    if n < 0:
        raise PointFileError(f"{path}: {what} is negative ({n}); the header is corrupt")
    return n


def _numeric_table(rows: list[list[str]], width: int, path: Path, what: str) -> np.ndarray:
    """(len(rows), width) float64 from text rows that each hold exactly ``width`` values."""
    for i, r in enumerate(rows):
        if len(r) != width:
            raise PointFileError(f"{path}: {what} row {i} has {len(r)} values, expected {width}")
    try:
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), width)
    except ValueError:
        raise PointFileError(f"{path}: a {what} row holds a value that is not a number") from None


_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
              ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}  # fmt: skip


def read_pcd(path: Path, extra_columns: str = "take_xyz") -> np.ndarray:
    """PCD v0.7/v0.6 with ``DATA ascii`` or ``DATA binary``; x, y, z are picked by field name."""
    raw = path.read_bytes()
    if not raw.strip():
        raise PointFileError(f"{path} is empty; re-export it or remove it from the dataset")
    header: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = raw.find(b"\n", pos)
        if end < 0:
            raise PointFileError(f"{path}: PCD header has no DATA line; the file is truncated or not a PCD file")
        line = raw[pos:end].decode("ascii", errors="replace").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        key, *vals = line.split()
        header[key.upper()] = vals
        if key.upper() == "DATA":
            break
    for key in ("FIELDS", "SIZE", "TYPE", "DATA"):
        if not header.get(key):
            raise PointFileError(f"{path}: PCD header has no {key} values; the file is not a valid PCD file")
    fields, types, mode = header["FIELDS"], header["TYPE"], header["DATA"][0].lower()
    sizes = [_count(s, "a PCD SIZE", path) for s in header["SIZE"]]
    counts = [_count(c, "a PCD COUNT", path) for c in header.get("COUNT") or ["1"] * len(fields)]
    n = _count((header.get("POINTS") or header.get("WIDTH") or ["0"])[0], "PCD POINTS", path)
    if not len(fields) == len(sizes) == len(types) == len(counts):
        raise PointFileError(
            f"{path}: PCD header gives {len(fields)} FIELDS but {len(sizes)} SIZE, {len(types)} TYPE and "
            f"{len(counts)} COUNT values; they must match one to one"
        )
    if not all(1 <= c <= MAX_PCD_COUNT for c in counts):
        raise PointFileError(f"{path}: PCD COUNT values {counts} must lie in 1…{MAX_PCD_COUNT}")
    if not all(f in fields for f in ("x", "y", "z")):
        raise PointFileError(f"{path}: PCD fields are {fields}; x, y and z are required")
    if n == 0:
        raise PointFileError(f"{path} holds no points (POINTS 0); re-export it or remove it from the dataset")
    extra = [f for f, c in zip(fields, counts) for _ in range(c) if f not in ("x", "y", "z")]
    if extra and extra_columns == "error":
        to_xyz(np.zeros((1, 3 + len(extra))), path, "error", fields)  # raises with the column names
    if extra:
        log.warning("%s has fields %s: using x, y, z", path, " ".join(fields))
    if mode == "ascii":
        rows = [ln.split() for ln in raw[pos:].decode("ascii", errors="replace").splitlines() if ln.strip()]
        if len(rows) != n:
            raise PointFileError(f"{path}: PCD header says POINTS {n}, the ascii data has {len(rows)} rows")
        table = _numeric_table(rows, sum(counts), path, "ascii PCD")
        offs = np.cumsum([0] + counts)
        cols = [table[:, offs[fields.index(a)]] for a in ("x", "y", "z")]
    elif mode == "binary":
        try:
            dt = np.dtype(
                [(f"f{i}", "<" + _PCD_TYPES[(t, s)], (c,)) for i, (t, s, c) in enumerate(zip(types, sizes, counts))]
            )
        except KeyError:
            raise PointFileError(f"{path}: unsupported PCD TYPE/SIZE {types}/{sizes}") from None
        if len(raw) - pos < n * dt.itemsize:
            raise PointFileError(
                f"{path}: binary PCD data is truncated ({len(raw) - pos} bytes for {n} points of {dt.itemsize} bytes)"
            )
        rec = np.frombuffer(raw, dtype=dt, count=n, offset=pos)
        cols = [rec[f"f{fields.index(a)}"][:, 0].astype(np.float64) for a in ("x", "y", "z")]
    else:
        raise PointFileError(
            f"{path}: PCD 'DATA {mode}' is not supported (ascii and binary are); re-save it uncompressed, e.g. "
            "with pcl_convert_pcd_ascii_binary <in> <out> 1"
        )
    return to_xyz(np.stack(cols, axis=1), path, "take_xyz")


def _off_faces(body: list[str], nf: int, nv: int, path: Path) -> np.ndarray:
    """(T, 3) vertex indices of the fan-triangulated faces."""
    if len(body) < nf:
        raise PointFileError(f"{path}: header says {nf} faces, the file has {len(body)} face rows")
    tris: list[tuple[int, int, int]] = []
    for i, ln in enumerate(body[:nf]):
        try:
            idx = [int(v) for v in ln.split()]
        except ValueError:
            raise PointFileError(f"{path}: face {i} holds a value that is not a vertex index") from None
        k = idx[0] if idx else 0
        if k < 3 or len(idx) < k + 1:
            raise PointFileError(f"{path}: face {i} is {ln[:40]!r}; a face is 'k i1 … ik' with k >= 3")
        if not all(0 <= v < nv for v in idx[1 : k + 1]):
            raise PointFileError(f"{path}: face {i} names a vertex outside 0…{nv - 1}")
        tris += [(idx[1], idx[1 + j], idx[2 + j]) for j in range(1, k - 1)]  # fan-triangulate polygons
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def read_off(path: Path, extra_columns: str = "take_xyz", surface_points: int = 0) -> np.ndarray:
    """OFF mesh: the vertices, or ``surface_points`` points sampled uniformly on the triangles (seed 0)."""
    lines = [ln.split("#")[0].strip() for ln in _read_text_lines(path)]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise PointFileError(f"{path} holds only comments; an OFF file starts with 'OFF'")
    head = lines[0]
    if not head.upper().startswith("OFF") and not head.upper().startswith("COFF"):
        raise PointFileError(f"{path}: first line is {head[:40]!r}, an OFF file starts with 'OFF'")
    rest = head[head.upper().index("OFF") + 3 :].split()  # ModelNet's 'OFF1234 5678 0' quirk
    body = lines[1:]
    if not rest and body:
        rest, body = body[0].split(), body[1:]
    if len(rest) < 2:
        raise PointFileError(f"{path}: malformed OFF header; expected 'OFF' then 'nv nf ne'")
    nv, nf = _count(rest[0], "the OFF vertex count", path), _count(rest[1], "the OFF face count", path)
    if nv == 0:
        raise PointFileError(f"{path} has no vertices; re-export it or remove it from the dataset")
    if len(body) < nv:
        raise PointFileError(f"{path}: header says {nv} vertices, the file has {len(body)}")
    rows = [ln.split() for ln in body[:nv]]
    verts = to_xyz(_numeric_table(rows, len(rows[0]), path, "OFF vertex"), path, extra_columns)
    if surface_points <= 0 or nf == 0:
        return verts
    tris = _off_faces(body[nv:], nf, nv, path)
    t = verts[tris].astype(np.float64)  # (T, 3 corners, 3)
    area = 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)
    total = float(area.sum())
    if not np.isfinite(total) or total <= 0:
        raise PointFileError(
            f"{path}: its faces have no area (total {total}) to sample {surface_points} points on; "
            "set task.off_points=0 to use the vertices"
        )
    rng = np.random.default_rng(0)
    pick = rng.choice(len(t), size=surface_points, p=area / total)
    u, v = rng.random((2, surface_points, 1))
    flip = (u + v) > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    a, b, c = t[pick, 0], t[pick, 1], t[pick, 2]
    return to_xyz(a + u * (b - a) + v * (c - a), path, "take_xyz")


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}  # fmt: skip


def read_ply(path: Path, extra_columns: str = "take_xyz") -> np.ndarray:
    """PLY ``ascii`` / ``binary_little_endian`` / ``binary_big_endian``: x, y, z of the ``vertex`` element."""
    raw = path.read_bytes()
    if not raw.strip():
        raise PointFileError(f"{path} is empty; re-export it or remove it from the dataset")
    end = raw.find(b"end_header")
    body_start = raw.find(b"\n", end) + 1 if end >= 0 else 0
    if not raw.startswith(b"ply") or end < 0 or body_start == 0:
        raise PointFileError(f"{path}: not a PLY file (it must start with 'ply' and have an 'end_header' line)")
    fmt, elements = "", []  # elements: [name, count, [(prop, type)]]
    for line in raw[:end].decode("ascii", errors="replace").splitlines()[1:]:
        parts = line.split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format" and len(parts) >= 2:
            fmt = parts[1]
        elif parts[0] == "element" and len(parts) >= 3:
            elements.append([parts[1], _count(parts[2], f"the PLY {parts[1]!r} count", path), []])
        elif parts[0] == "property" and elements and len(parts) >= 3:
            if parts[1] == "list":
                elements[-1][2].append((parts[-1], "list"))
            else:
                elements[-1][2].append((parts[2], parts[1]))
        elif parts[0] in ("format", "element", "property"):
            raise PointFileError(f"{path}: malformed PLY header line {line[:60]!r}")
    if not elements or elements[0][0] != "vertex":
        raise PointFileError(f"{path}: the first PLY element must be 'vertex', got {[e[0] for e in elements]}")
    _, nv, props = elements[0]
    names = [p for p, _ in props]
    if nv == 0:
        raise PointFileError(f"{path} has 0 vertices; re-export it or remove it from the dataset")
    if not all(a in names for a in ("x", "y", "z")):
        raise PointFileError(f"{path}: PLY vertex properties are {names}; x, y and z are required")
    if len(set(names)) != len(names):
        raise PointFileError(f"{path}: PLY vertex properties {names} repeat a name")
    if any(t == "list" for _, t in props):
        raise PointFileError(f"{path}: list properties inside 'vertex' are not supported")
    if len(names) > 3:
        if extra_columns == "error":
            to_xyz(np.zeros((1, len(names))), path, "error", names)
        log.warning("%s has vertex properties %s: using x, y, z", path, " ".join(names))
    if fmt == "ascii":
        rows = [r.split() for r in raw[body_start:].decode("ascii", errors="replace").splitlines()[:nv]]
        if len(rows) != nv:
            raise PointFileError(f"{path}: header says {nv} vertices, the ascii PLY body has {len(rows)} rows")
        table = _numeric_table(rows, len(names), path, "ascii PLY vertex")
        cols = [table[:, names.index(a)] for a in ("x", "y", "z")]
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        bo = "<" if fmt == "binary_little_endian" else ">"
        try:
            dt = np.dtype([(p, bo + _PLY_TYPES[t]) for p, t in props])
        except KeyError as e:
            raise PointFileError(f"{path}: unknown PLY property type {e}") from None
        if len(raw) - body_start < nv * dt.itemsize:
            raise PointFileError(
                f"{path}: binary PLY vertex data is truncated ({len(raw) - body_start} bytes for {nv} vertices "
                f"of {dt.itemsize} bytes)"
            )
        rec = np.frombuffer(raw, dtype=dt, count=nv, offset=body_start)
        cols = [rec[a].astype(np.float64) for a in ("x", "y", "z")]
    else:
        raise PointFileError(f"{path}: unknown PLY format {fmt!r} (ascii, binary_little_endian, binary_big_endian)")
    return to_xyz(np.stack(cols, axis=1), path, "take_xyz")


def read_points(path: str | Path, extra_columns: str = "take_xyz", index: int = 0, off_points: int = 0) -> np.ndarray:
    """Read one point cloud as (N, 3) float32 from any supported format.

    Args:
        path: the file; the extension picks the reader.
        extra_columns: ``take_xyz`` (warn and keep the first three columns) or ``error``.
        index: which shape of an HDF5 file.
        off_points: for OFF meshes, sample this many points on the surface (0 = use the vertices).

    Raises:
        PointFileError: the file is missing, unreadable, truncated or corrupt, or holds no usable points; the
            message names the file (and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise PointFileError(f"point file {path} does not exist")
    ext = path.suffix.lower()
    if ext == ".pcd":
        return read_pcd(path, extra_columns)
    if ext == ".off":
        return read_off(path, extra_columns, off_points)
    if ext == ".ply":
        return read_ply(path, extra_columns)
    if ext in (".npy", ".npz"):
        return read_numpy(path, extra_columns)
    if ext in (".h5", ".hdf5"):
        data, _ = read_h5(path, index)
        return to_xyz(data[0], Path(f"{path}[{index}]"), extra_columns)
    raise PointFileError(
        f"{path}: unknown point-cloud extension {ext!r}; supported: {', '.join(POINT_EXTS)} (convert the file)"
    )


# -- preprocessing --------------------------------------------------------------------------------------------
def convert_up_axis(points: np.ndarray, rule: str) -> np.ndarray:
    """``swap_yz``: swap the y and z columns (z-up files → y-up models); ``none``: unchanged."""
    if rule == "none":
        return points
    if rule == "swap_yz":
        return points[:, [0, 2, 1]]
    raise ValueError(f"unknown up-axis rule {rule!r}; known: {', '.join(UP_AXIS_RULES)}")


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Subtract the centroid, divide by the largest point norm (a single point maps to the origin)."""
    centred = points - points.mean(axis=0, keepdims=True)
    scale = float(np.sqrt((centred**2).sum(axis=1)).max())
    return (centred / scale if scale > 0 else centred).astype(np.float32)


def farthest_point_sample(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Indices of ``n`` farthest-point samples, starting from point ``start`` (deterministic)."""
    idx = np.empty(n, dtype=np.int64)
    dist = np.full(len(points), np.inf)
    cur = start
    for i in range(n):
        idx[i] = cur
        dist = np.minimum(dist, ((points - points[cur]) ** 2).sum(axis=1))
        cur = int(np.argmax(dist))
    return idx


def sample_points(
    points: np.ndarray, n: int, rule: str, rng: np.random.Generator, name: str = "point cloud"
) -> np.ndarray:
    """Exactly ``n`` points: ``random`` subset or ``fps``; fewer than ``n`` → resample with replacement (warns)."""
    m = len(points)
    if rule not in SAMPLING_RULES:
        raise ValueError(f"unknown sampling rule {rule!r}; known: {', '.join(SAMPLING_RULES)}")
    if m < n:
        log.warning(
            "%s has %d points, fewer than the %d required: resampling with replacement (duplicated points)", name, m, n
        )
        extra = rng.integers(0, m, size=n - m)
        return points[np.concatenate([np.arange(m), extra])]
    if m == n:
        return points
    if rule == "fps":
        return points[farthest_point_sample(points, n, start=int(rng.integers(0, m)))]
    return points[np.sort(rng.choice(m, size=n, replace=False))]


@dataclass
class PointAugment:
    """Training-time augmentation, written here (no third-party code); up axis is y (column 1) after conversion."""

    scale: tuple[float, float] = (0.8, 1.25)  # uniform anisotropic scale range per axis; (1, 1) disables
    jitter: float = 0.01  # Gaussian jitter sigma (clipped at 5 sigma); 0 disables
    rotate: float = 0.0  # max rotation about the up axis, degrees (180 = any angle); 0 disables
    dropout: float = 0.0  # max fraction of points dropped (replaced by the first point, N stays fixed)
    up: int = 1  # column index of the up axis

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = points.astype(np.float32, copy=True)
        if self.rotate > 0:
            a = math.radians(float(rng.uniform(-self.rotate, self.rotate)))
            c, s = math.cos(a), math.sin(a)
            i, j = [k for k in range(3) if k != self.up]
            r = np.eye(3, dtype=np.float32)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            p = p @ r.T
        if self.scale != (1.0, 1.0):
            p = p * rng.uniform(self.scale[0], self.scale[1], size=(1, 3)).astype(np.float32)
        if self.jitter > 0:
            p = p + np.clip(rng.normal(0, self.jitter, p.shape), -5 * self.jitter, 5 * self.jitter).astype(np.float32)
        if self.dropout > 0:
            frac = float(rng.uniform(0, self.dropout))
            drop = rng.random(len(p)) < frac
            p[drop] = p[0]
        return p


def preprocess_points(
    points: np.ndarray, num_points: int, sampling: str, up_axis: str, rng: np.random.Generator, name: str = ""
) -> np.ndarray:
    """Up-axis conversion → sampling to ``num_points`` → unit sphere: the (num_points, 3) float32 model input."""
    p = convert_up_axis(points, up_axis)
    p = sample_points(p, num_points, sampling, rng, name or "point cloud")
    return normalize_unit_sphere(p)


def eval_rng(index: int = 0) -> np.random.Generator:
    """The fixed generator used for eval/predict sampling (only matters when a file has != num_points points)."""
    return np.random.default_rng(index)
