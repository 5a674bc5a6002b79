"""Property-based fuzzing of the surfaces that take hostile input (issue 18): the dataset-zip upload validator, the
bundle manifest and adapter-pack loaders, and the HTTP endpoints of a real ``python -m vision_peft serve`` process
(also under concurrent requests while adapters are added and removed).

The properties: only the documented error type, with a message naming the input (``UploadError`` naming the archive,
``ValueError`` / ``FileNotFoundError`` / ``AdapterFileError`` naming the bundle file), never another exception; an
upload never writes outside its own upload folder; every HTTP answer is a 2xx or a 4xx with a JSON ``detail``, never
a 5xx, a traceback or a hang, and the server process still answers ``/health`` afterwards.

Example counts are bounded (``fuzz_examples(n)``; ``pytest --fuzz-long`` multiplies them by 50).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from conftest import build_tiny_pack, fuzz_examples
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import event as _hypothesis_event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from app.catalog import task_views, upload_suffixes
from app.uploads import UploadError, UploadLimits, check_zip, extract_zip
from vision_peft.packfile import AdapterFileError

REPO = Path(__file__).resolve().parent.parent
# duplicates are written on purpose (zipfile warns when it writes one)
pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")]
# no database (nothing written under .hypothesis/), no explain phase (it re-runs failures for minutes)
FUZZ = {"deadline": None, "database": None, "phases": (Phase.explicit, Phase.generate, Phase.shrink)}


def event(label: str) -> None:
    """hypothesis' event statistics (``--hypothesis-show-statistics``); a no-op in the plain regression tests."""
    if currently_in_test_context():
        _hypothesis_event(label)


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


# ================================================================================================================
# 2. the bundle manifest loader and the adapter-pack loader (vision_peft/bundle.py, deploy.py, packfile.py,
#    deploy_pack.py), on a real pack and a real merged bundle exported by the project itself
# ================================================================================================================
RUNS = {"a": ("alpha", "beta"), "b": ("p", "q", "r")}
EXTRA = ("u", "v", "w")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """A pack of two tiny runs (timm:test_vit 32², LoRA r=2, 2 steps), the merged bundle of run a, and the file pair
    of a third run exported for the pack (to add at run time): built once per module (~10 s on one CPU)."""
    root = tmp_path_factory.mktemp("fuzz-pack")
    runs, _ = build_tiny_pack(root, RUNS, EXTRA)
    images = sorted(p for p in (root / "data-a").rglob("*") if p.suffix in (".jpg", ".png"))[:2]
    return {"root": root, "pack": root / "pack", "merged": root / "merged", "runs": runs, "images": images,
            "extra": (root / "extra" / "d.onnx_adapter", root / "extra" / "d.adapter.json")}  # fmt: skip


JSON_LEAF = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["", "../../x", "/etc/passwd", "model.onnx", "a" * 5000, "vision_peft.bundle/2", "batch",
                       "tensor(float)", "float64", "int8", "classes", 10**30, -1, 0, 2**63, [], {}])
)  # fmt: skip
JSON_VALUE = st.recursive(
    JSON_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=5
)
TREE_OPS = ["delete", "retype", "retype", "rename", "add", "huge", "shape", "dtype"]


def mutate_tree(data, tree):
    """One mutation somewhere in a JSON tree (a random walk from the root, stopping at any level): a key or item
    removed, retyped, renamed or added, a number made huge, a shape or dtype changed. Returns the new tree."""
    tree = json.loads(json.dumps(tree))
    if not isinstance(tree, dict) or not tree:  # an earlier mutation replaced the whole tree
        return data.draw(JSON_VALUE, label="root")
    parent, key, node = None, None, tree
    while isinstance(node, (dict, list)) and node and data.draw(st.integers(0, 3), label="descend") > 0:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        k = data.draw(st.sampled_from(keys), label="key")
        parent, key, node = node, k, node[k]
    op = data.draw(st.sampled_from(TREE_OPS), label="op")
    if parent is None:  # the root itself
        if op in ("retype",):
            return data.draw(JSON_VALUE, label="root")
        parent, key = tree, data.draw(st.sampled_from(list(tree) or ["format"]), label="rootkey")
        node = parent.get(key)
    if op == "delete":
        if isinstance(parent, dict):
            parent.pop(key, None)
        elif parent:
            parent.pop(key)
    elif op == "rename" and isinstance(parent, dict):
        parent[f"{key}_x"] = parent.pop(key)
    elif op == "add":
        target = node if isinstance(node, (dict, list)) else parent
        value = data.draw(JSON_VALUE, label="added")
        if isinstance(target, dict):
            target[data.draw(st.text(max_size=8), label="newkey")] = value
        else:
            target.append(value)
    elif op == "huge":
        parent[key] = data.draw(st.sampled_from([10**30, 2**63, -(2**63), 1e308, float("inf"), float("nan"), -1]))
    elif op == "shape":
        parent[key] = data.draw(st.sampled_from([[], [0], [-1], [2**40, 2], ["batch"], [None], [1, 2, 3, 4, 5, 6]]))
    elif op == "dtype":
        parent[key] = data.draw(st.sampled_from(["float64", "int64", "bool", "tensor(float)", "complex128", "?"]))
    else:
        parent[key] = data.draw(JSON_VALUE, label="value")
    return tree


