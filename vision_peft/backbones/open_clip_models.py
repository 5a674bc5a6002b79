"""open_clip towers: ``open_clip:<arch>@<tag>`` (image tower) and ``open_clip_text:<arch>@<tag>`` (text tower).

``<tag>`` is an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k`` …) or a path to a checkpoint
file. Lookup order: ``backbone.weights`` → ``$VISION_PEFT_WEIGHTS/open_clip/<arch>-<tag>.safetensors``
(or ``.bin``) → the Hugging Face cache → download only with ``allow_download``. ``vp-tiny-clip`` is a tiny
config shipped with vision_peft for offline tests (random weights only).

open_clip 3.x attention is ``nn.MultiheadAttention`` with a fused ``in_proj_weight``; the ``qkv`` target
group names the MHA module itself, and LoRA re-parameterises that tensor.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.backbones import BACKBONES
from vision_peft.backbones.base import (
    ImageBackbone,
    TextBackbone,
    WeightsNotFoundError,
    explicit_weights_file,
    register_weights_status,
    seeded_init,
    state_hash,
)
from vision_peft.config import BackboneConfig
from vision_peft.paths import weights_root

open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def _groups(prefix: str) -> dict[str, list[str]]:
    return {
        "qkv": [f"{prefix}.resblocks.*.attn"],
        "attn_out": [f"{prefix}.resblocks.*.attn.out_proj"],
        "mlp": [f"{prefix}.resblocks.*.mlp.c_fc", f"{prefix}.resblocks.*.mlp.c_proj"],
        "mlp_in": [f"{prefix}.resblocks.*.mlp.c_fc"],
        "mlp_out": [f"{prefix}.resblocks.*.mlp.c_proj"],
    }


def parse_spec(arg: str) -> tuple[str, str | None]:
    arch, _, tag = arg.partition("@")
    if not arch:
        raise ValueError(
            "open_clip backbone needs an architecture: open_clip:<arch>@<tag>, e.g. open_clip:ViT-B-32@openai"
        )
    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        raise ValueError(
            f"unknown open_clip architecture {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    return arch, (tag or None)


def create_clip(arg: str, cfg: BackboneConfig) -> tuple[nn.Module, str, dict]:
    """Build the full open_clip model with weights found by the lookup order; returns (model, source, pcfg)."""
    arch, tag = parse_spec(arg)
    kwargs = {"force_image_size": cfg.image_size} if cfg.image_size else {}
    if not cfg.pretrained:
        model = seeded_init(lambda: open_clip.create_model(arch, pretrained=None, **kwargs))
        return model, "random init (seed 0)", {}
    if not tag and not cfg.weights:
        raise ValueError(
            f"open_clip:{arch} needs a pretrained tag or file: open_clip:{arch}@<tag>, "
            f"tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}"
        )
    pcfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    looked: list[str] = []
    file = explicit_weights_file(cfg)
    if file is None and tag and Path(tag).expanduser().is_file():
        file = Path(tag).expanduser()  # the tag names a checkpoint file
    if file is None:
        root = weights_root() / "open_clip"
        cands = [root / f"{arch}-{tag}{s}" for s in (".safetensors", ".bin", ".pt")]
        looked += [str(c) for c in cands]
        file = next((c for c in cands if c.is_file()), None)
        hub = (pcfg or {}).get("hf_hub")
        if file is None and hub:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                hit = try_to_load_from_cache(hub.rstrip("/"), fname)
                if isinstance(hit, str):
                    file = Path(hit)
                    break
            looked.append(f"the Hugging Face cache ({hub})")
    if file is not None:
        model = open_clip.create_model(arch, pretrained=str(file), **kwargs)
        return model, str(file), pcfg or {}
    if cfg.allow_download:
        return open_clip.create_model(arch, pretrained=tag, **kwargs), f"downloaded ({tag})", pcfg or {}
    raise WeightsNotFoundError(
        f"no weights for open_clip {arch}@{tag}; looked in: {'; '.join(looked)}. Put the checkpoint at "
        f"{looked[0] if looked else weights_root()}, set backbone.weights=<file>, or allow downloads with "
        "backbone.allow_download=true"
    )


class OpenClipImage(ImageBackbone):
    """open_clip image tower; features are the projected image embedding."""

    def __init__(self, visual: nn.Module, spec: str, pcfg: dict) -> None:
        super().__init__()
        self.visual = visual
        self.spec = spec
        self.embed_dim = int(visual.output_dim)
        size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
        self.data_config = {
            "input_size": [3, int(size[0]), int(size[1])],
            "mean": [float(v) for v in pcfg.get("mean", OPENAI_MEAN)],
            "std": [float(v) for v in pcfg.get("std", OPENAI_STD)],
            "interpolation": str(pcfg.get("interpolation", "bicubic")),
        }
        self.target_groups = _groups("visual.transformer") if hasattr(visual, "transformer") else {}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def _intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        out = self.visual.forward_intermediates(x, indices=list(indices), intermediates_only=True)
        return list(out["image_intermediates"])

    def token_blocks(self) -> tuple[nn.ModuleList, int] | None:
        tr = getattr(self.visual, "transformer", None)
        if tr is None or not getattr(tr, "batch_first", True):
            return None
        return tr.resblocks, 1


class OpenClipText(TextBackbone):
    """open_clip text tower with its tokenizer; sentence feature = projected EOS token."""

    def __init__(self, clip: nn.Module, spec: str, arch: str) -> None:
        super().__init__()
        self.spec = spec
        self.transformer = clip.transformer
        self.token_embed = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.width = int(clip.transformer.width)
        self.context_length = int(clip.context_length)
        proj = clip.text_projection
        self.embed_dim = int(proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features)
        self._tokenizer = open_clip.get_tokenizer(arch)
        self.target_groups = _groups("transformer")
        self.data_config = {"context_length": self.context_length, "tokenizer": f"open_clip:{arch}", "padding": "right"}

    def tokenizer_file(self, folder: str | Path) -> str:
        """Writes this tower's tokenizer as a ``tokenizers`` ``tokenizer.json`` into ``folder`` (so deployment needs
        neither torch nor open_clip) and returns its path; "" when the tokenizer has no such equivalent (only
        open_clip's CLIP BPE ``SimpleTokenizer`` with its default lower-case cleaning is converted)."""
        return clip_bpe_tokenizer_json(self._tokenizer, Path(folder) / "tokenizer.json")

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self._tokenizer(list(texts), context_length=self.context_length).long()  # (B, L)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def token_embedding(self) -> nn.Embedding:
        return self.token_embed

    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def forward_tokens(self, input_ids, attention_mask, inputs_embeds=None):
        x = self.token_embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, W)
        L = x.shape[1]
        x = x + self.positional_embedding[:L]
        x = self.transformer(x, attn_mask=self.attn_mask[:L, :L])  # causal, as CLIP was trained
        x = self.ln_final(x)
        eos = (attention_mask.cumsum(1) == attention_mask.sum(1, keepdim=True)).float().argmax(1)  # last real token
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]  # (B, W)
        proj = self.text_projection
        pooled = pooled @ proj if isinstance(proj, torch.Tensor) else proj(pooled)
        return x, F.normalize(pooled, dim=-1)


