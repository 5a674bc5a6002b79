"""Shared fixtures: real data/weight roots (loud when missing), tiny generated image folders, tiny run configs.

Tests that need real data or weights read ``$VISION_PEFT_DATA`` / ``$VISION_PEFT_WEIGHTS`` (design.md §5). CI sets
both; a test that silently skips there is a failing test, so a missing variable or folder *fails* the test with
the fix in the message instead of skipping it.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

TINY_IMAGE_SIZE = 32  # input size of every tiny backbone in the tests


def _root_from_env(var: str, what: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.fail(
            f"${var} is not set: these tests need the real {what}. "
            f"Run with `export {var}=/work/shared/{what.split()[0]}` (CI sets it); they never skip.",
            pytrace=False,
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        pytest.fail(f"${var}={value} is not a folder; point it at the shared {what}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    """$VISION_PEFT_DATA as a Path (fails, never skips, when unset or missing)."""
    return _root_from_env("VISION_PEFT_DATA", "data root")


@pytest.fixture(scope="session")
def weights_root() -> Path:
    """$VISION_PEFT_WEIGHTS as a Path (fails, never skips, when unset or missing)."""
    return _root_from_env("VISION_PEFT_WEIGHTS", "weights root")


@pytest.fixture(scope="session")
def aid_root(data_root: Path) -> Path:
    """The AID scene dataset (30 class folders of aerial JPEGs) under the data root."""
    root = data_root / "aid"
    if not root.is_dir() or not any(root.iterdir()):
        pytest.fail(f"{root} is missing or empty; $VISION_PEFT_DATA must hold the AID dataset in aid/", pytrace=False)
    return root


@pytest.fixture(scope="session")
def aid_images(aid_root: Path) -> Callable[..., list[Path]]:
    """``aid_images(n, classes)`` → the first ``n`` images of each class (sorted, so tests are deterministic)."""

    def pick(n: int = 2, classes: Sequence[str] = ("Airport", "Beach")) -> list[Path]:
        out: list[Path] = []
        for c in classes:
            files = sorted((aid_root / c).glob("*.jpg"))[:n]
            if not files:
                pytest.fail(f"no AID images in {aid_root / c}", pytrace=False)
            out += files
        return out

    return pick


def _pattern_image(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """A class-dependent pattern (stripes at a class-specific angle) plus noise, uint8 (H, W, 3)."""
    yy, xx = np.mgrid[0:h, 0:w]
    angle = label * np.pi / 5
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0)  # (H, W)
    base = (wave[..., None] * 80 + 128 + rng.normal(0, 20, (h, w, 3))).clip(0, 255)
    base[..., label % 3] = base[..., label % 3] * 0.5 + 100  # a class colour cast
    return base.astype(np.uint8)


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("alpha", "beta", "gamma"),
    per_class: int = 4,
    size: tuple[int, int] = (40, 48),
) -> Path:
    """Write a folder-per-class dataset of small generated images under ``root``; returns ``root``.

    Every class gets ``per_class`` images, mixing JPEG and PNG; the first class also holds a grayscale PNG and an
    RGBA PNG (counted in ``per_class``) so the readers' colour conversion is exercised.
    """
    rng = np.random.default_rng(0)
    h, w = size
    for label, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(_pattern_image(rng, label, h, w), "RGB")
            if label == 0 and i == 0:
                img.convert("L").save(d / f"{cls}_{i:02d}_gray.png")
            elif label == 0 and i == 1:
                rgba = img.convert("RGBA")
                rgba.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
                rgba.save(d / f"{cls}_{i:02d}_rgba.png")
            elif i % 2:
                img.save(d / f"{cls}_{i:02d}.png")
            else:
                img.save(d / f"{cls}_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory ``tiny_image_folder(classes=..., per_class=4, size=(40, 48), name="tiny_data")`` → dataset root
    in tmp_path (see :func:`write_image_folder`: JPEG + PNG, one grayscale and one RGBA image)."""

    def make(
        classes: Sequence[str] = ("alpha", "beta", "gamma"),
        per_class: int = 4,
        size: tuple[int, int] = (40, 48),
        name: str = "tiny_data",
    ) -> Path:
        return write_image_folder(tmp_path / name, classes, per_class, size)

    return make