RAW_OPS = ["truncate", "bad_utf8", "deep", "not_object", "empty", "bom", "dup_keys"]


def raw_mutation(data, text: str) -> bytes:
    """A mutation of the JSON text itself: truncated, invalid UTF-8, nested too deep for the parser, a JSON value
    that is not an object, empty, a byte-order mark, or a repeated key."""
    op = data.draw(st.sampled_from(RAW_OPS), label="raw")
    raw = text.encode()
    if op == "truncate":
        return raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="cut")]
    if op == "bad_utf8":
        at = data.draw(st.integers(0, len(raw)), label="at")
        return raw[:at] + b"\xff\xfe\xc3" + raw[at:]
    if op == "deep":
        n = data.draw(st.sampled_from([1000, 100_000]), label="depth")
        return b'{"format": ' + b"[" * n + b"]" * n + b"}"
    if op == "not_object":
        return data.draw(st.sampled_from([b"[]", b"null", b"42", b'"manifest"', b"NaN"]), label="json")
    if op == "empty":
        return b""
    if op == "bom":
        return b"\xef\xbb\xbf" + raw
    return raw[:-2] + b', "format": "vision_peft.bundle/9"}\n'


ALLOWED = (ValueError, FileNotFoundError)  # the loaders' documented errors (AdapterFileError is a ValueError)


def _copy(src: Path, base: Path) -> Path:
    dst = Path(tempfile.mkdtemp(dir=base)) / src.name
    shutil.copytree(src, dst)
    return dst


def _rehash(folder: Path) -> None:
    """Recompute the manifest's sha256 of every file it lists (so that mutations reach the checks past the hashes)."""
    from vision_peft.bundle import sha256_file

    path = folder / "manifest.json"
    try:
        man = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return
    if isinstance(man, dict) and isinstance(man.get("files"), dict):
        for name in list(man["files"]):
            f = folder / str(name)
            if isinstance(name, str) and ".." not in name and not name.startswith("/") and f.is_file():
                man["files"][name] = sha256_file(f)
        path.write_text(json.dumps(man))


def check_load(folder: Path, verify: bool, images: list[Path]) -> None:
    """The loader property: load_bundle raises a documented error naming the bundle folder, or loads a bundle whose
    every adapter classifies an image (or refuses with a ValueError naming the folder)."""
    from vision_peft.deploy import load_bundle

    try:
        bundle = load_bundle(folder, device="cpu", verify=verify)
    except ALLOWED as e:
        event(f"load refused: {type(e).__name__}")
        assert str(folder) in str(e), f"the error does not name the bundle folder: {type(e).__name__}: {e}"
        return
    event("load accepted")
    for name in bundle.adapters or [None]:
        try:
            res = bundle.select(name).classify([str(images[0])])
        except ValueError as e:
            event("classify refused")
            assert str(folder) in str(e), f"the error does not name the bundle folder: {e}"
            continue
        assert len(res) == 1 and isinstance(res[0]["label"], str), res


@pytest.fixture(scope="module")
def load_base(artifacts) -> Path:
    base = artifacts["root"] / "fuzz-load"
    base.mkdir()
    return base


@settings(max_examples=fuzz_examples(40), **FUZZ)
@given(data=st.data(), which=st.sampled_from(["pack", "merged"]), raw=st.integers(0, 5), rehash=st.booleans(),
       verify=st.booleans())  # fmt: skip
