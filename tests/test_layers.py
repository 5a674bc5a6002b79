"""The layering (design.md §2) holds: `lint-imports` keeps the contracts in pyproject.toml, and the leaf modules
import no registry (nor torch), so importing them can never pull the task/adapter/backbone packages in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REGISTRY_PACKAGES = ("vision_peft.tasks", "vision_peft.adapters", "vision_peft.backbones", "vision_peft.data")


def test_lint_imports_keeps_every_contract() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).is_file():
        pytest.skip("import-linter is not installed here (pip install -e '.[dev]' brings it; CI runs it)")
    res = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"lint-imports found imports against the layering:\n{res.stdout[-4000:]}"


def _modules_after_import(*modules: str) -> list[str]:
    code = f"import json, sys\nimport {', '.join(modules)}\nprint(json.dumps(sorted(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["vision_peft.config", "vision_peft.paths", "vision_peft.rundir"])
def test_leaf_modules_import_no_registry_and_no_torch(module: str) -> None:
    loaded = _modules_after_import(module)
    pulled = [m for m in loaded if m.startswith(REGISTRY_PACKAGES)]
    assert not pulled, f"importing {module} pulled in {pulled[:5]}: it must stay a leaf of the layering"
    assert "torch" not in loaded, f"importing {module} imported torch"


def test_paths_imports_nothing_of_the_package() -> None:
    loaded = _modules_after_import("vision_peft.paths")
    assert [m for m in loaded if m.startswith("vision_peft")] == ["vision_peft", "vision_peft.paths"]


def test_every_module_of_the_package_has_a_layer() -> None:
    """A new top-level module or package must be placed in the layering, else lint-imports would not check it."""
    import pkgutil
    import re

    import vision_peft

    text = (REPO / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11 only)
    layers = re.search(r'type = "layers"\s*\nlayers = \[(.*?)\n\]', text, re.S)
    assert layers, "pyproject.toml has no [[tool.importlinter.contracts]] of type layers"
    placed = set(re.findall(r"vision_peft\.(\w+)", layers.group(1)))
    children = {m.name for m in pkgutil.iter_modules(vision_peft.__path__)}
    missing = sorted(children - placed)
    assert not missing, f"add {', '.join('vision_peft.' + m for m in missing)} to a layer in pyproject.toml"
