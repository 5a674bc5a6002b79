"""Property-based fuzzing of the bundle manifest and adapter-pack loaders (issue 18: vision_peft/bundle.py,
deploy.py, packfile.py, deploy_pack.py) on a real pack and a real merged bundle exported by the project itself.

The properties every fuzzer here checks, and the example counts: see ``tests/surface_support.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import fuzz_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from surface_support import (
    DEEP,
    FUZZ,
    RUNS,
    build_artifacts,
    event,
    mutate_tree,
)

from vision_peft.packfile import AdapterFileError

# duplicates are written on purpose (zipfile warns when it writes one)
pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")]


# ================================================================================================================
# 2. the bundle manifest loader and the adapter-pack loader (vision_peft/bundle.py, deploy.py, packfile.py,
#    deploy_pack.py), on a real pack and a real merged bundle exported by the project itself
# ================================================================================================================


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """The tiny exported pack of :func:`surface_support.build_artifacts`, built once for this module."""
    return build_artifacts(tmp_path_factory)


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