def test_fuzz_manifest(artifacts, load_base, data, which, raw, rehash, verify) -> None:
    """A real bundle's manifest.json mutated (fields removed, retyped, renamed, added; shapes, dtypes, hashes, huge
    numbers, unknown formats; raw text damage): load_bundle refuses with ValueError / FileNotFoundError naming the
    bundle, or loads a bundle that classifies."""
    folder = _copy(artifacts[which], load_base)
    try:
        text = (folder / "manifest.json").read_text()
        if raw == 0:
            (folder / "manifest.json").write_bytes(raw_mutation(data, text))
        else:
            tree = json.loads(text)
            for _ in range(data.draw(st.integers(1, 3), label="n_mutations")):
                tree = mutate_tree(data, tree)
            (folder / "manifest.json").write_text(json.dumps(tree))
            if rehash:
                _rehash(folder)
        check_load(folder, verify, artifacts["images"])
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def _tensor_mutation(data, path: Path) -> None:
    """Damage an .onnx_adapter: truncated, a flipped byte, or rewritten with a tensor of another shape or dtype,
    one dropped, renamed or added, NaN values."""
    from vision_peft import packfile

    op = data.draw(st.sampled_from(["truncate", "flip", "shape", "dtype", "drop", "rename", "add", "nan", "empty"]))
    raw = path.read_bytes()
    if op == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")])
        return
    if op == "flip":
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        path.write_bytes(raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255), label="xor")]) + raw[at + 1 :])
        return
    if op == "empty":
        path.write_bytes(b"")
        return
    tensors = packfile.read_tensors(path)
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    if op == "shape":
        tensors[name] = np.zeros(data.draw(st.sampled_from([(0,), (1,), (3, 3), (2, 64, 1), (5, 64)])), np.float32)
    elif op == "dtype":
        tensors[name] = tensors[name].astype(data.draw(st.sampled_from([np.float64, np.float16, np.int64, np.int8])))
    elif op == "drop":
        del tensors[name]
    elif op == "rename":
        tensors[name + ".x"] = tensors.pop(name)
    elif op == "add":
        tensors["extra.weight"] = np.ones((2, 2), np.float32)
    else:
        tensors[name] = np.full_like(tensors[name], np.nan)
    path.unlink()
    packfile.write_tensors(path, tensors)


@settings(max_examples=fuzz_examples(30), **FUZZ)
@given(data=st.data(), target=st.sampled_from(["meta", "meta", "tensors"]), raw=st.integers(0, 5),
       rehash=st.booleans(), verify=st.booleans())  # fmt: skip
def test_fuzz_pack_files(artifacts, load_base, data, target, raw, rehash, verify) -> None:
    """A real pack's adapter pair damaged (the .adapter.json mutated like a manifest; the .onnx_adapter truncated,
    flipped, or with wrong shapes / dtypes / names): load_bundle refuses with a documented error naming the pack,
    or loads a pack whose adapters classify."""
    folder = _copy(artifacts["pack"], load_base)
    try:
        adapter = data.draw(st.sampled_from(sorted(RUNS)), label="adapter")
        if target == "tensors":
            _tensor_mutation(data, folder / f"{adapter}.onnx_adapter")
        else:
            meta = folder / f"{adapter}.adapter.json"
            if raw == 0:
                meta.write_bytes(raw_mutation(data, meta.read_text()))
            else:
                meta.write_text(json.dumps(mutate_tree(data, json.loads(meta.read_text()))))
        if rehash:
            _rehash(folder)
        check_load(folder, verify, artifacts["images"])
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


DEEP = b'{"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # deeper than json's recursion limit


@pytest.mark.parametrize(
    ("which", "file", "content", "error", "fragment"),
    [
        # found by test_fuzz_manifest: RecursionError escaped read_manifest
        ("merged", "manifest.json", DEEP, ValueError, "is not valid JSON"),
        # found by test_fuzz_manifest: UnicodeDecodeError without the file's name
        ("pack", "manifest.json", b"\xff\xfe\xc3{}", ValueError, "manifest.json is not UTF-8 text"),
        # found by test_fuzz_pack_files: RecursionError escaped packfile.read_meta
        ("pack", "a.adapter.json", DEEP, AdapterFileError, "a.adapter.json is not valid JSON"),
    ],
)
def test_loader_regressions(artifacts, load_base, which, file, content, error, fragment) -> None:
    folder = _copy(artifacts[which], load_base)
    (folder / file).write_bytes(content)
    from vision_peft.deploy import load_bundle

    with pytest.raises(error, match=fragment) as err:
        load_bundle(folder, device="cpu", verify=False)
    assert str(folder) in str(err.value)


def _edit_json(path: Path, edit) -> None:
    tree = json.loads(path.read_text())
    edit(tree)
    path.write_text(json.dumps(tree))


