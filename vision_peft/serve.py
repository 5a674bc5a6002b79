"""A small inference server over a deployment bundle: FastAPI on the torch-free runtime (``vision_peft.deploy``).

Endpoints: ``GET /health``, ``GET /info`` (task, labels, graphs, providers really in use, version) and one
endpoint per task the bundle serves — ``POST /v1/classify`` for classification bundles (multipart field
``files``, one or more images). Inputs are validated before they reach the model: size limit per file,
file-count limit, accepted image types, decodability; every rejection is a 4xx JSON error naming the file,
and the server keeps serving. Binds 127.0.0.1 unless told otherwise.

    python -m vision_peft serve runs/<run>/export --port 8000
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError

import vision_peft
from vision_peft.deploy import load_bundle, softmax
from vision_peft.preprocess import preprocess_batch

IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "application/octet-stream"}


@dataclass
class ServeLimits:
    """Input validation limits."""

    max_file_bytes: int = 10 * 2**20  # per uploaded file
    max_files: int = 32  # per request (one batch)
    max_pixels: int = 40_000_000  # decoded image size guard (decompression bombs)


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

    if bundle.task == "classification":
        graph = next(iter(bundle.manifest["graphs"]))
        spec = bundle.preprocess["image"]
        in_name = next(iter(bundle.manifest["graphs"][graph]["inputs"]))
        out_name = next(iter(bundle.manifest["graphs"][graph]["outputs"]))

        @app.post("/v1/classify")
        def classify(files: list[UploadFile] = File(...), top_k: int | None = None) -> dict[str, Any]:
            ok = False
            try:
                if len(files) > limits.max_files:
                    raise HTTPException(413, f"{len(files)} files in one request; the limit is {limits.max_files}")
                top_k = min(5, len(bundle.labels)) if top_k is None else top_k
                if not 1 <= top_k <= len(bundle.labels):
                    raise HTTPException(422, f"top_k must lie in 1..{len(bundle.labels)}, got {top_k}")
                images = []
                for f in files:
                    name = f.filename or "upload"
                    if f.content_type and f.content_type not in IMAGE_TYPES:
                        raise HTTPException(415, f"{name}: content type {f.content_type} is not an image")
                    data = f.file.read(limits.max_file_bytes + 1)
                    if len(data) > limits.max_file_bytes:
                        raise HTTPException(413, f"{name}: larger than {limits.max_file_bytes} bytes")
                    images.append(_decode(name, data, limits))
                x = preprocess_batch(images, spec)  # (B, 3, H, W)
                logits = bundle.run(graph, **{in_name: x})[out_name]
                probs = softmax(logits, axis=1)
                results = []
                for f, p in zip(files, probs):
                    order = np.argsort(-p)[:top_k]
                    results.append(
                        {
                            "file": f.filename,
                            "label": bundle.labels[int(order[0])],
                            "prob": float(p[order[0]]),
                            "top": [{"label": bundle.labels[int(i)], "prob": float(p[i])} for i in order],
                        }
                    )
                ok = True
                return {"results": results, "providers": bundle.providers}
            finally:
                count(ok)

    return app


def serve(
    bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", strict: bool = False
) -> None:
    """Run the server with uvicorn (blocking)."""
    import uvicorn

    uvicorn.run(create_app(bundle_dir, device=device, strict=strict), host=host, port=port, log_level="warning")