@pytest.fixture
def fish_recipe(tmp_path: Path, tiny_image_folder) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """Factory ``fish_recipe(eligible=None)`` → (recipe path, adapt config): a 2-step plain DiT pre-trained on a
    tiny folder (classes a, b), its base checkpoint, and a FISH adaptation recipe on classes b, c whose Fisher file
    is ``tmp_path/fisher.safetensors`` (``eligible`` also targets ``blocks.*`` and ``final``)."""

    def make(eligible: str | None = None) -> tuple[Path, dict[str, Any]]:
        import yaml

        from vision_peft.diffusion_tools import write_base_checkpoint
        from vision_peft.recipe import build_run_config
        from vision_peft.train import run

        data = tiny_image_folder(classes=("a", "b", "c"), per_class=3, size=(20, 24))
        task = {"name": "diffusion", "data_root": str(data), "image_size": 16, "train_per_class": 2,
                "eval_per_class": 1, "flip": False}  # fmt: skip
        train = {"max_steps": 2, "batch_size": 4, "device": "cpu", "log_every": 1, "epochs": 5}
        pre = build_run_config(
            {
                "task": {**task, "stage": "pretrain", "classes": ["a", "b"]},
                "train": train,
                "backbone": {"name": "dit:d1-w32-h2-c2", "pretrained": False},
                "adapter": {"name": "full"},
                "output": {"runs_root": str(tmp_path / "runs"), "name": "pre"},
            }  # fmt: skip
        )
        base = write_base_checkpoint(run(pre, progress=False))
        adapter = {"name": "fish", "fraction": 0.05, "fisher_file": str(tmp_path / "fisher.safetensors")}
        if eligible:
            adapter.update(eligible=eligible, targets=["blocks.*", "final"])
        adapt = {"task": {**task, "stage": "adapt", "classes": ["b", "c"]}, "train": train,
                 "backbone": {"name": f"dit:{base}"}, "adapter": adapter,
                 "output": {"runs_root": str(tmp_path / "runs"), "name": "fish"}}  # fmt: skip
        recipe = tmp_path / "fish.yaml"
        recipe.write_text(yaml.safe_dump(adapt))
        return recipe, adapt

    return make


def tiny_recipe(data_root: str | Path, runs_root: str | Path) -> dict[str, Any]:
    """A complete recipe for a seconds-long CPU run: timm:test_vit (random init) + LoRA r=2, 32×32 input."""
    return {
        "task": {
            "name": "classification",
            "data_root": str(data_root),
            "split": {"train": 2, "val": 1, "test": 1},
            "augment": "none",
            "resize": "squash",
        },
        "backbone": {"name": "timm:test_vit", "pretrained": False, "image_size": TINY_IMAGE_SIZE},
        "adapter": {"name": "lora", "r": 2, "targets": ["qkv"]},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu", "log_every": 1},
        "output": {"runs_root": str(runs_root), "name": "tiny"},
    }


def make_run_cfg(data_root: str | Path, runs_root: str | Path, *dotted: str, **sections: Any):
    """RunConfig from :func:`tiny_recipe`, then section dicts (merged), then dotted overrides ``"train.lr=5e-4"``.

    A section given as a dict is merged into the default; ``adapter={...}`` or ``task={...}`` with a different
    ``name`` replaces the section (the fields belong to another config class).
    """
    from vision_peft.recipe import build_run_config, deep_merge, parse_overrides

    data = tiny_recipe(data_root, runs_root)
    for key, value in sections.items():
        current = data.get(key)
        if (
            isinstance(value, dict)
            and isinstance(current, dict)
            and value.get("name", current.get("name")) == current.get("name")
        ):
            data[key] = deep_merge(current, value)
        else:
            data[key] = value
    data = deep_merge(data, parse_overrides(list(dotted)))
    return build_run_config(data)


@pytest.fixture
def run_cfg(tmp_path: Path, tiny_image_folder: Callable[..., Path]) -> Callable[..., Any]:
    """``run_cfg(*dotted, **sections)`` → a validated tiny RunConfig (data generated in tmp_path, runs in
    tmp_path/runs, CPU, timm:test_vit at 32×32, 2 steps). Pass ``task={"data_root": ...}`` for other data."""
    state: dict[str, Path] = {}

    def make(*dotted: str, **sections: Any):
        task = sections.get("task")
        own_data = isinstance(task, dict) and "data_root" in task
        if "data" not in state and not own_data:
            state["data"] = tiny_image_folder(name="run_cfg_data")
        return make_run_cfg(state.get("data", "unused"), tmp_path / "runs", *dotted, **sections)

    return make


def adapter_data_files(config_cls: type | None, backbone: Any, targets: list[str], directory: Path) -> dict[str, str]:
    """Config fields of an adapter that name a file computed from data, filled with a random stand-in written
    under ``directory`` for ``backbone``: FISH's ``fisher_file`` gets non-negative Fisher scores (seeded, one
    tensor per ``nn.Linear`` that ``targets`` resolve to; any non-negative scores exercise the sparse engine).
    Empty for adapters without such fields."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    fields = {f.name for f in dataclasses.fields(config_cls)} if config_cls is not None else set()
    if "fisher_file" not in fields:
        return {}
    linears = [n for n in backbone.resolve_targets(targets) if type(backbone.get_submodule(n)) is torch.nn.Linear]
    scores = {n: torch.rand(backbone.get_submodule(n).weight.shape, generator=torch.Generator().manual_seed(0))
              for n in linears}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fisher-{backbone.spec.replace(':', '_').replace('/', '_')}.safetensors"
    save_file(scores or {"none": torch.zeros(1)}, str(path))
    return {"fisher_file": str(path)}


def reset_vision_peft_logging() -> None:
    """Detach the handlers ``train.run`` installs on the ``vision_peft`` logger (stderr + train.log) and let
    records propagate again, so later tests' caplog sees library warnings."""
    log = logging.getLogger("vision_peft")
    for h in list(log.handlers):
        if getattr(h, "_vision_peft", False):
            log.removeHandler(h)
            h.close()
    log.propagate = True


