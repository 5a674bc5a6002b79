"""Moment Probing, MP and MP+ (Gao et al., ICCV 2023, "Tuning Pre-trained Model via Moment Probing",
https://arxiv.org/abs/2307.11342; official code https://github.com/mingzeG/Moment-Probing).

A linear probe classifies the first-order moment of the final features (the class token or the mean token). MP
classifies their *distribution*, approximated by the first- and second-order moments: next to the pooled feature it
computes MHC³, the multi-head convolutional cross-covariance. The final tokens (ViT patch tokens; for a CNN the
spatial positions of the last feature map) are down-projected to ``hidden_dim``, split into ``heads`` groups, each
layer-normalised (one LayerNorm shared by the groups); the cross second-moment (1/N) X_iᵀ X_{i+1} of every pair of
neighbouring groups (after removing each group's scalar mean, with unit-L2 columns) gives heads − 1 matrices
(d × d, d = hidden_dim / heads), which two 3×3 stride-2 convolutions (GELU between) shrink to a compact vector.
MP+ adds PSRP (partially shared recalibrating parameters) to the backbone: per block, one down-projection
(width → ``psrp_rank``, ReLU) shared by two up-projections that give a token-wise scale and shift of the block's
MLP branch, ``y ← (1 + scale) ⊙ y + shift``.

Registered as two adapters: ``moment_probing`` (MP: backbone frozen, only MHC³ and the head train) and
``moment_probing_plus`` (MP+: MP plus PSRP).

How it enters the contract: the task's head stays the one linear classifier; the adapter *widens* the backbone's
pooled features to ``[first-order (embed_dim), MHC³ (heads − 1)·s²]`` and raises ``backbone.embed_dim``
accordingly, so the head built after it sees the concatenation. The unpooled features are read with forward hooks
(nothing in the backbone's code changes): timm CNNs at their ``global_pool`` module (input: the map, output: the
pooled vector), timm ViTs at the final ``norm`` (tokens, prefix tokens dropped) with the widened vector leaving
``head_drop``, open_clip image towers at the transformer's output with the widened vector leaving the tower. The
first ``embed_dim`` entries are exactly the frozen backbone's pooled feature (MP+ at init too). A shape probe (one
forward of a zero image at apply time) reads the token count and width.

Point backbones (sites in ``vision_peft.adapters.point_sites``): the tokens are the per-point features before the
global pool — PointNet's last stage, relu(bn5(conv5 x)) as (B, N, 1024), read by a hook on ``bn5``; PointBERT's
normed patch tokens (B, G, D), its CLS token dropped — and the first-order part is the backbone's own pooled
feature (PointNet's max-pool, PointBERT's [CLS; max]), exactly the frozen one: ``_features`` is wrapped on this
instance, since no module emits the pooled vector. MP+'s PSRP recalibrates each of PointNet's five Conv1d+BN
stages per point (a hook on ``bn_i``: scale and shift from the conv output, zero-init), PointBERT's blocks' MLP as
on a ViT. Clouds with fewer than 2 points are refused (one point's cross second-moment is one outer product). Not mergeable (a new head branch, like
VPT); the ONNX export carries the hooks in the graph.

Where this implementation differs:
- one linear head on the concatenation instead of the paper's two classifiers whose logits are averaged,
  ``(W₁ f + b₁ + W₂ s + b₂) / 2``: the same function class (W = [W₁, W₂] / 2), and the task keeps its own head;
- the official code groups a CNN's projected channels with stride ``heads`` and a ViT's contiguously; here both
  are contiguous. The CNN first-order part is the plain average pool (the official CNN head adds a trainable
  LayerNorm before its classifier); the 3×3-conv sizes follow from ``hidden_dim`` instead of the fixed 2,883;
- PSRP's up-projections start at zero, so MP+ starts exactly at the frozen backbone (the official code uses the
  default Linear init); the scale and shift are computed from the input of the branch they recalibrate (ViT: the
  MLP's input, i.e. ``norm2(x)``, where the official code uses ``x``). On CNN stages the branch is each block's
  last projection (``bn3`` of an inverted residual, ``bn2`` of a depthwise-separable / edge block), recalibrated
  per position by 1×1 projections of that projection's own input.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters import point_sites
from vision_peft.adapters.base import ADAPTERS, AdapterHandle

CONV_K, CONV_S = 3, 2  # the two MHC³ convolutions: 3×3 kernels, stride 2, no padding (official code)
MIN_HEAD_WIDTH = 7  # smallest group width d that leaves one output after both convolutions
log = logging.getLogger("vision_peft")


def conv_side(d: int) -> int:
    """Side of an MHC³ output map from a d × d cross-covariance (two 3×3 stride-2 convolutions, no padding)."""
    for _ in range(2):
        d = (d - CONV_K) // CONV_S + 1
    return d


@dataclass
class MomentProbingConfig:
    """Moment Probing (MP): a linear head on the first-order feature and the MHC³ second-order vector."""

    name: str = "moment_probing"  # registry name
    hidden_dim: int = 512  # width the final tokens are projected to (paper: 512); in [7·heads, feature width]
    heads: int = 4  # groups of the projected width; neighbouring pairs give heads − 1 cross-covariances (paper: 4)

    def __post_init__(self) -> None:
        if self.heads < 2:
            raise ValueError(
                f"Moment Probing needs heads >= 2 (cross-covariances of neighbouring groups), got {self.heads}"
            )
        if self.hidden_dim % self.heads:
            raise ValueError(
                f"Moment Probing: hidden_dim={self.hidden_dim} is not divisible by heads={self.heads}; "
                f"use a multiple of {self.heads}, e.g. {self.heads * max(MIN_HEAD_WIDTH, self.hidden_dim // self.heads)}"
            )
        if self.hidden_dim // self.heads < MIN_HEAD_WIDTH:
            raise ValueError(
                f"Moment Probing: group width hidden_dim/heads = {self.hidden_dim // self.heads} is below "
                f"{MIN_HEAD_WIDTH} (two 3×3 stride-2 convolutions need it); use hidden_dim >= "
                f"{MIN_HEAD_WIDTH * self.heads} for heads={self.heads}"
            )


@dataclass
class MomentProbingPlusConfig(MomentProbingConfig):
    """MP+: Moment Probing plus PSRP, a partially shared scale-and-shift recalibration in every backbone block."""

    name: str = "moment_probing_plus"  # registry name
    psrp_rank: int = 16  # width of PSRP's shared down-projection (official code: 16)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.psrp_rank < 1:
            raise ValueError(f"MP+ psrp_rank must be positive, got {self.psrp_rank}")


class MHC3(nn.Module):
    """Multi-head convolutional cross-covariance: tokens (B, N, C) → second-order vector (B, (heads − 1)·s²)."""

    def __init__(self, in_dim: int, hidden_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden_dim // heads
        self.proj = nn.Linear(in_dim, hidden_dim)
        self.norm = nn.LayerNorm(self.head_dim)  # one LayerNorm shared by the groups, as in the official code
        g = heads - 1
        self.conv = nn.Sequential(
            nn.Conv2d(g, g, CONV_K, stride=CONV_S, bias=False),
            nn.GELU(),
            nn.Conv2d(g, g, CONV_K, stride=CONV_S, bias=False),
        )
        self.out_dim = g * conv_side(self.head_dim) ** 2

    def cross_covariances(self, tokens: torch.Tensor) -> torch.Tensor:
        """The heads − 1 neighbouring cross second-moments (B, heads − 1, d, d), columns of unit L2 norm."""
        x = self.proj(tokens)  # (B, N, C) -> (B, N, hidden)
        b, n, _ = x.shape
        x = self.norm(x.reshape(b, n, self.heads, self.head_dim))  # (B, N, hidden) -> (B, N, heads, d)
        x = x - x.mean(dim=(1, 3), keepdim=True)  # each group's scalar mean over tokens and channels
        cov = torch.einsum("bngi,bngj->bgij", x[:, :, :-1], x[:, :, 1:]) / n  # (B, heads - 1, d, d)
        return F.normalize(cov, dim=2)  # unit norm over the row index i (every column)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(self.cross_covariances(tokens)).flatten(1)  # (B, g, s, s) -> (B, g·s²)


class MomentProbe(nn.Module):
    """MHC³ plus the hooks that read a backbone's unpooled features and widen its pooled ones."""

    def __init__(self, mhc3: MHC3, layout: str, prefix: int) -> None:
        super().__init__()
        self.mhc3 = mhc3
        self.layout = layout  # map: (B, C, H, W) | tokens: (B, L, D) | tokens_lbd: (L, B, D) | points: (B, C, N)
        self.prefix = prefix  # leading prefix tokens (class / register) that are not part of the token set
        self._tokens: torch.Tensor | None = None

    def as_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled features as a token set (B, N, C)."""
        if self.layout == "map":
            return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        if self.layout == "points":  # PointNet's last stage before its ReLU (the hook sits on bn5)
            return F.relu(x).transpose(1, 2)  # (B, C, N) -> (B, N, C)
        if self.layout == "tokens_lbd":
            x = x.transpose(0, 1)  # (L, B, D) -> (B, L, D)
        if x.dim() == 4:
            x = x.flatten(1, 2)  # (B, h, w, D) -> (B, hw, D)
        return x[:, self.prefix :]  # (B, L, D) -> (B, N, D)

    def widen(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        second = self.mhc3(tokens).to(pooled.dtype)
        return torch.cat([pooled, second], dim=1)  # (B, D) + (B, g·s²) -> (B, D + g·s²)

    # -- forward hooks (bound methods, so a deep copy of the backbone rebinds them to its own copy) --------------
    def pool_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """On a pooling module: its input is the map, its output the first-order feature."""
        return self.widen(out, self.as_tokens(args[0]))

    def tap_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        """On the module emitting the final tokens: keep them for :meth:`sink_hook`."""
        self._tokens = self.as_tokens(out)

    def sink_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """On the module emitting the pooled feature: append MHC³ of the tokens :meth:`tap_hook` kept."""
        tokens, self._tokens = self._tokens, None
        if tokens is None:
            raise RuntimeError("Moment Probing: the pooled feature was computed without the final tokens passing")
        return self.widen(out, tokens)


class PSRPUnit(nn.Module):
    """One block's PSRP: down (C → r, shared) → ReLU → scale, shift (r → C, zero at init): y ← (1 + scale)·y + shift."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim  # -1: tokens (…, C); 1: maps (B, C, H, W)
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up_scale = nn.Linear(rank, out_dim, bias=False)
        self.up_shift = nn.Linear(rank, out_dim, bias=False)
        nn.init.zeros_(self.up_scale.weight)
        nn.init.zeros_(self.up_shift.weight)

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        u, y = args[0], out
        if self.channel_dim == 1:
            u, y = u.movedim(1, -1), y.movedim(1, -1)  # (B, C, H, W) -> (B, H, W, C)
        h = F.relu(self.down(u))  # shared by both recalibrating parameters
        y = y * (1 + self.up_scale(h)) + self.up_shift(h)
        return y.movedim(-1, 1) if self.channel_dim == 1 else y  # back to the module's own layout


