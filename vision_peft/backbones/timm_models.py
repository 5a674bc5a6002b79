"""timm image backbones: ``timm:<model_name>``.

Weights lookup order (design.md §5): ``backbone.weights`` (explicit file) → ``$VISION_PEFT_WEIGHTS/timm/
<name>.safetensors`` (or ``<name>/model.safetensors``, ``.pth``, ``.bin``) → the Hugging Face cache that
timm itself uses → a download, only with ``backbone.allow_download: true``. ``pretrained: false`` builds
a seeded random network (timm's ``test_*`` models make tiny offline tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vision_peft.backbones import BACKBONES
from vision_peft.backbones.base import (
    GridInfo,
    ImageBackbone,
    SplitPoint,
    WeightsNotFoundError,
    explicit_weights_file,
    register_weights_status,
    seeded_init,
    state_hash,
)
from vision_peft.config import BackboneConfig
from vision_peft.paths import weights_root

# Portable target names → timm module-name patterns (relative to the backbone wrapper).
TIMM_GROUPS = {
    "qkv": ["model.blocks.*.attn.qkv"],
    "attn_out": ["model.blocks.*.attn.proj"],
    "mlp": ["model.blocks.*.mlp.fc1", "model.blocks.*.mlp.fc2"],
    "mlp_in": ["model.blocks.*.mlp.fc1"],
    "mlp_out": ["model.blocks.*.mlp.fc2"],
    "conv_pw": ["model.blocks.*.conv_pw", "model.blocks.*.conv_pwl"],  # EfficientNet / MobileNet 1×1 convs
    "conv_dw": ["model.blocks.*.conv_dw"],
    "conv_head": ["model.conv_head"],
    "conv": ["model.layer*.*.conv*", "model.stages.*.blocks.*.conv*"],  # ResNet / ConvNeXt style
}


class TimmBackbone(ImageBackbone):
    """Any timm model, headless, with pooled features and intermediate feature maps."""

    def __init__(self, model: nn.Module, spec: str, image_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.embed_dim = int(model.num_features)
        dc = timm.data.resolve_data_config({}, model=model)
        size = (3, image_size, image_size) if image_size else tuple(dc["input_size"])
        self.data_config = {
            "input_size": list(size),
            "mean": [float(v) for v in dc["mean"]],
            "std": [float(v) for v in dc["std"]],
            "interpolation": str(dc.get("interpolation", "bilinear")),
        }
        names = {n for n, _ in self.named_modules()}
        self.target_groups = {k: v for k, v in TIMM_GROUPS.items() if any(self._match(n, p) for n in names for p in v)}

    @staticmethod
    def _match(name: str, pattern: str) -> bool:
        import fnmatch

        return fnmatch.fnmatchcase(name, pattern)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def _intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        return list(self.model.forward_intermediates(x, indices=list(indices), intermediates_only=True))

    def token_blocks(self) -> tuple[nn.ModuleList, int] | None:
        blocks = getattr(self.model, "blocks", None)
        if blocks is None or not hasattr(self.model, "num_prefix_tokens") or not hasattr(self.model, "patch_embed"):
            return None
        return blocks, int(self.model.num_prefix_tokens)

    # -- the network split at its first grid (timm ViTs: patch embeddings; timm CNNs with stages: a stage) -----
    def grid_info(self) -> GridInfo:
        m = self.model
        if self.token_blocks() is not None and hasattr(m, "_pos_embed"):
            size = getattr(m.patch_embed, "grid_size", None)
            return GridInfo("tokens", -1, hw=tuple(int(v) for v in size) if size is not None else None)
        blocks = getattr(m, "blocks", None)
        if blocks is not None and hasattr(m, "conv_stem") and isinstance(blocks, nn.Sequential):
            return GridInfo("cnn", 1, stages=len(blocks))
        return GridInfo("pixels", 1)

    def forward_grid(self, x: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        layout = self.grid_info().layout
        x = self.prepare(x)
        m = self.model
        if layout == "tokens":
            return m.patch_embed(x)  # (B, 3, H, W) -> (B, L, D) or (B, h, w, D)
        if layout == "cnn":
            x = m.bn1(m.conv_stem(x))
            for block in m.blocks[: self._stage(stage) + 1]:
                x = block(x)
            return x  # (B, C, h, w)
        return x  # pixels

    def forward_from_grid(self, grid: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        layout = self.grid_info().layout
        m = self.model
        if layout == "tokens":
            x = m.norm_pre(m.patch_drop(m._pos_embed(grid)))  # (B, L', D) with prefix tokens
            return m.forward_head(m.norm(m.blocks(x)), pre_logits=True)
        if layout == "cnn":
            x = grid
            for block in m.blocks[self._stage(stage) + 1 :]:
                x = block(x)
            return m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)
        return self._features(grid)

    def grid_point(self, stage: int | None = None) -> SplitPoint:
        """CNNs: stage ``stage``'s output (prefix: stem + stages 0..stage); ViTs: the patch tokens (prefix: the
        patch embedding); both after the pixel prompts."""
        info = self.grid_info()
        if info.layout == "cnn":
            s = self._stage(stage)
            if not 0 <= s < info.stages:
                raise ValueError(f"stage {s} outside [0, {info.stages - 1}] for {self.spec!r}")
            blocks = tuple(f"model.blocks.{i}" for i in range(s + 1))
            return SplitPoint("grid", "cnn", s, ("input_prompts", "model.conv_stem", "model.bn1", *blocks))
        if info.layout == "tokens":
            return SplitPoint("grid", "tokens", None, ("input_prompts", "model.patch_embed"))
        return super().grid_point(stage)

    def split_points(self) -> list[SplitPoint]:
        info = self.grid_info()
        points = [self.features_point()]
        if info.layout == "cnn":
            points += [self.grid_point(s) for s in range(info.stages - 1, -1, -1)]
        elif info.layout == "tokens":
            points.append(self.grid_point())
        return points

    @staticmethod
    def _stage(stage: int | None) -> int:
        if stage is None:
            raise ValueError("a CNN grid needs its stage: forward_grid(x, stage=…) / forward_from_grid(g, stage=…)")
        return int(stage)


def _local_candidates(name: str) -> list[Path]:
    root = weights_root()
    out = []
    for base in (root / "timm", root):
        for suffix in (".safetensors", ".pth", ".bin"):
            out.append(base / f"{name}{suffix}")
        out.extend([base / name / "model.safetensors", base / name / "pytorch_model.bin"])
    return out


def _hf_cached_file(model_name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return None
    cfg = timm.models.get_pretrained_cfg(model_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id.rstrip("/"), fname)
        if isinstance(hit, str):
            return Path(hit)
    return None


def create_timm(name: str, cfg: BackboneConfig, **kwargs: Any) -> tuple[nn.Module, str]:
    """Create a headless timm model with weights found by the lookup order; returns (model, source)."""
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        base = name.split(".")[0]
        if base not in timm.list_models():
            import difflib

            close = difflib.get_close_matches(base, timm.list_models(), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "list names with timm.list_models('*vit*')"
            raise ValueError(f"unknown timm model {name!r}; {hint}")
    kwargs = {"num_classes": 0, **kwargs}
    if cfg.image_size and _accepts_img_size(name):
        kwargs["img_size"] = cfg.image_size
    if not cfg.pretrained:
        return seeded_init(lambda: timm.create_model(name, pretrained=False, **kwargs)), "random init (seed 0)"
    looked: list[str] = []
    file = explicit_weights_file(cfg, "; point it at a weight file")
    if file is None:
        cands = _local_candidates(name)
        looked += [str(c) for c in cands]
        file = next((c for c in cands if c.is_file()), None) or _hf_cached_file(name)
        looked.append("the Hugging Face cache (HF_HOME)")
    if file is not None:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)
        return model, str(file)
    if cfg.allow_download:
        return timm.create_model(name, pretrained=True, **kwargs), "downloaded from the hub"
    raise WeightsNotFoundError(
        f"no pretrained weights for timm model {name!r}; looked in: {'; '.join(looked)}. "
        f"Put the file at {looked[0]}, set backbone.weights=<file>, allow downloads with "
        "backbone.allow_download=true, or use backbone.pretrained=false for a random network"
    )


def _accepts_img_size(name: str) -> bool:
    return any(k in name for k in ("vit", "deit", "eva", "beit", "swin"))


@register_weights_status("timm")
def timm_weights_status(arg: str, cfg: BackboneConfig) -> str:
    """Random test models, weights found locally / in the HF cache, or where to put them."""
    if arg.startswith("test_"):
        return "random weights (tests)"
    if not any(c.is_file() for c in _local_candidates(arg)) and _hf_cached_file(arg) is None:
        return f"weights missing: put them at {_local_candidates(arg)[0]} or allow downloads"
    return "available"


@BACKBONES.register(
    "timm",
    config_cls=BackboneConfig,
    help="any timm image model: timm:<model_name>",
    spec={"name": "timm:test_vit", "pretrained": False, "image_size": 32},
    provides=("image", "tokens", "linear", "grid"),  # of the spec model (timm CNNs: "image", "grid" with stages)
)
def build_timm(arg: str, cfg: BackboneConfig) -> TimmBackbone:
    """Any timm image model (timm:<name>), headless."""
    if not arg:
        raise ValueError("timm backbone needs a model name: timm:<name>, e.g. timm:vit_small_patch16_224")
    model, source = create_timm(arg, cfg)
    bb = TimmBackbone(model, f"timm:{arg}", cfg.image_size)
    bb.weights_source = source
    bb.weights_id = state_hash(bb)
    return bb
