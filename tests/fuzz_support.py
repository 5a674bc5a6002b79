"""What the input fuzzers (tests/test_fuzz_points.py, _images.py, _recipes.py) share: the
hypothesis settings, the SIGALRM watchdog, a scratch folder per example, outcome counting, and the byte
builders of valid point files (PCD, PLY, OFF, NPY, NPZ, HDF5) and the byte-level ``mutation`` strategy.

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
import signal
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from hypothesis import HealthCheck, event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

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
