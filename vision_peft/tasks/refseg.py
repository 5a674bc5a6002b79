"""Referring image segmentation (image + phrase → binary mask), the DETRIS recipe on any image/text encoder pair.

Two frozen encoders: the run's ``backbone`` (image: anything with ``forward_intermediates``) and
``task.text_backbone`` (MiniLM, open_clip text towers). The adapter (e.g. ``detris``) may implement the
text-conditioning protocol (``backbone.text_conditioning``, see ``vision_peft.adapters.detris``): the model
then runs the text encoder first and hands its tokens to the image encoder's adapters. The head (CRIS lineage,
all trainable):

- **Neck**: three image feature maps (two intermediate + last) → 1×1 conv + BN + ReLU to ``dim``, resized to
  the middle map's grid, each gated by the projected sentence feature (element-wise, as CRIS), concatenated,
  fused, CoordConv (3×3 over features + x/y coordinates).
- **Decoder**: ``decoder_layers`` pre-norm transformer layers over the visual tokens (self-attention with 2-D
  sine positions, cross-attention to the word features with 1-D sine positions and a key-padding mask, FFN).
- **Projector**: ×4 upsampling convs, then a per-sample dynamic 3×3 kernel (and bias) generated from the
  sentence feature → one logit map at 1/4 of the input resolution (for stride-16 middle maps).

Loss: BCE-with-logits against the mask resized (nearest) to the logit map. Inference: sigmoid, bilinear
upsampling, undo the letterbox, threshold (0.35). Metrics, always together: mIoU (mean per-sample IoU), oIoU
(ΣI / ΣU), Prec@0.5…0.9 — computed at the original image resolution.

Where this differs from DETRIS/CRIS: the neck resizes all levels to the middle grid instead of CRIS's fixed
1/8-1/16-1/32 wiring (so ViTs with one stride work); the sentence gate is a projection (a cross-attention to a
single sentence token reduces to one); Adam lr and epochs come from the recipe; images are letterboxed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.config import BackboneConfig, ConfigError, resolve_data_path
from vision_peft.tasks import TASKS, ExportSpec, Task, TaskModel, build_adapted_backbone

log = logging.getLogger("vision_peft")

DATA_FORMATS = ("coco128_seg", "folder", "refcoco")
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class RefSegConfig:
    """Referring image segmentation with a frozen image encoder and a frozen text encoder."""

    name: str = "refseg"  # registry name
    data: str = "coco128_seg"  # data format: coco128_seg (generated phrases) | folder (refs.json) | refcoco
    data_root: str = "coco128-seg"  # dataset folder (relative paths resolve under $VISION_PEFT_DATA)
    refs_file: str = "refs(unc).p"  # refcoco: the refs pickle (read with a plain-containers-only unpickler)
    instances_file: str = "instances.json"  # refcoco: COCO instances with the segmentations
    split_source: str = "images"  # images: image-level split by counts below | annotations: the refs' own split
    split: dict[str, int] = field(default_factory=lambda: {"train": -1, "test": 25})  # images per split; -1 = rest
    split_seed: int = 0  # seed of the image-level split (numpy RandomState permutation of sorted image ids)
    min_area: float = 0.01  # coco128_seg: smallest target (fraction of the image area) that gets phrases
    mask_mismatch: str = "resize"  # folder: a mask whose size differs from its image: resize (nearest) | error
    text_backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="minilm"))  # frozen text encoder
    max_tokens: int = 24  # tokens per phrase incl. special tokens; longer phrases are truncated (with a warning)
    augment: str = "light"  # joint image/mask augmentation preset (left/right are swapped in flipped phrases)
    feature_indices: list[int] | None = None  # three image-backbone levels for the neck; None = auto
    dim: int = 512  # neck / decoder width
    decoder_layers: int = 3  # transformer decoder layers
    heads: int = 8  # decoder attention heads
    ffn: int = 2048  # decoder feed-forward width
    proj_dim: int = 256  # projector channels (the dynamic kernel is proj_dim × 3 × 3)
    dropout: float = 0.1  # decoder dropout
    threshold: float = 0.35  # probability threshold of the predicted mask

    def __post_init__(self) -> None:
        if self.data not in DATA_FORMATS:
            raise ConfigError(f"task.data must be one of {', '.join(DATA_FORMATS)}, got {self.data!r}")
        if self.split_source not in ("images", "annotations"):
            raise ConfigError(f"task.split_source must be images or annotations, got {self.split_source!r}")
        if "train" not in self.split or set(self.split) - {"train", "val", "test"}:
            raise ConfigError(f"task.split needs train (and optionally val, test) image counts, got {self.split}")
        if sum(1 for v in self.split.values() if v < 0) > 1:
            raise ConfigError("task.split: only one split may take the rest (-1)")
        if self.mask_mismatch not in ("resize", "error"):
            raise ConfigError(f"task.mask_mismatch must be resize or error, got {self.mask_mismatch!r}")
        if self.max_tokens < 3:
            raise ConfigError(f"task.max_tokens must be >= 3 (two special tokens + one word), got {self.max_tokens}")
        if self.feature_indices is not None and len(self.feature_indices) != 3:
            raise ConfigError(f"task.feature_indices needs exactly 3 levels, got {self.feature_indices}")
        if self.dim % self.heads:
            raise ConfigError(f"task.dim={self.dim} must be divisible by task.heads={self.heads}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"task.threshold must lie in (0, 1), got {self.threshold}")
        if self.decoder_layers < 0 or self.proj_dim < 1:
            raise ConfigError("task.decoder_layers must be >= 0 and task.proj_dim >= 1")


# -- head --------------------------------------------------------------------------------------------------------
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
        self.text = text.requires_grad_(False).eval()
        self.indices = list(indices)
        self.head = RefSegHead(in_chs, int(text.width), int(text.embed_dim), t)

    def mark_base(self, base: tuple[set[int], set[str]]) -> None:
        """The frozen text encoder is pretrained too: never saved, never trained."""
        super().mark_base(base)
        self._base_ids |= {id(p) for p in self.text.parameters()}
        self._base_buffers |= {f"text.{n}" for n, _ in self.text.named_buffers()}

    def set_train_mode(self) -> None:
        super().set_train_mode()
        self.text.eval()  # no dropout in the frozen text encoder (its adapters live in backbone.text_conditioning)

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


class _MaskLogits(nn.Module):
    """The export graph: (image, input_ids, attention_mask) → mask logits. Always in inference mode: the
    TorchScript exporter restores the wrapper's training flag afterwards, which would otherwise switch the
    wrapped model's BatchNorm layers to batch statistics before the parity check."""

    def __init__(self, model: RefSegModel) -> None:
        super().__init__()
        self.model = model
        self.train(False)

    def train(self, mode: bool = True) -> _MaskLogits:
        return super().train(False)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.logits(image, input_ids, attention_mask)


