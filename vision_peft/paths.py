"""Weight and data roots, and the repository root: the lookup order every loader shares.

Imports nothing of the package (a leaf of the layering): explicit path → ``$VISION_PEFT_WEIGHTS`` (default
``./weights``) → the upstream library's cache → download when allowed; data the same way with ``$VISION_PEFT_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """Root for relative dataset paths: $VISION_PEFT_DATA, default ./data."""
    return Path(os.environ.get("VISION_PEFT_DATA", "data")).expanduser()


def weights_root() -> Path:
    """Root of the local weight store: $VISION_PEFT_WEIGHTS, default ./weights."""
    return Path(os.environ.get("VISION_PEFT_WEIGHTS", "weights")).expanduser()


def resolve_data_path(path: str) -> Path:
    """An absolute path stays; a relative one is looked up in the working directory, then the data root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return data_root() / p
