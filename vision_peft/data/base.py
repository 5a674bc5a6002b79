"""What the dataset readers share: the class-folder layout ``root/<class>/…`` of image and point datasets."""

from __future__ import annotations

from pathlib import Path


def class_folders(root: Path, classes: list[str] | None, error: type[Exception]) -> list[str]:
    """The class sub-folders of ``root`` to read, in label order.

    Args:
        root: The dataset folder (it exists).
        classes: The class names to use, in label order; None = every sub-folder not starting with ``.``, sorted.
        error: The reader's error type, raised with the fix in its message.

    Returns:
        The class names, in label order.

    Raises:
        error: A requested class has no folder, or fewer than two classes are left.
    """
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    missing = [c for c in classes if c not in found]
    if missing:
        raise error(f"class folder(s) {', '.join(missing)} not found in {root}; present: {', '.join(found)}")
    if len(classes) < 2:
        raise error(f"{root} has {len(classes)} class folder(s); classification needs at least 2")
    return list(classes)
