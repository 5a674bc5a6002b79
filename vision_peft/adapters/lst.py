"""LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning (Sung, Cho & Bansal, NeurIPS 2022,
https://arxiv.org/abs/2206.06522; official code https://github.com/ylsung/Ladder-Side-Tuning).

A small *side network* is trained next to the frozen backbone. At each of K chosen layers (ViT blocks, CNN feature
levels) the backbone's activation f_i is down-projected by a *ladder* (width / ``reduction``) and mixed into the side
state through a learned gate, g_i = σ(α_i / T): h_i = block_i(g_i · h_{i-1} + (1 − g_i) · down_i(f_i)). The
backbone runs under ``torch.no_grad``: nothing is saved for its backward and no gradient flows through it, so
training memory is the side network's alone (the paper: 69 % less than full fine-tuning on T5). The side network's
last state is pooled and up-projected to the backbone's feature width, so the task heads are unchanged.

How it maps onto vision backbones (the paper tunes T5 / CLIP-T5):

- ViT blocks (timm ViTs, open_clip image towers): one side transformer block per ladder at width d/r (the
  backbone's head count when it divides d/r, else one head; MLP width / r), all tokens (prefix tokens included);
  the last state is layer-normed, averaged over tokens and up-projected (a Linear) to ``embed_dim``.
- CNN stages (EfficientNet-Lite0, timm CNNs with ``feature_info``): one ladder per feature level (Lite0: the five
  resolutions, 16/24/40/112/320 channels), a 1×1 conv ladder to c_i/r channels, a strided 3×3 conv carrying the side
  state to the next level's resolution and channels, and a light residual block (depthwise 3×3 + pointwise 1×1,
  GroupNorm, ReLU); the last state is averaged over space and up-projected to ``embed_dim``.
- PointNet (point backbones, ``vision_peft.adapters.point_sites``): one ladder per per-point stage (conv1..conv5 +
  BN + ReLU, 64/64/64/128/1024 channels, each (B, C_i, N)): the ReLU'd stage output through a 1×1 Conv1d to
  C_i/r channels, a 1×1 Conv1d carry when the side width changes, and a residual per-point MLP (two 1×1 Conv1d,
  GroupNorm, ReLU) — PointNet's own layer type at 1/r width, every point independent as in the backbone. The last
  state is max-pooled over points (PointNet's symmetric pooling, so the side stays order-invariant) and
  up-projected to ``embed_dim`` (1,024), so the task head is unchanged. PointBERT: its blocks as ViT blocks (pruned
  side blocks over the 1 + G tokens), the last state max-pooled over tokens.

Where this implementation differs:

- Initialisation. The paper initialises the side network by structural pruning of the backbone (keep the rows /
  columns of largest magnitude, its ``pruning_v2``: L1 of each weight row). Here each ViT side block is pruned from
  the backbone block it ladders from: the d/r residual coordinates of largest summed |W| (over qkv, proj, fc1, fc2),
  per head the q/k and the v coordinates of largest |W|, and the fc1 units of largest |W|; layer norms keep the same
  coordinates, and the ladder starts as the selection of the kept residual coordinates (the official code starts it
  at random), so step 0 feeds each pruned block the coordinates it was pruned for. CNN side blocks start at random
  (PyTorch's default init): an inverted-residual stage has no block of the side's shape to prune from. PointNet
  side blocks start at random too: a residual per-point MLP fed by a ladder has no backbone layer of its shape
  (PointNet's convs are not residual), and pruning conv_i's rows would not give the side's input columns.
- PointNet is not a stack of blocks the paper's side could mirror one-to-one; the side has one block per conv
  stage, and its final max-pool (not T5-LST's mean) keeps the permutation invariance of the backbone.
- The first ladder has a gate too (its side state before is zero; T5-LST starts the side from a down-projected
  embedding instead); gates start at α = 0, T = 0.1 (σ = 0.5), as the official code's defaults.
- No side-network layer dropping (the paper's best T5 runs drop some side layers): choose ``layers`` instead.
- Attachment: forward hooks on the tapped modules record their outputs while the frozen forward runs, and the
  backbone's pooled-feature path (``_features``, ``forward_from_grid``) is replaced on this instance by the side
  network's. The hooks also tell the frozen-prefix cache that these modules feed a trained part. On a CNN,
  ``forward_from_grid(grid, stage)`` (MVP's path) runs the side network from the first ladder after the grid
  (ladders inside the grid's prefix cannot be recomputed from the grid), so there it equals ``forward_features``
  only when no ladder lies in that prefix. Dense tasks read ``forward_intermediates``: LST does not change them.

``merge()`` has nothing to fold (the side network is extra compute); export traces the side network with the rest.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle
from vision_peft.adapters.point_sites import (
    check_points,
    is_pointnet,
    point_side_parts,
    pointbert_blocks,
    pointnet_stages,
    probe_input,
)


@dataclass
class LSTConfig:
    """Ladder side-tuning: a small side network fed by gated ladders from the frozen backbone."""

    name: str = "lst"  # registry name
    reduction: int = 8  # r: side width = backbone width / r (ViT blocks) or channels / r (CNN levels)
    layers: list[int] | None = None  # ladder taps: ViT block / CNN feature-level indices (negative: from the end)
    gate_alpha: float = 0.0  # initial α of every gate, g = σ(α / T) (0 → 0.5, the paper's)
    gate_temperature: float = 0.1  # T of the gates (the paper's 0.1)
    prune_init: bool = True  # ViT: initialise side blocks by structural pruning of the backbone's blocks
    seed: int = 0  # seed of the random initialisations

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"LST reduction factor must be >= 1, got reduction={self.reduction}")
        if self.gate_temperature <= 0:
            raise ValueError(f"LST gate_temperature must be positive, got {self.gate_temperature}")
        if self.layers is not None and not self.layers:
            raise ValueError("LST layers must name at least one ladder (or be null for all)")


# -- side blocks ---------------------------------------------------------------------------------------------------
class SideAttentionBlock(nn.Module):
    """Pre-norm transformer block at the side width: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)  # (B,N,3d)->(B,N,3,h,d/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, N, d/h)
        attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)  # (B, h, N, N)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))  # (B,h,N,d/h)->(B,N,d)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SideConvBlock(nn.Module):
    """Light residual conv block at the side width: x + GN(PW(ReLU(GN(DW3×3(x)))))."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(ch, ch, 3, padding=1, groups=ch, bias=False)
        self.pw = nn.Conv2d(ch, ch, 1, bias=False)
        self.gn1, self.gn2 = nn.GroupNorm(1, ch), nn.GroupNorm(1, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gn2(self.pw(F.relu(self.gn1(self.dw(x)))))


class Ladder(nn.Module):
    """One rung: down-projection of the backbone activation, gate, carry of the side state, side block."""

    def __init__(self, down: nn.Module, carry: nn.Module, block: nn.Module, shape: tuple[int, ...], cfg) -> None:
        super().__init__()
        self.down, self.carry, self.block = down, carry, block
        self.alpha = nn.Parameter(torch.full((1,), float(cfg.gate_alpha)))
        self.temperature = cfg.gate_temperature
        self.state_shape = shape  # side state out, no batch: tokens (N, d/r), cnn (c/r, h, w), points (c/r,) × N

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha / self.temperature)

    def forward(self, feature: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        g = self.gate().to(feature.dtype)
        return self.block(g * self.carry(state) + (1 - g) * self.down(feature))


class LSTSide(nn.Module):
    """The ladders, the side network's output (norm, pool, up-projection), and the recording of the taps."""

    def __init__(self, ladders: list[Ladder], layout: str, embed_dim: int, pool: str = "mean") -> None:
        super().__init__()
        self.ladders = nn.ModuleList(ladders)
        self.layout = layout  # tokens | cnn | points
        self.pool = pool  # tokens: mean (images) | max (point backbones' symmetric pooling)
        width = ladders[-1].state_shape[-1 if layout == "tokens" else 0]
        self.norm = nn.LayerNorm(width) if layout == "tokens" else nn.Identity()  # cnn: the blocks end in a norm
        self.up = nn.Linear(width, embed_dim)
        self._taps: dict[int, torch.Tensor] | None = None

    def record(self, i: int, module: nn.Module, args, output) -> None:
        """Forward hook of tapped module ``i``: keep its output while :meth:`recording` is active."""
        if self._taps is not None:
            self._taps[i] = output[0] if isinstance(output, tuple) else output

    @contextmanager
    def recording(self) -> Iterator[dict[int, torch.Tensor]]:
        self._taps = taps = {}
        try:
            yield taps
        finally:
            self._taps = None

    def forward(self, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """Side network over the recorded activations: it starts at the first ladder whose tap was recorded."""
        present = [i for i in range(len(self.ladders)) if i in taps]
        if not present or present != list(range(present[0], len(self.ladders))):
            raise RuntimeError(
                f"LST ladders recorded {present} of {len(self.ladders)}: the frozen forward skipped some"
            )
        start, ref = present[0], taps[present[0]]
        points = (ref.shape[-1],) if self.layout == "points" else ()  # a per-point state is (B, C', N)
        state = ref.new_zeros(ref.shape[0], *self.ladders[max(0, start - 1)].state_shape, *points)  # no side state
        for i in present:
            state = self.ladders[i](taps[i], state)
        if self.layout == "tokens":
            pooled = self.norm(state).amax(1) if self.pool == "max" else self.norm(state).mean(1)  # (B,N,d')->(B,d')
        else:  # points: PointNet's symmetric max over points (B,C',N)->(B,C'); cnn: average (B,C',h,w)->(B,C')
            pooled = state.amax(2) if self.layout == "points" else state.mean((2, 3))
        return self.up(pooled)  # (B, d') -> (B, embed_dim)


# -- structural pruning of a ViT block -----------------------------------------------------------------------------
def _block_weights(block: nn.Module) -> dict[str, torch.Tensor | None] | None:
    """The weights of a timm ``Block`` or an open_clip ``ResidualAttentionBlock``, or None for other blocks."""
    try:
        if hasattr(block, "norm1") and hasattr(block.attn, "qkv"):  # timm
            n1, n2, qkv, proj, fc1, fc2 = (
                block.norm1,
                block.norm2,
                block.attn.qkv,
                block.attn.proj,
                block.mlp.fc1,
                block.mlp.fc2,
            )
            qkv_w, qkv_b = qkv.weight, qkv.bias
        elif hasattr(block, "ln_1") and isinstance(block.attn, nn.MultiheadAttention):  # open_clip
            n1, n2, proj, fc1, fc2 = block.ln_1, block.ln_2, block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj
            qkv_w, qkv_b = block.attn.in_proj_weight, block.attn.in_proj_bias
        else:
            return None
        heads = int(block.attn.num_heads if hasattr(block.attn, "num_heads") else block.attn.heads)  # PointBERT
    except AttributeError:
        return None
    if not all(isinstance(m, nn.Linear) for m in (proj, fc1, fc2)) or not isinstance(qkv_w, torch.Tensor):
        return None  # already adapted (wrappers) or another layout
    return {
        "n1w": n1.weight, "n1b": n1.bias, "n2w": n2.weight, "n2b": n2.bias, "qkv_w": qkv_w, "qkv_b": qkv_b,
        "proj_w": proj.weight, "proj_b": proj.bias, "fc1_w": fc1.weight, "fc1_b": fc1.bias, "fc2_w": fc2.weight,
        "fc2_b": fc2.bias, "heads": heads,
    }  # fmt: skip


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return score.topk(k).indices.sort().values


@torch.no_grad()
def prune_into(side: SideAttentionBlock, w: dict, heads: int) -> torch.Tensor:
    """Copy the largest-|W| rows / columns of a backbone block into ``side``; returns the kept residual indices."""
    dim, d = w["qkv_w"].shape[1], side.qkv.in_features
    qkv = w["qkv_w"].abs().float()
    score = qkv.sum(0) + w["fc1_w"].abs().float().sum(0) + w["proj_w"].abs().float().sum(1)
    score = score + w["fc2_w"].abs().float().sum(1)
    keep = _top(score, d)  # residual coordinates
    hd, shd = dim // heads, d // heads
    q, k, v = qkv[:, keep].split(dim)  # (dim, d) each
    qk_rows, v_rows = [], []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        qk_rows.append(h * hd + _top(q[sl].sum(1) + k[sl].sum(1), shd))
        v_rows.append(h * hd + _top(v[sl].sum(1), shd))
    qk, vv = torch.cat(qk_rows), torch.cat(v_rows)
    rows = torch.cat([qk, dim + qk, 2 * dim + vv])
    hidden = _top(w["fc1_w"].abs().float()[:, keep].sum(1), side.fc1.out_features)

    def put(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, r, c) -> None:
        lin.weight.copy_(weight[r][:, c])
        if bias is not None:
            lin.bias.copy_(bias[r])
        else:
            lin.bias.zero_()

    put(side.qkv, w["qkv_w"], w["qkv_b"], rows, keep)
    put(side.proj, w["proj_w"], w["proj_b"], keep, vv)
    put(side.fc1, w["fc1_w"], w["fc1_b"], hidden, keep)
    put(side.fc2, w["fc2_w"], w["fc2_b"], keep, hidden)
    for norm, nw, nb in ((side.norm1, "n1w", "n1b"), (side.norm2, "n2w", "n2b")):
        if w[nw] is not None:
            norm.weight.copy_(w[nw][keep])
        if w[nb] is not None:
            norm.bias.copy_(w[nb][keep])
    return keep


# -- building ------------------------------------------------------------------------------------------------------
def _taps(backbone: nn.Module) -> tuple[str, list[nn.Module]]:
    """(layout, the modules whose outputs the ladders read, in order) of a backbone, or a refusal naming it."""
    if getattr(backbone, "kind", "") == "points":
        if is_pointnet(backbone):
            return "points", pointnet_stages(backbone)  # bn1..bn5: the stages' outputs before their ReLU
        blocks = pointbert_blocks(backbone)
        if blocks is not None:
            return "tokens", blocks
    tb = backbone.token_blocks() if hasattr(backbone, "token_blocks") else None
    if tb is not None:
        return "tokens", list(tb[0])
    model = getattr(backbone, "model", None)
    info = getattr(model, "feature_info", None)
    names = (
        [f.get("module") for f in info] if isinstance(info, list) and hasattr(model, "forward_intermediates") else []
    )
    if names and all(isinstance(n, str) for n in names) and getattr(backbone, "kind", "") == "image":
        return "cnn", [model.get_submodule(n) for n in names]  # timm's feature levels (Lite0: blocks.0/1/2/4/6)
    raise ValueError(
        f"LST needs ViT blocks, CNN stages or point stages to ladder from; "
        f"{getattr(backbone, 'spec', type(backbone).__name__)!r} exposes none. Supported: timm ViTs and open_clip image "
        "towers (token blocks), EfficientNet-Lite0 and timm CNNs with feature_info (feature levels), PointNet (conv "
        "stages) and PointBERT (blocks). Use lora or linear instead"
    )


def _choose(n: int, layers: list[int] | None, spec: str) -> list[int]:
    if layers is None:
        return list(range(n))
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"LST layers {bad} outside the {n} ladder points of {spec!r} (valid: 0..{n - 1} or -{n}..-1)")
    chosen = sorted({i % n for i in layers})
    if len(chosen) != len(layers):
        raise ValueError(f"LST layers {layers} name a ladder point twice on {spec!r}")
    return chosen