# -- metrics -----------------------------------------------------------------------------------------------------
def seg_metrics(inter: np.ndarray, union: np.ndarray) -> dict[str, float]:
    """mIoU, oIoU and Prec@0.5…0.9 from per-sample intersections and unions (pixels)."""
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # both empty = perfect
    out = {"mIoU": float(iou.mean()) if iou.size else 0.0, "oIoU": float(inter.sum() / max(union.sum(), 1.0))}
    for t in PREC_THRESHOLDS:
        out[f"Prec@{t}"] = float((iou >= t).mean()) if iou.size else 0.0
    return out


def mask_from_logits(
    logits: np.ndarray, src_hw: tuple[int, int], in_hw: tuple[int, int], threshold: float
) -> np.ndarray:
    """(h, w) logits on the letterboxed input → bool mask at the original image size."""
    from vision_peft.preprocess import unletterbox

    prob = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float32), -60, 60)))
    return unletterbox(prob, src_hw, in_hw, "bilinear") > threshold


def text_tokenizer_file(text) -> str:
    """A ``tokenizer.json`` equivalent to the text encoder's tokenizer, for torch-free deployment: MiniLM ships one;
    open_clip's CLIP BPE tokenizer is converted into a temporary folder (removed at exit). "" when neither applies."""
    path = str(text.data_config.get("tokenizer", ""))
    if path.endswith(".json") and Path(path).is_file():
        return path
    if hasattr(text, "tokenizer_file"):
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="vision_peft-tokenizer-")
        atexit.register(shutil.rmtree, folder, True)
        return text.tokenizer_file(folder)
    return ""


