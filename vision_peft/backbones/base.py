"""The backbone contract shared by every family (image, text, point cloud).

A backbone is an ``nn.Module`` with ``embed_dim``, ``data_config`` (preprocessing that travels into the
run's config, predict, the app and the ONNX bundle), ``forward_features``, ``forward_intermediates`` for
dense tasks (and :meth:`ImageBackbone.default_feature_indices` for them), ``forward_grid`` /
``forward_from_grid`` (the network split at its first token grid or early feature map, for tasks that work
on that grid), and ``target_groups`` mapping portable names (``qkv``, ``attn_out``, ``mlp``, ``conv_pw`` …)
to the family's own module-name patterns (``fnmatch`` style, relative to the backbone).

:func:`weights_status` tells (without building the model) whether a spec's weights are found and, if not,
how to provide them; each family registers its check with :func:`register_weights_status`.
"""

from __future__ import annotations

import abc
import fnmatch
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class WeightsNotFoundError(FileNotFoundError):
    """Requested pretrained weights are not available locally and downloads are not allowed."""


WeightsCheck = Callable[[str, Any], str]  # (spec argument, BackboneConfig) -> status; raises WeightsNotFoundError
_WEIGHTS_CHECKS: dict[str, WeightsCheck] = {}


def register_weights_status(family: str) -> Callable[[WeightsCheck], WeightsCheck]:
    """Decorator: ``fn(arg, cfg) -> str`` says whether family ``family``'s weights are available (it may raise
    :class:`WeightsNotFoundError` with the fix in its message)."""

    def deco(fn: WeightsCheck) -> WeightsCheck:
        if family in _WEIGHTS_CHECKS:
            raise ValueError(f"weights status of backbone family {family!r} is registered twice")
        _WEIGHTS_CHECKS[family] = fn
        return fn

    return deco


def register_weights_finder(family: str, find: Callable[[Any], Any]) -> None:
    """Registers family ``family``'s weights check as its weight finder: ``available`` when ``find(cfg)`` returns
    (the finder raises :class:`WeightsNotFoundError` naming where it looked)."""

    def check(arg: str, cfg: Any) -> str:
        find(cfg)
        return "available"

    register_weights_status(family)(check)


def explicit_weights_file(cfg: Any, fix: str = "") -> Path | None:
    """The weight file ``backbone.weights`` names (``~`` expanded), or None when it names none.

    Raises:
        WeightsNotFoundError: The named file does not exist (``fix``, if given, ends the message).
    """
    if not cfg.weights:
        return None
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"backbone.weights={cfg.weights} does not exist{fix}")
    return path


def weights_status(spec: str) -> str:
    """``"available"``, ``"random weights (tests)"`` or ``"weights missing: <where to put them>"`` for a backbone
    spec (e.g. ``timm:vit_small_patch16_224``), without building the model. Families without a check are
    reported available (their builder raises with the fix when they are not)."""
    from vision_peft.config import BackboneConfig

    family, _, arg = spec.partition(":")
    check = _WEIGHTS_CHECKS.get(family)
    if check is None:
        return "available"
    try:
        return check(arg, BackboneConfig(name=spec))
    except WeightsNotFoundError as e:
        return f"weights missing: {e}"


@dataclass(frozen=True)
class GridInfo:
    """Where :meth:`ImageBackbone.forward_grid` splits the network and what its output looks like."""

    layout: str  # tokens: patch embeddings (B, L, D) / (B, h, w, D) | cnn: a stage's map (B, C, h, w) | pixels
    channel_dim: int  # the embedding / channel axis of the grid
    hw: tuple[int, int] | None = None  # tokens: the patch grid (h, w), to view (B, L, D) as (B, D, h, w)
    stages: int = 0  # cnn: number of stages (a grid stage lies in [0, stages - 2])


