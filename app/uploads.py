"""Safe handling of uploaded datasets: zip extraction with hard limits, per-upload folders, dataset previews.

A zip is refused as a whole (nothing is extracted) when any entry has an absolute path or a ``..`` part,
is a symlink or other special file, has a type the task does not read (the task's declared ``upload_suffixes``),
or when the archive holds more files or more uncompressed bytes than configured (zip bombs).
"""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import stat
import struct
import uuid
import zipfile
import zlib
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


MAX_NAME_BYTES = 255  # one path component (the usual filesystem limit)
MAX_PATH_BYTES = 1024  # a whole entry name, UTF-8
SUPPORTED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
# what zipfile and its decompressors raise on a damaged archive (bz2 raises OSError, lzma LZMAError, zlib zlib.error)
DAMAGED = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError, NotImplementedError,
           RuntimeError, struct.error)  # fmt: skip


def _entry_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's path inside the upload folder: backslashes read as separators (archives made on Windows)."""
    return PurePosixPath(info.filename.replace("\\", "/"))


def check_zip(path: str | Path, task: str, limits: UploadLimits | None = None) -> list[zipfile.ZipInfo]:
    """Validate every entry of a zip; returns the entries to extract. Raises UploadError on the first problem.

    Every message starts with the archive's file name. Besides the rules in the module docstring, an archive is
    refused when it is damaged or unreadable, encrypted, uses a compression method other than stored / deflate /
    bzip2 / lzma, names one file twice (after ``./``, ``//`` and backslashes are normalised), uses a file's path
    as a folder of another entry, or has names longer than the filesystem takes.
    """
    limits = limits or UploadLimits()
    archive = Path(path).name
    try:
        exts = {s.lower() for s in upload_suffixes(task)}  # the task's declared upload_suffixes
    except LookupError as e:
        raise UploadError(f"{archive}: uploads: {e}") from None
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UploadError(f"{archive} is not a zip archive") from None
    except DAMAGED as e:
        raise UploadError(f"{archive} is not a readable zip archive ({type(e).__name__}: {e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise UploadError(f"{archive}: the archive has {len(infos)} entries; the limit is {limits.max_files}")
        total, keep, files, folders = 0, [], set(), set()
        for info in infos:
            name = info.filename
            pure = _entry_path(info)
            norm = name.replace("\\", "/")
            if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or pure.is_absolute():
                raise UploadError(f"{archive}: entry {name!r} has an absolute path; archives must hold relative paths")
            if ".." in pure.parts:
                raise UploadError(f"{archive}: entry {name!r} escapes the upload folder ('..'); refused")
            if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES or any(
                len(p.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for p in pure.parts
            ):
                raise UploadError(
                    f"{archive}: entry {name[:80]!r}… has a name longer than {MAX_NAME_BYTES} bytes per folder or "
                    f"{MAX_PATH_BYTES} in all; shorten it"
                )
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UploadError(f"{archive}: entry {name!r} is a symlink; links are not accepted")
            ftype = stat.S_IFMT(mode)  # 0 when the archiver stored permission bits only
            if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR):
                raise UploadError(f"{archive}: entry {name!r} is not a regular file")
            # not info.is_dir(): zipfile's own test fails with IndexError on an entry with an empty name
            if norm.endswith("/") or ftype == stat.S_IFDIR or _ignored(pure.parts):
                continue
            if pure.suffix.lower() not in exts:
                raise UploadError(
                    f"{archive}: entry {name!r}: {pure.suffix or 'no extension'} files are not read by the {task} "
                    f"task (accepted: {', '.join(sorted(exts))})"
                )
            if info.flag_bits & 0x1:
                raise UploadError(f"{archive}: entry {name!r} is encrypted; upload an archive without a password")
            if info.compress_type not in SUPPORTED_METHODS:
                raise UploadError(
                    f"{archive}: entry {name!r} uses compression method {info.compress_type}; re-create the archive "
                    "with deflate (the default of every zip tool)"
                )
            rel = str(pure)
            if rel in files:
                raise UploadError(f"{archive}: entry {name!r} appears twice; an archive must name each file once")
            if rel in folders or any(str(p) in files for p in pure.parents):
                raise UploadError(
                    f"{archive}: entry {name!r} is both a file and a folder of another entry; rename one of them"
                )
            files.add(rel)
            folders.update(str(p) for p in pure.parents)
            total += info.file_size
            if total > limits.max_total_bytes:
                raise UploadError(
                    f"{archive}: the archive unpacks to more than {limits.max_total_bytes} bytes; refused"
                )
            if info.compress_size and info.file_size / info.compress_size > limits.max_ratio and info.file_size > 2**20:
                raise UploadError(
                    f"{archive}: entry {name!r} compresses {info.file_size / info.compress_size:.0f}:1 (a zip bomb?)"
                )
            keep.append(info)
        if not keep:
            raise UploadError(f"{archive}: the archive holds no {task} files (accepted: {', '.join(sorted(exts))})")
        return keep


def extract_zip(path: str | Path, task: str, uploads_root: str | Path, limits: UploadLimits | None = None) -> Path:
    """Check, then extract into a fresh folder ``uploads_root/<id>/``; returns the dataset root.

    When the archive has a single top-level folder, that folder is the dataset root. A refused or damaged archive
    (UploadError naming it) leaves nothing behind.
    """
    entries = check_zip(path, task, limits)
    archive = Path(path).name
    dest = Path(uploads_root) / uuid.uuid4().hex[:12]
    dest.mkdir(parents=True)
    limits = limits or UploadLimits()
    written = 0
    info: zipfile.ZipInfo | None = None
    try:
        with zipfile.ZipFile(path) as zf:
            for info in entries:
                target = (dest / _entry_path(info)).resolve()
                if not str(target).startswith(str(dest.resolve()) + os.sep):
                    raise UploadError(f"{archive}: entry {info.filename!r} escapes the upload folder; refused")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    src = zf.open(info)
                except DAMAGED as e:
                    raise UploadError(_damaged(archive, info, e)) from None
                with src, open(target, "wb") as out:
                    while True:
                        try:
                            chunk = src.read(1 << 20)  # count real bytes: headers can lie about sizes
                        except DAMAGED as e:
                            raise UploadError(_damaged(archive, info, e)) from None
                        if not chunk:
                            break
                        written += len(chunk)
                        if written > limits.max_total_bytes:
                            raise UploadError(
                                f"{archive}: the archive unpacks to more than {limits.max_total_bytes} bytes"
                            )
                        out.write(chunk)
    except BaseException as e:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(e, OSError):  # writing failed (disk full, file-size limit, read-only folder): reading is DAMAGED
            entry = f"entry {info.filename!r} of " if info is not None else ""
            code = errno.errorcode.get(e.errno or 0, str(e.errno))
            raise UploadError(
                f"could not extract {entry}{archive} into {dest.parent}: {e.strerror or e} ({code}); nothing of it "
                f"was kept. Free space on that disk (df -h {dest.parent}) or raise the file-size limit (ulimit -f), "
                "then upload again"
            ) from None
        raise
    tops = [p for p in dest.iterdir() if not _ignored((p.name,))]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else dest


def _damaged(archive: str, info: zipfile.ZipInfo, e: BaseException) -> str:
    return (
        f"{archive}: entry {info.filename!r} cannot be unpacked ({type(e).__name__}: {str(e)[:200]}); the archive is "
        "damaged or truncated, create it again"
    )


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