# -- task --------------------------------------------------------------------------------------------------------
@TASKS.register("refseg", config_cls=RefSegConfig, help="referring image segmentation (image + phrase → mask)")
class RefSegTask(Task):
    """Referring image segmentation with a frozen image/text encoder pair."""

    name = "refseg"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._samples = None
        self._stats: dict[str, Any] = {}
        self._text_info: dict[str, Any] = {}
        self._warned: set[str] = set()

    # -- data -------------------------------------------------------------------------------------------
    def samples(self):
        from vision_peft.data import refer

        if self._samples is None:
            t = self.cfg.task
            root = resolve_data_path(t.data_root)
            if t.data == "coco128_seg":
                self._samples, self._stats = refer.read_coco128_seg(root, t.min_area)
            elif t.data == "folder":
                self._samples = refer.read_refer_folder(root, t.mask_mismatch)
            else:
                self._samples = refer.read_refcoco(root, t.refs_file, t.instances_file)
            if not self._samples:
                raise refer.DatasetError(f"{root} holds no referring targets ({t.data} format)")
        return self._samples

    def split_samples(self):
        from vision_peft.data import refer

        t = self.cfg.task
        samples = self.samples()
        if t.split_source == "annotations":
            out: dict[str, list] = {"train": [], "val": [], "test": []}
            for s in samples:
                name = {"testA": "test", "testB": "test"}.get(s.split or "", s.split or "")
                if name in out:
                    out[name].append(s)
            if not out["train"]:
                raise refer.DatasetError("task.split_source=annotations but no sample has split 'train'")
            return {k: v for k, v in out.items() if v}
        return refer.split_by_image(samples, dict(t.split), t.split_seed)

    def splits(self) -> dict[str, list[tuple[str, str]]]:
        """Per split: (image#ref id, canonical phrase) — written to the run's split.json."""
        return {
            k: [(f"{Path(s.image).name}#{s.ref_id}", s.phrases[0]) for s in v] for k, v in self.split_samples().items()
        }

    def image_spec(self, model: TaskModel) -> dict:
        from vision_peft.preprocess import image_spec

        return image_spec(model.backbone.data_config, resize="letterbox")

    def tokenizer(self, model: RefSegModel):
        """phrase → (input_ids (L,), attention_mask (L,)) padded/truncated to the fixed length L (cached)."""
        text = model.text
        length = min(self.cfg.task.max_tokens, int(text.context_length))
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def tok(phrase: str) -> tuple[torch.Tensor, torch.Tensor]:
            if phrase in cache:
                return cache[phrase]
            if not phrase.strip() and "empty" not in self._warned:
                self._warned.add("empty")
                log.warning("empty referring phrase: the model sees only the text encoder's special tokens")
            enc = text.tokenize([phrase])
            ids, am = enc["input_ids"][0].long(), enc["attention_mask"][0].long()
            n = int(am.sum())
            if n > length or n >= int(text.context_length):
                if phrase not in self._warned:
                    self._warned.add(phrase)
                    log.warning(
                        "phrase %r has %d tokens, more than task.max_tokens=%d (text context %d): truncated, "
                        "keeping the final special token",
                        phrase[:80],
                        n,
                        length,
                        text.context_length,
                    )
            if n > length:
                ids = torch.cat([ids[: length - 1], ids[n - 1 : n]])
                am = torch.ones(length, dtype=torch.long)
            else:
                ids = F.pad(ids[:n], (0, length - n))
                am = F.pad(am[:n], (0, length - n))
            cache[phrase] = (ids, am)
            return ids, am

        return tok

    def datasets(self, model: TaskModel) -> dict[str, torch.utils.data.Dataset]:
        from vision_peft.augment import build_augment
        from vision_peft.data.refer import RefSegDataset

        spec = self.image_spec(model)
        aug = build_augment(self.cfg.task.augment, tuple(spec["size"]), spec.get("interpolation", "bilinear"))
        tok = self.tokenizer(model)
        out = {}
        for split, samples in self.split_samples().items():
            if samples:
                train = split == "train"
                out[split] = RefSegDataset(samples, spec, tok, aug if train else None, self.cfg.train.seed, train)
        return out

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def state_info(self) -> dict[str, Any]:
        return {"text_backbone": self._text_info, "data_stats": self._stats, "threshold": self.cfg.task.threshold}

    # -- model ------------------------------------------------------------------------------------------
    def build_text(self):
        from vision_peft.backbones import build_backbone

        text = build_backbone(self.cfg.task.text_backbone)
        if getattr(text, "kind", "") != "text":
            raise ConfigError(
                f"task.text_backbone must be a text encoder (minilm, open_clip_text:…), got "
                f"{self.cfg.task.text_backbone.name!r}"
            )
        text.requires_grad_(False)
        self._text_info = {"spec": text.spec, "weights_id": text.weights_id, "weights_source": text.weights_source}
        return text

    def build_model(self) -> RefSegModel:
        backbone, handle, base = build_adapted_backbone(self.cfg)
        if getattr(backbone, "kind", "") != "image":
            raise ConfigError(
                f"refseg needs an image backbone; {self.cfg.backbone.name!r} is a {backbone.kind} encoder"
            )
        text = self.build_text()
        cond = getattr(backbone, "text_conditioning", None)
        if cond is not None:
            handle.touched.extend(cond.bind_text_encoder(text))
        indices = self.cfg.task.feature_indices
        if indices is None:
            tb = backbone.token_blocks()
            if tb is not None:
                n = len(tb[0])
                indices = sorted({max(0, n // 2 - 1), max(0, (3 * n) // 4 - 1), n - 1})
                if len(indices) < 3:
                    indices = [n - 1] * (3 - len(indices)) + indices
            else:
                indices = [-3, -2, -1]
        was = backbone.training
        backbone.eval()
        h, w = backbone.input_size
        with torch.no_grad():
            try:
                feats = backbone.forward_intermediates(torch.zeros(1, 3, h, w), list(indices))
            except Exception as e:
                raise ConfigError(
                    f"backbone {self.cfg.backbone.name!r} cannot give feature maps at task.feature_indices={indices}: {e}"
                ) from e
        backbone.train(was)
        in_chs = [int(f.shape[1]) for f in feats]
        model = RefSegModel(backbone, handle, text, list(indices), in_chs, self.cfg.task)
        model.mark_base(base)
        return model

    # -- metrics ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: TaskModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        model.eval()
        ds = loader.dataset
        in_hw = tuple(ds.spec["size"])
        inter, union, loss_sum, n = [], [], 0.0, 0
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(batch)
            loss_sum += float(out["loss"]) * len(batch["index"])
            logits = out["output"].float().cpu().numpy()[:, 0]  # (B, h, w)
            for lg, idx in zip(logits, batch["index"].cpu().tolist()):
                gt = ds.target(idx)
                pred = mask_from_logits(lg, gt.shape, in_hw, self.cfg.task.threshold)
                inter.append(int((pred & gt).sum()))
                union.append(int((pred | gt).sum()))
                n += 1
        res = seg_metrics(np.array(inter), np.array(union))
        res.update({"loss": loss_sum / max(n, 1), "n": n})
        return res

    # -- predict ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_mask(self, model: RefSegModel, image, phrase: str, device: torch.device | str = "cpu") -> dict:
        """One image (path, PIL or uint8 array) + phrase → {"prob": (H, W) float32, "mask": (H, W) bool}."""
        from vision_peft.preprocess import _as_image, preprocess_image, unletterbox

        model.eval()
        img = _as_image(image)
        spec = self.image_spec(model)
        x = torch.from_numpy(preprocess_image(img, spec))[None].to(device)  # (1, 3, H, W)
        ids, am = self.tokenizer(model)(phrase)
        lg = model.logits(x, ids[None].to(device), am[None].to(device)).float()[0, 0].cpu().numpy()
        prob = unletterbox(1 / (1 + np.exp(-np.clip(lg, -60, 60))), (img.height, img.width), tuple(spec["size"]))
        return {"prob": prob, "mask": prob > self.cfg.task.threshold, "image": img}

    def predict(
        self, model: TaskModel, inputs: list[str], device: torch.device, top_k: int = 5
    ) -> list[dict[str, Any]]:
        """Inputs ``IMAGE::PHRASE``; writes ``predictions/<image>-<phrase>.mask.png`` and ``.overlay.png``."""
        from PIL import Image

        out_dir = Path("predictions")
        out_dir.mkdir(exist_ok=True)
        res = []
        for item in inputs:
            if "::" not in item:
                raise ValueError(
                    f"refseg predict takes IMAGE::PHRASE (e.g. 'photo.jpg::the dog on the left'), got {item!r}"
                )
            path, phrase = item.split("::", 1)
            r = self.predict_mask(model, path, phrase, device)
            slug = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")[:40] or "empty"
            stem = out_dir / f"{Path(path).stem}-{slug}"
            Image.fromarray((r["mask"] * 255).astype(np.uint8)).save(f"{stem}.mask.png")
            rgb = np.asarray(r["image"], dtype=np.float32)
            rgb[r["mask"]] = 0.5 * rgb[r["mask"]] + 0.5 * np.array([255, 0, 0], np.float32)
            Image.fromarray(rgb.astype(np.uint8)).save(f"{stem}.overlay.png")
            res.append(
                {
                    "file": path,
                    "phrase": phrase,
                    "mask": f"{stem}.mask.png",
                    "overlay": f"{stem}.overlay.png",
                    "area_fraction": float(r["mask"].mean()),
                    "max_prob": float(r["prob"].max()),
                }
            )
        return res

    # -- export -----------------------------------------------------------------------------------------
    def export_spec(self, model: TaskModel) -> ExportSpec:
        h, w = model.backbone.input_size
        tok = self.tokenizer(model)
        pairs = [tok("the person on the left"), tok("a dog")]
        ids = torch.stack([p[0] for p in pairs])
        am = torch.stack([p[1] for p in pairs])
        length = ids.shape[1]
        text = model.text
        stride = h // max(1, self._logit_hw(model)[0])
        tok_file = text_tokenizer_file(text)
        return ExportSpec(
            module=_MaskLogits(model),
            example_inputs={"image": torch.randn(2, 3, h, w), "input_ids": ids, "attention_mask": am},
            output_names=["mask_logits"],
            outputs_meaning={
                "mask_logits": f"(batch, 1, {h // stride}, {w // stride}) mask logits on the letterboxed input at "
                f"1/{stride} resolution: sigmoid, resize to {h}x{w}, cut the letterbox padding, resize to the "
                f"image, threshold {self.cfg.task.threshold}"
            },
            preprocess={
                "image": self.image_spec(model),
                "input_ids": {
                    "tokenizer": text.data_config.get("tokenizer", ""),
                    "library": "tokenizers (tokenizer.json in this bundle)" if tok_file else "open_clip",
                    "max_length": int(length),
                    "padding": "right, id 0, to exactly max_length",
                    "truncation": "keep the first max_length-1 tokens and the final special token",
                    "special_tokens": "added by the tokenizer (e.g. [CLS] … [SEP] or <sot> … <eot>)",
                },
                "attention_mask": {"meaning": "1 for real tokens, 0 for padding", "max_length": int(length)},
                "mask_logits": {
                    "stride": int(stride),
                    "undo_letterbox": "sigmoid; bilinear resize to the input size; crop rows pad_top:pad_top+new_h "
                    "and columns pad_left:pad_left+new_w (letterbox_params: scale=min(H/h0, W/w0), new=round(h0*scale), "
                    "pad=(H-new)//2); resize to the original image",
                    "threshold": self.cfg.task.threshold,
                },
            },
            labels=[],
            graph_name="refseg",
            task_info={
                "threshold": float(self.cfg.task.threshold),
                "max_length": int(length),
                "stride": int(stride),
                "tokenizer_file": "tokenizer.json" if tok_file else "",
            },
            extra_files={"tokenizer.json": tok_file} if tok_file else None,
        )

    def _logit_hw(self, model: TaskModel) -> tuple[int, int]:
        h, w = model.backbone.input_size
        tok = self.tokenizer(model)
        ids, am = tok("a")
        was = model.training
        model.eval()
        with torch.no_grad():
            lg = model.logits(torch.zeros(1, 3, h, w), ids[None], am[None])
        model.train(was)
        return int(lg.shape[-2]), int(lg.shape[-1])

    def onnx_agreement(self, run_fn, model: TaskModel, max_samples: int = 64) -> dict[str, Any] | None:
        """Test split through torch and an exported graph: logit max |Δ|, torch-vs-onnx mask IoU, both metric sets."""
        ds = self.datasets(model).get("test")
        if ds is None:
            return None
        model.eval()
        in_hw = tuple(ds.spec["size"])
        diffs, agree, it_t, un_t, it_o, un_o = [], [], [], [], [], []
        for i in range(min(len(ds), max_samples)):
            item = ds[i]
            x = {k: item[k][None] for k in ("image", "input_ids", "attention_mask")}
            with torch.no_grad():
                ref = model.logits(**x).float().numpy()[0, 0]
            got = run_fn({k: v.numpy() for k, v in x.items()})[0, 0]
            diffs.append(float(np.abs(ref - got).max()))
            gt = ds.target(i)
            mt = mask_from_logits(ref, gt.shape, in_hw, self.cfg.task.threshold)
            mo = mask_from_logits(got, gt.shape, in_hw, self.cfg.task.threshold)
            u = int((mt | mo).sum())
            agree.append(1.0 if u == 0 else int((mt & mo).sum()) / u)
            it_t.append(int((mt & gt).sum()))
            un_t.append(int((mt | gt).sum()))
            it_o.append(int((mo & gt).sum()))
            un_o.append(int((mo | gt).sum()))
        return {
            "n": len(diffs),
            "logits_max_abs_diff": max(diffs),
            "mask_iou_torch_vs_onnx_mean": float(np.mean(agree)),
            "mask_iou_torch_vs_onnx_min": float(np.min(agree)),
            "torch": seg_metrics(np.array(it_t), np.array(un_t)),
            "onnx": seg_metrics(np.array(it_o), np.array(un_o)),
        }

    def evaluate_onnx(self, run_fn, model: TaskModel) -> dict[str, Any] | None:
        res = self.onnx_agreement(run_fn, model)
        if res is None:
            return None
        return {**res["onnx"], "n": res["n"], "mask_iou_vs_torch": res["mask_iou_torch_vs_onnx_mean"]}

    def synthetic_batch(self, model: TaskModel, n: int = 2) -> dict[str, torch.Tensor]:
        h, w = model.backbone.input_size
        tok = self.tokenizer(model)
        pairs = [tok(p) for p in ["the cat on the left", "the larger of the two dogs", "a"][:n]] * (n // 3 + 1)
        mask = torch.zeros(n, h, w)
        mask[:, h // 4 : h // 2, w // 4 : w // 2] = 1
        return {
            "image": torch.randn(n, 3, h, w),
            "mask": mask,
            "input_ids": torch.stack([p[0] for p in pairs[:n]]),
            "attention_mask": torch.stack([p[1] for p in pairs[:n]]),
            "index": torch.arange(n),
        }
