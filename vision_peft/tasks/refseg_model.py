"""The referring-segmentation model (task ``refseg``, :mod:`vision_peft.tasks.refseg`): frozen image + text
encoders (+ adapters) and the trainable head (CRIS lineage).

- **Neck**: three image feature maps (two intermediate + last) → 1×1 conv + BN + ReLU to ``dim``, resized to
  the middle map's grid, each gated by the projected sentence feature (element-wise, as CRIS), concatenated,
  fused, CoordConv (3×3 over features + x/y coordinates).
- **Decoder**: ``decoder_layers`` pre-norm transformer layers over the visual tokens (self-attention with 2-D
  sine positions, cross-attention to the word features with 1-D sine positions and a key-padding mask, FFN).
- **Projector**: ×4 upsampling convs, then a per-sample dynamic 3×3 kernel (and bias) generated from the
  sentence feature → one logit map at 1/4 of the input resolution (for stride-16 middle maps).

Loss: BCE-with-logits against the mask resized (nearest) to the logit map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.tasks.base import GraphWrapper, TaskModel

if TYPE_CHECKING:
    from vision_peft.tasks.refseg import RefSegConfig


def _cbr(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


def sine_2d(d: int, h: int, w: int, device, dtype) -> torch.Tensor:
    """2-D sine positions (h·w, d): half the channels encode y, half x."""
    q = d // 4
    freq = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float32) / max(q, 1)))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq  # (h, q)
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq  # (w, q)
    py = torch.cat([ys.sin(), ys.cos()], 1)[:, None, :].expand(h, w, 2 * q)  # (h, w, 2q)
    px = torch.cat([xs.sin(), xs.cos()], 1)[None, :, :].expand(h, w, 2 * q)  # (h, w, 2q)
    pos = torch.cat([py, px], -1).reshape(h * w, 4 * q)  # (h, w, 4q) -> (hw, 4q)
    if 4 * q < d:
        pos = F.pad(pos, (0, d - 4 * q))
    return pos.to(dtype)


def sine_1d(d: int, n: int, device, dtype) -> torch.Tensor:
    """1-D sine positions (n, d)."""
    half = d // 2
    freq = 1.0 / (10000 ** (torch.arange(half, device=device, dtype=torch.float32) / max(half, 1)))
    t = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freq  # (n, half)
    pos = torch.cat([t.sin(), t.cos()], 1)
    if 2 * half < d:
        pos = F.pad(pos, (0, d - 2 * half))
    return pos.to(dtype)


class Neck(nn.Module):
    """Three levels → d, resized to the middle grid, gated by the sentence, fused, CoordConv."""

    def __init__(self, in_chs: list[int], d: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList([_cbr(c, d) for c in in_chs])
        self.gate = nn.ModuleList([nn.Linear(d, d) for _ in in_chs])
        self.fuse = _cbr(d * len(in_chs), d)
        self.coord = _cbr(d + 2, d, 3)

    def forward(self, feats: list[torch.Tensor], sent: torch.Tensor) -> torch.Tensor:
        h, w = feats[len(feats) // 2].shape[-2:]
        out = []
        for f, proj, gate in zip(feats, self.proj, self.gate):
            f = proj(f)
            if f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(int(h), int(w)), mode="bilinear", align_corners=False)
            out.append(f * gate(sent)[:, :, None, None])  # (B, d, h, w) * (B, d, 1, 1)
        x = self.fuse(torch.cat(out, 1))  # (B, 3d, h, w) -> (B, d, h, w)
        b = x.shape[0]
        yy = torch.linspace(-1, 1, int(h), device=x.device, dtype=x.dtype)[None, None, :, None].expand(b, 1, h, w)
        xx = torch.linspace(-1, 1, int(w), device=x.device, dtype=x.dtype)[None, None, None, :].expand(b, 1, h, w)
        return self.coord(torch.cat([x, xx, yy], 1))  # (B, d+2, h, w) -> (B, d, h, w)


class DecoderLayer(nn.Module):
    """Pre-norm: self-attention (2-D positions) → cross-attention to words (1-D positions) → FFN."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pos, words, wpos, pad) -> torch.Tensor:
        q = self.n1(x)
        x = x + self.drop(self.self_attn(q + pos, q + pos, q, need_weights=False)[0])
        q = self.n2(x)
        x = x + self.drop(self.cross_attn(q + pos, words + wpos, words, key_padding_mask=pad, need_weights=False)[0])
        return x + self.drop(self.ffn(self.n3(x)))


