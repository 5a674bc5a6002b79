"""Diffusion runtime: class names -> images by deterministic DDIM over the bundle's denoiser and decoder graphs.

The sampler lives here once, written for any array type with ``+ - * /`` and ``.clip``: the torch task
(``tasks/diffusion.py``) calls :func:`ddim_sample` with tensors, this runtime with numpy arrays. Schedule
coefficients are Python floats (``float(alphas_cumprod[t])``), so both halves compute each step in the latents'
own dtype.
"""

from __future__ import annotations

import argparse
import base64
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes import base as rt

MAX_GUIDANCE = 20.0  # the largest classifier-free guidance scale a request may ask for


class DiffusionInputError(ValueError):
    """A bad sampling request (steps, guidance, classes) or bad image data."""


def check_sampling(steps: Any, guidance: Any, num_timesteps: int, max_guidance: float = MAX_GUIDANCE) -> None:
    """Refuses sampler arguments outside their range.

    Args:
        steps: DDIM steps: an integer (not a bool) in [1, num_timesteps].
        guidance: Classifier-free guidance scale: a finite Python number in [0, max_guidance].
        num_timesteps: T of the schedule.
        max_guidance: The largest accepted guidance scale.

    Raises:
        DiffusionInputError: Either argument is out of range or of the wrong type.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise DiffusionInputError(f"sampling steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and 0.0 <= guidance <= max_guidance):
        raise DiffusionInputError(f"guidance scale must lie in [0, {max_guidance}], got {guidance!r}")


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Descending, evenly spaced timesteps from T-1 down to 0."""
    ts = np.linspace(0, num_timesteps - 1, steps).round().astype(int)[::-1]
    return [int(t) for t in ts]


def x0_eps(x: Any, out: Any, a_t: float, prediction: str) -> tuple[Any, Any]:
    """(x0 estimate, ε estimate) from the denoiser output ``out`` at x_t with ᾱ_t = ``a_t`` (a Python float).

    ``prediction`` is ``eps`` (the denoiser predicts the noise) or ``v`` (v = √ᾱ·ε − √(1−ᾱ)·x0)."""
    if prediction == "v":
        return math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out, math.sqrt(1 - a_t) * x + math.sqrt(a_t) * out
    return (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t), out


def ddim_step(x: Any, out: Any, a_t: float, a_prev: float, clip_x0: float = 0.0, prediction: str = "eps") -> Any:
    """One deterministic DDIM step (η = 0) from the denoiser output ``out`` (ε or v). With ``clip_x0`` > 0 the x0
    estimate is clipped to [-clip_x0, clip_x0] and ε re-derived from it."""
    x0, eps = x0_eps(x, out, a_t, prediction)
    if clip_x0 > 0:
        x0 = x0.clip(-clip_x0, clip_x0)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def guided(cond: Any, uncond: Any, guidance: float) -> Any:
    """Classifier-free guidance: ``uncond + guidance · (cond − uncond)``."""
    return uncond + guidance * (cond - uncond)


