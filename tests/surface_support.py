"""What the surface fuzzers (tests/test_fuzz_upload.py, test_fuzz_bundles.py, test_fuzz_serve.py) share: the
hypothesis settings, event counting, and the tiny exported pack (two runs, a merged bundle, a third run's
file pair) that the bundle-loader and HTTP fuzzers attack, and the JSON values and tree edits they inject.

The properties: only the documented error type, with a message naming the input (``UploadError`` naming the archive,
``ValueError`` / ``FileNotFoundError`` / ``AdapterFileError`` naming the bundle file), never another exception; an
upload never writes outside its own upload folder; every HTTP answer is a 2xx or a 4xx with a JSON ``detail``, never
a 5xx, a traceback or a hang, and the server process still answers ``/health`` afterwards.

Example counts are bounded (``fuzz_examples(n)``; ``pytest --fuzz-long`` multiplies them by 50).
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import build_tiny_pack
from hypothesis import Phase
from hypothesis import event as _hypothesis_event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

REPO = Path(__file__).resolve().parent.parent
# no database (nothing written under .hypothesis/), no explain phase (it re-runs failures for minutes)
FUZZ = {"deadline": None, "database": None, "phases": (Phase.explicit, Phase.generate, Phase.shrink)}


def event(label: str) -> None:
    """hypothesis' event statistics (``--hypothesis-show-statistics``); a no-op in the plain regression tests."""
    if currently_in_test_context():
        _hypothesis_event(label)


RUNS = {"a": ("alpha", "beta"), "b": ("p", "q", "r")}
EXTRA = ("u", "v", "w")


def build_artifacts(tmp_path_factory) -> dict:
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


DEEP = b'{"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # deeper than json's recursion limit
