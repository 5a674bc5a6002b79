"""Where LST and Moment Probing read a point backbone (PointNet, PointBERT): the per-point stages, the final point
tokens, the blocks MP+'s PSRP recalibrates, and LST's per-point side network (PointNet's side blocks and ladders).

The point backbones have no ``token_blocks`` / ``feature_info``: their stages are named here, once, for both methods.

- PointNet (``feature_model.conv{i}``/``bn{i}``, ReLU after each, max-pool over points): a stage's output is
  ``relu(bn_i(conv_i(x)))`` (B, C_i, N); the hooks sit on ``bn_i`` and the ReLU (parameter-free) is applied by
  the reader, so it sees exactly the stage output. The final point tokens are stage 5's (B, N, 1024).
- PointBERT (``blocks.blocks.{i}``, a final ``norm``, feature ``[CLS; max over patch tokens]``): the blocks'
  outputs (B, 1 + G, D) are ViT-style tokens; the final tokens are ``norm``'s output without the CLS token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_POINTS = 2  # MHC³: a cross second-moment over one point is a single outer product; refused below this


def spec_of(backbone: nn.Module) -> str:
    return str(getattr(backbone, "spec", type(backbone).__name__))


def is_pointnet(backbone: nn.Module) -> bool:
    enc = getattr(backbone, "feature_model", None)
    return getattr(backbone, "kind", "") == "points" and all(
        isinstance(getattr(enc, f"{k}{i}", None), m) for i in range(1, 6) for k, m in (("conv", nn.Conv1d),
                                                                                        ("bn", nn.BatchNorm1d))
    )  # fmt: skip


def pointbert_blocks(backbone: nn.Module) -> list[nn.Module] | None:
    """PointBERT's transformer blocks (timm-like: norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2), else None."""
    blocks = getattr(getattr(backbone, "blocks", None), "blocks", None)
    if getattr(backbone, "kind", "") != "points" or not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return None
    if not isinstance(getattr(backbone, "norm", None), nn.LayerNorm):
        return None
    return list(blocks)


def pointnet_stages(backbone: nn.Module) -> list[nn.Module]:
    """PointNet's per-point stages as the modules whose (pre-ReLU) outputs are hooked: ``bn1`` … ``bn5``."""
    return [getattr(backbone.feature_model, f"bn{i}") for i in range(1, 6)]


def probe_input(backbone: nn.Module) -> torch.Tensor:
    """One zero point cloud (1, N, 3) at the backbone's own point count, for shape probes."""
    p = next(backbone.parameters())
    n = int(backbone.data_config.get("num_points", 1024))
    return torch.zeros(1, n, 3, device=p.device, dtype=p.dtype)


def check_points(points: torch.Tensor, need: int, what: str, spec: str) -> None:
    """Refuse a point batch with fewer than ``need`` points per cloud, naming the valid range and the fix."""
    if points.dim() != 3 or points.shape[-1] != 3 or points.shape[1] < need:
        raise ValueError(
            f"{what} on {spec!r} needs point clouds (B, N, 3) with N >= {need} points; got {tuple(points.shape)}. "
            "Fix: raise task.num_points (or give each cloud more points)"
        )


# -- Moment Probing ------------------------------------------------------------------------------------------------
def mp_token_site(backbone: nn.Module) -> tuple[str, str, int]:
    """(module name to tap, layout, prefix tokens) of the final per-point features before the global pool."""
    if is_pointnet(backbone):
        return "feature_model.bn5", "points", 0  # (B, 1024, N) before the ReLU; relu → tokens (B, N, 1024)
    if pointbert_blocks(backbone) is not None:
        return "norm", "tokens", 1  # (B, 1 + G, D): the CLS token leads
    raise ValueError(
        f"Moment Probing on points supports PointNet (per-point conv stages) and PointBERT (patch tokens); "
        f"{spec_of(backbone)!r} is neither. Use adapter linear or point_mlp instead"
    )


def psrp_targets(backbone: nn.Module) -> list[tuple[str, int]]:
    """(module name, channel dim) of the branches MP+'s PSRP recalibrates on a point backbone: PointNet's five
    Conv1d+BN stages (the BN output, per point, channels first) or PointBERT's blocks' MLP (tokens, channels last)."""
    if is_pointnet(backbone):
        return [(f"feature_model.bn{i}", 1) for i in range(1, 6)]
    blocks = pointbert_blocks(backbone)
    names = {m: n for n, m in backbone.named_modules()}
    return [(names[b.mlp], -1) for b in blocks or [] if isinstance(getattr(b, "mlp", None), nn.Module)]


# -- LST: PointNet's per-point side network ------------------------------------------------------------------------
class SidePointBlock(nn.Module):
    """Residual per-point MLP at the side width: x + GN(W₂ ReLU(GN(W₁ x))), W 1×1 Conv1d (PointNet's own layer)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv1d(ch, ch, 1, bias=False), nn.Conv1d(ch, ch, 1, bias=False)
        self.gn1, self.gn2 = nn.GroupNorm(1, ch), nn.GroupNorm(1, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, N) -> (B, C, N)
        return x + self.gn2(self.fc2(F.relu(self.gn1(self.fc1(x)))))


class StageDown(nn.Module):
    """Ladder from a hooked PointNet stage: ReLU (the stage's own, parameter-free) then a 1×1 Conv1d C_i → C_i / r."""

    def __init__(self, c: int, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_i, N) -> (B, C_i / r, N)
        return self.conv(F.relu(x))


def point_side_parts(widths: list[int], r: int, divide) -> list[tuple[nn.Module, nn.Module, nn.Module, int]]:
    """(down, carry, block, side width) per PointNet stage: the carry maps the previous side width to this one (a
    1×1 Conv1d, the identity when equal); ``divide(width, r, what)`` checks that r divides every stage width."""
    parts, prev = [], None
    for i, c in enumerate(widths):
        ch = divide(c, r, f"point stage {i} ({c} channels)")
        carry: nn.Module = nn.Identity() if prev in (None, ch) else nn.Conv1d(prev, ch, 1)
        parts.append((StageDown(c, ch), carry, SidePointBlock(ch), ch))
        prev = ch
    return parts