def ddim_sample(
    denoise: Callable[[Any, int], tuple[Any, Any]],
    x: Any,
    alphas_cumprod: Sequence[float] | Any,
    steps: int,
    guidance: float,
    clip_x0: float = 0.0,
    prediction: str = "eps",
    denoise_cond: Callable[[Any, int], Any] | None = None,
) -> Any:
    """Deterministic DDIM (η = 0) with classifier-free guidance, for numpy arrays or torch tensors alike.

    Validate the arguments with :func:`check_sampling` first.

    Args:
        denoise: ``(x_t, t) -> (conditional output, null-class output)`` of the denoiser at integer timestep t.
        x: Initial latents x_T (N, C, g, g).
        alphas_cumprod: ᾱ for t = 0..T-1 (anything indexable whose items ``float()`` takes).
        steps: Sampler steps.
        guidance: Guidance scale.
        clip_x0: Clip of the x0 estimate (0 = off).
        prediction: ``eps`` or ``v``.
        denoise_cond: ``(x_t, t) -> conditional output`` alone; used at guidance 1 (one pass instead of two).

    Returns:
        The final latents x_0, same type and shape as ``x``.
    """
    ts = ddim_timesteps(len(alphas_cumprod), steps)
    for i, t in enumerate(ts):
        if guidance == 1.0 and denoise_cond is not None:
            out = denoise_cond(x, t)
        else:
            cond, uncond = denoise(x, t)
            out = guided(cond, uncond, guidance)
        a_prev = float(alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x = ddim_step(x, out, float(alphas_cumprod[t]), a_prev, clip_x0, prediction)
    return x


def save_grid(images: np.ndarray, nrow: int, path: str | Path) -> Path:
    """(N, 3, H, W) images in [0, 1] -> one PNG grid with ``nrow`` images per row (2-pixel white gaps)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + 2), nrow * (w + 2), 3), 255, np.uint8)
    arr = (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)  # (N,3,H,W)->(N,H,W,3)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = arr[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return Path(path)


@RUNTIMES.register("diffusion", help="class names -> images: numpy DDIM over the denoiser and decoder graphs")
class DiffusionRuntime(rt.Runtime):
    """Class-conditional latent diffusion bundles (graphs ``denoiser`` and ``decoder``)."""

    task = "diffusion"
    endpoint = "/v1/generate"
    panel = "class_grid"
    methods = ("generate",)
    cli_inputs = "class names (--n per class, --out grid.png)"
    cli_args = (
        rt.CliArg(("--out",), {"help": "the PNG grid (default samples.png)"}),
        rt.CliArg(("--n",), {"type": int, "default": 4, "help": "images per class (default: 4)"}),
        rt.CliArg(("--steps",), {"type": int, "default": 25, "help": "DDIM steps (default: 25)"}),
        rt.CliArg(("--guidance",), {"type": float, "default": 2.0, "help": "guidance scale (default: 2)"}),
        rt.CliArg(("--seed",), {"type": int, "default": 0, "help": "noise seed (default: 0)"}),
    )
    http_fields = (
        rt.HttpField(
            "req",
            "json",
            model="GenerateRequest",
            body={
                "classes": (list[str], ...),
                "n": (int, 1),
                "steps": (int, 25),
                "guidance": (float, 2.0),
                "seed": (int, 0),
            },
        ),
    )

    def generate(
        self,
        classes: Sequence[str | int],
        steps: int = 25,
        guidance: float = 2.0,
        seed: int = 0,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """One image per entry of ``classes`` (names or ids) -> (N, 3, H, W) float32 in [0, 1].

        Deterministic DDIM (eta = 0) with classifier-free guidance on the denoiser graph, then the decoder graph;
        ``noise`` (N, C, g, g) replaces the seeded initial latents (numpy ``RandomState(seed)``)."""
        b = self.bundle
        info = b.task_info
        names = list(info["classes"])
        ids = []
        for c in classes:
            if isinstance(c, str) and c in names:
                ids.append(names.index(c))
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= int(c) < len(names):
                ids.append(int(c))
            else:
                raise ValueError(f"class {c!r} is outside the trained set; known: {names} (or ids 0..{len(names) - 1})")
        if not ids:
            raise ValueError("generate() needs at least one class")
        check_sampling(steps, guidance, int(info["num_timesteps"]), float(info.get("max_guidance", MAX_GUIDANCE)))
        labels = np.asarray(ids, np.int64)
        c, g = int(info["latent_channels"]), int(info["latent_size"])
        if noise is None:
            noise = np.random.RandomState(seed).standard_normal((len(labels), c, g, g))
        x = np.asarray(noise, np.float32)
        if x.shape != (len(labels), c, g, g):
            raise ValueError(f"noise must have shape {(len(labels), c, g, g)}, got {x.shape}")
        null = np.full_like(labels, int(info["null_class"]))

        def denoise(x: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
            tt = np.full(len(labels), t, np.int64)
            e = b.run(
                "denoiser", x=np.concatenate([x, x]), t=np.concatenate([tt, tt]), y=np.concatenate([labels, null])
            )
            cond, uncond = np.split(next(iter(e.values())), 2)  # (2N, C, g, g) -> 2 × (N, C, g, g)
            return cond, uncond

        ac = [float(a) for a in info["alphas_cumprod"]]
        x = ddim_sample(denoise, x, ac, int(steps), float(guidance), float(info.get("clip_x0", 0.0)),
                        info.get("prediction", "eps"))  # fmt: skip
        return np.clip(next(iter(b.run("decoder", z=np.asarray(x, np.float32)).values())), 0.0, 1.0)

    def predict_cli(self, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
        classes = [c for c in inputs for _ in range(args.n)]
        images = self.generate(classes, steps=args.steps, guidance=args.guidance, seed=args.seed)
        dest = save_grid(images, args.n, args.out or "samples.png")
        return [{"classes": list(inputs), "n_per_class": args.n, "grid": str(dest), "shape": list(images.shape)}]

    def http(self, request: rt.HttpRequest) -> dict[str, Any]:
        req, limits = request.value("req"), request.limits
        n, classes = req["n"], req["classes"]
        if n < 1 or not classes or n * len(classes) > limits.max_images:
            raise rt.HttpError(
                422, f"ask for 1..{limits.max_images} images in all (classes × n), got {len(classes)} × {n}"
            )
        if not 1 <= req["steps"] <= limits.max_steps:
            raise rt.HttpError(422, f"steps must lie in 1..{limits.max_steps} on this server, got {req['steps']}")
        labels = [c for c in classes for _ in range(n)]
        images = self.generate(labels, steps=req["steps"], guidance=req["guidance"], seed=req["seed"])
        with tempfile.TemporaryDirectory() as td:
            grid = save_grid(images, n, Path(td) / "grid.png").read_bytes()
        return {
            "classes": classes,
            "n_per_class": n,
            "image_size": int(images.shape[-1]),
            "grid_png_base64": base64.b64encode(grid).decode("ascii"),
        }

    @classmethod
    def load_test_request(cls, inputs: Path | None, options: rt.LoadTestOptions) -> rt.LoadTestRequests:
        return _GenerateRequests(cls.endpoint, list(options.labels), options.steps)


class _GenerateRequests(rt.LoadTestRequests):
    """JSON bodies: one class per request; malformed = garbage JSON, an unknown class, no classes."""

    def __init__(self, route: str, classes: list[str], steps: int) -> None:
        super().__init__(route)
        if not classes:
            raise SystemExit("the bundle lists no classes to generate")
        self.classes, self.steps = classes, steps

    def good(self, i: int) -> dict[str, Any]:
        return {"json": {"classes": [self.classes[i % len(self.classes)]], "n": 1, "steps": self.steps, "seed": i}}

    def malformed(self, kind: int) -> dict[str, Any]:
        import os

        return [
            {"content": os.urandom(64), "headers": {"content-type": "application/json"}},
            {"json": {"classes": ["no-such-class-xyz"], "n": 1, "steps": self.steps}},
            {"json": {"n": 1}},
        ][kind]