class Projector(nn.Module):
    """×4 upsampling convs, then a dynamic 3×3 kernel per sample generated from the sentence feature."""

    def __init__(self, d: int, p: int) -> None:
        super().__init__()
        self.p = p
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _cbr(d, d // 2, 3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _cbr(d // 2, d // 2, 3),
            nn.Conv2d(d // 2, p, 1),
        )
        self.txt = nn.Linear(d, p * 9 + 1)

    def forward(self, x: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        x = self.vis(x)  # (B, p, 4h, 4w)
        b, p, h, w = x.shape
        k = self.txt(sent)  # (B, 9p + 1)
        weight, bias = k[:, :-1].reshape(b, p, 3, 3), k[:, -1]  # (B, 9p) -> (B, p, 3, 3)
        xp = F.pad(x, (1, 1, 1, 1))
        out = bias[:, None, None].expand(b, h, w)
        for dy in range(3):  # 9 shifted products: a per-sample 3×3 conv that exports with a dynamic batch
            for dx in range(3):
                out = out + (xp[:, :, dy : dy + h, dx : dx + w] * weight[:, :, dy, dx, None, None]).sum(1)
        return out[:, None]  # (B, 1, 4h, 4w)


class RefSegHead(nn.Module):
    """Word/sentence projections, neck, decoder, projector: everything trainable outside the adapters."""

    def __init__(self, in_chs: list[int], word_dim: int, sent_dim: int, t: RefSegConfig) -> None:
        super().__init__()
        d = t.dim
        self.word_proj = nn.Linear(word_dim, d)
        self.sent_proj = nn.Linear(sent_dim, d)
        self.neck = Neck(in_chs, d)
        self.layers = nn.ModuleList([DecoderLayer(d, t.heads, t.ffn, t.dropout) for _ in range(t.decoder_layers)])
        self.norm = nn.LayerNorm(d)
        self.projector = Projector(d, t.proj_dim)

    def forward(self, feats, words, sent, attention_mask) -> torch.Tensor:
        w = self.word_proj(words)  # (B, L, d)
        s = self.sent_proj(sent)  # (B, d)
        first = torch.arange(attention_mask.shape[1], device=attention_mask.device) == 0
        pad = (attention_mask == 0) & ~first  # (B, L); token 0 always attendable
        v = self.neck(feats, s)  # (B, d, h, w)
        b, d, h, wd = v.shape
        x = v.flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, hw, d)
        pos = sine_2d(d, int(h), int(wd), x.device, x.dtype)[None]
        wpos = sine_1d(d, w.shape[1], x.device, x.dtype)[None]
        for layer in self.layers:
            x = layer(x, pos, w, wpos, pad)
        v = self.norm(x).transpose(1, 2).reshape(b, d, h, wd)  # (B, hw, d) -> (B, d, h, w)
        return self.projector(v, s)


class RefSegModel(TaskModel):
    """Frozen image + text encoders (+ adapters) → head → mask logits at 1/4 resolution."""

    def __init__(self, backbone, adapter, text, indices: list[int], in_chs: list[int], t: RefSegConfig) -> None:
        super().__init__(backbone, adapter)
        # frozen, eval mode, never saved (its adapters live in backbone.text_conditioning)
        self.add_frozen_encoder("text", text)
        self.indices = list(indices)
        self.head = RefSegHead(in_chs, int(text.width), int(text.embed_dim), t)

    def logits(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cond = getattr(self.backbone, "text_conditioning", None)
        if cond is not None:
            cond.set_text_mask(attention_mask)
        words, sent = self.text.forward_tokens(input_ids, attention_mask)  # (B, L, W), (B, E)
        if cond is not None:
            cond.set_text(words, attention_mask)
        try:
            feats = self.backbone.forward_intermediates(image, self.indices)
        finally:
            if cond is not None:
                cond.set_text(None, None)
                cond.set_text_mask(None)
        return self.head(feats, words, sent, attention_mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch["image"], batch["input_ids"], batch["attention_mask"])
        out = {"output": logits}
        if "mask" in batch:
            target = F.interpolate(batch["mask"][:, None].float(), size=logits.shape[-2:], mode="nearest")
            out["loss"] = F.binary_cross_entropy_with_logits(logits.float(), target)
        return out


class MaskLogitsGraph(GraphWrapper):
    """The export graph: (image, input_ids, attention_mask) → mask logits, always in inference mode."""

    def __init__(self, model: RefSegModel) -> None:
        super().__init__(model, "logits", inference_only=True)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.logits(image, input_ids, attention_mask)