class _AbstractModuleMeta(abc.ABCMeta, type(nn.Module)):
    """Lets nn.Module subclasses declare abstract methods."""


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below in ``__init__``."""

    kind: str = "image"  # image | text | points
    spec: str = ""  # the registry spec that built it, e.g. "timm:vit_small_patch16_224"
    embed_dim: int = 0  # size of forward_features' output
    data_config: dict[str, Any] = {}  # preprocessing: input_size, mean, std, interpolation …
    target_groups: dict[str, list[str]] = {}  # portable group → module-name patterns
    weights_id: str = "random-init"  # sha256 of the loaded weights (content hash), or "random-init"
    weights_source: str = "random init"  # where the weights came from, for logs and model cards

    def resolve_targets(self, targets: list[str]) -> list[str]:
        """Expand portable group names and patterns into concrete module names (sorted, unique)."""
        names = [n for n, _ in self.named_modules() if n]
        out: list[str] = []
        for t in targets:
            patterns = self.target_groups.get(t, [t])
            hit = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            if not hit:
                groups = ", ".join(sorted(self.target_groups)) or "none"
                raise ValueError(
                    f"target {t!r} matches no module of backbone {self.spec!r}; "
                    f"portable groups for it: {groups}; or give a module-name pattern like 'model.blocks.*.attn.qkv'"
                )
            out.extend(h for h in hit if h not in out)
        return out


class ImageBackbone(Backbone):
    """Image encoder: pixels (B, 3, H, W), normalised by ``data_config``, to features."""

    kind = "image"

    def __init__(self) -> None:
        super().__init__()
        self.input_prompts = nn.ModuleList()  # pixel-space prompts applied before the network

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        for prompt in self.input_prompts:
            x = prompt(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, embed_dim)."""
        return self._features(self.prepare(x))

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Feature maps (B, C_i, H_i, W_i) at the given block/stage indices (negative counts from the end)."""
        return self._intermediates(self.prepare(x), indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def token_blocks(self) -> tuple[nn.ModuleList, int] | None:
        """(transformer blocks taking (B, L, D) tokens, number of prefix tokens) for token prompts, or None."""
        return None

    def default_feature_indices(self) -> list[int]:
        """Three levels for dense tasks' necks: token backbones the blocks near 1/2, 3/4 and the end (0-based);
        others the last three stages."""
        tb = self.token_blocks()
        if tb is None:
            return [-3, -2, -1]
        n = len(tb[0])
        indices = sorted({max(0, n // 2 - 1), max(0, (3 * n) // 4 - 1), n - 1})
        if len(indices) < 3:
            indices = [n - 1] * (3 - len(indices)) + indices
        return indices

    def grid_info(self) -> GridInfo:
        """What :meth:`forward_grid` returns; the base has no grid (the prepared pixels stand in for one)."""
        return GridInfo("pixels", 1)

    def forward_grid(self, x: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        """The first token grid / early feature map (after the pixel prompts): ViTs their patch embeddings before
        the position embedding, CNNs the output of stage ``stage``; the base returns the prepared pixels."""
        return self.prepare(x)

    def forward_from_grid(self, grid: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        """The rest of the network: a :meth:`forward_grid` output (same ``stage``) → pooled features (B, embed_dim);
        ``forward_from_grid(forward_grid(x))`` equals ``forward_features(x)``."""
        return self._features(grid)

    @property
    def input_size(self) -> tuple[int, int]:
        _, h, w = self.data_config["input_size"]
        return int(h), int(w)


class TextBackbone(Backbone, metaclass=_AbstractModuleMeta):
    """Text encoder with its tokenizer and token embeddings exposed for prompt learning."""

    kind = "text"
    width: int = 0  # token feature width
    context_length: int = 0  # maximum number of tokens

    @abc.abstractmethod
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """{'input_ids': (B, L) int64, 'attention_mask': (B, L) int64}; truncates to context_length."""

    @abc.abstractmethod
    def token_embedding(self) -> nn.Embedding:
        """The input token-embedding table (prompt contexts live in its space)."""

    @abc.abstractmethod
    def forward_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token features (B, L, width), sentence feature (B, embed_dim)); ``inputs_embeds`` replaces lookup."""

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(input_ids, attention_mask)[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_features(input_ids, attention_mask)

    @abc.abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (text adapters attach here)."""


def state_hash(module: nn.Module) -> str:
    """sha256 over names, shapes and bytes of a module's state dict: identifies the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from vision_peft.checkpoint import CheckpointError, safe_torch_load

    try:
        sd = safe_torch_load(path)  # the one safe torch.load (weights_only=True)
    except CheckpointError as e:  # pickle with code, or not a checkpoint at all
        raise ValueError(
            f"{path} could not be read safely as backbone weights ({e}); convert it to .safetensors"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


def seeded_init(fn, seed: int = 0):
    """Run a model constructor under a fixed torch seed so random-init backbones are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()
