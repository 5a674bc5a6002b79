"""Class-conditional latent diffusion: pre-train a small DiT on source classes, adapt it to new classes.

Latent space: the frozen TAEF2 autoencoder (image [0, 1] ↔ 32×H/8×W/8, latents scaled by ``LATENT_SCALE``).
Denoiser: the latent DiT of ``vision_peft.backbones.dit`` — **pre-trained by this project** (no pretrained
denoiser exists offline): ``stage: pretrain`` trains it from random init on the AID base classes and
:func:`write_base_checkpoint` turns that run into ``base_dit.safetensors``, the frozen backbone of
``stage: adapt`` runs on held-out classes (SaRA, KIND tailors, LoRA, full fine-tuning, FISH …).

Diffusion: DDPM linear β schedule (1e-4 → 0.02, T = 1000), ε objective (MSE), class dropout to the null
class for classifier-free guidance, deterministic DDIM sampling (η = 0) with guidance
ε = ε_∅ + s (ε_y − ε_∅). In ``adapt`` the class table is replaced by a trainable one for the target classes
(its rows start at the mean base-class row; the null row is copied) and counts as the task head.

Evaluation (test split = held-out real images of the run's classes): held-out ε-MSE at fixed timesteps, and
when ``samples_per_class > 0`` the **Fréchet distance in EfficientNet-Lite0 pooled-feature space** (1280-d,
224², mean/std 0.5 — not "FID", which is defined on Inception-v3) between generated and real images, and the
top-1 accuracy on generated samples of a fixed classifier (softmax regression on EfficientNet-Lite0
features of the real training images, trained deterministically, identical for every method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.config import ConfigError, resolve_data_path
from vision_peft.tasks import TASKS, ExportSpec, Task, TaskModel, build_adapted_backbone

AID_BASE = [
    "BaseballField", "StorageTanks", "Meadow", "Farmland", "Square", "School", "Stadium", "Forest",
    "Parking", "Resort", "Center", "Park", "DenseResidential", "MediumResidential", "River", "Port",
]  # fmt: skip
AID_NOVEL = ["Commercial", "SparseResidential", "Beach", "Airport", "RailwayStation", "Mountain", "Industrial"]
LATENT_SCALE = 1.25  # 1 / std of TAEF2 latents of 64² AID images (measured 0.795)
MAX_GUIDANCE = 20.0
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DiffusionInputError(ValueError):
    """A bad sampling request or bad image data."""


@dataclass
class DiffusionConfig:
    """Latent class-conditional diffusion (TAEF2 latents, DiT denoiser)."""

    name: str = "diffusion"  # registry name
    stage: str = "adapt"  # pretrain (random-init DiT, source classes) | adapt (frozen pre-trained DiT, new classes)
    data_root: str = "aid"  # folder of class sub-folders (relative paths resolve under $VISION_PEFT_DATA)
    classes: list[str] | None = None  # None = AID base classes (pretrain) or AID novel classes (adapt)
    image_size: int = 64  # square training resolution (multiple of 16: TAEF2 /8, DiT patch 2)
    train_per_class: int = 60  # real images per class for training (first after a seeded shuffle)
    eval_per_class: int = 40  # real held-out images per class for evaluation (the rest)
    split_seed: int = 0
    flip: bool = True  # add horizontally flipped copies (encoded once) to the training latents
    num_timesteps: int = 1000  # DDPM steps T
    class_dropout: float = 0.1  # probability of training a sample with the null class (for guidance)
    sample_steps: int = 25  # DDIM steps at evaluation
    guidance: float = 2.0  # classifier-free guidance scale at evaluation
    samples_per_class: int = 0  # generated images per class at evaluation (0 = only held-out ε-MSE)
    eval_seed: int = 1234  # seed of the evaluation noise (same for every method)
    # DDIM clips each x0 estimate to [-clip_x0, clip_x0] (scaled-latent units; 0 = off). Scaled TAEF2 latents of AID
    # images have std ≈ 1.0 and max |z| ≈ 5.1; without the clip, the ε error at t ≈ T (amplified by 1/√ᾱ_T ≈ 157)
    # set x0 estimates of std ≈ 20 that later steps never pull back, and samples saturated (measured).
    clip_x0: float = 5.0
    # what the denoiser predicts: eps (noise; the classic DDPM target) or v = sqrt(a)*eps - sqrt(1-a)*x0 (Salimans &
    # Ho 2022), whose x0 estimate has no 1/sqrt(a_T) amplification at t ≈ T. The recipes use v; eps is the default
    # only so that run directories written before this option load unchanged. A base checkpoint records its own
    # and adapting it with the other is refused.
    prediction: str = "eps"
    vae_weights: str | None = None  # TAEF2 folder; None = $VISION_PEFT_WEIGHTS/taef2

    def __post_init__(self) -> None:
        if self.stage not in ("pretrain", "adapt"):
            raise ConfigError(f"task.stage must be pretrain or adapt, got {self.stage!r}")
        if self.image_size < 16 or self.image_size % 16:
            raise ConfigError(f"task.image_size must be a multiple of 16 (TAEF2 /8 × patch 2), got {self.image_size}")
        if self.train_per_class < 1 or self.eval_per_class < 0 or self.samples_per_class < 0:
            raise ConfigError("task.train_per_class must be >= 1; eval_per_class, samples_per_class >= 0")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"task.class_dropout must lie in [0, 1), got {self.class_dropout}")
        check_sampling(self.sample_steps, self.guidance, self.num_timesteps)
        if self.prediction not in ("eps", "v"):
            raise ConfigError(f"task.prediction must be eps or v, got {self.prediction!r}")
        if not (math.isfinite(self.clip_x0) and self.clip_x0 >= 0):
            raise ConfigError(f"task.clip_x0 must be >= 0 (0 = no clipping), got {self.clip_x0}")


def check_sampling(steps: int, guidance: float, num_timesteps: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise DiffusionInputError(f"sampling steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
        raise DiffusionInputError(f"guidance scale must lie in [0, {MAX_GUIDANCE}], got {guidance!r}")


# -- schedule and sampler -------------------------------------------------------------------------------------
def ddpm_alphas_cumprod(t: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    betas = torch.linspace(beta_start, beta_end, t, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Descending, evenly spaced timesteps ending at 0."""
    ts = np.linspace(0, num_timesteps - 1, steps).round().astype(int)[::-1]
    return [int(t) for t in ts]


