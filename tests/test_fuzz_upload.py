"""Property-based fuzzing of the dataset-zip upload validator (issue 18, app/uploads.py): random archives with
tricky names, links, special files and corrupted headers; an upload never writes outside its own upload folder.

The properties every fuzzer here checks, and the example counts: see ``tests/surface_support.py``.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from conftest import fuzz_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from surface_support import (
    FUZZ,
    event,
)

from app.catalog import task_views, upload_suffixes
from app.uploads import UploadError, UploadLimits, check_zip, extract_zip

# duplicates are written on purpose (zipfile warns when it writes one)
pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")]


# ================================================================================================================
# 1. the dataset-zip upload validator (app/uploads.py)
# ================================================================================================================
TASKS = sorted(v.name for v in task_views())
OUTSIDE = "{OUTSIDE}"  # replaced per example by an absolute path inside the watched sandbox (never a real system path)
DEPTH = 6  # the upload folder sits this deep inside the watched tree, so '..' chains up to DEPTH are observable

TRICKY_NAMES = [
    "../evil.jpg", "a/../../evil.jpg", "a/b/../../../evil.jpg", "../../../../evil.jpg", "..", "../", "a/..",
    f"{OUTSIDE}/evil.jpg", "/evil.jpg", "//evil.jpg", "\\evil.jpg", "..\\evil.jpg", "a\\..\\..\\evil.jpg",
    "C:\\evil.jpg", "C:evil.jpg", "c:/evil.jpg", "./a.jpg", "a//b.jpg", "a/./b.jpg", "a\\b.jpg", ".",
    "__MACOSX/._a.jpg", "a/.DS_Store", "Thumbs.db", "a/", "a/b.jpg/", "x.jpg\x00.txt", "\x00", "ｘ.jpg", "a/ｃｏｎ.jpg",
    "\u202egpj.exe", "é/ü.png", "日本/画像.jpg", "a b/c d.jpg", "a/b.JPG", "a.jpg.exe", ".jpg", "a/b.tar.gz",
    "inner.zip", "a" * 255 + ".jpg", "a" * 300 + ".jpg", "/".join(["d"] * 200) + "/x.jpg", "a/" + "é" * 130 + ".jpg",
    "a\r\nb.jpg", "a\tb.png", "-rf.jpg", "~/x.jpg", "$HOME/x.jpg", "x.jpg ",
]  # fmt: skip
SEGMENT = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="/"), min_size=1, max_size=12
) | st.sampled_from(["..", ".", "a", "b", "__MACOSX", "._x", ""])
KINDS = ["file"] * 6 + ["dir", "symlink", "fifo", "chardev", "perm_only", "socket"]
COMPRESS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
MUTATIONS = ["none"] * 5 + ["truncate", "flip", "lie_size", "lie_csize", "encrypt", "method", "crc", "dup_cd"]


@st.composite
def entry_names(draw, suffixes: tuple[str, ...]) -> str:
    how = draw(st.integers(0, 4))
    if how == 0:
        return draw(st.sampled_from(TRICKY_NAMES))
    if how == 1:
        return draw(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
    parts = draw(st.lists(SEGMENT, min_size=1, max_size=5))
    sep = draw(st.sampled_from(["/", "/", "/", "\\"]))
    ext = draw(st.sampled_from([*suffixes, *suffixes, ".exe", ".zip", "", ".JPG", ".Png"]))
    return sep.join(parts) + ext


@st.composite
def archives(draw) -> dict:
    """A zip archive spec: task, limits, entries (name, kind, payload, compression) and one raw-byte mutation."""
    task = draw(st.sampled_from(TASKS))
    suffixes = upload_suffixes(task)
    clean = draw(st.integers(0, 2)) == 0  # a third are well-formed archives (they must extract exactly)
    entries = []
    for _ in range(draw(st.integers(0 if not clean else 1, 12))):
        if clean:
            parts = draw(st.lists(st.text(alphabet="abcXYZ_-é 0", min_size=1, max_size=6), min_size=1, max_size=3))
            name = "/".join(p.strip() or "x" for p in parts) + draw(st.sampled_from(suffixes))
            kind = draw(st.sampled_from(["file", "file", "perm_only", "dir"]))
        else:
            name = draw(entry_names(suffixes))
            kind = draw(st.sampled_from(KINDS))
        size = draw(st.sampled_from([0, 1, 17, 600, 5000]))
        payload = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(size)
        payload = draw(st.sampled_from([payload] * 6 + [b"\0" * (3 * 2**20 // 2), b"PK\x03\x04nested"]))
        entries.append((name, kind, payload, draw(st.sampled_from(COMPRESS))))
    if not clean and draw(st.booleans()):  # a duplicate of an earlier entry (same name, other bytes)
        if entries:
            name, kind, _, comp = entries[draw(st.integers(0, len(entries) - 1))]
            entries.append((name, kind, b"second copy", comp))
    if not clean and draw(st.integers(0, 9)) == 0:  # many entries
        entries += [(f"many/m{i}{suffixes[0]}", "file", b"m", zipfile.ZIP_STORED) for i in range(300)]
    limits = UploadLimits(
        max_files=draw(st.sampled_from([3, 50, 20_000, 20_000, 20_000, 20_000])),
        max_total_bytes=draw(st.sampled_from([4000, 2**20, 2 * 2**30, 2 * 2**30])),
        max_ratio=draw(st.sampled_from([3.0, 200.0, 200.0])),
    )
    mutation = "none" if clean else draw(st.sampled_from(MUTATIONS))
    return {"task": task, "entries": entries, "limits": limits, "mutation": mutation,
            "where": draw(st.integers(0, 2**31)), "byte": draw(st.integers(0, 255))}  # fmt: skip


MODES = {"file": stat.S_IFREG | 0o644, "dir": stat.S_IFDIR | 0o755, "symlink": stat.S_IFLNK | 0o777,
         "fifo": stat.S_IFIFO | 0o644, "chardev": stat.S_IFCHR | 0o644, "perm_only": 0o644,
         "socket": stat.S_IFSOCK | 0o644}  # fmt: skip


def _headers(raw: bytes, sig: bytes) -> list[int]:
    out, i = [], raw.find(sig)
    while i >= 0:
        out.append(i)
        i = raw.find(sig, i + 1)
    return out


def _mutate(raw: bytes, spec: dict) -> bytes:
    """One raw-byte mutation of a written archive: truncation, a flipped byte, lying sizes / CRC, the encryption flag,
    an unknown compression method, or a repeated central-directory record."""
    how, where, byte = spec["mutation"], spec["where"], spec["byte"]
    buf = bytearray(raw)
    local, central = _headers(raw, b"PK\x03\x04"), _headers(raw, b"PK\x01\x02")
    if how == "truncate" and raw:
        return raw[: where % len(raw)]
    if how == "flip" and raw:
        buf[where % len(buf)] ^= byte or 1
    elif how in ("lie_size", "lie_csize", "crc", "encrypt", "method") and central:
        c = central[where % len(central)]
        if how in ("lie_size", "lie_csize"):  # central directory: compressed size @20, uncompressed @24
            value = [0, 1, 2**31, 2**32 - 2, byte][where % 5]
            struct.pack_into("<I", buf, c + (24 if how == "lie_size" else 20), value)
        elif how == "crc":
            struct.pack_into("<I", buf, c + 16, where & 0xFFFFFFFF)
        elif how == "encrypt":
            buf[c + 8] |= 1
            for lo in local:
                buf[lo + 6] |= 1
        else:  # an unknown compression method in both headers
            struct.pack_into("<H", buf, c + 10, 99)
            for lo in local:
                struct.pack_into("<H", buf, lo + 8, 99)
    elif how == "dup_cd" and central:
        end = raw.find(b"PK\x05\x06")
        c = central[where % len(central)]
        n, m, k = struct.unpack_from("<HHH", raw, c + 28)
        record = raw[c : c + 46 + n + m + k]
        buf = bytearray(raw[:end] + record + raw[end:])
        e = end + len(record)
        count = struct.unpack_from("<H", buf, e + 10)[0]
        struct.pack_into(
            "<HHI", buf, e + 8, count + 1, count + 1, struct.unpack_from("<I", buf, e + 12)[0] + len(record)
        )
    return bytes(buf)


def _write_archive(path: Path, spec: dict, outside: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, kind, payload, comp in spec["entries"]:
            info = zipfile.ZipInfo(name.replace(OUTSIDE, str(outside)))
            info.external_attr = MODES[kind] << 16 | (0x10 if kind == "dir" else 0)
            info.compress_type = comp
            zf.writestr(info, payload)
    path.write_bytes(_mutate(path.read_bytes(), spec))


def _tree(root: Path) -> dict[str, tuple[str, bytes | None]]:
    """Every path under ``root`` (links not followed) -> (kind, bytes of a small file)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st_ = p.lstat()
            kind = "link" if stat.S_ISLNK(st_.st_mode) else "dir" if stat.S_ISDIR(st_.st_mode) else "file"
            out[str(p.relative_to(root))] = (kind, p.read_bytes() if kind == "file" and st_.st_size < 2**16 else None)
    return out


