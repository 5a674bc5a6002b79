"""The registry and the run configuration (design.md §3, §4): loud errors, dotted overrides, every recipe loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest

from vision_peft.adapters import ADAPTERS
from vision_peft.adapters.lora import LoRAConfig
from vision_peft.backbones import BACKBONES
from vision_peft.config import REPO_ROOT, ConfigError, check_choices
from vision_peft.data import DATASETS
from vision_peft.recipe import build_run_config, load_recipe, parse_overrides
from vision_peft.registry import Registry, UnknownNameError
from vision_peft.tasks import TASKS


@dataclasses.dataclass
class Widget:
    """A config with choices (test_literal_choices_are_checked_generically)."""

    mode: Literal["a", "b"] = "a"  # a choice
    size: Literal[1, 2] | None = None  # an optional numeric choice

    def __post_init__(self) -> None:
        check_choices(self, "widget")


REGISTRIES = {"backbone": BACKBONES, "adapter": ADAPTERS, "task": TASKS, "dataset": DATASETS}
RECIPES = sorted((REPO_ROOT / "tasks").glob("*.yaml"))


# -- registry ---------------------------------------------------------------------------------------------------
def test_duplicate_name_raises() -> None:
    reg: Registry = Registry("widget")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(lambda: 2)
    assert reg.names() == ["a"]


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_unknown_name_lists_known_ones(kind: str) -> None:
    reg = REGISTRIES[kind]
    assert reg.names(), f"the {kind} registry is empty"
    with pytest.raises(UnknownNameError) as e:
        reg.get("definitely_not_registered")
    msg = str(e.value)
    assert f"unknown {kind} 'definitely_not_registered'" in msg
    for name in reg.names():
        assert name in msg


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_unknown_name_suggests_close_match(kind: str) -> None:
    reg = REGISTRIES[kind]
    name = reg.names()[0]
    typo = name[:-1] + ("x" if name[-1] != "x" else "y")
    with pytest.raises(LookupError, match=f"did you mean '{name}'"):
        reg.get(typo)


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_registry_entries_have_help_and_config(kind: str) -> None:
    for name, entry in REGISTRIES[kind].items():
        assert entry.help, f"{kind} {name!r} has no help line (shown by `python -m vision_peft list`)"
        if kind in ("adapter", "task"):
            assert dataclasses.is_dataclass(entry.config_cls), f"{kind} {name!r} needs a config dataclass"
            assert entry.config_cls().name == name, f"{kind} {name!r}: its config's default name differs"


# -- validation -------------------------------------------------------------------------------------------------
def test_misspelled_key_names_it_and_suggests(run_cfg) -> None:
    with pytest.raises(ConfigError) as e:
        run_cfg("train.lrr=1e-3")
    msg = str(e.value)
    assert "train.lrr" in msg and "did you mean train.lr?" in msg
    assert "batch_size" in msg  # lists the valid fields


def test_misspelled_section_names_it(run_cfg) -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) trian \(did you mean train\?\)"):
        run_cfg(trian={"lr": 1e-3})


def test_misspelled_adapter_key(run_cfg) -> None:
    with pytest.raises(ConfigError, match=r"adapter\.rank.*valid keys here:.*\br\b"):
        run_cfg("adapter.rank=4")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ('train.batch_size="abc"', "train.batch_size must be an integer, got 'abc'"),
        ("train.lr=fast", "train.lr must be a number, got 'fast'"),
        ("backbone.pretrained=3", "backbone.pretrained must be true or false, got 3"),
        ("adapter.targets=qkv", "adapter.targets must be a list"),
        ("train.batch_size=0", "train.batch_size must be positive, got 0"),
        ("train.amp=fp8", "train.amp must be one of auto, none, bf16, fp16, got 'fp8'"),
        ("adapter.r=0", "LoRA rank must be positive, got r=0"),
    ],
)
def test_bad_values_are_named(run_cfg, override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        run_cfg(override)
    assert needle in str(e.value)


def test_lora_rank_zero_message() -> None:
    with pytest.raises(ValueError) as e:
        LoRAConfig(r=0)
    assert str(e.value) == "LoRA rank must be positive, got r=0"


def test_every_config_field_has_a_default() -> None:
    from vision_peft.config import BackboneConfig, OutputConfig, TrainConfig

    classes = [BackboneConfig, TrainConfig, OutputConfig]
    classes += [e.config_cls for reg in (ADAPTERS, TASKS) for _, e in reg.items()]
    for cls in classes:
        cls()  # every field has a default (design.md §6.3); raises TypeError otherwise


# -- overrides --------------------------------------------------------------------------------------------------
def test_parse_overrides_types_and_nesting() -> None:
    got = parse_overrides(
        [
            "--train.lr=0.0005",
            "adapter.r=4",
            "train.max_steps=null",
            "adapter.targets=[qkv, mlp]",
            "output.name=my-run",
            "backbone.pretrained=false",
        ]
    )
    assert got == {
        "train": {"lr": 5e-4, "max_steps": None},
        "adapter": {"r": 4, "targets": ["qkv", "mlp"]},
        "output": {"name": "my-run"},
        "backbone": {"pretrained": False},
    }


def test_override_without_equals_raises() -> None:
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["--train.lr"])


def test_overrides_apply(run_cfg) -> None:
    # 5e-4 without a dot is a *string* to PyYAML (YAML 1.1); the float field must still accept it
    cfg = run_cfg("--train.lr=5e-4", "adapter.r=4", "train.head_lr=1e-2", "train.max_steps=null")
    assert cfg.train.lr == 5e-4 and cfg.train.head_lr == 1e-2 and cfg.train.max_steps is None
    assert isinstance(cfg.train.lr, float)
    assert cfg.adapter.r == 4 and isinstance(cfg.adapter, LoRAConfig)


def test_recipe_overrides_apply_on_a_file() -> None:
    recipe = RECIPES[0]
    cfg = load_recipe(str(recipe), ["--train.lr=5e-4", "train.epochs=3"])
    assert cfg.train.lr == 5e-4 and cfg.train.epochs == 3


def test_bad_override_names_the_recipe_file() -> None:
    recipe = RECIPES[0]
    with pytest.raises(ConfigError) as e:
        load_recipe(str(recipe), ["train.lrr=1"])
    assert str(recipe) in str(e.value) and "train.lrr" in str(e.value)


def test_recipe_by_name_and_unknown_recipe() -> None:
    cfg = load_recipe(RECIPES[0].stem)
    assert cfg.task.name in TASKS
    with pytest.raises(ConfigError, match=f"known: .*{RECIPES[0].stem}"):
        load_recipe("no-such-recipe")


# -- recipes and round trip -------------------------------------------------------------------------------------
def test_recipes_exist() -> None:
    assert RECIPES, f"no recipes in {REPO_ROOT / 'tasks'}"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads(recipe: Path) -> None:
    cfg = load_recipe(str(recipe))
    assert cfg.task.name in TASKS and cfg.adapter.name in ADAPTERS
    assert cfg.backbone.name.partition(":")[0] in BACKBONES


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_round_trips(recipe: Path) -> None:
    cfg = load_recipe(str(recipe))
    data = json.loads(json.dumps(cfg.to_dict()))  # what config.json stores
    again = build_run_config(data)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_tiny_config_round_trips(run_cfg) -> None:
    cfg = run_cfg("adapter.targets=[qkv, mlp]", "train.head_lr=0.01")
    again = build_run_config(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert type(again.adapter) is type(cfg.adapter) and type(again.task) is type(cfg.task)


def test_adamw_betas_are_configurable_and_checked() -> None:
    from vision_peft.config import ConfigError, TrainConfig

    assert TrainConfig(betas=[0.9, 0.98]).betas == [0.9, 0.98]
    for bad in ([0.9], [0.9, 1.0], [-0.1, 0.9]):
        with pytest.raises(ConfigError, match="train.betas"):
            TrainConfig(betas=bad)
    import torch

    from vision_peft.engine import build_optimizer
    from vision_peft.tasks import TaskModel

    cfg = build_run_config(
        {
            "task": {"name": "classification"},
            "backbone": {"name": "timm:test_vit"},
            "adapter": {"name": "lora"},
            "train": {"betas": [0.8, 0.97]},
        }  # fmt: skip
    )
    opt = build_optimizer(TaskModel(torch.nn.Linear(2, 2), None), cfg)
    assert all(g["betas"] == (0.8, 0.97) for g in opt.param_groups)


def test_literal_choices_are_checked_generically() -> None:
    """A ``Literal[...]`` field is checked by the typed builder and on direct construction, naming the choices."""
    from vision_peft.config import TrainConfig, build_dataclass

    with pytest.raises(ConfigError, match=r"train\.amp must be one of auto, none, bf16, fp16, got 'fp8'"):
        TrainConfig(amp="fp8")
    assert build_dataclass(Widget, {"mode": "b", "size": 2}, "widget") == Widget("b", 2)
    assert build_dataclass(Widget, {"size": None}, "widget").size is None
    with pytest.raises(ConfigError, match=r"widget\.mode must be one of a, b, got 'c'"):
        build_dataclass(Widget, {"mode": "c"}, "widget")
    with pytest.raises(ConfigError, match=r"widget\.size must be one of 1, 2, got True"):
        build_dataclass(Widget, {"size": True}, "widget")  # a bool is not the integer 1 here
    with pytest.raises(ConfigError, match=r"widget\.mode must be one of a, b"):
        Widget(mode="z")


# -- capability tags: alternatives, task tags, the pre-training refusal ---------------------------------------------
def test_unmet_tags_and_alternatives() -> None:
    from vision_peft.registry import satisfied, unmet

    assert unmet(("image", "pooled"), {"image"}) == ["pooled"]
    assert unmet(("image|points", "pooled"), {"points", "pooled"}) == []
    assert unmet(("image|points",), {"tokens"}) == ["image|points"]
    assert satisfied((), set()) and not satisfied(("a|b",), {"c"})


@pytest.mark.parametrize(
    ("recipe", "adapter", "needle"),
    [
        ("refseg-coco128", "moment_probing", "'pooled'"),  # MP widens pooled features; refseg's head reads a grid
        ("refseg-coco128", "lst", "'pooled'"),
        ("classification-aid", "detris", "'text_encoder'"),  # DETRIS's aligners need the task's text tokens
    ],
)
def test_adapter_the_task_cannot_use_is_refused_before_training(recipe: str, adapter: str, needle: str,
                                                                tmp_path: Path) -> None:
    from vision_peft.recipe import check_compatible, compatible_adapters
    from vision_peft.train import run

    cfg = load_recipe(recipe, [f"adapter.name={adapter}", f"output.runs_root={tmp_path}", "train.tensorboard=false"])
    ok = compatible_adapters(cfg.backbone.name, cfg.task.name)
    assert adapter not in ok and "lora" in ok
    with pytest.raises(ConfigError, match=needle) as e:
        check_compatible(cfg)
    assert "compatible adapters: " + ", ".join(ok) in str(e.value)
    with pytest.raises(ConfigError, match=needle):
        run(cfg, progress=False)
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_every_adapter_is_compatible_with_some_task_and_backbone() -> None:
    from vision_peft.recipe import compatible_adapters

    offered = {a for t in TASKS.names() for b in BACKBONES.names() for a in compatible_adapters(b, t)}
    assert offered == set(ADAPTERS.names())