@pytest.mark.parametrize(
    ("which", "file", "edit", "fragment"),
    [
        # found by test_fuzz_manifest: 'preprocess' retyped to a number -> TypeError in Bundle.preprocess and in
        # packfile.preprocess_conflict
        ("merged", "manifest.json", lambda m: m.update(preprocess=10**30), "field 'preprocess' must be a dict"),
        ("pack", "manifest.json", lambda m: m.update(preprocess=10**30), "field 'preprocess' must be a dict"),
        # found by test_fuzz_manifest: preprocess['image'] retyped to a string -> ValueError from dict() without
        # the file's name
        ("merged", "manifest.json", lambda m: m["preprocess"].update(image="float64"), "spec object"),
        # found by test_fuzz_pack_files: preprocess['image'] a number in an adapter record -> AttributeError
        ("pack", "a.adapter.json", lambda m: m["preprocess"].update(image=10**30), "spec object"),
        # found by test_fuzz_pack_files: scale None / interpolation [] -> TypeError from validate_spec at classify
        ("pack", "a.adapter.json", lambda m: m["preprocess"]["image"].update(scale=None), "preprocess['image']"),
        ("pack", "a.adapter.json", lambda m: m["preprocess"]["image"].update(interpolation=[]), "preprocess['image']"),
        ("merged", "manifest.json", lambda m: m["preprocess"]["image"].update(mean=None), "preprocess['image']"),
        # a size that validates but would allocate terabytes at resize
        ("merged", "manifest.json", lambda m: m["preprocess"]["image"].update(size=[2**40, 2]), "exceeds"),
        # found by test_fuzz_manifest (--fuzz-long): a label removed -> the width error did not name the bundle
        ("merged", "manifest.json", lambda m: m.update(labels=["alpha"]), "but the manifest lists 1 labels"),
        # found by test_fuzz_pack_files: the record's name retyped -> AdapterFileError without the file's name
        ("pack", "b.adapter.json", lambda m: m.update(name="tensor(float)"), "b.adapter.json: field 'name'"),
    ],
)
def test_manifest_field_regressions(artifacts, load_base, which, file, edit, fragment) -> None:
    """Each refused with a ValueError naming the bundle (at load, or at the first request for a spec value)."""
    from vision_peft.deploy import load_bundle

    folder = _copy(artifacts[which], load_base)
    _edit_json(folder / file, edit)
    with pytest.raises(ValueError, match=re.escape(fragment)) as err:
        bundle = load_bundle(folder, device="cpu", verify=False)
        bundle.select("a" if which == "pack" else None).classify([str(artifacts["images"][0])])
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("record", [[], None, 3, ["a"]])
def test_add_adapter_record_not_an_object(artifacts, loaded_pack, record) -> None:
    """Found by test_fuzz_add_adapter: a record that is no JSON object reached Path(record) (TypeError for None,
    a misleading 'adapter record . does not exist' for "")."""
    with pytest.raises(AdapterFileError, match="must be a JSON object") as err:
        loaded_pack.add_adapter(artifacts["extra"][0], record)
    assert str(artifacts["extra"][0]) in str(err.value)
    assert loaded_pack.adapters == sorted(RUNS)


@pytest.fixture(scope="module")
def loaded_pack(artifacts):
    from vision_peft.deploy import load_bundle

    return load_bundle(artifacts["pack"], device="cpu")


