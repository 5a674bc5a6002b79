"""Point-BERT: Pre-training 3D Point Cloud Transformers with Masked Point Modeling (Yu et al., CVPR 2022,
https://arxiv.org/abs/2111.14819), in the layout ULIP (Xue et al., CVPR 2023, https://arxiv.org/abs/2212.05171)
uses as its point encoder.

The idea: farthest-point sampling picks ``num_group`` centres, each centre's ``group_size`` nearest neighbours
(relative coordinates) form a patch, a mini-PointNet embeds each patch into a token, and a ViT-style transformer
(with the centres' positional embedding added before every block) encodes the tokens plus a [CLS] token. The
global feature is ``[CLS; max-pool over patch tokens]`` (2 × trans_dim), optionally projected by ULIP's
``pc_projection``. Where this differs: FPS and kNN are plain PyTorch (no CUDA extension), so it runs on CPU.

Checkpoint key layout (``backbone.weights``; a ULIP checkpoint's ``state_dict``; ``module.`` and
``point_encoder.`` prefixes are stripped; keys of the other ULIP towers — ``open_clip_model.*``, ``logit_scale``
… — are ignored; the remaining keys are loaded **strictly**)::

    encoder.first_conv.{0,1,3}.*   Conv1d 3→128, BN(128), Conv1d 128→256          (mini-PointNet, part 1)
    encoder.second_conv.{0,1,3}.*  Conv1d 512→512, BN(512), Conv1d 512→encoder_dims (part 2)
    reduce_dim.{weight,bias}       Linear encoder_dims→trans_dim
    cls_token, cls_pos             (1, 1, trans_dim)
    pos_embed.{0,2}.*              Linear 3→128, GELU, Linear 128→trans_dim
    blocks.blocks.{i}.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2.*   (qkv without bias)
    norm.{weight,bias}             final LayerNorm
    pc_projection                  optional (2·trans_dim, D) matrix; when present, embed_dim = D

Target groups: ``qkv``, ``attn_out``, ``mlp`` (every block), ``last_stage`` (the last block + final norm: PPT-PTB's
set plus the norm) and ``last_ffn`` (the last block's ``mlp.fc1``/``mlp.fc2``/``norm1``/``norm2``: the set PPT's
official ``head_type: 2`` — its scripts' "ppt-ffn" — re-trains; the ``point_ffn`` adapter).

Specs: ``pointbert`` = ULIP's config (trans_dim 384, depth 12, 6 heads, encoder_dims 256, 512 groups of 32);
``pointbert:tiny`` (64-d, 2 blocks, 16 groups of 8) for offline tests with ``pretrained: false``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.backbones import BACKBONES
from vision_peft.backbones.base import WeightsNotFoundError, load_state_file, seeded_init, state_hash
from vision_peft.backbones.pointnet import PointBackbone, _point_data_config
from vision_peft.config import BackboneConfig

PRESETS = {
    "": dict(trans_dim=384, depth=12, num_heads=6, encoder_dims=256, num_group=512, group_size=32, num_points=8192),
    "tiny": dict(trans_dim=64, depth=2, num_heads=2, encoder_dims=64, num_group=16, group_size=8, num_points=256),
}


def fps(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """Farthest-point sampling indices (B, n), starting from point 0 (deterministic)."""
    b, m, _ = xyz.shape
    idx = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, m), float("inf"), device=xyz.device)
    cur = torch.zeros(b, dtype=torch.long, device=xyz.device)
    ar = torch.arange(b, device=xyz.device)
    for i in range(n):
        idx[:, i] = cur
        d = ((xyz - xyz[ar, cur][:, None]) ** 2).sum(-1)  # (B, M)
        dist = torch.minimum(dist, d)
        cur = dist.argmax(1)
    return idx


def group_points(xyz: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FPS centres and kNN patches: (B, N, 3) → neighbourhoods (B, G, k, 3) relative to centres, centres (B, G, 3)."""
    b = xyz.shape[0]
    centers = torch.gather(xyz, 1, fps(xyz, num_group)[..., None].expand(-1, -1, 3))  # (B, G, 3)
    knn = torch.cdist(centers, xyz).topk(group_size, dim=-1, largest=False).indices  # (B, G, k)
    nb = torch.gather(xyz, 1, knn.reshape(b, -1)[..., None].expand(-1, -1, 3))  # (B, G*k, 3)
    nb = nb.reshape(b, num_group, group_size, 3) - centers[:, :, None]  # (B,G*k,3)->(B,G,k,3)
    return nb, centers


class PatchEncoder(nn.Module):
    """Mini-PointNet over each patch: (B, G, k, 3) → (B, G, encoder_dims)."""

    def __init__(self, encoder_dims: int) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, encoder_dims, 1)
        )
        self.encoder_dims = encoder_dims

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, k, _ = groups.shape
        x = groups.reshape(b * g, k, 3).transpose(2, 1)  # (B,G,k,3)->(BG,3,k)
        f = self.first_conv(x)  # (BG, 256, k)
        glob = f.amax(dim=2, keepdim=True)  # (BG, 256, 1)
        f = self.second_conv(torch.cat([glob.expand(-1, -1, k), f], dim=1))  # (BG, enc, k)
        return f.amax(dim=2).reshape(b, g, self.encoder_dims)  # (BG,enc)->(B,G,enc)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (3,B,H,N,C/H)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, C/H)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))  # (B,H,N,C/H)->(B,N,C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, dim * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Blocks(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x + pos)  # Point-BERT adds the positional embedding before every block
        return x


