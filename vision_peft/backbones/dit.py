"""Class-conditional latent DiT (Peebles & Xie, ICCV 2023, arXiv 2212.09748) sized for CPU experiments.

adaLN-Zero blocks, patch size 2, fixed 2-D sin-cos position embedding computed for the input's grid, a
sinusoidal timestep MLP and a class table with one extra row for the null class (classifier-free guidance).
The denoiser predicts ε. Spec: ``dit`` (random init, architecture from ``dit:d4-w192-c16``-style text) or
``dit:<file>.safetensors`` — a checkpoint written by the diffusion task's pre-training stage (architecture in
its metadata). There is no public pretrained denoiser offline: the base DiT is pre-trained by this project.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.backbones import BACKBONES
from vision_peft.backbones.base import Backbone, WeightsNotFoundError, seeded_init, state_hash


@dataclass
class DiTArch:
    depth: int = 4
    width: int = 192
    heads: int = 4
    num_classes: int = 16
    in_channels: int = 32
    patch: int = 2
    mlp_ratio: float = 4.0

    @classmethod
    def parse(cls, text: str) -> DiTArch:
        """``d4-w192-h4-c16`` (any subset, any order)."""
        a = cls()
        keys = {"d": "depth", "w": "width", "h": "heads", "c": "num_classes", "i": "in_channels", "p": "patch"}
        for part in filter(None, text.split("-")):
            m = re.fullmatch(r"([dwhcip])(\d+)", part)
            if not m:
                raise ValueError(f"bad DiT architecture part {part!r}; use e.g. d4-w192-h4-c16")
            setattr(a, keys[m.group(1)], int(m.group(2)))
        if a.width % a.heads:
            raise ValueError(f"DiT width {a.width} must be divisible by heads {a.heads}")
        return a


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim: int, gh: int, gw: int, device=None) -> torch.Tensor:
    """(gh*gw, dim) fixed 2-D sine-cosine position embedding."""
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32, device=device),
        torch.arange(gw, dtype=torch.float32, device=device),
        indexing="ij",
    )
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32, device=device) / q))
    out = [f(c.reshape(-1, 1) * omega[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero: the conditioning regresses shift/scale/gate for attention and MLP; gates start at zero."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN(F.silu(c)).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiT(Backbone):
    """ε-prediction latent DiT: ``forward(x (B,C,H,W), t (B,), y (B,) with y == num_classes the null class)``."""

    kind = "denoiser"

    def __init__(self, arch: DiTArch) -> None:
        super().__init__()
        self.arch = arch
        d, p = arch.width, arch.patch
        self.embed_dim = d
        self.x_embed = nn.Linear(arch.in_channels * p * p, d)
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(arch.num_classes + 1, d)
        self.blocks = nn.ModuleList(DiTBlock(d, arch.heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, p * p * arch.in_channels)
        self.spec = "dit"
        self.data_config = {"arch": asdict(arch)}
        self.target_groups = {
            "qkv": ["blocks.*.attn.qkv"],
            "attn_out": ["blocks.*.attn.proj"],
            "mlp": ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"],
            "adaln": ["blocks.*.adaLN"],
            "blocks_linear": ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"],
        }
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN.weight)
            nn.init.zeros_(blk.adaLN.bias)
        for m in (self.final_adaLN, self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_classes(self) -> int:
        return self.y_embed.num_embeddings - 1

    def reset_classes(self, n: int) -> None:
        """A new (trainable) class table for ``n`` target classes: rows start at the mean base-class row, the
        null row is copied, so guidance keeps its pretrained unconditional branch."""
        old = self.y_embed.weight.detach()
        new = nn.Embedding(n + 1, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            new.weight[:n] = old[:-1].mean(0, keepdim=True)
            new.weight[n] = old[-1]
        self.y_embed = new

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        p = self.arch.patch
        if h % p or w % p:
            raise ValueError(f"latent grid {h}x{w} is not divisible by the patch size {p}")
        gh, gw = h // p, w // p
        tok = x.reshape(b, ch, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * ch)
        tok = self.x_embed(tok) + sincos_2d(self.embed_dim, gh, gw, x.device).to(x.dtype)
        c = self.t_mlp(timestep_embedding(t, 256).to(x.dtype)) + self.y_embed(y)
        for blk in self.blocks:
            tok = blk(tok, c)
        shift, scale = self.final_adaLN(F.silu(c)).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tok), shift, scale))
        return out.reshape(b, gh, gw, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(b, ch, h, w)


def save_dit(path: str | Path, model: DiT, extra: dict[str, torch.Tensor] | None = None, meta: dict | None = None):
    """Write a DiT checkpoint (safetensors; architecture and notes in the metadata)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    md = {"arch": json.dumps(asdict(model.arch)), "format": "vision_peft.dit/1"}
    md.update({k: json.dumps(v) for k, v in (meta or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=md)


def load_dit(path: str | Path) -> DiT:
    """A DiT from a checkpoint written by :func:`save_dit`, loaded strictly; extra ``kind.*`` tensors (KIND
    pre-trained tailors) and the metadata land in ``model.extra_tensors`` / ``model.meta``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"DiT checkpoint {path} does not exist (run the diffusion pre-training stage)")
    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
        if md.get("format") != "vision_peft.dit/1":
            raise ValueError(f"{path} is not a vision_peft DiT checkpoint (metadata format missing)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    arch = DiTArch(**json.loads(md["arch"]))
    model = DiT(arch)
    own = {k: v for k, v in tensors.items() if not k.startswith("kind.")}
    model.load_state_dict(own, strict=True)
    model.extra_tensors = {k: v for k, v in tensors.items() if k.startswith("kind.")}
    model.meta = {k: json.loads(v) for k, v in md.items() if k not in ("format",)}
    model.spec = f"dit:{path}"
    model.weights_source = str(path)
    model.weights_id = state_hash(model)
    return model


@BACKBONES.register(
    "dit", help="class-conditional latent DiT (random init 'dit:d4-w192' or 'dit:<ckpt>')",
    spec={"name": "dit:d1-w32-h2-c3", "pretrained": False}, provides=("denoiser", "linear"),
)  # fmt: skip
def build_dit(arg: str, cfg) -> DiT:
    target = cfg.weights or arg
    if target and (target.endswith(".safetensors") or "/" in target):
        return load_dit(target)
    model = seeded_init(lambda: DiT(DiTArch.parse(arg)))
    model.spec = f"dit:{arg}"
    return model
