"""A small inference server over a deployment bundle: FastAPI on the torch-free runtime (``vision_peft.deploy``).

Endpoints: ``GET /health``, ``GET /info`` (task, labels, graphs, providers really in use, version) and one
``POST`` endpoint per registered runtime (``vision_peft.runtimes.RUNTIMES``), built from the request fields the
runtime declares; the bundle's own task answers, the others answer 409 naming the right endpoint:

- ``POST /v1/classify``: multipart ``files`` (images), optional ``top_k``;
- ``POST /v1/fewshot``: multipart ``support`` (images) with ``support_labels`` (one class name per support image,
  same order) and ``query`` (images);
- ``POST /v1/points``: multipart ``files`` (PCD/OFF/PLY/NPY/NPZ/HDF5 point files);
- ``POST /v1/segment``: multipart ``file`` (one image) and form field ``phrase`` -> mask PNG (base64);
- ``POST /v1/generate``: JSON ``{"classes": [...], "n": 1, "steps": 25, "guidance": 2, "seed": 0}`` -> PNG grid
  (base64), one row per class.

Adapter packs (``export <run> <run> … --pack``; :mod:`vision_peft.packfile`): every task endpoint takes the
optional query parameter ``adapter`` (``POST /v1/classify?adapter=NAME``; the same rule for multipart and JSON
endpoints), required when the pack holds more than one adapter; the answer then carries ``"adapter": NAME``.
An unknown name is a 404 listing the known ones, a missing one a 422 saying to pass it, a name sent to a merged
bundle a 400. ``/info`` lists the adapters (``GET /v1/adapters`` too). Adapters are added and removed without a
restart:

- ``POST /v1/adapters``: multipart ``file`` (the ``.onnx_adapter``) and ``meta`` (its ``.adapter.json``), optional
  form field ``name`` -> 201 with the adapter's record; the upload is size-limited (``max_adapter_bytes``,
  ``max_meta_bytes``), must be a readable onnxruntime adapter and a valid record (415 otherwise), and must fit the
  pack's graph, task, adapter family and backbone hash (422, checked by ``Bundle.add_adapter``); the bytes are
  kept under a server-owned temporary folder under a generated name, never a client-chosen path;
- ``DELETE /v1/adapters/<name>`` -> 200 (404 unknown, 409 for the last adapter); requests already running with
  it finish. Both answer 409 on a merged bundle. Nothing in the bundle folder is written.

Inputs are validated before they reach the model: size limit per file, file-count limit, accepted types,
decodability, step and image-count caps; every rejection is a 4xx JSON error naming the file, and the server
keeps serving. Binds 127.0.0.1 unless told otherwise.

    python -m vision_peft serve runs/<run>/export --port 8000
"""

from __future__ import annotations

import inspect
import io
import math
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import create_model

import vision_peft
from vision_peft.deploy import Bundle, load_bundle
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import HttpError, HttpField, Runtime, runtime_for_task
from vision_peft.serve_adapters import AdapterStore

IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "application/octet-stream"}
UPLOAD_KINDS = ("files", "file")
ADAPTER_FIELD = "adapter"  # the query parameter that picks a pack's adapter on every task endpoint


@dataclass
class ServeLimits:
    """Input validation limits."""

    max_file_bytes: int = 10 * 2**20  # per uploaded file
    max_files: int = 32  # per request (one batch)
    max_pixels: int = 40_000_000  # decoded image size guard (decompression bombs)
    max_images: int = 16  # generating endpoints: images per request
    max_steps: int = 100  # generating endpoints: sampler steps per request
    max_adapter_bytes: int = 64 * 2**20  # POST /v1/adapters: the .onnx_adapter upload
    max_meta_bytes: int = 2 * 2**20  # POST /v1/adapters: the .adapter.json upload
    max_adapters: int = 256  # adapters one pack server holds at most (uploads beyond are refused)