@settings(max_examples=fuzz_examples(30), **FUZZ,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(data=st.data(), target=st.sampled_from(["meta", "meta", "tensors"]), name=st.none() | st.text(max_size=70))
def test_fuzz_add_adapter(artifacts, load_base, loaded_pack, data, target, name) -> None:
    """Bundle.add_adapter (what POST /v1/adapters calls) with a damaged pair: AdapterFileError / ValueError naming
    the file or the name, or the adapter is added, classifies, and can be removed again; the pack keeps its own."""
    from vision_peft import packfile

    tensor_src, meta_src = artifacts["extra"]
    work = Path(tempfile.mkdtemp(dir=load_base))
    try:
        tensor_file = work / tensor_src.name
        shutil.copy(tensor_src, tensor_file)
        meta = json.loads(meta_src.read_text())
        if target == "tensors":
            _tensor_mutation(data, tensor_file)
        else:
            meta = mutate_tree(data, meta)
            meta = [meta] if isinstance(meta, str) else meta  # a str would be read as the record's path
        try:
            added = loaded_pack.add_adapter(tensor_file, meta, name=name)
        except ValueError as e:
            event(f"add refused: {type(e).__name__}")
            msg = str(e)
            assert (
                str(tensor_file) in msg
                or "adapter name" in msg
                or "already has an adapter" in msg
                or (isinstance(e, packfile.AdapterFileError) and str(tensor_file) in msg)
            ), f"the error names neither the file nor the name: {type(e).__name__}: {e}"
        else:
            event("add accepted")
            try:
                res = loaded_pack.classify([str(artifacts["images"][0])], adapter=added)
                assert len(res) == 1 and isinstance(res[0]["label"], str)
            except ValueError as e:
                assert added in str(e) or str(artifacts["pack"]) in str(e), e
            finally:
                loaded_pack.remove_adapter(added)
        assert loaded_pack.adapters == sorted(RUNS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ================================================================================================================
# 3. the HTTP endpoints of a real `python -m vision_peft serve` process (the pack above)
# ================================================================================================================
HTTP_TIMEOUT = 30.0  # seconds per request: an answer later than this is a hang
PATHS = ["/health", "/info", "/v1/classify", "/v1/classify", "/v1/classify", "/v1/fewshot", "/v1/points",
         "/v1/segment", "/v1/generate", "/v1/adapters", "/v1/adapters", "/v1/adapters/zz", "/v1/adapters/%2e%2e",
         "/v1/adapters/..%2f..%2fetc", "/v1/adapters/" + "x" * 3000, "/", "/docs", "/openapi.json", "/v1/",
         "/v1/classify/", "/v1/classify%00", "/%ff%fe", "/v1/clas sify", "/" + "a/" * 500, "/v1/ädäpters"]  # fmt: skip
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
FIELDS = ["files", "files", "file", "meta", "name", "support", "query", "support_labels", "phrase", "adapter", "top_k"]
CTYPES = ["image/jpeg", "image/png", "application/octet-stream", "application/json", "text/plain", "", "x/y",
          "multipart/form-data", "image/jpeg; charset=utf-8", "\u00e9/\u00e8", None]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(artifacts):
    """A real server process over the pack (``python -m vision_peft serve``), shared by the module; its stderr is
    kept in a file so that the tests can check it never logged a traceback."""
    import httpx

    port = _free_port()
    log = artifacts["root"] / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vision_peft", "serve", str(artifacts["pack"]), "--port", str(port),
             "--device", "cpu"],
            env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=artifacts["root"],
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=HTTP_TIMEOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield {"proc": proc, "client": client, "base": base, "log": log, "port": port}
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _image_bytes(artifacts, which: int) -> bytes:
    return artifacts["images"][which % len(artifacts["images"])].read_bytes()


@st.composite
def payloads(draw, artifacts) -> bytes:
    kind = draw(st.sampled_from(["image", "image", "truncated", "random", "empty", "json", "adapter", "meta", "big",
                                 "png_bomb"]))  # fmt: skip
    if kind == "image":
        return _image_bytes(artifacts, draw(st.integers(0, 9)))
    if kind == "truncated":
        raw = _image_bytes(artifacts, 0)
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return b""
    if kind == "json":
        return json.dumps(draw(JSON_VALUE)).encode()
    if kind == "adapter":
        return artifacts["extra"][0].read_bytes()
    if kind == "meta":
        return json.dumps(mutate_tree(draw(st.data()), json.loads(artifacts["extra"][1].read_text()))).encode()
    if kind == "big":
        return b"\xff\xd8" + b"\0" * (10 * 2**20 + 10)  # just over the server's per-file limit
    return _png_bomb()


@functools.cache
def _png_bomb() -> bytes:
    """A decompression bomb: a small PNG that decodes to 400 megapixels (built once)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def requests_(draw, artifacts) -> dict:
    """One HTTP request: method, path, query, and a body that is empty, raw bytes with a content type, a JSON value,
    a well- or ill-formed multipart form (random fields, file names, part types and contents)."""
    method = draw(st.sampled_from(["POST"] * 12 + METHODS))
    target = draw(st.integers(0, 9))
    if target < 5:
        path = "/v1/classify"
    elif target < 7:
        path = "/v1/adapters" if draw(st.integers(0, 3)) else f"/v1/adapters/{draw(st.text(max_size=12))}"
    elif target < 9:
        path = draw(st.sampled_from(PATHS))
    else:
        path = "/" + draw(st.text(alphabet=st.characters(codec="ascii", min_codepoint=33), max_size=30))
        path = path.replace("?", "").replace("#", "")
    if method == "DELETE" and path.rstrip("/") in ("/v1/adapters/a", "/v1/adapters/b"):
        path = "/v1/adapters/zz"  # the pack's own adapters stay (the concurrency test removes and restores them)
    params = {}
    for key in draw(st.lists(st.sampled_from(["adapter", "top_k", "x", "adapter"]), max_size=3)):
        params[key] = draw(st.sampled_from(["a", "b", "zz", "", "0", "-1", "99", "1e9", "nan", "ä", "../a", "1"])
                           | st.text(max_size=20))  # fmt: skip
    body = draw(st.sampled_from(["none", "raw", "json", "multipart", "multipart", "multipart", "broken_multipart"]))
    if path == "/v1/classify" and draw(st.booleans()):
        body = "classify_form"  # the endpoint's own field with mostly real images: reaches the runtime
    elif path == "/v1/adapters" and draw(st.booleans()):
        body = "adapter_form"  # the upload's own fields: a real or damaged pair
    if body in ("classify_form", "adapter_form"):
        method = "POST"
    req = {"method": method, "path": path, "params": params, "body": body}
    if body == "classify_form":
        parts = []
        for _ in range(draw(st.integers(1, 4))):
            payload = (
                _image_bytes(artifacts, draw(st.integers(0, 9)))
                if draw(st.integers(0, 2))
                else draw(payloads(artifacts))
            )
            names = st.sampled_from(["x.jpg"] * 4 + ["x.png", "", "../x.jpg", "é.png"]) | st.text(max_size=20)
            ctype = draw(st.sampled_from(["image/jpeg"] * 4 + ["image/png", "text/plain"]))
            parts.append(("files", (draw(names), payload, ctype)))
        req["files"], req["data"], req["body"] = parts, {}, "multipart"
        if draw(st.integers(0, 3)):
            params["adapter"] = draw(st.sampled_from(sorted(RUNS)))
    elif body == "adapter_form":
        tensor = artifacts["extra"][0].read_bytes()
        if draw(st.booleans()):
            tensor = tensor[: draw(st.integers(0, len(tensor)))]
        meta = json.loads(artifacts["extra"][1].read_text())
        meta = mutate_tree(draw(st.data()), meta) if draw(st.booleans()) else meta
        req["files"] = [("file", ("d.onnx_adapter", tensor, "application/octet-stream")),
                        ("meta", ("d.adapter.json", json.dumps(meta).encode(), "application/json"))]  # fmt: skip
        req["data"] = {"name": draw(st.text(max_size=12))} if draw(st.booleans()) else {}
        req["body"] = "multipart"
    if body == "raw":
        req["content"] = draw(payloads(artifacts))
        ctype = draw(st.sampled_from([c for c in CTYPES if c] + ["multipart/form-data; boundary=x"]))
        req["headers"] = {"content-type": ctype.encode()}  # bytes: httpx sends them as they are (UTF-8 too)
    elif body == "json":  # serialised here: NaN / Infinity go out as the literals httpx's own encoder refuses
        req["headers"] = {"content-type": b"application/json"}
        value = draw(JSON_VALUE | st.fixed_dictionaries({"classes": JSON_VALUE, "n": JSON_VALUE, "steps": JSON_VALUE}))
        req["content"] = json.dumps(value).encode()
    elif body == "multipart":
        files, data = [], {}
        for _ in range(draw(st.integers(0, 5))):
            field = draw(st.sampled_from(FIELDS) | st.text(max_size=10))
            if draw(st.integers(0, 3)) == 0:
                data[field] = draw(st.text(max_size=30))
                continue
            fname = draw(
                st.sampled_from(
                    [
                        "x.jpg",
                        "x.png",
                        "../../etc/passwd",
                        "",
                        "a" * 1000 + ".jpg",
                        "é.jpg",
                        "x.onnx_adapter",
                        "x.adapter.json",
                        "x",
                    ]
                )
                | st.text(max_size=20)
            )
            ctype = draw(st.sampled_from(CTYPES))
            part = (fname, draw(payloads(artifacts))) if ctype is None else (fname, draw(payloads(artifacts)), ctype)
            files.append((field, part))
        if draw(st.integers(0, 9)) == 0:  # more files than the server's limit (32)
            files += [("files", (f"{i}.jpg", _image_bytes(artifacts, i), "image/jpeg")) for i in range(33)]
        req["files"], req["data"] = files, data
    elif body == "broken_multipart":
        boundary = draw(st.sampled_from(["b", "", "x" * 200, "é"]))
        req["headers"] = {"content-type": f"multipart/form-data; boundary={boundary}".encode()}
        good = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n'
        req["content"] = draw(
            st.sampled_from(
                [good, good + _image_bytes(artifacts, 0)[:100], b"--b--", b"--b\r\n\r\n--b--\r\n", b"garbage"]
            )
            | st.binary(max_size=200)
        )
    return req


def _answer_ok(r, req: dict) -> None:
    """Every answer: not a 5xx, no traceback text, and a 4xx carries a JSON 'detail'."""
    text = r.text if req["method"] != "HEAD" else ""
    assert r.status_code < 500, f"{r.status_code} for {req['method']} {req['path']}: {text[:500]}"
    assert "Traceback" not in text and 'File "/' not in text, text[:800]
    if 400 <= r.status_code < 500 and req["method"] != "HEAD":
        body = r.json()
        assert isinstance(body, dict) and "detail" in body, text[:300]


def _server_alive(server) -> None:
    assert server["proc"].poll() is None, "the server process died: " + server["log"].read_text()[-3000:]
    assert server["client"].get("/health").json()["status"] == "ok"


def _cleanup_added(server) -> None:
    """Remove adapters a fuzzed POST /v1/adapters added (the pack's own a and b stay)."""
    for rec in server["client"].get("/v1/adapters").json()["adapters"]:
        if rec["name"] not in RUNS:
            server["client"].delete(f"/v1/adapters/{rec['name']}")


@settings(max_examples=fuzz_examples(120), **FUZZ, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data())
def test_fuzz_http(artifacts, server, data) -> None:
    """Random methods, paths, queries and bodies against the real server: a 2xx or a 4xx with a JSON error, within
    HTTP_TIMEOUT, and the process answers /health afterwards."""
    import httpx

    req = data.draw(requests_(artifacts), label="request")
    kwargs = {k: req[k] for k in ("params", "headers", "content", "json", "files", "data") if req.get(k) is not None}
    if not kwargs.get("files"):
        kwargs.pop("files", None)
        if not kwargs.get("data"):
            kwargs.pop("data", None)
    try:
        r = server["client"].request(req["method"], req["path"], **kwargs)
    except httpx.TimeoutException:
        pytest.fail(f"no answer within {HTTP_TIMEOUT} s (a hang): {req['method']} {req['path']}")
    except httpx.InvalidURL:
        event("http: URL refused by the client")
        return
    event(f"http {r.status_code}")
    _answer_ok(r, req)
    _server_alive(server)
    if req["path"].startswith("/v1/adapters") and r.status_code == 201:
        _cleanup_added(server)


def test_http_adapter_meta_nested_too_deep(artifacts, server) -> None:
    """POST /v1/adapters with an .adapter.json nested deeper than json's recursion limit: a RecursionError in the
    server's json.loads was a 500 (the meta part of a multipart upload, found by the loader fuzzing above)."""
    tensor_file = artifacts["extra"][0]
    files = {"file": (tensor_file.name, tensor_file.read_bytes(), "application/octet-stream"),
             "meta": ("deep.adapter.json", DEEP, "application/json")}  # fmt: skip
    r = server["client"].post("/v1/adapters", files=files)
    assert r.status_code == 415 and "meta (deep.adapter.json): not a JSON adapter record" in r.json()["detail"], r.text
    _server_alive(server)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (b"image/jpeg", b"\x08\x00\x00\x00TORT\xb8\xc7\xff\xff"),  # non-UTF-8 bytes echoed in the 422 -> 500
        (b"text/plain", b"\xb8\xc7"),
        (b"application/json", b"NaN"),  # a NaN echoed in the 422 -> 'Out of range float values' -> 500
        (b"application/json", b'{"classes": ["a"], "n": 1e400}'),  # infinity, the same
    ],
)
def test_http_validation_errors_with_unencodable_input(server, content_type, body) -> None:
    """Found by test_fuzz_http: FastAPI's own validation handler answered 500 (and logged a traceback) when the
    rejected body could not be encoded back into its JSON error (POST /v1/generate, the JSON endpoint)."""
    r = server["client"].post("/v1/generate", content=body, headers={"content-type": content_type})
    assert r.status_code == 422 and isinstance(r.json()["detail"], list), r.text
    _server_alive(server)


