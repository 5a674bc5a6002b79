"""A small inference server over a deployment bundle: FastAPI on the torch-free runtime (``vision_peft.deploy``).

Endpoints: ``GET /health``, ``GET /info`` (task, labels, graphs, providers really in use, version) and the
endpoint of the bundle's task (the others answer 409 naming the right one):

- ``POST /v1/classify`` (classification): multipart ``files`` (images), optional ``top_k``;
- ``POST /v1/fewshot`` (fewshot): multipart ``support`` (images) with ``support_labels`` (one class name per
  support image, same order) and ``query`` (images);
- ``POST /v1/points`` (pointcloud): multipart ``files`` (PCD/OFF/PLY/NPY/NPZ/HDF5 point files);
- ``POST /v1/segment`` (refseg): multipart ``file`` (one image) and form field ``phrase`` -> mask PNG (base64);
- ``POST /v1/generate`` (diffusion): JSON ``{"classes": [...], "n": 1, "steps": 25, "guidance": 2, "seed": 0}``
  -> PNG grid (base64), one row per class.

Inputs are validated before they reach the model: size limit per file, file-count limit, accepted types,
decodability, step and image-count caps; every rejection is a 4xx JSON error naming the file, and the server
keeps serving. Binds 127.0.0.1 unless told otherwise.

    python -m vision_peft serve runs/<run>/export --port 8000
"""

from __future__ import annotations

import base64
import functools
import io
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

import vision_peft
from vision_peft.deploy import load_bundle

IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "application/octet-stream"}


@dataclass
class ServeLimits:
    """Input validation limits."""

    max_file_bytes: int = 10 * 2**20  # per uploaded file
    max_files: int = 32  # per request (one batch)
    max_pixels: int = 40_000_000  # decoded image size guard (decompression bombs)
    max_images: int = 16  # diffusion: generated images per request
    max_steps: int = 100  # diffusion: DDIM steps per request


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


