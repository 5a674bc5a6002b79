"""TAEF2: the tiny FLUX.2 autoencoder (madebyollin/taesd, MIT), image [0, 1] ↔ 32-channel latent at 1/8 size.

Architecture exactly as ``$VISION_PEFT_WEIGHTS/taef2/README`` and the weights' keys imply; weights are loaded
strictly (every key, every shape) from ``taef2/taef2_{encoder,decoder}.safetensors``. The autoencoder is always
frozen: it defines the latent space of the diffusion task and is never adapted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vision_peft.backbones import BACKBONES
from vision_peft.backbones.base import Backbone, WeightsNotFoundError, load_state_file, seeded_init, state_hash

LATENT_CHANNELS = 32
SCALE = 8


def _conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv + identity, ReLU; the mid-block variant first adds a GroupNorm pool branch."""

    def __init__(self, c: int, mid: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
            if mid
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def build_encoder(c: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = [_conv(3, c), _Block(c)]
    for stage in range(3):
        mid = stage == 2
        layers += [_conv(c, c, stride=2, bias=False), _Block(c, mid), _Block(c, mid), _Block(c, mid)]
    layers.append(_conv(c, LATENT_CHANNELS))
    return nn.Sequential(*layers)


def build_decoder(c: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = [_Clamp(), _conv(LATENT_CHANNELS, c), nn.ReLU(), _Block(c, True), _Block(c, True)]
    layers.append(_Block(c, True))
    for _ in range(2):
        layers += [nn.Upsample(scale_factor=2), _conv(c, c, bias=False), _Block(c), _Block(c), _Block(c)]
    layers += [nn.Upsample(scale_factor=2), _conv(c, c, bias=False), _Block(c), _conv(c, 3)]
    return nn.Sequential(*layers)


class TAEF2(Backbone):
    """Frozen TAEF2 autoencoder: ``encode`` (B,3,H,W) in [0,1] → (B,32,H/8,W/8); ``decode`` the reverse."""

    kind = "autoencoder"

    def __init__(self) -> None:
        super().__init__()
        self.encoder = build_encoder()
        self.decoder = build_decoder()
        self.embed_dim = LATENT_CHANNELS
        self.spec = "taef2"
        self.data_config = {"input_range": [0.0, 1.0], "latent_channels": LATENT_CHANNELS, "scale": SCALE}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < SCALE or w < SCALE or h % SCALE or w % SCALE:
            raise ValueError(f"TAEF2 needs images whose sides are multiples of {SCALE} (>= {SCALE}), got {h}x{w}")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def load_taef2(folder: str | Path | None = None, pretrained: bool = True) -> TAEF2:
    """TAEF2 with weights loaded strictly from ``folder`` (default ``$VISION_PEFT_WEIGHTS/taef2``)."""
    from vision_peft.config import weights_root

    model = seeded_init(TAEF2)
    if pretrained:
        folder = Path(folder) if folder else weights_root() / "taef2"
        for part in ("encoder", "decoder"):
            path = folder / f"taef2_{part}.safetensors"
            if not path.is_file():
                raise WeightsNotFoundError(f"TAEF2 {part} weights not found at {path} (set $VISION_PEFT_WEIGHTS)")
            getattr(model, part).load_state_dict(load_state_file(path), strict=True)
        model.weights_source = str(folder)
        model.weights_id = state_hash(model)
    return model.requires_grad_(False).eval()


@BACKBONES.register(
    "taef2", help="TAEF2 tiny autoencoder (frozen latent space for the diffusion task)",
    spec={"name": "taef2", "pretrained": False}, provides=("autoencoder",),
)  # fmt: skip
def build_taef2(arg: str, cfg) -> TAEF2:
    return load_taef2(cfg.weights or None, cfg.pretrained)
