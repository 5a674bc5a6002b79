"""Property-based fuzzing of recipes and dotted overrides (issue 18): random override keys and values,
random and mutated recipe text, every registered config class with random values; a YAML tag never runs code.

The properties every fuzzer here checks, and the example counts: see ``tests/fuzz_support.py``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import fuzz_examples, tiny_recipe
from fuzz_support import (
    FUZZ,
    outcome,
    scratch,
    watchdog,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vision_peft.config import ConfigError
from vision_peft.recipe import POLYMORPHIC, build_run_config, load_recipe, parse_overrides

pytestmark = pytest.mark.fuzz

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
