"""Class-conditional latent diffusion: pre-train a small DiT on source classes, adapt it to new classes.

Latent space: the frozen TAEF2 autoencoder (image [0, 1] ↔ 32×H/8×W/8, latents scaled by ``LATENT_SCALE``).
Denoiser: the latent DiT of ``vision_peft.backbones.dit`` — **pre-trained by this project** (no pretrained
denoiser exists offline): ``stage: pretrain`` trains it from random init on the AID base classes and
:func:`write_base_checkpoint` turns that run into ``base_dit.safetensors``, the frozen backbone of
``stage: adapt`` runs on held-out classes (SaRA, KIND tailors, LoRA, full fine-tuning, FISH …). Method knowledge
stays in the adapters: their penalties come from ``handle.extra_losses``, class-gated layers follow
``handle.on_classes``, and the base checkpoint is ``handle.merge_and_unload()``.

Diffusion: DDPM linear β schedule (1e-4 → 0.02, T = 1000), ε objective (MSE), class dropout to the null
class for classifier-free guidance, deterministic DDIM sampling (η = 0) with guidance
ε = ε_∅ + s (ε_y − ε_∅). In ``adapt`` the class table is replaced by a trainable one for the target classes
(its rows start at the mean base-class row; the null row is copied) and counts as the task head.

Evaluation (test split = held-out real images of the run's classes): held-out ε-MSE at fixed timesteps, and
when ``samples_per_class > 0``, for ``sample_seeds`` independent sample sets, **KID in EfficientNet-Lite0
pooled-feature space** (1280-d, 224², mean/std 0.5 — not Inception-v3; the unbiased MMD² with the cubic kernel,
valid at small n) between generated and real images, the top-1 accuracy on generated samples of a fixed
classifier (softmax regression on EfficientNet-Lite0 features of the real training images, trained
deterministically, identical for every method), and a Fréchet distance on a ``pca_dim``-dimensional PCA
projection only (on the full 1280-d features n ≤ 300 samples leave the covariance rank-deficient). Each comes per
seed, as mean ± 95 % t half-width over seeds, and pooled (KID: bootstrap interval; top-1: Wilson interval); see
:mod:`vision_peft.tasks.diffusion_eval`.

This file holds the config and the registered task; ``vision_peft/tasks/diffusion.py`` is the task's public
face (re-exports and the ``python -m vision_peft.tasks.diffusion`` entry point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision_peft.config import ConfigError, resolve_data_path
from vision_peft.data.aid import AID_BASE, AID_NOVEL
from vision_peft.preprocess import IMAGE_SUFFIXES
from vision_peft.runtimes.diffusion import MAX_GUIDANCE, check_sampling
from vision_peft.tasks import TASKS
from vision_peft.tasks.base import ExportSpec, Task, build_adapted_backbone
from vision_peft.tasks.diffusion_data import (
    LATENT_CACHE,
    LATENT_SCALE,
    TensorDictDataset,
    encode_images,
    list_class_images,
    load_rgb,
)
from vision_peft.tasks.diffusion_eval import (
    effnet_features,
    fit_probe,
    frechet_pca,
    kid,
    kid_bootstrap,
    mean_ci,
    pca_basis,
    probe_predict,
    wilson_interval,
)
from vision_peft.tasks.diffusion_model import DecoderGraph, DenoiserGraph, DiffusionModel


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
    # independent sample sets (seeds eval_seed + SEED_STRIDE·k, k < sample_seeds; k = 0 is the noise of runs written
    # before this option): KID and the classifier's top-1 per seed, their mean with a 95 % t-interval, and on the pooled
    # samples a bootstrap (KID) / Wilson (top-1) interval
    sample_seeds: int = 1
    pca_dim: int = 8  # the Fréchet distance is reported on this many principal components only (k ≪ n samples)
    kid_bootstrap: int = 500  # bootstrap replicates of the pooled KID's 95 % interval (0 = none)
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
        if self.sample_seeds < 1 or self.pca_dim < 1 or self.kid_bootstrap < 0:
            raise ConfigError("task.sample_seeds and task.pca_dim must be >= 1, task.kid_bootstrap >= 0")


SEED_STRIDE = 1_000_003  # sample seed k draws its noise from eval_seed + SEED_STRIDE·k (+ batch offset)


@TASKS.register(
    "diffusion", config_cls=DiffusionConfig, help="class-conditional latent diffusion (TAEF2 + DiT)",
    requires=("denoiser",),
    spec={"stage": "adapt", "classes": ["a", "b"], "image_size": 16, "flip": False},  # tiny task config (tests)
)  # fmt: skip
class DiffusionTask(Task):
    """Pre-train a latent DiT on source classes, or adapt a pre-trained one to new classes."""

    name = "diffusion"
    runtime = "diffusion"
    upload_suffixes = IMAGE_SUFFIXES
    preview = "class_folders"
    has_classes = True
    predict_options = ()  # samples come from class names (sample_run, the runtime's generate), not input files

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._vae = None
        self._probe = None

    def discover_classes(self) -> list[str]:
        """``task.classes``, else the AID base classes (pretrain) or the AID novel classes (adapt)."""
        t = self.cfg.task
        return list(t.classes) if t.classes else list(AID_BASE if t.stage == "pretrain" else AID_NOVEL)

    def extra_state(self) -> dict[str, Any]:
        return {"stage": self.cfg.task.stage, "latent_scale": LATENT_SCALE}

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
        model = DiffusionModel(backbone, handle, vae, t)
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
        if key not in LATENT_CACHE:
            z = encode_images(self.vae(), imgs)
            if t.flip:
                z = torch.cat([z, encode_images(self.vae(), imgs.flip(-1))])
            LATENT_CACHE[key] = z.cpu()
        z = LATENT_CACHE[key]
        lab = torch.cat([labels, labels]) if t.flip else labels
        out = {"train": TensorDictDataset(latent=z.cpu(), label=lab)}  # the engine moves batches (pinned) to the device
        if sp["test"]:
            ti, tl = self.load_images(sp["test"])
            out["test"] = TensorDictDataset(image=ti, label=tl)
        self._train_images = (imgs, labels)
        return out

    # -- evaluation -------------------------------------------------------------------------------------
    def train_features(self) -> tuple[np.ndarray, np.ndarray]:
        """EfficientNet-Lite0 features and labels of the real training images (computed once)."""
        if getattr(self, "_train_feats", None) is None:
            imgs, labels = getattr(self, "_train_images", None) or self.load_images(self.splits()["train"])
            self._train_feats = (effnet_features(imgs), labels.numpy())
        return self._train_feats

    def probe(self):
        """The fixed sample classifier (EfficientNet-Lite0 features of the real training images)."""
        if self._probe is None:
            feats, labels = self.train_features()
            self._probe = fit_probe(feats, labels, len(self.classes))
        return self._probe

    def sample_metrics(self, fake_feats: list[np.ndarray], ys: np.ndarray, real_feats: np.ndarray) -> dict[str, Any]:
        """KID, classifier top-1 and PCA Fréchet distance per sample seed (features ``fake_feats[k]`` of seed k,
        class ids ``ys``), their mean ± 95 % t half-width over seeds, and on the pooled samples KID with its
        bootstrap interval and top-1 with its Wilson interval."""
        t = self.cfg.task
        probe = self.probe()
        k = min(t.pca_dim, len(real_feats) - 1, len(self.train_features()[0]) - 1)
        basis = pca_basis(self.train_features()[0], k)
        per_seed = []
        for s, ff in enumerate(fake_feats):
            per_seed.append(
                {
                    "seed": t.eval_seed + SEED_STRIDE * s,
                    "kid": kid(ff, real_feats),
                    "sample_top1": float((probe_predict(probe, ff) == ys).mean()),
                    f"frechet_pca{k}": frechet_pca(ff, real_feats, basis),
                }
            )
        pooled = np.concatenate(fake_feats)
        pooled_y = np.tile(ys, len(fake_feats))
        hits = int((probe_predict(probe, pooled) == pooled_y).sum())
        out: dict[str, Any] = {}
        if t.kid_bootstrap > 0:
            v, lo, hi = kid_bootstrap(pooled, real_feats, t.kid_bootstrap, seed=t.eval_seed)
            out.update({"kid_effnet_lite0": v, "kid_ci95": [lo, hi]})
        else:
            out["kid_effnet_lite0"] = kid(pooled, real_feats)
        out.update(
            {
                "sample_top1": hits / len(pooled_y),
                "sample_top1_ci95": list(wilson_interval(hits, len(pooled_y))),
                f"frechet_pca{k}_effnet_lite0": frechet_pca(pooled, real_feats, basis),
                "pca_dim": k,
            }
        )
        for key in ("kid", "sample_top1", f"frechet_pca{k}"):
            m, h = mean_ci([r[key] for r in per_seed])
            out[f"{key}_seed_mean"], out[f"{key}_seed_ci95_halfwidth"] = m, h
        out["per_seed"] = per_seed
        return out

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
            fake_feats = []
            for s in range(t.sample_seeds):  # the same noise for every method: it depends on the seed and ids only
                seed = t.eval_seed + SEED_STRIDE * s
                fake = torch.cat(
                    [
                        model.sample(ys[i : i + 64], t.sample_steps, t.guidance, seed=seed + i).cpu()
                        for i in range(0, len(ys), 64)
                    ]
                )
                fake_feats.append(effnet_features(fake))
            rf = effnet_features(real.cpu())
            res = {
                **self.sample_metrics(fake_feats, ys.numpy(), rf),
                "real_top1": float((probe_predict(self.probe(), rf) == real_y.numpy()).mean()),
                **res,
                "n_generated": int(len(ys)) * t.sample_seeds,
                "n_generated_per_seed": int(len(ys)),
                "sample_seeds": t.sample_seeds,
                "sample_steps": t.sample_steps,
                "guidance": t.guidance,
            }
        return res

    # -- export / tests ---------------------------------------------------------------------------------
    def export_spec(self, model: DiffusionModel) -> ExportSpec:
        g = self.cfg.task.image_size // 8
        return ExportSpec(
            module=DenoiserGraph(model.backbone),
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
                    module=DecoderGraph(model.vae),
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
