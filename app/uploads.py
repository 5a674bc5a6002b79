"""Safe handling of uploaded datasets: zip extraction with hard limits, per-upload folders, dataset previews.

A zip is refused as a whole (nothing is extracted) when any entry has an absolute path or a ``..`` part,
is a symlink or other special file, has a type the task does not read (the task's declared ``upload_suffixes``),
or when the archive holds more files or more uncompressed bytes than configured (zip bombs).
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.catalog import upload_suffixes
from vision_peft.preprocess import IMAGE_SUFFIXES

IGNORED = {"__MACOSX", ".DS_Store", "Thumbs.db"}


class UploadError(ValueError):
    """An upload refused for safety or format reasons; the message names the entry and the rule."""


@dataclass
class UploadLimits:
    """Limits for one uploaded archive."""

    max_files: int = 20_000  # entries in one zip
    max_total_bytes: int = 2 * 2**30  # uncompressed bytes in one zip
    max_ratio: float = 200.0  # uncompressed / compressed size of one entry (bombs compress extremely well)


def _ignored(parts: tuple[str, ...]) -> bool:
    return any(p in IGNORED or p.startswith("._") for p in parts)


def check_zip(path: str | Path, task: str, limits: UploadLimits | None = None) -> list[zipfile.ZipInfo]:
    """Validate every entry of a zip; returns the entries to extract. Raises UploadError on the first problem."""
    limits = limits or UploadLimits()
    try:
        exts = {s.lower() for s in upload_suffixes(task)}  # the task's declared upload_suffixes
    except LookupError as e:
        raise UploadError(f"uploads: {e}") from None
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UploadError(f"{Path(path).name} is not a zip archive") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise UploadError(f"the archive has {len(infos)} entries; the limit is {limits.max_files}")
        total, keep = 0, []
        for info in infos:
            name = info.filename
            pure = PurePosixPath(name.replace("\\", "/"))
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or pure.is_absolute():
                raise UploadError(f"entry {name!r} has an absolute path; archives must hold relative paths")
            if ".." in pure.parts:
                raise UploadError(f"entry {name!r} escapes the upload folder ('..'); refused")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UploadError(f"entry {name!r} is a symlink; links are not accepted")
            ftype = stat.S_IFMT(mode)  # 0 when the archiver stored permission bits only
            if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR):
                raise UploadError(f"entry {name!r} is not a regular file")
            if info.is_dir() or _ignored(pure.parts):
                continue
            if pure.suffix.lower() not in exts:
                raise UploadError(
                    f"entry {name!r}: {pure.suffix or 'no extension'} files are not read by the {task} task "
                    f"(accepted: {', '.join(sorted(exts))})"
                )
            total += info.file_size
            if total > limits.max_total_bytes:
                raise UploadError(f"the archive unpacks to more than {limits.max_total_bytes} bytes; refused")
            if info.compress_size and info.file_size / info.compress_size > limits.max_ratio and info.file_size > 2**20:
                raise UploadError(
                    f"entry {name!r} compresses {info.file_size / info.compress_size:.0f}:1 (a zip bomb?)"
                )
            keep.append(info)
        if not keep:
            raise UploadError(f"the archive holds no {task} files (accepted: {', '.join(sorted(exts))})")
        return keep


def extract_zip(path: str | Path, task: str, uploads_root: str | Path, limits: UploadLimits | None = None) -> Path:
    """Check, then extract into a fresh folder ``uploads_root/<id>/``; returns the dataset root.

    When the archive has a single top-level folder, that folder is the dataset root.
    """
    entries = check_zip(path, task, limits)
    dest = Path(uploads_root) / uuid.uuid4().hex[:12]
    dest.mkdir(parents=True)
    limits = limits or UploadLimits()
    written = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in entries:
                target = (dest / info.filename).resolve()
                if not str(target).startswith(str(dest.resolve()) + os.sep):
                    raise UploadError(f"entry {info.filename!r} escapes the upload folder; refused")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):  # count real bytes: headers can lie about sizes
                        written += len(chunk)
                        if written > limits.max_total_bytes:
                            raise UploadError(f"the archive unpacks to more than {limits.max_total_bytes} bytes")
                        out.write(chunk)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    tops = [p for p in dest.iterdir() if not _ignored((p.name,))]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else dest


def confine(path: str | Path, root: str | Path) -> Path:
    """``path`` resolved, if it lies inside ``root``; else UploadError (no traversal out of the root)."""
    root_r = Path(root).resolve()
    p = Path(path)
    p = (root_r / p).resolve() if not p.is_absolute() else p.resolve()
    if p != root_r and root_r not in p.parents:
        raise UploadError(f"{path} is outside {root_r}; choose a folder inside it")
    return p


def class_counts(root: str | Path) -> dict[str, int]:
    """Files per class folder (folder-per-class layouts), sorted by class name."""
    root = Path(root)
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[d.name] = sum(1 for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
    return out


def thumbnails(root: str | Path, per_class: int = 1, limit: int = 24) -> list[tuple[str, str]]:
    """(image path, caption) pairs: the first images of each class folder, for a gallery."""
    root = Path(root)
    out: list[tuple[str, str]] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        imgs = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:per_class]
        out += [(str(f), d.name) for f in imgs]
        if len(out) >= limit:
            break
    return out[:limit]