class PointBERT(PointBackbone):
    """ULIP PointBERT encoder; feature = [CLS; max-pool(patch tokens)] (→ pc_projection when loaded)."""

    def __init__(self, preset: str = "", with_projection: int = 0) -> None:
        super().__init__()
        p = PRESETS[preset]
        self.num_group, self.group_size = p["num_group"], p["group_size"]
        d = p["trans_dim"]
        self.encoder = PatchEncoder(p["encoder_dims"])
        self.reduce_dim = nn.Linear(p["encoder_dims"], d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, d))
        self.blocks = _Blocks(d, p["depth"], p["num_heads"])
        self.norm = nn.LayerNorm(d)
        self.pc_projection = nn.Parameter(torch.randn(2 * d, with_projection) * d**-0.5) if with_projection else None
        self.embed_dim = with_projection or 2 * d
        self.spec = "pointbert" + (f":{preset}" if preset else "")
        self.data_config = _point_data_config(p["num_points"])
        last = p["depth"] - 1
        self.target_groups = {
            "qkv": ["blocks.blocks.*.attn.qkv"],
            "attn_out": ["blocks.blocks.*.attn.proj"],
            "mlp": ["blocks.blocks.*.mlp.fc1", "blocks.blocks.*.mlp.fc2"],
            "last_stage": [f"blocks.blocks.{last}.*", "norm"],
            "last_ffn": [  # PPT-FFN (official head_type 2, "ppt-ffn"): the last block's FFN and both its norms
                f"blocks.blocks.{last}.mlp.fc1",
                f"blocks.blocks.{last}.mlp.fc2",
                f"blocks.blocks.{last}.norm1",
                f"blocks.blocks.{last}.norm2",
            ],
        }

    def tokens(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) → normalised tokens (B, 1 + G, trans_dim)."""
        nb, centers = group_points(points, self.num_group, self.group_size)
        x = self.reduce_dim(self.encoder(nb))  # (B, G, D)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # (B, 1+G, D)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(centers)], dim=1)  # (B, 1+G, D)
        return self.norm(self.blocks(x, pos))

    def _features(self, points: torch.Tensor) -> torch.Tensor:
        x = self.tokens(points)
        f = torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)  # (B, 2D)
        return f @ self.pc_projection if self.pc_projection is not None else f

    def forward_intermediates(self, points: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Token maps (B, 1 + G, D) after the given blocks (negative counts from the end)."""
        nb, centers = group_points(points, self.num_group, self.group_size)
        x = self.reduce_dim(self.encoder(nb))
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(centers)], dim=1)
        n = len(self.blocks.blocks)
        want, outs = {i % n for i in indices}, []
        for i, blk in enumerate(self.blocks.blocks):
            x = blk(x + pos)
            if i in want:
                outs.append(x)
        return outs


def ulip_point_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The point-encoder part of a ULIP checkpoint, with ``module.`` / ``point_encoder.`` prefixes stripped."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("point_encoder."):
            out[k.removeprefix("point_encoder.")] = v
        elif k == "pc_projection":
            out[k] = v
        elif not any(
            k.startswith(p)
            for p in (
                "open_clip_model.",
                "logit_scale",
                "image_",
                "text_",
                "transformer.",
                "token_embedding",
                "positional_embedding",
                "ln_final",
                "visual.",
            )
        ):
            out[k] = v  # a bare PointBERT state dict
    return out


@BACKBONES.register(
    "pointbert", config_cls=BackboneConfig, help="ULIP PointBERT point encoder (user checkpoint)",
    spec={"name": "pointbert:tiny", "pretrained": False}, provides=("points", "linear"),
)  # fmt: skip
def build_pointbert(arg: str, cfg: BackboneConfig) -> PointBERT:
    """ULIP-layout PointBERT (pointbert | pointbert:tiny); weights from a user's ULIP checkpoint (strict)."""
    if arg not in PRESETS:
        raise ValueError(f"unknown pointbert preset {arg!r}; known: pointbert, pointbert:tiny")
    if not cfg.pretrained:
        model = seeded_init(lambda: PointBERT(arg))
        model.weights_source = "random init (seed 0)"
    else:
        if not cfg.weights:
            raise WeightsNotFoundError(
                "pointbert needs a ULIP PointBERT checkpoint: set backbone.weights=<ULIP .pt/.safetensors> "
                "(e.g. ULIP's pointbert checkpoint), or backbone.pretrained=false for a random network"
            )
        sd = ulip_point_state(load_state_file(cfg.weights))
        proj = sd.get("pc_projection")
        model = PointBERT(arg, with_projection=int(proj.shape[1]) if proj is not None else 0)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"{cfg.weights} does not match the ULIP PointBERT layout ({arg or 'default'} preset): {e}"
            ) from None
        model.weights_source = str(cfg.weights)
    model.weights_id = state_hash(model)
    return model