def test_http_raw_socket_abuse(server) -> None:
    """Requests httpx will not send: a body shorter than its Content-Length (then the client hangs up), a header line
    of 100 kB, a non-HTTP greeting, a request line of garbage; the server keeps answering /health."""
    cases = [
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,  # a TLS ClientHello
        b"\xff\xfe garbage \r\n\r\n",
        b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\nzz\r\n",
    ]
    for raw in cases:
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            try:
                answer = s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 5"), answer[:300]
        _server_alive(server)


# ================================================================================================================
# 4. concurrency: the real server under concurrent requests while adapters are added and removed at run time
# ================================================================================================================
def _upload_pair(tensor_file: Path, meta_file: Path, name: str | None = None) -> dict:
    out = {"files": {"file": (tensor_file.name, tensor_file.read_bytes(), "application/octet-stream"),
                     "meta": (meta_file.name, meta_file.read_bytes(), "application/json")}}  # fmt: skip
    if name is not None:
        out["data"] = {"name": name}
    return out


@settings(max_examples=fuzz_examples(3), **FUZZ, suppress_health_check=[HealthCheck.too_slow])
@given(workers=st.integers(2, 6), per_worker=st.integers(4, 10), cycles=st.integers(1, 3), seed=st.integers(0, 99))
def test_concurrent_requests_while_adapters_change(artifacts, server, workers, per_worker, cycles, seed) -> None:
    """Worker threads (own connections) classify with adapters a, b, d (and a bad name) while an admin thread adds
    d, removes b, re-uploads b's own pair and removes d, ``cycles`` times: no 5xx; every 200 carries the adapter asked
    for, its labels and its probabilities (from a torch-free reference load); a always answers 200, b and d 200 or
    404 (removed at that moment), the bad name 404; the admin's calls all succeed; the pack ends as it started."""
    import httpx

    from vision_peft.deploy import load_bundle

    ref = load_bundle(artifacts["pack"], device="cpu")
    ref.add_adapter(*artifacts["extra"])
    image = artifacts["images"][0]
    want = {n: ref.classify([str(image)], adapter=n)[0]["probs"] for n in [*RUNS, "d"]}
    labels = {**RUNS, "d": EXTRA}
    pack = artifacts["pack"]
    answers: list[tuple[str, int, dict]] = []
    admin: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(workers + 1)
    rng = np.random.default_rng(seed)
    plans = [[["a", "b", "d", "a", "zz"][int(k)] for k in rng.integers(0, 5, per_worker)] for _ in range(workers)]
    files = [("files", (image.name, image.read_bytes(), "image/png" if image.suffix == ".png" else "image/jpeg"))]

    def worker(plan: list[str]) -> None:
        with httpx.Client(base_url=server["base"], timeout=HTTP_TIMEOUT) as c:
            start.wait()
            for name in plan:
                r = c.post("/v1/classify", files=files, params={"adapter": name, "top_k": 2})
                with lock:
                    answers.append((name, r.status_code, r.json() if r.status_code != 500 else {"text": r.text}))

    def administrator() -> None:
        with httpx.Client(base_url=server["base"], timeout=HTTP_TIMEOUT) as c:
            start.wait()
            for _ in range(cycles):
                steps = [("add d", lambda: c.post("/v1/adapters", **_upload_pair(*artifacts["extra"]))),
                         ("remove b", lambda: c.delete("/v1/adapters/b")),
                         ("add b", lambda: c.post("/v1/adapters", **_upload_pair(pack / "b.onnx_adapter",
                                                                                  pack / "b.adapter.json"))),
                         ("remove d", lambda: c.delete("/v1/adapters/d"))]  # fmt: skip
                for what, call in steps:
                    r = call()
                    with lock:
                        admin.append((what, r.status_code, r.text[:300]))

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    threads.append(threading.Thread(target=administrator))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert [(w, s) for w, s, _ in admin] == [(w, 201 if w.startswith("add") else 200) for w, _, _ in admin], admin
    assert len(admin) == 4 * cycles and len(answers) == workers * per_worker
    for name, status, body in answers:
        event(f"concurrent {name}: {status}")
        assert status < 500, body
        if name == "a":
            assert status == 200, body
        elif name == "zz":
            assert status == 404, body
        else:
            assert status in (200, 404), body
        if status == 200:
            res = body["results"][0]
            assert body["adapter"] == name and {t["label"] for t in res["top"]} <= set(labels[name]), body
            assert abs(res["prob"] - want[name][res["label"]]) < 1e-5, (name, res, want[name])
    assert sorted(a["name"] for a in server["client"].get("/v1/adapters").json()["adapters"]) == sorted(RUNS)
    _server_alive(server)


def test_server_never_logged_a_traceback(server) -> None:
    """After the fuzzing above (module order), the server's stderr holds no traceback (uvicorn logs one per 500)."""
    _server_alive(server)
    log = server["log"].read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