ZIP_RULES = ["absolute path", "escapes", "longer than", "symlink", "not a regular file", "not read by", "encrypted",
             "compression method", "appears twice", "both a file and a folder", "unpacks to more", "zip bomb",
             "entries; the limit", "holds no", "not a zip archive", "not a readable zip", "cannot be unpacked"]  # fmt: skip


def _rule(message: str) -> str:
    """The rule a refusal names (for hypothesis' event statistics), without the entry name."""
    return next((r for r in ZIP_RULES if r in message), "other: " + message[:40])


@pytest.fixture(scope="module")
def zip_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-zip")


def check_upload(base: Path, spec: dict) -> None:
    """Writes the archive, runs extract_zip, and checks the property (see the module docstring)."""
    top = Path(tempfile.mkdtemp(dir=base))
    try:
        sandbox = top.joinpath(*[f"l{i}" for i in range(DEPTH)])
        (sandbox / "in").mkdir(parents=True)
        (top / "outside").mkdir()
        (top / "outside" / "canary.jpg").write_bytes(b"canary")
        archive = sandbox / "in" / "upload.zip"
        _write_archive(archive, spec, top / "outside")
        uploads = sandbox / "uploads"
        before = _tree(top)
        try:
            root = extract_zip(archive, spec["task"], uploads, spec["limits"])
        except UploadError as e:
            event(f"zip refused: {_rule(str(e))}")
            assert archive.name in str(e), f"the error does not name the archive: {e}"
            after = _tree(top)
            assert {k: v for k, v in after.items() if k != str(uploads.relative_to(top))} == before, (
                f"a refused archive left files behind: {sorted(set(after) - set(before))}"
            )
            assert not uploads.exists() or not any(uploads.iterdir()), "a refused archive left an upload folder"
            return
        event("zip extracted")
        after = _tree(top)
        created = sorted(set(after) - set(before))
        changed = [k for k in before if after.get(k) != before[k]]
        assert not changed, f"extraction changed existing files: {changed}"
        folders = [p for p in uploads.iterdir()]
        assert len(folders) == 1 and folders[0].is_dir(), folders
        dest = folders[0]
        prefix = str(dest.relative_to(top))
        outside = [c for c in created if c != str(uploads.relative_to(top)) and not (c + "/").startswith(prefix + "/")]
        assert not outside, f"extraction wrote outside its upload folder: {outside}"
        assert root == dest or root.parent == dest
        assert all(kind != "link" for kind, _ in after.values()), "extraction created a link"
        kept = check_zip(archive, spec["task"], spec["limits"])  # what the validator accepted
        files = {k[len(prefix) + 1 :]: v for k, v in after.items() if k.startswith(prefix + "/") and v[0] == "file"}
        want = {str(PurePosixPath(i.filename.replace("\\", "/"))) for i in kept}
        assert set(files) == want, (sorted(files), sorted(want))
        if spec["mutation"] == "none":  # the bytes are the archive's (the last of duplicates wins)
            payload = {}
            for name, kind, data, _ in spec["entries"]:
                if kind == "dir":  # a folder entry (by its mode) is not extracted, whatever its name
                    continue
                payload[str(PurePosixPath(name.replace("\\", "/")))] = data
            for name, (_, data) in files.items():
                assert data is None or data == payload[name], name
    finally:
        shutil.rmtree(top, ignore_errors=True)


