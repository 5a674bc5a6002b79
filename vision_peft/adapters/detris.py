"""DETRIS: Densely Connected Parameter-Efficient Tuning for Referring Image Segmentation (Huang et al., AAAI 2025,
https://arxiv.org/abs/2501.08580).

Idea: when the image and text encoders were never trained together (DINOv2 + CLIP text, or here
EfficientNet-Lite0 + MiniLM), low-rank visual adapters with *dense* connections ("Dense Aligners") that also
cross-attend to the text tokens, plus small dense text adapters, align the two frozen encoders while
updating ~1-2 % of their parameters. A Dense Aligner projects a block's input to c channels, runs three conv
branches (k = 1, 3, 5; each sees the input and all earlier branches), lets the result query the text tokens
(multi-head attention with a key-padding mask), and adds ``scale · W2(...)`` in parallel to the block's FFN.

Where this implementation differs from the released code:
- One module for ViT token grids *and* CNN feature maps. ViT blocks (timm ``Block``, open_clip
  ``ResidualAttentionBlock``): a forward hook on ``block.mlp`` adds ``scale · aligner(LN2 x)`` to the FFN output,
  so ``x ← x + LS(MLP(LN2 x) + scale · out)`` exactly as in the paper; prefix tokens (class/register) are kept
  aside and the patch grid comes from a hook on the patch-embedding conv. CNN stages (timm ``model.blocks[i]``,
  e.g. EfficientNet-Lite0): a parallel branch ``y ← stage(x) + scale · aligner(pool(x))`` where ``pool``
  average-pools the stage input to the stage's output grid.
- The key-padding mask is passed (the reference code omits it); the first token is always attendable, so an
  all-padding row can never produce NaNs.
- ``dense_across_depth: true`` implements the abstract's reading ("dense interconnections between each layer
  and all preceding layers"): each aligner also receives the low-rank features of every earlier aligner
  (resized to its grid, concatenated, fused by a 1×1 conv initialised to pass its own features through
  unchanged). The default (false) is the released code's design (density inside each adapter only).
- Text adapters: the same dense design in 1-D (Conv1d k = 1, 3, 5 + BN) on the post-attention residual stream,
  parallel to the FFN: open_clip blocks ``x ← x + MLP(LN2 x) + scale · TA(x)``; BERT/MiniLM (post-LN) blocks
  ``x ← LN(FFN(x) + x + scale · TA(x))`` (added to the FFN's output projection, before its LayerNorm).
- The final ``W2`` projections are zero-initialised, so the adapted encoders equal the frozen ones at step 0.

How the text reaches the image encoder (the text-conditioning protocol any adapter may implement): the adapter
stores a :class:`DetrisModules` as ``backbone.text_conditioning``. A task that has a text encoder calls, once
after building, ``backbone.text_conditioning.bind_text_encoder(text)`` (inserts the text adapters, creates the
text-side projections), then per batch ``set_text_mask(attention_mask)`` before the text forward and
``set_text(tokens, attention_mask)`` before the image forward. The visual aligners read the text tokens from
that context; without a bound text encoder they skip the cross-attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle


@dataclass
class DetrisConfig:
    """DETRIS Dense Aligners (visual) and dense text adapters."""

    name: str = "detris"  # registry name
    visual: bool = True  # insert visual Dense Aligners into the image backbone
    visual_blocks: list[int] | None = None  # ViT block / CNN stage indices; None = ViT 1,3,5,…; CNN middle stages
    width: int = 128  # c: low-rank width of a visual aligner
    attn_dim: int = 128  # width of the aligner's cross-attention to the text tokens
    heads: int = 8  # heads of that cross-attention
    scale: float = 0.2  # visual adapter output scale
    cross_attention: bool = True  # aligners attend to the text tokens (false = purely visual dense adapters)
    dense_across_depth: bool = False  # every aligner also receives all earlier aligners' low-rank features
    text: bool = True  # insert dense text adapters into the text encoder
    text_blocks: list[int] | None = None  # text block indices; None = 1,3,5,…
    text_width: int = 64  # c_t: low-rank width of a text adapter
    text_scale: float = 0.2  # text adapter output scale

    def __post_init__(self) -> None:
        for key in ("width", "attn_dim", "heads", "text_width"):
            if getattr(self, key) <= 0:
                raise ValueError(f"DETRIS {key} must be positive, got {key}={getattr(self, key)}")
        if self.width % 4:
            raise ValueError(f"DETRIS width must be divisible by 4 (dense branches c/2, c/4, c/4), got {self.width}")
        if self.text_width % 4:
            raise ValueError(f"DETRIS text_width must be divisible by 4, got {self.text_width}")
        if self.attn_dim % self.heads:
            raise ValueError(f"DETRIS attn_dim={self.attn_dim} must be divisible by heads={self.heads}")
        if not self.visual and not self.text:
            raise ValueError("DETRIS with visual: false and text: false adapts nothing; use adapter 'linear' instead")


def _cbr(cin: int, cout: int, k: int, dims: int = 2) -> nn.Sequential:
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return nn.Sequential(conv(cin, cout, k, padding=k // 2, bias=False), bn(cout), nn.ReLU(inplace=True))


class DenseBranches(nn.Module):
    """b1 = CBR1(P) → c/2; b2 = CBR3(CBR1([P; b1])) → c/4; b3 = CBR5(CBR1([P; b1; b2])) → c/4; out [b1; b2; b3] + P."""

    def __init__(self, c: int, dims: int = 2) -> None:
        super().__init__()
        h, q = c // 2, c // 4
        self.b1 = _cbr(c, h, 1, dims)
        self.b2 = nn.Sequential(_cbr(c + h, q, 1, dims), _cbr(q, q, 3, dims))
        self.b3 = nn.Sequential(_cbr(c + h + q, q, 1, dims), _cbr(q, q, 5, dims))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        b1 = self.b1(p)
        b2 = self.b2(torch.cat([p, b1], 1))
        b3 = self.b3(torch.cat([p, b1, b2], 1))
        return torch.cat([b1, b2, b3], 1) + p  # (B, c, *grid)


class _State:
    """Per-forward context shared by all aligners: text tokens, their mask, the patch grid, earlier features."""

    def __init__(self) -> None:
        self.text: torch.Tensor | None = None  # (B, L, W) text tokens
        self.pad: torch.Tensor | None = None  # (B, L) bool, True = padding (ignored by attention)
        self.text_mask: torch.Tensor | None = None  # (B, L) attention mask for the text adapters
        self.grid: tuple[int, int] | None = None  # ViT patch grid of the current image forward
        self.earlier: list[torch.Tensor] = []  # low-rank features of earlier aligners (dense across depth)


class DenseAligner(nn.Module):
    """One visual Dense Aligner: W1 → dense conv branches → text cross-attention → W2 (zero-init)."""

    def __init__(self, dim_in: int, dim_out: int, cfg: DetrisConfig, state: _State, index: int) -> None:
        super().__init__()
        c = cfg.width
        self.state, self.index, self.cfg = state, index, cfg
        self.down = nn.Linear(dim_in, c)  # W1
        self.fuse = None
        if cfg.dense_across_depth and index > 0:
            self.fuse = nn.Conv2d(c * (index + 1), c, 1)  # [own; earlier aligners] → c, starts as identity on own
            with torch.no_grad():
                self.fuse.weight.zero_()
                self.fuse.weight[:, :c, 0, 0].copy_(torch.eye(c))
                self.fuse.bias.zero_()
        self.dense = DenseBranches(c)
        self.up = nn.Linear(c, dim_out)  # W2
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        # the cross-attention exists only once a text encoder is bound (bind_text knows its width)
        self.q: nn.Linear | None = None
        self.kv: nn.Linear | None = None
        self.attn: nn.MultiheadAttention | None = None
        self.attn_up: nn.Linear | None = None

    def bind_text(self, text_width: int) -> None:
        if self.cfg.cross_attention and self.kv is None:
            c, a, dev = self.cfg.width, self.cfg.attn_dim, self.down.weight.device
            self.q = nn.Linear(c, a).to(dev)
            self.kv = nn.Linear(text_width, a).to(dev)
            self.attn = nn.MultiheadAttention(a, self.cfg.heads, batch_first=True).to(dev)
            self.attn_up = nn.Linear(a, c).to(dev)

    def _grid_features(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, c, h, w) low-rank grid → F' (B, c, h, w)."""
        st = self.state
        if self.fuse is not None:
            prev = [F.interpolate(e, size=p.shape[-2:], mode="bilinear", align_corners=False) for e in st.earlier]
            if len(prev) != self.index:
                raise RuntimeError(
                    f"dense-across-depth aligner {self.index} saw {len(prev)} earlier features; the image forward "
                    "must run every aligner in order (do not call blocks out of order)"
                )
            p = self.fuse(torch.cat([p, *prev], 1))  # (B, c·(i+1), h, w) -> (B, c, h, w)
        f = self.dense(p)
        if self.kv is not None and st.text is not None:
            b, c, h, w = f.shape
            q = self.q(f.flatten(2).transpose(1, 2))  # (B, c, h, w) -> (B, hw, A)
            kv = self.kv(st.text.to(q.dtype))  # (B, L, A)
            a, _ = self.attn(q, kv, kv, key_padding_mask=st.pad, need_weights=False)
            f = self.attn_up(a).transpose(1, 2).reshape(b, c, h, w)  # (B, hw, c) -> (B, c, h, w)
        if self.cfg.dense_across_depth:
            st.earlier.append(f + p)
        return f

    def forward_tokens(self, u: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """u = LN2(x) (B, L, D) → adapter output (B, L, D_out)."""
        x0 = F.relu(self.down(u))  # (B, L, c)
        b, n_tok, c = x0.shape
        h, w = self.state.grid or (0, 0)
        if h * w != n_tok - num_prefix:
            side = math.isqrt(n_tok - num_prefix)
            if side * side != n_tok - num_prefix:
                raise ValueError(f"cannot lay {n_tok - num_prefix} patch tokens out on a grid (no patch-embed conv)")
            h = w = side
        p = x0[:, num_prefix:].transpose(1, 2).reshape(b, c, h, w)  # (B, hw, c) -> (B, c, h, w)
        f = self._grid_features(p).flatten(2).transpose(1, 2)  # (B, c, h, w) -> (B, hw, c)
        return self.up(torch.cat([x0[:, :num_prefix], f], 1) + x0)

    def forward_map(self, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """x (B, C_in, H, W) stage input → adapter output (B, C_out, h, w) at the stage's output grid."""
        if tuple(x.shape[-2:]) != tuple(out_hw):
            kh, kw = x.shape[-2] // out_hw[0], x.shape[-1] // out_hw[1]
            if kh * out_hw[0] == x.shape[-2] and kw * out_hw[1] == x.shape[-1]:
                x = F.avg_pool2d(x, (kh, kw))
            else:
                x = F.interpolate(x, size=tuple(out_hw), mode="bilinear", align_corners=False)
        x0 = F.relu(self.down(x.permute(0, 2, 3, 1)))  # (B, C, h, w) -> (B, h, w, c)
        p = x0.permute(0, 3, 1, 2)  # (B, h, w, c) -> (B, c, h, w)
        f = self._grid_features(p)
        return self.up((f + p).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)


class TextAdapter(nn.Module):
    """Dense 1-D text adapter: down → dense Conv1d branches (k = 1, 3, 5, BN) → up (zero-init)."""

    def __init__(self, width: int, c: int, state: _State) -> None:
        super().__init__()
        self.state = state
        self.down = nn.Linear(width, c)
        self.dense = DenseBranches(c, dims=1)
        self.up = nn.Linear(c, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.down(x))  # (B, L, c)
        m = self.state.text_mask
        if m is not None and m.shape == z.shape[:2]:
            z = z * m.unsqueeze(-1).to(z.dtype)  # padding tokens contribute nothing to the convolutions
        z = self.dense(z.transpose(1, 2)).transpose(1, 2)  # (B, L, c) -> (B, c, L) -> (B, L, c)
        return self.up(z)


def _default_indices(n: int) -> list[int]:
    return list(range(1, n, 2)) or [0]


class DetrisModules(nn.Module):
    """Every DETRIS module of a run (visual aligners, text adapters) and the text-conditioning protocol."""

    def __init__(self, cfg: DetrisConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.state = _State()
        self.visual = nn.ModuleList()
        self.text = nn.ModuleList()
        self._hooks: list = []
        self.text_touched: list[str] = []

    # -- protocol --------------------------------------------------------------------------------------------
    def bind_text_encoder(self, text: nn.Module) -> list[str]:
        """Create the text-side projections and (if configured) insert the text adapters; returns module names."""
        if getattr(self, "_bound", False):
            return self.text_touched
        self._bound = True
        width = int(text.width)
        for a in self.visual:
            a.bind_text(width)
        if not self.cfg.text:
            return []
        blocks = text.blocks()
        idx = self.cfg.text_blocks if self.cfg.text_blocks is not None else _default_indices(len(blocks))
        for i in idx:
            if not -len(blocks) <= i < len(blocks):
                raise ValueError(
                    f"DETRIS text_blocks index {i} out of range: the text encoder has {len(blocks)} blocks"
                )
            blk = blocks[i]
            ta = TextAdapter(width, self.cfg.text_width, self.state).to(next(text.parameters()).device)
            self.text.append(ta)
            self._hooks += _attach_text_adapter(blk, ta, self.cfg.text_scale, f"text block {i}")
            self.text_touched.append(f"text.blocks.{i % len(blocks)}")
        return self.text_touched

    def set_text_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Before the text forward: the token mask the text adapters use."""
        self.state.text_mask = attention_mask

    def set_text(self, tokens: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Before the image forward: text tokens (B, L, W) and mask (B, L) the aligners attend to."""
        st = self.state
        st.text = tokens
        if attention_mask is None or tokens is None:
            st.pad = None
        else:
            first = torch.arange(attention_mask.shape[1], device=attention_mask.device) == 0
            st.pad = (attention_mask == 0) & ~first  # (B, L); token 0 always attendable: no all-masked rows
        st.earlier = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _attach_text_adapter(blk: nn.Module, ta: TextAdapter, scale: float, where: str) -> list:
    """Hooks putting ``scale · TA(post-attention stream)`` in parallel to the block's FFN."""
    box: dict[str, torch.Tensor] = {}
    if hasattr(blk, "ln_2") and hasattr(blk, "mlp"):  # open_clip ResidualAttentionBlock (pre-LN)

        def keep(mod, args):
            box["x"] = args[0]

        def add(mod, args, out):
            return out + scale * ta(box.pop("x")).to(out.dtype)

        return [blk.ln_2.register_forward_pre_hook(keep), blk.mlp.register_forward_hook(add)]
    if hasattr(blk, "attention") and hasattr(getattr(blk, "output", None), "dense"):  # BERT layer (post-LN)

        def keep_bert(mod, args, out):
            box["x"] = out[0] if isinstance(out, tuple) else out

        def add_bert(mod, args, out):
            return out + scale * ta(box.pop("x")).to(out.dtype)

        return [blk.attention.register_forward_hook(keep_bert), blk.output.dense.register_forward_hook(add_bert)]
    raise ValueError(
        f"DETRIS text adapters support open_clip and BERT-style blocks; {where} is a {type(blk).__name__}. "
        "Set adapter.text=false to train visual aligners only"
    )


def _token_dims(blk: nn.Module) -> tuple[int, int]:
    mlp = blk.mlp
    fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "c_fc", None)
    fc2 = getattr(mlp, "fc2", None) or getattr(mlp, "c_proj", None)
    if fc1 is None or fc2 is None:
        raise ValueError(f"DETRIS: cannot read the width of {type(blk).__name__}.mlp (no fc1/c_fc, fc2/c_proj)")
    return int(fc1.in_features), int(fc2.out_features)


def _stage_channels(stage: nn.Module) -> tuple[int, int]:
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"DETRIS: stage {type(stage).__name__} holds no Conv2d")
    return int(convs[0].in_channels), int(convs[-1].out_channels)


@ADAPTERS.register(
    "detris", config_cls=DetrisConfig, help="DETRIS dense aligners (ViT/CNN) + dense text adapters",
    requires=("image", "text_encoder"), spec={},  # the aligners cross-attend to the task's text tokens
)  # fmt: skip
def apply_detris(backbone: nn.Module, cfg: DetrisConfig) -> AdapterHandle:
    """Insert Dense Aligners into the image backbone; text adapters follow when a task binds its text encoder."""
    mods = DetrisModules(cfg)
    touched: list[str] = ["text_conditioning"]
    state = mods.state
    tb = backbone.token_blocks() if hasattr(backbone, "token_blocks") else None
    if cfg.visual:
        if tb is not None:  # ViT: hook the FFN of the chosen blocks
            blocks, num_prefix = tb
            idx = cfg.visual_blocks if cfg.visual_blocks is not None else _default_indices(len(blocks))
            idx = sorted({i % len(blocks) if -len(blocks) <= i < len(blocks) else i for i in idx})
            conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
            if conv is not None:  # the patch embedding: remember the grid of this forward

                def grid_hook(mod, args, out):
                    state.grid = (int(out.shape[-2]), int(out.shape[-1]))
                    state.earlier = []

                mods._hooks.append(conv.register_forward_hook(grid_hook))
            for k, i in enumerate(idx):
                if not -len(blocks) <= i < len(blocks):
                    raise ValueError(f"DETRIS visual_blocks index {i} out of range: {len(blocks)} blocks")
                blk = blocks[i]
                din, dout = _token_dims(blk)
                al = DenseAligner(din, dout, cfg, state, k)
                mods.visual.append(al)

                def add(mod, args, out, al=al):
                    return out + cfg.scale * al.forward_tokens(args[0], num_prefix).to(out.dtype)

                mods._hooks.append(blk.mlp.register_forward_hook(add))
                touched.append(f"blocks.{i % len(blocks)}.mlp")
        else:  # CNN: a parallel branch per stage of model.blocks
            stages = getattr(getattr(backbone, "model", None), "blocks", None)
            if not isinstance(stages, (nn.Sequential, nn.ModuleList)):
                raise ValueError(
                    f"DETRIS needs ViT blocks or CNN stages (model.blocks); {getattr(backbone, 'spec', '?')!r} has "
                    "neither. Use visual: false for text adapters only"
                )
            n = len(stages)
            idx = cfg.visual_blocks if cfg.visual_blocks is not None else list(range(max(0, n // 2 - 1), n - 1))
            idx = sorted({i % n if -n <= i < n else i for i in idx})  # forward order (dense across depth)
            for k, i in enumerate(idx):
                if not -n <= i < n:
                    raise ValueError(f"DETRIS visual_blocks index {i} out of range: the CNN has {n} stages")
                stage = stages[i]
                cin, cout = _stage_channels(stage)
                al = DenseAligner(cin, cout, cfg, state, k)
                mods.visual.append(al)
                box: dict[str, torch.Tensor] = {}

                def keep(mod, args, box=box):
                    box["x"] = args[0]
                    if al_first(mod):
                        state.earlier = []

                def add_map(mod, args, out, al=al, box=box):
                    return out + cfg.scale * al.forward_map(box.pop("x"), tuple(out.shape[-2:])).to(out.dtype)

                first_stage = stages[idx[0]]

                def al_first(mod, first_stage=first_stage):
                    return mod is first_stage

                mods._hooks.append(stage.register_forward_pre_hook(keep))
                mods._hooks.append(stage.register_forward_hook(add_map))
                touched.append(f"model.blocks.{i % n}")
    backbone.text_conditioning = mods
    return AdapterHandle("detris", touched=touched)