def _png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate``."""

    classes: list[str]
    n: int = 1
    steps: int = 25
    guidance: float = 2.0
    seed: int = 0


def create_app(
    bundle_dir: str | Path, device: str = "auto", strict: bool = False, limits: ServeLimits | None = None
) -> FastAPI:
    """Build the ASGI app for one bundle (loaded once, shared by all requests)."""
    limits = limits or ServeLimits()
    bundle = load_bundle(bundle_dir, device=device, strict=strict)
    app = FastAPI(title="vision_peft", version=vision_peft.__version__)
    stats = {"requests": 0, "errors": 0, "started": time.time()}
    lock = threading.Lock()

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
        return {
            "task": m["task"],
            "backbone": m.get("backbone"),
            "adapter": m.get("adapter"),
            "labels": bundle.labels,
            "graphs": m["graphs"],
            "preprocess": m.get("preprocess"),
            "providers": bundle.providers,
            "bundle_version": m.get("vision_peft_version"),
            "server_version": vision_peft.__version__,
            "limits": limits.__dict__,
        }

    endpoints = {
        "classification": "/v1/classify",
        "fewshot": "/v1/fewshot",
        "pointcloud": "/v1/points",
        "refseg": "/v1/segment",
        "diffusion": "/v1/generate",
    }

    def guarded(task: str):
        """Runs an endpoint body: 409 on a bundle of another task, 4xx for bad input, counted either way."""

        def wrap(fn):
            @functools.wraps(fn)
            def inner(*args, **kwargs):
                ok = False
                try:
                    if bundle.task != task:
                        raise HTTPException(
                            409,
                            f"this server's bundle is task {bundle.task!r}; use "
                            f"{endpoints.get(bundle.task, '/info')} (this endpoint serves {task!r} bundles)",
                        )
                    out = fn(*args, **kwargs)
                    ok = True
                    return out
                except ValueError as e:  # the runtime's own input checks (unknown class, bad point file …)
                    raise HTTPException(422, str(e)) from None
                finally:
                    count(ok)

            return inner

        return wrap

    def checked_top_k(top_k: int | None) -> int:
        n = len(bundle.labels)
        top_k = min(5, n) if top_k is None else top_k
        if not 1 <= top_k <= n:
            raise HTTPException(422, f"top_k must lie in 1..{n}, got {top_k}")
        return top_k

    def images_of(files: list[UploadFile]) -> tuple[list[str], list[Image.Image]]:
        names, images = [], []
        for f in files:
            name, data = _read(f, limits, IMAGE_TYPES)
            names.append(name)
            images.append(_decode(name, data, limits))
        return names, images

    @app.post("/v1/classify")
    @guarded("classification")
    def classify(files: list[UploadFile] = File(...), top_k: int | None = None) -> dict[str, Any]:
        _count_files(len(files), limits)
        top_k = checked_top_k(top_k)
        names, images = images_of(files)
        results = [{"file": n, **_top(r, top_k)} for n, r in zip(names, bundle.classify(images), strict=True)]
        return {"results": results, "providers": bundle.providers}

    @app.post("/v1/fewshot")
    @guarded("fewshot")
    def fewshot(
        support: list[UploadFile] = File(...),
        support_labels: list[str] = Form(...),
        query: list[UploadFile] = File(...),
    ) -> dict[str, Any]:
        _count_files(len(support) + len(query), limits)
        if len(support_labels) == 1 and len(support) > 1 and "," in support_labels[0]:
            support_labels = [x.strip() for x in support_labels[0].split(",")]
        if len(support_labels) != len(support):
            raise HTTPException(
                422,
                f"support_labels must give one class name per support image: {len(support_labels)} names for "
                f"{len(support)} images",
            )
        _, s_imgs = images_of(support)
        q_names, q_imgs = images_of(query)
        sets: dict[str, list[Image.Image]] = {}
        for label, img in zip(support_labels, s_imgs, strict=True):
            sets.setdefault(label, []).append(img)
        res = bundle.fewshot(sets, q_imgs)
        return {"results": [{"file": n, **_top(r, len(sets))} for n, r in zip(q_names, res, strict=True)],
                "classes": list(sets), "providers": bundle.providers}  # fmt: skip

    @app.post("/v1/points")
    @guarded("pointcloud")
    def points(files: list[UploadFile] = File(...), top_k: int | None = None) -> dict[str, Any]:
        from vision_peft.pointio import POINT_EXTS

        _count_files(len(files), limits)
        top_k = checked_top_k(top_k)
        with tempfile.TemporaryDirectory(prefix="vp-points-") as td:
            paths = []
            for i, f in enumerate(files):
                name, data = _read(f, limits, None)
                ext = Path(name).suffix.lower()
                if ext not in POINT_EXTS:
                    raise HTTPException(415, f"{name}: extension {ext or '(none)'} is not a point format {POINT_EXTS}")
                dest = Path(td) / f"{i}{ext}"  # never the client's file name on disk
                dest.write_bytes(data)
                paths.append(dest)
            try:
                res = bundle.classify_points(paths)
            except ValueError as e:  # the reader names the temp file: name the upload instead
                msg = str(e)
                for f, path in zip(files, paths, strict=True):
                    msg = msg.replace(str(path), f.filename or "upload")
                raise HTTPException(422, msg) from None
        results = [{"file": f.filename, **_top(r, top_k)} for f, r in zip(files, res, strict=True)]
        return {"results": results, "providers": bundle.providers}

    @app.post("/v1/segment")
    @guarded("refseg")
    def segment(file: UploadFile = File(...), phrase: str = Form(...)) -> dict[str, Any]:
        if len(phrase) > 1000:
            raise HTTPException(413, f"phrase has {len(phrase)} characters; the limit is 1000")
        (name,), (image,) = images_of([file])
        r = bundle.segment(image, phrase)
        return {
            "file": name,
            "phrase": phrase,
            "width": image.width,
            "height": image.height,
            "area_fraction": r["area_fraction"],
            "max_prob": r["max_prob"],
            "mask_png_base64": _png_b64((r["mask"] * 255).astype(np.uint8)),
            "providers": bundle.providers,
        }

    @app.post("/v1/generate")
    @guarded("diffusion")
    def generate(req: GenerateRequest) -> dict[str, Any]:
        total = req.n * len(req.classes)
        if req.n < 1 or not req.classes or total > limits.max_images:
            raise HTTPException(
                422, f"ask for 1..{limits.max_images} images in all (classes × n), got {len(req.classes)} × {req.n}"
            )
        if not 1 <= req.steps <= limits.max_steps:
            raise HTTPException(422, f"steps must lie in 1..{limits.max_steps} on this server, got {req.steps}")
        labels = [c for c in req.classes for _ in range(req.n)]
        images = bundle.generate(labels, steps=req.steps, guidance=req.guidance, seed=req.seed)
        from vision_peft.deploy import save_grid

        with tempfile.TemporaryDirectory() as td:
            grid = save_grid(images, req.n, Path(td) / "grid.png").read_bytes()
        return {
            "classes": req.classes,
            "n_per_class": req.n,
            "image_size": int(images.shape[-1]),
            "grid_png_base64": base64.b64encode(grid).decode("ascii"),
            "providers": bundle.providers,
        }

    return app


def _top(r: dict[str, Any], k: int) -> dict[str, Any]:
    order = sorted(r["probs"].items(), key=lambda kv: -kv[1])[:k]
    return {"label": r["label"], "prob": r["prob"], "top": [{"label": a, "prob": b} for a, b in order]}


def serve(
    bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", strict: bool = False
) -> None:
    """Run the server with uvicorn (blocking)."""
    import uvicorn

    uvicorn.run(create_app(bundle_dir, device=device, strict=strict), host=host, port=port, log_level="warning")
