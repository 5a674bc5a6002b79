"""Prompt maps: learnable visual prompts for CNNs, added to an early feature map.

Visual prompts as in VPT (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119) are tokens, which a CNN cannot
take. Bahng et al. (2022, https://arxiv.org/abs/2203.17274) prompt CNNs in pixel space (``pad_prompt``). This
adapter sits in between: a learnable tensor (1, C, h, w) is added to the output feature map of stage ``stage``
of a timm CNN whose ``model.blocks`` is a sequence of stages (EfficientNet / MobileNet family), i.e. to the
input of stage ``stage + 1``. Zero at initialisation, so the adapted model equals the frozen one at step 0.

Where this differs from the literature: the prompt is a dense additive map on a feature grid rather than
tokens or pixels (an inferred design for MVP on CNN backbones, see ``vision_peft/tasks/fewshot.py``). The map
is tied to the backbone's input size; ``merge()`` is not needed (the prompt is a constant addend, exported as
is). On backbones without CNN stages (ViTs, open_clip towers) the map is added to the input pixels instead (a
full-image pixel prompt; prefer ``vpt`` there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vision_peft.adapters.base import ADAPTERS, AdapterHandle


@dataclass
class PromptMapConfig:
    """Learnable additive prompt on an early CNN feature map."""

    name: str = "prompt_map"  # registry name
    stage: int = 2  # add the prompt to the output of model.blocks[stage] (EfficientNet-Lite0: 0–5; 2 = 40 ch, stride 8)
    init_std: float = 0.0  # normal init std (0 = start from the frozen model exactly)

    def __post_init__(self) -> None:
        if self.stage < 0:
            raise ValueError(f"prompt_map stage must be >= 0, got stage={self.stage}")
        if self.init_std < 0:
            raise ValueError(f"prompt_map init_std must be >= 0, got {self.init_std}")


class PromptMap(nn.Module):
    """A learnable (1, C, h, w) addend and the pre-hook that adds it to the next stage's input."""

    def __init__(self, shape: tuple[int, int, int], init_std: float) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(1, *shape) * init_std)

    def add(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != tuple(self.prompt.shape[1:]):
            raise ValueError(
                f"prompt_map was built for feature maps {tuple(self.prompt.shape[1:])} (the backbone's input size), "
                f"got {tuple(x.shape[1:])}; feed images at the run's input size"
            )
        return x + self.prompt.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x)

    def _pre(self, module, args):
        return (self.add(args[0]), *args[1:])


def cnn_stages(backbone: nn.Module) -> nn.Sequential | None:
    """``model.blocks`` of a timm CNN made of stages (EfficientNet, MobileNet …), or None."""
    model = getattr(backbone, "model", None)
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "conv_stem") or not isinstance(blocks, nn.Sequential):
        return None
    return blocks


@ADAPTERS.register(
    "prompt_map", config_cls=PromptMapConfig, help="learnable prompt map on an early CNN feature map",
    requires=("image",), spec={},
)  # fmt: skip
def apply_prompt_map(backbone: nn.Module, cfg: PromptMapConfig) -> AdapterHandle:
    """Add a learnable map to the output of CNN stage ``cfg.stage``."""
    stages = cnn_stages(backbone)
    if stages is None:  # no CNN stages (ViT, open_clip tower): a full-size map on the input pixels
        if not hasattr(backbone, "input_prompts"):
            raise ValueError(f"prompt_map needs an image backbone; {backbone.spec!r} takes no images")
        h, w = backbone.input_size
        backbone.input_prompts.append(PromptMap((3, h, w), cfg.init_std))
        return AdapterHandle("prompt_map", touched=[f"input_prompts.{len(backbone.input_prompts) - 1}"])
    if cfg.stage >= len(stages) - 1:
        raise ValueError(f"prompt_map stage must be below {len(stages) - 1} for {backbone.spec!r}, got {cfg.stage}")
    h, w = backbone.input_size
    seen: dict[str, tuple[int, ...]] = {}

    def record(module, args, out) -> None:
        seen["shape"] = tuple(out.shape[1:])  # (C, h, w)

    hook = stages[cfg.stage].register_forward_hook(record)
    try:
        with torch.no_grad():
            backbone.eval()._features(torch.zeros(1, 3, h, w))
    finally:
        hook.remove()
    pm = PromptMap(seen["shape"], cfg.init_std)
    pm.handle = stages[cfg.stage + 1].register_forward_pre_hook(pm._pre)
    backbone.prompt_map = pm
    backbone.prompt_map_stage = cfg.stage
    return AdapterHandle("prompt_map", touched=["prompt_map"])