def open_clip_weights_status(arg: str, cfg: BackboneConfig) -> str:
    """The tiny test config has random weights only; other towers need a local checkpoint."""
    if arg.startswith("vp-tiny"):
        return "random weights (tests)"
    return "needs a local checkpoint: backbone.weights=<file> or $VISION_PEFT_WEIGHTS/open_clip/"


register_weights_status("open_clip")(open_clip_weights_status)
register_weights_status("open_clip_text")(open_clip_weights_status)


@BACKBONES.register(
    "open_clip",
    config_cls=BackboneConfig,
    help="open_clip image tower: open_clip:<arch>@<tag>",
    spec={"name": "open_clip:vp-tiny-clip", "pretrained": False, "image_size": 32},
    provides=("image", "tokens", "linear"),
)
def build_open_clip_image(arg: str, cfg: BackboneConfig) -> OpenClipImage:
    """open_clip image tower (open_clip:<arch>@<tag or file>)."""
    model, source, pcfg = create_clip(arg, cfg)
    bb = OpenClipImage(model.visual, f"open_clip:{arg}", pcfg)
    bb.weights_source = source
    bb.weights_id = state_hash(bb)
    return bb


@BACKBONES.register(
    "open_clip_text",
    config_cls=BackboneConfig,
    help="open_clip text tower: open_clip_text:<arch>@<tag>",
    spec={"name": "open_clip_text:vp-tiny-clip", "pretrained": False},
    provides=("text", "linear"),
)
def build_open_clip_text(arg: str, cfg: BackboneConfig) -> OpenClipText:
    """open_clip text tower and tokenizer (open_clip_text:<arch>@<tag or file>)."""
    model, source, _ = create_clip(arg, cfg)
    bb = OpenClipText(model, f"open_clip_text:{arg}", parse_spec(arg)[0])
    bb.weights_source = source
    bb.weights_id = state_hash(bb)
    return bb


def clip_bpe_tokenizer_json(tok, path: Path) -> str:
    """open_clip's ``SimpleTokenizer`` (CLIP byte-level BPE) rebuilt with the ``tokenizers`` library from its own
    vocabulary and merge ranks: NFC + whitespace collapsing + lower-casing, CLIP's split pattern, byte-level
    mapping, BPE with the ``</w>`` end-of-word suffix, ``<start_of_text> … <end_of_text>`` around the ids.
    Differences: ftfy's mojibake repair and HTML unescaping are not reproduced (plain phrases are unaffected;
    tests compare the ids on a phrase list). Returns the written path, or "" for other tokenizers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    simple = getattr(open_clip.tokenizer, "SimpleTokenizer", None)
    lower = getattr(open_clip.tokenizer, "_clean_lower", None)
    if simple is None or type(tok) is not simple or getattr(tok, "clean_fn", None) is not lower:
        return ""
    if getattr(tok, "reduction_fn", None) is not None:
        return ""
    merges = [pair for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    sot, eot = "<start_of_text>", "<end_of_text>"
    t = Tokenizer(models.BPE(vocab=dict(tok.encoder), merges=merges, end_of_word_suffix="</w>", fuse_unk=False))
    t.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    pattern = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    t.add_special_tokens([sot, eot])
    t.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, tok.encoder[sot]), (eot, tok.encoder[eot])]
    )
    t.decoder = decoders.ByteLevel()
    path.parent.mkdir(parents=True, exist_ok=True)
    t.save(str(path))
    return str(path)