# -- where the features live, per backbone family ------------------------------------------------------------------
def _sites(backbone: nn.Module) -> tuple[str, int, list[tuple[str, str]]]:
    """(layout, prefix tokens, [(hook, module name)]) of the hooks that read and widen the features; on a point
    backbone the widening replaces its ``_features`` on this instance instead (no module emits the pooled vector)."""
    if getattr(backbone, "kind", "") == "points":
        name, layout, prefix = point_sites.mp_token_site(backbone)
        return layout, prefix, [("tap", name)]
    model = getattr(backbone, "model", None)
    if model is not None and isinstance(getattr(model, "global_pool", None), nn.Module):  # timm CNNs
        return "map", 0, [("pool", "model.global_pool")]
    if model is not None and backbone.token_blocks() is not None:  # timm ViTs
        if not (isinstance(getattr(model, "norm", None), nn.Module) and hasattr(model, "head_drop")):
            raise ValueError(f"Moment Probing: timm model {backbone.spec!r} has no final norm / head_drop to hook")
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError(f"Moment Probing: {backbone.spec!r} pools with attention; it supports token/avg pooling")
        return "tokens", int(model.num_prefix_tokens), [("tap", "model.norm"), ("sink", "model.head_drop")]
    visual = getattr(backbone, "visual", None)
    if visual is not None and hasattr(visual, "transformer"):  # open_clip image towers
        if getattr(visual, "output_tokens", False) or getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"Moment Probing: {backbone.spec!r} returns tokens or pools with attention")
        layout = "tokens" if getattr(visual.transformer, "batch_first", True) else "tokens_lbd"
        return layout, 1, [("tap", "visual.transformer"), ("sink", "visual")]  # its class embedding leads
    raise ValueError(
        f"Moment Probing needs ViT blocks or CNN stages with unpooled final features (timm ViTs / CNNs, "
        f"EfficientNet-Lite0, open_clip image towers); {getattr(backbone, 'spec', type(backbone).__name__)!r} "
        "has none. For other backbones use adapter linear or lora"
    )


