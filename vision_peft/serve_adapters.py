"""Adapters added and removed while a pack server runs (``POST`` / ``DELETE /v1/adapters`` of
:mod:`vision_peft.serve`): the uploads' size caps and validation, their bytes kept under a server-owned temporary
folder (generated names, never a client's path), changes serialised by one lock.

The HTTP codes are the ones :mod:`vision_peft.serve` documents: 413 over a size cap, 400 an empty file or a bad
name, 415 not an adapter record / not an onnxruntime adapter, 422 an adapter that does not fit the pack, 409 a name
in use, the adapter limit, the last adapter or a merged bundle, 404 an unknown name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, UploadFile

from vision_peft import packfile
from vision_peft.deploy import Bundle

if TYPE_CHECKING:
    from vision_peft.serve import ServeLimits


def _read_capped(f: UploadFile, cap: int, field: str) -> bytes:
    """All bytes of one upload, 413 over ``cap`` and 400 when empty (naming the field and the file)."""
    data = f.file.read(cap + 1)
    name = f.filename or "upload"
    if len(data) > cap:
        raise HTTPException(413, f"{field} ({name}): larger than {cap} bytes (the server's limit)")
    if not data:
        raise HTTPException(400, f"{field} ({name}): empty file")
    return data


class AdapterStore:
    """Adds and removes a pack's adapters at run time (``POST`` / ``DELETE /v1/adapters``): validates uploads,
    keeps their bytes under a server-owned temporary folder (generated names; removed with the app) and
    serialises changes. The bundle's own adapter dict is lock-protected (:class:`vision_peft.deploy.Bundle`)."""

    def __init__(self, bundle: Bundle, limits: ServeLimits) -> None:
        self.bundle, self.limits = bundle, limits
        self.lock = threading.Lock()
        self.folder: Path | None = None
        self.uploaded: dict[str, Path] = {}  # adapter name -> its stored tensor file

    def _folder(self) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="vp-adapters-"))
            weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        return self.folder

    def _pack_only(self, verb: str) -> None:
        if not self.bundle.is_pack:
            raise HTTPException(
                409,
                f"this server's bundle is merged (one adapter folded into its graph); adapters cannot be {verb}. "
                "Serve a pack (`python -m vision_peft export <run> <run> … --pack --bundle DIR`) to swap adapters",
            )

    def record(self, name: str) -> dict[str, Any]:
        """What ``/info`` and the adapter endpoints say of one adapter."""
        view = self.bundle.select(name)
        meta = view.active.meta
        parity = meta.get("parity")
        parity = parity if isinstance(parity, dict) else {}  # an uploaded file may carry any JSON here
        return {
            "name": name,
            "labels": list(meta.get("labels") or []),
            "n_labels": len(meta.get("labels") or []),
            "source_run": meta.get("source_run"),
            "bytes": view.active.nbytes,
            "origin": "uploaded" if name in self.uploaded else "bundle",
            "parity_max_abs_diff": parity.get("max_abs_diff"),
        }

    def records(self) -> list[dict[str, Any]]:
        out = []
        for name in self.bundle.adapters:
            try:
                out.append(self.record(name))
            except ValueError:  # removed meanwhile
                continue
        return out

    def add(self, file: UploadFile, meta: UploadFile, name: str | None) -> dict[str, Any]:
        """Validates and adds one uploaded pair; returns its record (see the module docstring for the codes)."""
        self._pack_only("added")
        file_name, meta_name = file.filename or "upload", meta.filename or "upload"
        if name is not None:
            try:
                packfile.check_name(name)
            except packfile.AdapterFileError as e:
                raise HTTPException(400, f"form field 'name': {e}") from None
        raw = _read_capped(meta, self.limits.max_meta_bytes, "meta")
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # Recursion: nested too deep
            raise HTTPException(
                415, f"meta ({meta_name}): not a JSON adapter record ({type(e).__name__}); send the .adapter.json"
            ) from None
        try:
            packfile.check_meta(record, f"meta ({meta_name})")
        except packfile.AdapterFileError as e:
            status = 400 if isinstance(record, dict) and record.get("format") == packfile.ADAPTER_FORMAT else 415
            raise HTTPException(status, str(e)) from None
        name = name or record["name"]
        with self.lock:
            known = self.bundle.adapters
            if name in known:
                raise HTTPException(409, f"adapter name {name!r} is in use; DELETE /v1/adapters/{name} first, or "
                                         "send another name in the form field 'name'")  # fmt: skip
            if len(known) >= self.limits.max_adapters:
                raise HTTPException(409, f"this server holds {len(known)} adapters, its limit "
                                         f"(max_adapters); DELETE one first")  # fmt: skip
            data = _read_capped(file, self.limits.max_adapter_bytes, "file")
            path = self._folder() / f"{uuid.uuid4().hex}{packfile.ADAPTER_SUFFIX}"  # never the client's name
            path.write_bytes(data)
            try:
                try:
                    packfile.read_tensors(path)
                except packfile.AdapterFileError as e:
                    raise HTTPException(415, str(e).replace(str(path), f"file ({file_name})")) from None
                try:
                    self.bundle.add_adapter(path, record, name=name)
                except ValueError as e:
                    raise HTTPException(422, str(e).replace(str(path), f"file ({file_name})")) from None
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            self.uploaded[name] = path
        return self.record(name)

    def remove(self, name: str) -> dict[str, Any]:
        """Removes one adapter (404 unknown, 409 the last one); its uploaded file goes too (requests holding it
        keep onnxruntime's mapping of it)."""
        self._pack_only("removed")
        with self.lock:
            known = self.bundle.adapters
            if name not in known:
                raise HTTPException(404, f"unknown adapter {name!r}; known adapters: {', '.join(known)}")
            if len(known) == 1:
                raise HTTPException(
                    409, f"{name!r} is the last adapter of this pack; add another one (POST /v1/adapters) first"
                )
            self.bundle.remove_adapter(name)
            path = self.uploaded.pop(name, None)
            if path is not None:
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # a platform that cannot unlink a mapped file: removed with the folder
                    pass
        return {"removed": name, "adapters": self.bundle.adapters}