def x0_eps(x: torch.Tensor, out: torch.Tensor, a_t: float, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 estimate, ε estimate) from the denoiser output at x_t with ᾱ_t = a_t."""
    if prediction == "v":
        return math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out, math.sqrt(1 - a_t) * x + math.sqrt(a_t) * out
    return (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t), out


def ddim_step(
    x: torch.Tensor, out: torch.Tensor, a_t: float, a_prev: float, clip_x0: float = 0.0, prediction: str = "eps"
) -> torch.Tensor:
    """One deterministic DDIM step (η = 0) from the denoiser output ``out`` (ε or v). With ``clip_x0`` > 0 the x0
    estimate is clipped to that range and ε re-derived from it (the runtime's numpy sampler does the same)."""
    x0, eps = x0_eps(x, out, a_t, prediction)
    if clip_x0 > 0:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


# -- data ---------------------------------------------------------------------------------------------------
def list_class_images(root: Path, classes: list[str]) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DiffusionInputError(f"image folder {root} does not exist (set $VISION_PEFT_DATA or task.data_root)")
    out = {}
    for c in classes:
        d = root / c
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXT) if d.is_dir() else []
        if not files:
            raise DiffusionInputError(f"class folder {d} is missing or holds no images ({', '.join(IMAGE_EXT)})")
        out[c] = files
    return out