def _psrp_targets(backbone: nn.Module) -> list[tuple[str, int]]:
    """(module name, channel dim) of every branch PSRP recalibrates: ViT blocks' MLP, CNN blocks' last projection."""
    if getattr(backbone, "kind", "") == "points":
        return point_sites.psrp_targets(backbone)
    tb = backbone.token_blocks()
    names = {m: n for n, m in backbone.named_modules()}
    if tb is not None:
        blocks = [b for b in tb[0] if isinstance(getattr(b, "mlp", None), nn.Module)]
        return [(names[b.mlp], -1) for b in blocks]
    out = []
    stages = getattr(getattr(backbone, "model", None), "blocks", None)
    for stage in stages if isinstance(stages, nn.Sequential) else []:
        for block in stage.children() if isinstance(stage, nn.Sequential) else [stage]:
            last = getattr(block, "bn3", None)
            last = getattr(block, "bn2", None) if last is None else last
            if isinstance(last, nn.BatchNorm2d):
                out.append((names[last], 1))
    return out


@torch.no_grad()
def _probe(backbone: nn.Module, module: nn.Module, layout: str, pool: bool) -> tuple[int, int]:
    """(tokens N, width C) of the unpooled features, from one forward of a zero image through ``module``."""
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def record(_m, args, out):
        seen.append((tuple((args[0] if pool else out).shape), tuple(out.shape)))

    h = module.register_forward_hook(record)
    was_training = backbone.training
    backbone.eval()
    try:
        p = next(backbone.parameters())
        if getattr(backbone, "kind", "") == "points":
            backbone.forward_features(point_sites.probe_input(backbone))
        else:
            backbone.forward_features(torch.zeros(1, 3, *backbone.input_size, device=p.device, dtype=p.dtype))
    finally:
        h.remove()
        backbone.train(was_training)
    if not seen:
        raise ValueError(f"Moment Probing: the hooked module of {backbone.spec!r} did not run in forward_features")
    shape, pooled = seen[-1]
    if layout == "map":
        if len(shape) != 4 or len(pooled) != 2:
            raise ValueError(
                f"Moment Probing expects a (B, C, H, W) map into the pool of {backbone.spec!r} and a flat (B, C) "
                f"feature out of it, got {shape} -> {pooled}"
            )
        return shape[2] * shape[3], shape[1]
    if layout == "points":
        return shape[2], shape[1]  # (B, C, N): N points of width C
    n = shape[1] * shape[2] if len(shape) == 4 else shape[0 if layout == "tokens_lbd" else 1]
    return n, shape[-1]