def _divide(width: int, r: int, what: str, spec: str) -> int:
    if width % r:
        raise ValueError(
            f"LST reduction={r} does not divide the width {width} of {what} of {spec!r}; pick a reduction that divides "
            "every tapped width (e.g. 2, 4 or 8 for EfficientNet-Lite0's 16/24/40/112/320 channels)"
        )
    return width // r


@torch.no_grad()
def _probe(backbone: nn.Module, taps: list[nn.Module]) -> list[torch.Size]:
    """Shapes (without batch) of the tapped outputs on one zero image (point cloud), in eval mode (no statistics
    move)."""
    shapes: dict[int, torch.Size] = {}

    def keep(i: int, _m: nn.Module, _a, out) -> None:
        shapes.setdefault(i, (out[0] if isinstance(out, tuple) else out).shape[1:])

    hooks = [m.register_forward_hook(functools.partial(keep, i)) for i, m in enumerate(taps)]
    was = backbone.training
    p = next(backbone.parameters())
    try:
        backbone.eval()
        points = getattr(backbone, "kind", "") == "points"
        x = probe_input(backbone) if points else torch.zeros(1, 3, *backbone.input_size, device=p.device, dtype=p.dtype)
        backbone.forward_features(x)
    finally:
        backbone.train(was)
        for h in hooks:
            h.remove()
    return [shapes[i] for i in range(len(taps))]