def _decode(name: str, data: bytes, limits: ServeLimits) -> Image.Image:
    if not data:
        raise HTTPException(400, f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > limits.max_pixels:
                raise HTTPException(
                    413, f"{name}: {im.width}×{im.height} pixels exceeds the limit of {limits.max_pixels}"
                )
            im.load()
            return im.convert("RGB")
    except HTTPException:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise HTTPException(
            400, f"{name}: not a readable image ({type(e).__name__}); send JPEG/PNG/WebP bytes"
        ) from None


def _read(f: UploadFile, limits: ServeLimits, types: set[str] | None) -> tuple[str, bytes]:
    """(name, bytes) of one upload, refusing wrong content types and files over the byte limit."""
    name = f.filename or "upload"
    if types is not None and f.content_type and f.content_type not in types:
        raise HTTPException(415, f"{name}: content type {f.content_type} is not accepted (send {sorted(types)})")
    data = f.file.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        raise HTTPException(413, f"{name}: larger than {limits.max_file_bytes} bytes")
    return name, data


def _count_files(n: int, limits: ServeLimits) -> None:
    if n > limits.max_files:
        raise HTTPException(413, f"{n} files in one request; the limit is {limits.max_files}")


class _Request:
    """One request's parameters, read and validated on demand by the runtime (:class:`HttpRequest`)."""

    def __init__(self, params: dict[str, Any], limits: ServeLimits, workdir: Path) -> None:
        self.params, self.limits, self.workdir = params, limits, workdir
        self.renames: dict[str, str] = {}  # temporary path -> upload name, for error messages

    def _uploads(self, name: str) -> list[UploadFile]:
        value = self.params[name]
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def value(self, name: str) -> Any:
        value = self.params[name]
        return value.model_dump() if hasattr(value, "model_dump") else value

    def count(self, name: str) -> int:
        return len(self._uploads(name))

    def images(self, name: str) -> tuple[list[str], list[Image.Image]]:
        names, images = [], []
        for f in self._uploads(name):
            file_name, data = _read(f, self.limits, IMAGE_TYPES)
            names.append(file_name)
            images.append(_decode(file_name, data, self.limits))
        return names, images

    def files_on_disk(self, name: str, suffixes: Sequence[str]) -> tuple[list[str], list[Path]]:
        names, paths = [], []
        for f in self._uploads(name):
            file_name, data = _read(f, self.limits, None)
            ext = Path(file_name).suffix.lower()
            if ext not in suffixes:
                accepted = ", ".join(suffixes)
                raise HTTPException(415, f"{file_name}: extension {ext or '(none)'} is not accepted (send {accepted})")
            dest = self.workdir / f"{len(self.renames)}{ext}"  # never the client's file name on disk
            dest.write_bytes(data)
            self.renames[str(dest)] = f.filename or "upload"
            names.append(f.filename or "upload")
            paths.append(dest)
        return names, paths


def _parameters(fields: Sequence[HttpField]) -> list[inspect.Parameter]:
    """FastAPI parameters (File / Form / query / JSON body) for a runtime's declared request fields."""
    kw = inspect.Parameter.KEYWORD_ONLY
    out = []
    for f in fields:
        if f.kind == "files":
            out.append(inspect.Parameter(f.name, kw, default=File(...), annotation=list[UploadFile]))
        elif f.kind == "file":
            out.append(inspect.Parameter(f.name, kw, default=File(...), annotation=UploadFile))
        elif f.kind == "form":
            out.append(inspect.Parameter(f.name, kw, default=Form(...), annotation=str))
        elif f.kind == "form_list":
            out.append(inspect.Parameter(f.name, kw, default=Form(...), annotation=list[str]))
        elif f.kind == "query":
            out.append(inspect.Parameter(f.name, kw, default=None, annotation=f.type | None))
        elif f.kind == "json":
            model = create_model(f.model or f"{f.name.title()}Body", **f.body)
            out.append(inspect.Parameter(f.name, kw, annotation=model))
        else:
            raise ValueError(f"HttpField {f.name!r} has unknown kind {f.kind!r}")
    return out


def select_adapter(bundle: Bundle, adapter: str | None) -> Bundle:
    """The bundle that answers a request: a merged bundle itself, or the view of the pack adapter ``adapter``
    (the only one when None).

    Raises:
        HTTPException: 400 a name for a merged bundle, 422 no name for a pack of several adapters, 404 an unknown
            name (the known ones listed).
    """
    if not bundle.is_pack:
        if adapter is not None:
            raise HTTPException(
                400,
                f"{ADAPTER_FIELD} {adapter!r}: this server's bundle is merged (its one adapter is folded into the "
                f"graph) and has no adapters to choose from; omit the {ADAPTER_FIELD!r} query parameter",
            )
        return bundle
    try:
        return bundle.select(adapter)
    except ValueError:
        known = bundle.adapters
        if adapter is None:
            raise HTTPException(
                422,
                f"this server's pack holds {len(known)} adapters ({', '.join(known)}); pass one as the "
                f"{ADAPTER_FIELD!r} query parameter, e.g. ?{ADAPTER_FIELD}={known[0] if known else 'NAME'}",
            ) from None
        raise HTTPException(
            404, f"unknown {ADAPTER_FIELD} {adapter!r}; known adapters: {', '.join(known)} (GET /info lists them)"
        ) from None


def _endpoint(
    runtime: type[Runtime], bundle: Bundle, limits: ServeLimits, count: Callable[[bool], None]
) -> Callable[..., dict[str, Any]]:
    """The endpoint function of one runtime: 409 on a bundle of another task, the adapter (:func:`select_adapter`),
    the file-count limit, then the runtime's own handling; ValueError -> 422 (temporary paths renamed to the
    uploads); counted either way."""
    served = runtime_for_task(bundle.task)
    if any(f.name == ADAPTER_FIELD for f in runtime.http_fields):
        raise ValueError(
            f"runtime {runtime.__name__} declares a request field {ADAPTER_FIELD!r}, which the server owns"
        )

    def endpoint(**params: Any) -> dict[str, Any]:
        ok = False
        try:
            adapter = params.pop(ADAPTER_FIELD, None)
            if bundle.task != runtime.task:
                raise HTTPException(
                    409,
                    f"this server's bundle is task {bundle.task!r}; use {served.endpoint if served else '/info'} "
                    f"(this endpoint serves {runtime.task!r} bundles)",
                )
            chosen = select_adapter(bundle, adapter)  # holds its adapter: a removal mid-request does not affect it
            uploads = [f.name for f in runtime.http_fields if f.kind in UPLOAD_KINDS]
            _count_files(sum(len(p) if isinstance(p, list) else 1 for p in (params[n] for n in uploads)), limits)
            with tempfile.TemporaryDirectory(prefix="vp-upload-") as td:
                request = _Request(params, limits, Path(td))
                try:
                    out = chosen.runtime.http(request)
                except ValueError as e:  # the runtime's own input checks (unknown class, bad point file …)
                    msg = str(e)
                    for tmp, name in request.renames.items():
                        msg = msg.replace(tmp, name)
                    raise HTTPException(422, msg) from None
            ok = True
            extra = {ADAPTER_FIELD: chosen.adapter_name} if bundle.is_pack else {}
            return {**out, **extra, "providers": bundle.providers}
        except HttpError as e:
            raise HTTPException(e.status, e.detail) from None
        finally:
            count(ok)

    endpoint.__name__ = f"post_{runtime.endpoint.strip('/').replace('/', '_')}"
    choose = inspect.Parameter(
        ADAPTER_FIELD,
        inspect.Parameter.KEYWORD_ONLY,
        default=Query(None, description="the pack adapter to run (required when the pack holds several)"),
        annotation=str | None,
    )
    endpoint.__signature__ = inspect.Signature([*_parameters(runtime.http_fields), choose])  # type: ignore[attr-defined]
    return endpoint


def _json_safe(value: Any, depth: int = 0) -> Any:
    """A value FastAPI's validation errors echo back, made JSON-safe: bytes decoded with replacement, NaN and
    infinities as strings, long strings cut, nesting bounded (the echo of a hostile body must not fail the answer)."""
    if depth > 8:
        return "…"
    if isinstance(value, bytes):
        return value[:200].decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value[:200]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k)[:100]: _json_safe(v, depth + 1) for k, v in list(value.items())[:20]}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in list(value)[:20]]
    return str(value)[:200]


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's usual ``detail`` list, its echoed inputs made JSON-safe: FastAPI's own handler answered 500
    to a body of non-UTF-8 bytes or a JSON NaN (it could not encode its own error message)."""
    return JSONResponse(status_code=422, content={"detail": _json_safe(list(exc.errors()))})


def create_app(
    bundle_dir: str | Path, device: str = "auto", strict: bool = False, limits: ServeLimits | None = None
) -> FastAPI:
    """Build the ASGI app for one bundle (loaded once, shared by all requests)."""
    limits = limits or ServeLimits()
    bundle = load_bundle(bundle_dir, device=device, strict=strict)
    app = FastAPI(title="vision_peft", version=vision_peft.__version__)
    app.add_exception_handler(RequestValidationError, _validation_error)
    stats = {"requests": 0, "errors": 0, "started": time.time()}
    lock = threading.Lock()
    store = AdapterStore(bundle, limits)
    app.state.adapter_store = store  # keeps the uploaded files alive with the app

    def count(ok: bool) -> None:
        with lock:
            stats["requests"] += 1
            stats["errors"] += 0 if ok else 1

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - stats["started"], 1), **stats}

    @app.get("/info")
    def info() -> dict[str, Any]:
        m = bundle.manifest
        adapters = store.records() if bundle.is_pack else []
        labels = bundle.labels if not bundle.is_pack else (adapters[0]["labels"] if len(adapters) == 1 else [])
        return {
            "task": m["task"],
            "backbone": m.get("backbone"),
            "adapter": m.get("adapter"),
            "pack": bundle.is_pack,
            "adapters": adapters,
            "labels": labels,
            "graphs": m["graphs"],
            "preprocess": m.get("preprocess"),
            "providers": bundle.providers,
            "bundle_version": m.get("vision_peft_version"),
            "server_version": vision_peft.__version__,
            "limits": limits.__dict__,
        }

    @app.get("/v1/adapters")
    def list_adapters() -> dict[str, Any]:
        return {"pack": bundle.is_pack, "adapters": store.records() if bundle.is_pack else []}

    @app.post("/v1/adapters", status_code=201)
    def add_adapter(
        file: UploadFile = File(..., description="the .onnx_adapter file"),  # noqa: B008 - FastAPI's idiom
        meta: UploadFile = File(..., description="its .adapter.json record"),  # noqa: B008
        name: str | None = Form(None, description="the name to serve it under (default: the record's)"),
    ) -> dict[str, Any]:
        ok = False
        try:
            out = store.add(file, meta, name)
            ok = True
            return out
        finally:
            count(ok)

    @app.delete("/v1/adapters/{name}")
    def remove_adapter(name: str) -> dict[str, Any]:
        ok = False
        try:
            out = store.remove(name)
            ok = True
            return out
        finally:
            count(ok)

    for _, entry in RUNTIMES.items():
        app.post(entry.builder.endpoint)(_endpoint(entry.builder, bundle, limits, count))
    return app


def serve(
    bundle_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    strict: bool = False,
    limits: ServeLimits | None = None,
) -> None:
    """Run the server with uvicorn (blocking)."""
    import uvicorn

    app = create_app(bundle_dir, device=device, strict=strict, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="warning")