def _point_features(self: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """A point backbone's pooled feature with MP: the backbone's own (first order), then MHC³ of the tokens."""
    point_sites.check_points(points, point_sites.MIN_POINTS, "Moment Probing", self.spec)
    return self.moment_probe.sink_hook(self, (points,), type(self)._features(self, points))


def _apply(backbone: nn.Module, cfg: MomentProbingConfig, plus: bool) -> AdapterHandle:
    points = getattr(backbone, "kind", "") == "points"
    if not points and (getattr(backbone, "kind", "") != "image" or not hasattr(backbone, "token_blocks")):
        raise ValueError(
            f"Moment Probing needs an image backbone (ViT blocks or CNN stages) or a point backbone (PointNet, "
            f"PointBERT); {getattr(backbone, 'spec', type(backbone).__name__)!r} is neither"
        )
    layout, prefix, sites = _sites(backbone)
    first = backbone.get_submodule(sites[0][1])
    n_all, width = _probe(backbone, first, layout, pool=sites[0][0] == "pool")
    n = n_all - prefix
    if n < 1:
        raise ValueError(
            f"Moment Probing: {backbone.spec!r} yields {n} tokens after {prefix} prefix tokens; it needs >= 1"
        )
    if points and n < point_sites.MIN_POINTS:
        raise ValueError(
            f"Moment Probing on {backbone.spec!r}: the final features have {n} point token(s); MHC³ needs >= "
            f"{point_sites.MIN_POINTS} (a second moment over one point is one outer product). Fix: task.num_points "
            f">= {point_sites.MIN_POINTS}"
        )
    if n < 2:  # allowed (the tiny test backbones at 32² end in a 1×1 map), but say what it means
        log.warning(
            "Moment Probing on %s: the final features have %d position(s), so each cross second-moment is one outer "
            "product; a larger backbone.image_size gives MHC³ more tokens (stride 32 CNNs: >= 64 px for 2×2)",
            backbone.spec, n,
        )  # fmt: skip
    if not MIN_HEAD_WIDTH * cfg.heads <= cfg.hidden_dim <= width:
        raise ValueError(
            f"Moment Probing: features of width {width} ({backbone.spec!r}) are too small for hidden_dim="
            f"{cfg.hidden_dim} with heads={cfg.heads}; hidden_dim must lie in [{MIN_HEAD_WIDTH * cfg.heads}, {width}] "
            f"(a down-projection with groups of >= {MIN_HEAD_WIDTH})"
        )
    touched = ["moment_probe"]
    report = {"tokens": n, "token_width": width, "first_order_dim": int(backbone.embed_dim)}
    if plus:
        targets = _psrp_targets(backbone)
        if not targets:
            raise ValueError(
                f"MP+ needs ViT blocks with an MLP, CNN blocks with a final BatchNorm projection or PointNet's "
                f"Conv1d+BN stages; {backbone.spec!r} "
                "has none. Use adapter moment_probing (MP without PSRP)"
            )
        units = []
        for name, cdim in targets:
            mod = backbone.get_submodule(name)
            unit = PSRPUnit(*_branch_dims(mod, name), cfg.psrp_rank, cdim)
            mod.register_forward_hook(unit.hook)
            units.append(unit)
        backbone.psrp = nn.ModuleList(units)
        touched.append("psrp")
        report["psrp_blocks"] = len(units)
    probe = MomentProbe(MHC3(width, cfg.hidden_dim, cfg.heads), layout, prefix)
    p = next(backbone.parameters())
    backbone.moment_probe = probe.to(device=p.device, dtype=p.dtype)
    if plus:
        backbone.psrp.to(device=p.device, dtype=p.dtype)
    for role, name in sites:
        backbone.get_submodule(name).register_forward_hook(getattr(probe, f"{role}_hook"))
    if points:  # the sink: the backbone's own pooled feature, widened (a deep copy rebinds the method)
        backbone._features = types.MethodType(_point_features, backbone)
    backbone.embed_dim = int(backbone.embed_dim) + probe.mhc3.out_dim
    report["second_order_dim"] = probe.mhc3.out_dim
    return AdapterHandle(cfg.name, touched=touched, report=report)


def _branch_dims(mod: nn.Module, name: str) -> tuple[int, int]:
    """(input, output) width of a branch PSRP recalibrates: a CNN block's final BatchNorm, or a transformer block's
    MLP (its first Linear's input, its last Linear's output)."""
    if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
        return mod.num_features, mod.num_features
    linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"MP+: {name} has no Linear layer to read its width from")
    return linears[0].in_features, linears[-1].out_features


TINY = {"hidden_dim": 32, "heads": 4}  # groups of 8: one 1×1 output per cross-covariance on the tiny backbones


@ADAPTERS.register(
    "moment_probing", config_cls=MomentProbingConfig, requires=("image|points", "pooled"), spec=TINY,
    help="Moment Probing (MP): linear head on first-order + MHC³ second-order features",
)  # fmt: skip
def apply_moment_probing(backbone: nn.Module, cfg: MomentProbingConfig) -> AdapterHandle:
    """MP: widen the frozen backbone's pooled features with the MHC³ second-order vector."""
    return _apply(backbone, cfg, plus=False)


@ADAPTERS.register(
    "moment_probing_plus", config_cls=MomentProbingPlusConfig, requires=("image|points", "pooled"),
    spec={**TINY, "psrp_rank": 4},
    help="MP+: Moment Probing plus PSRP scale-and-shift recalibration in every block",
)  # fmt: skip
def apply_moment_probing_plus(backbone: nn.Module, cfg: MomentProbingPlusConfig) -> AdapterHandle:
    """MP+: PSRP in every block of the backbone, then MP's widened features."""
    return _apply(backbone, cfg, plus=True)