@settings(max_examples=fuzz_examples(150), **FUZZ)
@given(spec=archives())
def test_fuzz_zip_upload(zip_base: Path, spec: dict) -> None:
    check_upload(zip_base, spec)


# regressions the zip fuzzer found (each input as it was found, shrunk)
@pytest.mark.parametrize(
    ("entries", "mutation", "fragment"),
    [
        # an entry with an empty name: zipfile's ZipInfo.is_dir() raised IndexError
        (
            [("", "file", b"", zipfile.ZIP_STORED), ("a/x.jpg", "file", b"x", zipfile.ZIP_STORED)],
            "none",
            "no extension",
        ),
        # the encryption flag set: zipfile raised RuntimeError ('password required') half-way through extraction
        ([("d/x.jpg", "file", b"x", zipfile.ZIP_STORED)], "encrypt", "is encrypted"),
        # an unknown compression method: NotImplementedError from zipfile.open
        ([("d/x.jpg", "file", b"x", zipfile.ZIP_STORED)], "method", "compression method 99"),
        # a lying CRC: BadZipFile ('Bad CRC-32') from the read loop
        ([("d/x.jpg", "file", b"xyz", zipfile.ZIP_STORED)], "crc", "cannot be unpacked"),
        # a file and a folder of the same path: FileExistsError from mkdir
        (
            [("d/x.jpg", "file", b"x", zipfile.ZIP_STORED), ("d/x.jpg/y.jpg", "file", b"y", zipfile.ZIP_STORED)],
            "none",
            "both a file and a folder",
        ),
        # one file twice ('./' and '//' normalised): the second silently replaced the first
        (
            [("d/x.jpg", "file", b"1", zipfile.ZIP_STORED), ("./d//x.jpg", "file", b"2", zipfile.ZIP_STORED)],
            "none",
            "appears twice",
        ),
        # a 300-character name: OSError 'File name too long' from open
        ([("a" * 300 + ".jpg", "file", b"x", zipfile.ZIP_STORED)], "none", "longer than 255 bytes"),
    ],
)
def test_zip_regressions(zip_base: Path, entries, mutation, fragment) -> None:
    spec = {"task": "classification", "entries": entries, "limits": UploadLimits(), "mutation": mutation,
            "where": 0, "byte": 1}  # fmt: skip
    top = Path(tempfile.mkdtemp(dir=zip_base))
    archive = top / "upload.zip"
    _write_archive(archive, spec, top)
    with pytest.raises(UploadError, match=fragment) as err:
        extract_zip(archive, "classification", top / "uploads")
    assert "upload.zip" in str(err.value)
    assert not (top / "uploads").exists() or not any((top / "uploads").iterdir())
    check_upload(zip_base, spec)


def test_zip_backslash_names_extract_as_folders(zip_base: Path) -> None:
    """An archive made on Windows ('A\\x.jpg'): the validator read backslashes as separators but extraction wrote
    a file literally named 'A\\x.jpg' in the upload root (found by the fuzzer: the class folders were lost)."""
    top = Path(tempfile.mkdtemp(dir=zip_base))
    spec = {"task": "classification", "entries": [("d\\A\\x.jpg", "file", b"x", 0), ("d\\B\\y.jpg", "file", b"y", 0)],
            "limits": UploadLimits(), "mutation": "none", "where": 0, "byte": 0}  # fmt: skip
    _write_archive(top / "w.zip", spec, top)
    root = extract_zip(top / "w.zip", "classification", top / "uploads")
    assert root.name == "d" and sorted(p.name for p in root.iterdir()) == ["A", "B"]
    assert (root / "A" / "x.jpg").read_bytes() == b"x"