def _token_ladders(cfg: LSTConfig, taps: list[nn.Module], shapes, spec: str) -> tuple[list[Ladder], bool]:
    ladders, pruned = [], True
    for i, (blk, shape) in enumerate(zip(taps, shapes, strict=True)):
        dim = int(shape[-1])
        d = _divide(dim, cfg.reduction, f"ViT block {i}", spec)
        w = _block_weights(blk)
        heads = w["heads"] if w is not None else 1
        heads = heads if d % heads == 0 and dim % heads == 0 else 1
        hidden = max(1, (w["fc1_w"].shape[0] if w is not None else 4 * dim) // cfg.reduction)
        block = SideAttentionBlock(d, heads, hidden)
        down = nn.Linear(dim, d)
        if cfg.prune_init and w is not None and w["heads"] == heads:
            keep = prune_into(block, w, heads)
            with torch.no_grad():  # the ladder starts as the selection of the kept coordinates
                down.weight.zero_()
                down.weight[torch.arange(d), keep] = 1.0
                down.bias.zero_()
        else:
            pruned = False
        ladders.append(Ladder(down, nn.Identity(), block, (int(shape[0]), d), cfg))
    return ladders, pruned


def _cnn_ladders(cfg: LSTConfig, shapes, spec: str) -> list[Ladder]:
    ladders: list[Ladder] = []
    prev = None
    for i, shape in enumerate(shapes):
        c, h, w = (int(v) for v in shape)
        ch = _divide(c, cfg.reduction, f"feature level {i} ({c} channels)", spec)
        if prev is None:
            carry: nn.Module = nn.Identity()
        else:
            pc, ph, pw = prev
            stride = max(1, round(ph / h))
            if (ph - 1) // stride + 1 != h or (pw - 1) // stride + 1 != w:
                raise ValueError(f"LST cannot carry the side state from {ph}×{pw} to {h}×{w} on {spec!r}")
            carry = nn.Conv2d(pc, ch, 3, stride=stride, padding=1)
        ladders.append(Ladder(nn.Conv2d(c, ch, 1), carry, SideConvBlock(ch), (ch, h, w), cfg))
        prev = (ch, h, w)
    return ladders


def _lst_features(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features with LST: the frozen forward under no_grad, then the side network."""
    if self.lst.layout == "points" or self.lst.pool == "max":
        check_points(x, 1, "LST", self.spec)
    with torch.no_grad(), self.lst.recording() as taps:
        type(self)._features(self, x)
    return self.lst(taps)


def _lst_from_grid(self: nn.Module, grid: torch.Tensor, stage: int | None = None) -> torch.Tensor:
    """``forward_from_grid`` with LST: the rest of the frozen network under no_grad, then the side network."""
    with torch.no_grad(), self.lst.recording() as taps:
        type(self).forward_from_grid(self, grid.detach(), stage)
    return self.lst(taps)


@ADAPTERS.register(
    "lst", config_cls=LSTConfig, help="ladder side-tuning: a gated side network next to the no-grad frozen backbone",
    requires=("image|points", "pooled"), spec={"reduction": 4},  # the side network replaces the pooled features
)  # fmt: skip
def apply_lst(backbone: nn.Module, cfg: LSTConfig) -> AdapterHandle:
    """Attach a ladder side network to the ViT blocks / CNN feature levels / point stages of a backbone."""
    spec = getattr(backbone, "spec", type(backbone).__name__)
    layout, modules = _taps(backbone)
    chosen = _choose(len(modules), cfg.layers, spec)
    modules = [modules[i] for i in chosen]
    shapes = _probe(backbone, modules)
    p = next(backbone.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if layout == "tokens":
            ladders, pruned = _token_ladders(cfg, modules, shapes, spec)
        elif layout == "points":
            parts = point_side_parts([int(s[0]) for s in shapes], cfg.reduction, functools.partial(_divide, spec=spec))
            ladders, pruned = [Ladder(d, c, b, (ch,), cfg) for d, c, b, ch in parts], False
        else:
            ladders, pruned = _cnn_ladders(cfg, shapes, spec), False
        pool = "max" if getattr(backbone, "kind", "") == "points" else "mean"
        side = LSTSide(ladders, layout, backbone.embed_dim, pool).to(device=p.device, dtype=p.dtype)
    backbone.lst = side
    for i, m in enumerate(modules):
        m.register_forward_hook(functools.partial(LSTSide.record, side, i))
    backbone._features = types.MethodType(_lst_features, backbone)
    if hasattr(backbone, "forward_from_grid"):  # image backbones (MVP's path); point backbones have none
        backbone.forward_from_grid = types.MethodType(_lst_from_grid, backbone)
    n = sum(t.numel() for t in side.parameters())
    report = {
        "layout": layout, "ladders": chosen, "widths": [list(lad.state_shape) for lad in ladders],
        "init": "pruned from the backbone blocks" if pruned else "random", "parameters": n,
        "gate": f"sigmoid(alpha / {cfg.gate_temperature}), alpha0 = {cfg.gate_alpha}",
        "side_vs_backbone": round(n / max(1, sum(t.numel() for t in backbone.parameters()) - n), 4),
    }  # fmt: skip
    return AdapterHandle("lst", touched=["lst"], report=report)
