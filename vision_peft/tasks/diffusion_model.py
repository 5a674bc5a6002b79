"""The diffusion task's model: DDPM schedule, ε/v training loss with class dropout, guided DDIM sampling (the one
array-agnostic sampler of :mod:`vision_peft.runtimes.diffusion`, run on torch tensors) and the export wrappers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.runtimes.diffusion import DiffusionInputError, check_sampling, ddim_sample
from vision_peft.tasks.base import TaskModel
from vision_peft.tasks.diffusion_data import LATENT_SCALE


def ddpm_alphas_cumprod(t: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    betas = torch.linspace(beta_start, beta_end, t, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class DiffusionModel(TaskModel):
    """Frozen TAEF2 + (adapted) DiT (``cfg``: the run's DiffusionConfig); ``forward`` returns the ε/v-MSE (adapter
    penalties such as SaRA's nuclear norm come from ``adapter.extra_losses``, added by the engine)."""

    def __init__(self, backbone: nn.Module, adapter, vae: nn.Module, cfg) -> None:
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
        n = len(labels)

        def steps_t(t: int) -> torch.Tensor:
            return torch.full((n,), t, device=dev, dtype=torch.long)

        def denoise(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:  # (conditional, null class)
            tt = steps_t(t)
            return self.backbone(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)

        def denoise_cond(x: torch.Tensor, t: int) -> torch.Tensor:
            return self.backbone(x, steps_t(t), labels)

        t = self.tcfg
        return ddim_sample(denoise, x, self.alphas_cumprod, steps, guidance, t.clip_x0, t.prediction, denoise_cond)

    @torch.no_grad()
    def sample(self, labels, steps: int = 25, guidance: float = 2.0, seed: int = 0, noise=None) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] for class ids ``labels`` (``noise``: optional initial latents)."""
        z = self.sample_latents(labels, steps, guidance, seed, noise=noise)
        return self.vae.decode(z / LATENT_SCALE)


class DenoiserGraph(nn.Module):
    """Export wrapper: (x_t, t float, y int64) → ε."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, y)


class DecoderGraph(nn.Module):
    """Export wrapper: scaled latents z → RGB images in [0, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / LATENT_SCALE)