def load_rgb(path: Path, size: int, min_side: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: shorter side resized, centre crop. Refuses images below ``min_side``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if min(w, h) < min_side:
            raise DiffusionInputError(
                f"{path} is {w}x{h}: smaller than the smallest latent grid ({min_side}x{min_side} pixels)"
            )
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


_LATENT_CACHE: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Scaled latents (N, 32, H/8, W/8) of images (N, 3, H, W) in [0, 1]."""
    if images.shape[-1] < 16 or images.shape[-2] < 16:
        raise DiffusionInputError(f"images of {tuple(images.shape[-2:])} are smaller than the 2×2 latent grid (16 px)")
    dev = next(vae.parameters()).device  # the VAE follows the model (CUDA in training); images come from disk
    out = [vae.encode(images[i : i + batch].to(dev)) * LATENT_SCALE for i in range(0, len(images), batch)]
    return torch.cat(out)


class TensorDictDataset(torch.utils.data.Dataset):
    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


# -- features for evaluation ------------------------------------------------------------------------------------
_FEATURE_NET = None


def effnet_features(images: torch.Tensor, batch: int = 50) -> np.ndarray:
    """EfficientNet-Lite0 pooled features (N, 1280) of images in [0, 1] (resized to 224², mean/std 0.5)."""
    global _FEATURE_NET
    if _FEATURE_NET is None:
        from vision_peft.backbones import build_backbone
        from vision_peft.config import BackboneConfig

        _FEATURE_NET = build_backbone(BackboneConfig(name="effnet_lite0")).eval().requires_grad_(False)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = F.interpolate(images[i : i + batch].float(), size=(224, 224), mode="bilinear", align_corners=False)
            out.append(_FEATURE_NET.forward_features((x - 0.5) / 0.5).double().numpy())
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between two feature sets (rows = samples)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fit_probe(feats: np.ndarray, labels: np.ndarray, n_classes: int, steps: int = 300) -> tuple[torch.Tensor, ...]:
    """Deterministic softmax regression on standardised features (the fixed sample classifier)."""
    x = torch.from_numpy(feats).float()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    y = torch.from_numpy(labels).long()
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mu, sd, w.detach(), b.detach()


def probe_predict(probe, feats: np.ndarray) -> np.ndarray:
    mu, sd, w, b = probe
    return (((torch.from_numpy(feats).float() - mu) / sd) @ w + b).argmax(1).numpy()


# -- model --------------------------------------------------------------------------------------------------
class DiffusionModel(TaskModel):
    """Frozen TAEF2 + (adapted) DiT; ``forward`` returns the ε-MSE (+ SaRA's nuclear-norm penalty)."""

    def __init__(self, backbone: nn.Module, adapter, vae: nn.Module, cfg: DiffusionConfig, adapter_cfg) -> None:
        super().__init__(backbone, adapter)
        self.vae = vae
        self.tcfg = cfg
        self.register_buffer("alphas_cumprod", ddpm_alphas_cumprod(cfg.num_timesteps), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def null_class(self) -> int:
        return self.backbone.num_classes

    def head_parameters(self) -> list[nn.Parameter]:
        w = self.backbone.y_embed.weight
        return [w] if (self.tcfg.stage == "adapt" and w.requires_grad) else []

    def set_train_mode(self) -> None:
        super().set_train_mode()
        self.vae.eval()

    def eps_loss(self, z0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Training loss: MSE to the configured target (ε, or v = √ā·ε − √(1−ā)·x0)."""
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = noise if self.tcfg.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z0
        return F.mse_loss(self.backbone(xt, t, y).float(), target.float())

    def heldout_eps_mse(self, z0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> float:
        """ε-MSE of the denoiser whatever it predicts (v is converted), so runs compare across parameterisations."""
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        out = self.backbone(xt, t, y).float()
        eps = out if self.tcfg.prediction == "eps" else (1 - a).sqrt() * xt + a.sqrt() * out
        return float(F.mse_loss(eps, noise.float()))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z0, y = batch["latent"], batch["label"]
        if self.training and self.tcfg.class_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.tcfg.class_dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        t = torch.randint(0, self.tcfg.num_timesteps, (len(y),), device=z0.device)
        loss = self.eps_loss(z0, y, t, torch.randn_like(z0))
        return {"loss": loss, "output": loss.detach()}  # adapter penalties (SaRA's): handle.extra_losses

    def check_labels(self, labels: torch.Tensor) -> None:
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise DiffusionInputError(
                f"class id(s) {sorted(set(bad.tolist()))[:5]} outside the trained classes 0..{self.num_classes - 1}"
            )

    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        steps: int = 25,
        guidance: float = 2.0,
        seed: int = 0,
        size: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM (η = 0) with classifier-free guidance; returns scaled latents."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        self.check_labels(labels)
        check_sampling(steps, guidance, self.tcfg.num_timesteps)
        size = size or self.tcfg.image_size
        g = size // 8
        dev = self.alphas_cumprod.device
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(len(labels), 32, g, g, generator=gen) if noise is None else torch.as_tensor(noise)).to(dev)
        labels = labels.to(dev)
        null = torch.full_like(labels, self.null_class)
        ts = ddim_timesteps(self.tcfg.num_timesteps, steps)
        ac = self.alphas_cumprod
        for i, t in enumerate(ts):
            tt = torch.full((len(labels),), t, device=dev, dtype=torch.long)
            if guidance == 1.0:
                eps = self.backbone(x, tt, labels)
            else:
                e = self.backbone(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
                ec, eu = e.chunk(2)
                eps = eu + guidance * (ec - eu)
            a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            x = ddim_step(x, eps, float(ac[t]), a_prev, self.tcfg.clip_x0, self.tcfg.prediction)
        return x

    @torch.no_grad()
    def sample(self, labels, steps: int = 25, guidance: float = 2.0, seed: int = 0, noise=None) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] for class ids ``labels`` (``noise``: optional initial latents)."""
        z = self.sample_latents(labels, steps, guidance, seed, noise=noise)
        return self.vae.decode(z / LATENT_SCALE)


class _Denoiser(nn.Module):
    """Export wrapper: (x_t, t float, y int64) → ε."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, y)


class _Decoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / LATENT_SCALE)


if __name__ == "__main__":  # `python -m vision_peft.tasks.diffusion`: run the registered module's CLI, once
    from vision_peft.tasks.diffusion import main as _main

    _main()
    raise SystemExit(0)


@TASKS.register("diffusion", config_cls=DiffusionConfig, help="class-conditional latent diffusion (TAEF2 + DiT)")
class DiffusionTask(Task):
    """Pre-train a latent DiT on source classes, or adapt a pre-trained one to new classes."""

    name = "diffusion"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        t = cfg.task
        self._classes = list(t.classes) if t.classes else list(AID_BASE if t.stage == "pretrain" else AID_NOVEL)
        self._vae = None
        self._probe = None

    @property
    def classes(self) -> list[str]:
        return self._classes

    def set_classes(self, classes: list[str]) -> None:
        self._classes = list(classes)

    def state_info(self) -> dict[str, Any]:
        return {"classes": self.classes, "stage": self.cfg.task.stage, "latent_scale": LATENT_SCALE}

    def vae(self):
        if self._vae is None:
            from vision_peft.backbones.taef2 import load_taef2

            self._vae = load_taef2(self.cfg.task.vae_weights)
        return self._vae

    # -- model ------------------------------------------------------------------------------------------
    def build_model(self) -> DiffusionModel:
        backbone, handle, base = build_adapted_backbone(self.cfg)
        if getattr(backbone, "kind", "") != "denoiser":
            raise ConfigError(f"the diffusion task needs backbone.name=dit:…, got {self.cfg.backbone.name!r}")
        t = self.cfg.task
        if t.stage == "pretrain":
            if backbone.num_classes != len(self.classes):
                raise ConfigError(
                    f"pretrain: the DiT has {backbone.num_classes} classes but the task {len(self.classes)}; "
                    f"use backbone.name=dit:…-c{len(self.classes)}"
                )
            if not all(p.requires_grad for p in backbone.parameters()):  # full, or KIND's integration stage
                raise ConfigError("stage: pretrain trains the whole DiT: use adapter full or kind (mode: pretrain)")
        else:
            base_pred = (getattr(backbone, "meta", None) or {}).get("prediction", "eps")  # older checkpoints: eps
            if base_pred != t.prediction:
                raise ConfigError(
                    f"the base DiT {self.cfg.backbone.name} was pre-trained to predict {base_pred!r} but "
                    f"task.prediction={t.prediction!r}; set task.prediction={base_pred} (or pre-train a new base)"
                )
            backbone.reset_classes(len(self.classes))  # a new trainable class table (the task head)
            handle.on_classes(self.classes)
        vae = self.vae()
        ids, bufs = base
        ids = set(ids) | {id(p) for p in vae.parameters()}
        model = DiffusionModel(backbone, handle, vae, t, self.cfg.adapter)
        model.mark_base((ids, bufs))
        return model

    # -- data -------------------------------------------------------------------------------------------
    def splits(self) -> dict[str, list[tuple[str, int]]]:
        t = self.cfg.task
        files = list_class_images(resolve_data_path(t.data_root), self.classes)
        rng = np.random.RandomState(t.split_seed)
        out: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for label, c in enumerate(self.classes):
            order = rng.permutation(len(files[c]))
            fs = [str(files[c][i]) for i in order]
            out["train"] += [(f, label) for f in fs[: t.train_per_class]]
            out["test"] += [(f, label) for f in fs[t.train_per_class : t.train_per_class + t.eval_per_class]]
        return out

    def load_images(self, samples: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.task
        imgs = torch.stack([load_rgb(Path(p), t.image_size, 16) for p, _ in samples])
        return imgs, torch.tensor([lab for _, lab in samples], dtype=torch.long)

    def datasets(self, model: DiffusionModel) -> dict[str, torch.utils.data.Dataset]:
        t = self.cfg.task
        sp = self.splits()
        key = (tuple(sp["train"]), t.image_size, t.flip, str(t.vae_weights))
        imgs, labels = self.load_images(sp["train"])
        if key not in _LATENT_CACHE:
            z = encode_images(self.vae(), imgs)
            if t.flip:
                z = torch.cat([z, encode_images(self.vae(), imgs.flip(-1))])
            _LATENT_CACHE[key] = z.cpu()
        z = _LATENT_CACHE[key]
        lab = torch.cat([labels, labels]) if t.flip else labels
        out = {"train": TensorDictDataset(latent=z.cpu(), label=lab)}  # the engine moves batches (pinned) to the device
        if sp["test"]:
            ti, tl = self.load_images(sp["test"])
            out["test"] = TensorDictDataset(image=ti, label=tl)
        self._train_images = (imgs, labels)
        return out

    # -- evaluation -------------------------------------------------------------------------------------
    def probe(self):
        """The fixed sample classifier (EfficientNet-Lite0 features of the real training images)."""
        if self._probe is None:
            imgs, labels = getattr(self, "_train_images", None) or self.load_images(self.splits()["train"])
            self._probe = fit_probe(effnet_features(imgs), labels.numpy(), len(self.classes))
        return self._probe

    @torch.no_grad()
    def evaluate(self, model: DiffusionModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        model.eval()
        t = self.cfg.task
        images, labels = [], []
        for batch in loader:
            images.append(batch["image"])
            labels.append(batch["label"])
        real, real_y = torch.cat(images), torch.cat(labels)
        gen = torch.Generator().manual_seed(t.eval_seed)
        z0 = encode_images(model.vae, real.to(device))
        losses = []
        for tt in (100, 300, 500, 700, 900):
            tt = min(tt, t.num_timesteps - 1)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            ts = torch.full((len(z0),), tt, device=device, dtype=torch.long)
            losses.append(model.heldout_eps_mse(z0, real_y.to(device), ts, noise))
        res: dict[str, Any] = {"eps_mse": float(np.mean(losses)), "n_real": int(len(real))}
        if t.samples_per_class > 0:
            ys = torch.arange(len(self.classes)).repeat_interleave(t.samples_per_class)
            fake = torch.cat(
                [
                    model.sample(ys[i : i + 64], t.sample_steps, t.guidance, seed=t.eval_seed + i).cpu()
                    for i in range(0, len(ys), 64)
                ]
            )
            ff, rf = effnet_features(fake), effnet_features(real.cpu())
            pred = probe_predict(self.probe(), ff)
            res = {
                "frechet_effnet_lite0": frechet_distance(ff, rf),
                "sample_top1": float((pred == ys.numpy()).mean()),
                "real_top1": float((probe_predict(self.probe(), rf) == real_y.numpy()).mean()),
                **res,
                "n_generated": int(len(ys)),
                "sample_steps": t.sample_steps,
                "guidance": t.guidance,
            }
        return res

    # -- export / tests ---------------------------------------------------------------------------------
    def export_spec(self, model: DiffusionModel) -> ExportSpec:
        g = self.cfg.task.image_size // 8
        return ExportSpec(
            module=_Denoiser(model.backbone),
            example_inputs={
                "x": torch.randn(2, 32, g, g),
                "t": torch.tensor([10, 500], dtype=torch.long),
                "y": torch.tensor([0, model.null_class], dtype=torch.long),
            },
            output_names=["eps"],
            outputs_meaning={
                "eps": f"denoiser output ({self.cfg.task.prediction}: "
                + ("predicted noise ε" if self.cfg.task.prediction == "eps" else "v = √ā·ε − √(1−ā)·x0")
                + ") for scaled TAEF2 latents; y == num_classes is the null class"
            },
            labels=list(self.classes) + ["<null>"],
            graph_name="denoiser",
            exporter="torchscript",
            atol=1e-3,
            task_info={
                "classes": list(self.classes),
                "null_class": model.null_class,
                "latent_scale": LATENT_SCALE,
                "latent_channels": 32,
                "latent_size": g,
                "image_size": self.cfg.task.image_size,
                "num_timesteps": self.cfg.task.num_timesteps,
                "alphas_cumprod": [float(a) for a in model.alphas_cumprod.cpu().tolist()],
                "max_guidance": MAX_GUIDANCE,
                "clip_x0": float(self.cfg.task.clip_x0),
                "prediction": self.cfg.task.prediction,
                "sampler": "DDIM (eta = 0), evenly spaced timesteps from T-1 down to 0, classifier-free guidance "
                "eps = eps_null + guidance * (eps_class - eps_null); x0 estimate clipped to [-clip_x0, clip_x0] and eps "
                "re-derived from it (clip_x0 = 0: no clip); decoder(z) with z the final latent",
                "pretrained_by": "the denoiser was pre-trained by vision_peft (no public pretrained DiT offline)",
            },
            extra_graphs=[
                ExportSpec(
                    module=_Decoder(model.vae),
                    example_inputs={"z": torch.randn(2, 32, g, g)},
                    output_names=["image"],
                    outputs_meaning={"image": "RGB images in [0, 1] (clip), (batch, 3, 8*latent_size, 8*latent_size)"},
                    graph_name="decoder",
                    exporter="torchscript",
                    atol=1e-3,
                )
            ],
        )

    def synthetic_batch(self, model: DiffusionModel, n: int = 2) -> dict[str, torch.Tensor]:
        g = self.cfg.task.image_size // 8
        return {"latent": torch.randn(n, 32, g, g), "label": torch.randint(0, model.num_classes, (n,))}


# -- stage glue, grids, deploy-time sampler -----------------------------------------------------------------
def write_base_checkpoint(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Turn a finished ``stage: pretrain`` run into a DiT checkpoint usable as ``backbone.name=dit:<file>``.
    A KIND pre-training run stores its learngene products as the weights and its tailors as ``kind.*``."""
    from vision_peft.backbones.dit import save_dit
    from vision_peft.predict import load_run

    cfg, task, model, info = load_run(run_dir, "cpu")
    if cfg.task.stage != "pretrain":
        raise ConfigError(f"{run_dir} is not a pre-training run (task.stage={cfg.task.stage})")
    out = Path(out) if out else Path(run_dir) / "base_dit.safetensors"
    dit = model.backbone
    meta = {
        "classes": task.classes,
        "pretrained_by": "vision_peft diffusion pretrain stage",
        "run": str(run_dir),
        "prediction": cfg.task.prediction,
    }
    extra = model.adapter.merge_and_unload()  # KIND: learngene products as weights, tailors as kind.* tensors
    save_dit(out, dit, extra=extra or None, meta=meta)
    return out


def save_grid(images: torch.Tensor, nrow: int, path: str | Path) -> Path:
    """Images (N, 3, H, W) in [0, 1] to a PNG grid, ``nrow`` images per row (the runtime's grid writer)."""
    from vision_peft.deploy import save_grid as write

    return write(images.detach().float().cpu().numpy(), nrow, path)


def sample_run(run_dir: str | Path, classes: list[str] | None, n: int, out: str | Path, steps: int = 25,
               guidance: float = 2.0, seed: int = 0) -> Path:  # fmt: skip
    """class names → PNG grid (one row per class) from a finished run."""
    from vision_peft.predict import load_run

    _, task, model, _ = load_run(run_dir, "cpu")
    names = classes or task.classes
    unknown = [c for c in names if c not in task.classes]
    if unknown:
        raise DiffusionInputError(f"class(es) {unknown} were not trained in {run_dir}; known: {task.classes}")
    ys = torch.tensor([task.classes.index(c) for c in names]).repeat_interleave(n)
    return save_grid(model.sample(ys, steps, guidance, seed), n, out)


def export_diffusion(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The merged denoiser and the TAEF2 decoder as one bundle (``python -m vision_peft export`` does the same);
    :meth:`vision_peft.deploy.Bundle.generate` samples from it with numpy + onnxruntime."""
    from vision_peft.export import export_run

    return export_run(run_dir, out_dir)


def compute_fisher(recipe: str, out: str | Path, overrides: list[str] | None = None, batches: int = 8) -> Path:
    """FISH scores: the empirical Fisher (mean squared ε-loss gradient) of the frozen base DiT's targeted
    Linear weights on the recipe's training latents, saved as safetensors for ``adapter.fisher_file``."""
    from safetensors.torch import save_file

    from vision_peft.adapters.sara import fisher_scores
    from vision_peft.recipe import load_recipe

    cfg = load_recipe(recipe, list(overrides or []))
    targets = list(getattr(cfg.adapter, "targets", ["blocks_linear"]))
    cfg.adapter = load_recipe(recipe, [*(overrides or []), "adapter.name=linear"]).adapter  # nothing wrapped
    task = TASKS.get("diffusion").builder(cfg)
    model = task.build_model().eval()
    ds = task.datasets(model)["train"]
    torch.manual_seed(cfg.train.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True)
    it = iter(loader)
    chunks = [next(it) for _ in range(min(batches, len(loader)))]
    names = model.backbone.resolve_targets(targets)
    names = [n for n in names if type(model.backbone.get_submodule(n)) is nn.Linear]
    sc = fisher_scores(model.backbone, names, lambda b: model(b)["loss"], chunks)
    save_file({k: v.contiguous() for k, v in sc.items()}, str(out))
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m vision_peft.tasks.diffusion base|sample|export RUN_DIR …`` or ``fisher RECIPE --out F``"""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m vision_peft.tasks.diffusion")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="write <run>/base_dit.safetensors from a finished pretrain run")
    b.add_argument("run_dir")
    b.add_argument("--out")
    s = sub.add_parser("sample", help="class names -> PNG grid")
    s.add_argument("run_dir")
    s.add_argument("--classes", nargs="*")
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=2.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    e = sub.add_parser("export", help="bundle with denoiser.onnx + decoder.onnx, with parity")
    e.add_argument("run_dir")
    e.add_argument("--out")
    f = sub.add_parser("fisher", help="FISH: empirical Fisher scores of the base DiT for adapter.fisher_file")
    f.add_argument("recipe")
    f.add_argument("overrides", nargs="*")
    f.add_argument("--out", required=True)
    f.add_argument("--batches", type=int, default=8)
    a = ap.parse_args(argv)
    if a.cmd == "fisher":
        print(compute_fisher(a.recipe, a.out, a.overrides, a.batches))
        return
    if a.cmd == "base":
        print(write_base_checkpoint(a.run_dir, a.out))
    elif a.cmd == "sample":
        print(sample_run(a.run_dir, a.classes, a.n, a.out, a.steps, a.guidance, a.seed))
    else:
        m = export_diffusion(a.run_dir, a.out)
        print(json.dumps(m["parity"], indent=1, default=str))