@pytest.fixture
def vp_logging_reset():
    """Undo, after the test, the logging handlers a ``train.run`` / CLI call left on the ``vision_peft`` logger."""
    yield
    reset_vision_peft_logging()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run directory (timm:test_vit + LoRA r=2 on generated data), trained once per session.

    Treat it as read-only: copy it (``shutil.copytree``) before editing anything inside.
    """
    from vision_peft.train import run

    base = tmp_path_factory.mktemp("tiny_run")
    data = write_image_folder(base / "data")
    cfg = make_run_cfg(data, base / "runs")
    try:
        run_dir = run(cfg, progress=False)
    finally:
        reset_vision_peft_logging()
    return Path(run_dir)


@pytest.fixture(scope="session")
def tiny_cls_bundle(tmp_path_factory, aid_root):
    """(run dir, bundle dir) of a seconds-long classification run on 3 real AID classes, exported with int8."""
    from vision_peft.export import export_run
    from vision_peft.recipe import load_recipe
    from vision_peft.train import run

    root = tmp_path_factory.mktemp("cls-bundle")
    cfg = load_recipe("classification-tiny", {"output": {"runs_root": str(root), "name": "run"}})
    run_dir = run(cfg, progress=False)
    export_run(run_dir, run_dir / "bundle", int8=True)
    return run_dir, run_dir / "bundle"


# -- the fault-injection tests (tests/test_faults_*.py; their helpers are in tests/fault_injection.py) ----------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("faults") / "data")


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory) -> dict[str, Any]:
    """The adapter tensors of the uninterrupted 6-step run every fault test must end up with (0 work lost)."""
    from fault_injection import cfg_for

    from vision_peft import rundir
    from vision_peft.checkpoint import load_tensors
    from vision_peft.train import run

    try:
        d = run(cfg_for(data, tmp_path_factory.mktemp("ref"), "ref"), progress=False)
    finally:
        reset_vision_peft_logging()
    return load_tensors(d / rundir.ADAPTER_FILE)


_TORCH_BLOCKER = """
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked here: the deployment runtime must run without it")
        return None


sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture
def torch_free() -> Callable[[str], str]:
    """Runs Python code in a fresh interpreter where importing torch fails, then checks no torch module loaded;
    returns its stdout. The deployment runtime must pass this for every task."""
    import subprocess
    import sys
    import textwrap

    def run(code: str) -> str:
        full = (
            _TORCH_BLOCKER
            + textwrap.dedent(code)
            + "\nassert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\nprint('TORCH_FREE_OK')\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", full], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1]
        )
        assert proc.returncode == 0 and "TORCH_FREE_OK" in proc.stdout, proc.stderr[-4000:]
        return proc.stdout

    return run


# --- property-based fuzzing (issue 18) --------------------------------------------------------------------------
# Fuzz tests run in every suite with bounded example counts (`fuzz_examples(n)`); `pytest --fuzz-long` multiplies
# them by 50 for longer runs outside CI. Every fuzz test also carries a wall-clock deadline per example.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="run the hypothesis fuzz tests with 50x their CI example counts (minutes to hours)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # an environment variable, so that the value reaches test modules whichever way they import this file
    if config.getoption("--fuzz-long", default=False):
        os.environ["VISION_PEFT_FUZZ_LONG"] = "1"


def fuzz_examples(n: int) -> int:
    """The example count for a fuzz test: ``n`` in CI, ``50 * n`` under ``--fuzz-long``."""
    return n * 50 if os.environ.get("VISION_PEFT_FUZZ_LONG") == "1" else n


def build_tiny_pack(root: Path, runs: dict[str, tuple[str, ...]], extra: tuple[str, ...]) -> tuple[dict, dict]:
    """Train one tiny run per ``runs`` entry plus run ``d`` (classes ``extra``), export the pack of ``runs`` to
    ``root/pack``, run a's merged bundle to ``root/merged`` and d's file pair for the pack to ``root/extra``.
    Returns ({name: run dir}, the extra adapter's record)."""
    from vision_peft.export import export_run
    from vision_peft.pack import export_adapter_for, export_pack
    from vision_peft.train import run

    dirs: dict[str, Path] = {}
    try:
        for name, classes in [*runs.items(), ("d", extra)]:
            data = write_image_folder(root / f"data-{name}", classes=classes)
            dirs[name] = Path(run(make_run_cfg(data, root / "runs", f"output.name={name}"), progress=False))
    finally:
        reset_vision_peft_logging()
    export_pack([dirs[n] for n in runs], root / "pack", names=list(runs))
    export_run(dirs["a"], root / "merged")
    rec = export_adapter_for(dirs["d"], root / "pack", out_dir=root / "extra", name="d")
    return dirs, rec
