"""The backbone contract shared by every family (image, text, point cloud).

A backbone is an ``nn.Module`` with ``embed_dim``, ``data_config`` (preprocessing that travels into the
run's config, predict, the app and the ONNX bundle), ``forward_features``, ``forward_intermediates`` for
dense tasks (and :meth:`ImageBackbone.default_feature_indices` for them), ``forward_grid`` /
``forward_from_grid`` (the network split at its first token grid or early feature map, for tasks that work
on that grid), and ``target_groups`` mapping portable names (``qkv``, ``attn_out``, ``mlp``, ``conv_pw`` …)
to the family's own module-name patterns (``fnmatch`` style, relative to the backbone).

Image backbones also name the places they can be cut for a frozen-prefix cache (:class:`SplitPoint`, from
:meth:`ImageBackbone.split_points`, deepest first): the pooled features (the whole backbone), a CNN stage's
output, a ViT's patch tokens — each with the modules that compute it. :func:`prefix_blockers` says why a
point's prefix is not a frozen, deterministic function of the image; :meth:`ImageBackbone.forward_prefix`
computes it, and inside :meth:`ImageBackbone.cached_input` ``forward_features`` takes that output instead of
pixels (``vision_peft.prefix_cache`` builds on these).

:func:`weights_status` tells (without building the model) whether a spec's weights are found and, if not,
how to provide them; each family registers its check with :func:`register_weights_status`.
"""

from __future__ import annotations

import abc
import fnmatch
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


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


@dataclass(frozen=True)
class SplitPoint:
    """A place where an image backbone can be cut: the modules before it (``prefix``) map an image to an activation
    that the rest of the network (``forward_features`` inside :meth:`ImageBackbone.cached_input`) consumes."""

    kind: str  # features: the pooled embedding (the whole backbone is the prefix) | grid: forward_grid's output
    layout: str = "features"  # features | cnn (a stage's map (B, C, h, w)) | tokens (patch embeddings) | pixels
    stage: int | None = None  # cnn: the stage whose output it is
    prefix: tuple[str, ...] = ("",)  # module names (relative to the backbone; "" = the whole backbone) computing it

    @property
    def name(self) -> str:
        """``features``, ``stage 4``, ``tokens`` or ``pixels`` (logs, reports, cache keys)."""
        if self.kind == "features":
            return "features"
        return f"stage {self.stage}" if self.layout == "cnn" else self.layout


def _stochastic(m: nn.Module) -> str | None:
    """What makes ``m`` random in train mode (dropout of any kind with a positive rate), or None."""
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
        return f"{type(m).__name__}(p={m.p})"
    for attr in ("drop_prob", "prob", "drop_rate"):  # timm DropPath, PatchDropout, a model's functional dropout
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return f"{type(m).__name__}.{attr}={v}"
    return None


def prefix_blockers(backbone: nn.Module, point: SplitPoint) -> list[str]:
    """Why the prefix of ``point`` is not a frozen, deterministic function of its input (empty: it is one).

    Checked on every module of the prefix (and hooks also on the backbone itself): a parameter that trains, a
    forward (pre-)hook (adapters such as prompt_map and VPT change activations through hooks), a parametrized
    tensor (LoRA on convolutions), and a layer that is random in train mode (Dropout, DropPath, PatchDropout or
    a ``drop_rate`` with a positive rate: training sees another activation than the cache would). BatchNorm
    layers without trainable parameters stay in eval mode during training (``TaskModel.set_train_mode``), so
    they are deterministic; ones that train are caught by their parameters. Global module hooks block too.
    One line per kind of blocker, naming the first module and how many more there are.
    """
    found: dict[str, list[str]] = {"trains": [], "hook": [], "param": [], "random": []}
    if backbone._forward_hooks or backbone._forward_pre_hooks:
        found["hook"].append("the backbone itself")
    for root_name in point.prefix:
        root = backbone.get_submodule(root_name) if root_name else backbone
        for name, m in root.named_modules(prefix=root_name):
            where = name or "the backbone"
            trainable = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
            if trainable:
                found["trains"].append(f"{where}.{trainable[0]}")
            if m is not backbone and (m._forward_hooks or m._forward_pre_hooks):
                found["hook"].append(where)
            if parametrize.is_parametrized(m):
                found["param"].append(where)
            random_layer = _stochastic(m)
            if random_layer:
                found["random"].append(f"{where} ({random_layer})")
    what = {
        "trains": "trains (a trainable tensor inside the prefix)",
        "hook": "has a forward hook (an adapter changes its activations)",
        "param": "has a re-parameterised weight (an adapter's weight delta)",
        "random": "is random in train mode",
    }
    reasons = []
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        reasons.append("global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook)")
    for kind, items in found.items():
        if items:
            more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
            reasons.append(f"{items[0]}{more} {what[kind]}")
    return reasons


def prefix_state_hash(backbone: nn.Module, point: SplitPoint) -> str:
    """sha256 over the names, shapes and bytes of every tensor of ``point``'s prefix modules: the exact function
    the prefix computes (adapter changes inside it included)."""
    h = hashlib.sha256()
    for root_name in point.prefix:
        root = backbone.get_submodule(root_name) if root_name else backbone
        h.update(f"[{root_name}]".encode())
        h.update(state_hash(root).encode())
    return h.hexdigest()


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
        self._cached_point: SplitPoint | None = None  # set inside cached_input(): inputs are that point's output

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        for prompt in self.input_prompts:
            x = prompt(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, embed_dim). Inside :meth:`cached_input`, ``x`` is the output of that split point
        (the features themselves, or a grid) and only the rest of the network runs."""
        point = self._cached_point
        if point is not None:
            return x if point.kind == "features" else self.forward_from_grid(x, point.stage)
        return self._features(self.prepare(x))

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Feature maps (B, C_i, H_i, W_i) at the given block/stage indices (negative counts from the end)."""
        if self._cached_point is not None:
            raise RuntimeError(
                f"forward_intermediates needs images, but {self.spec!r} is consuming cached activations "
                f"({self._cached_point.name}); call it outside cached_input()"
            )
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

    # -- split points for a frozen-prefix cache ----------------------------------------------------------------
    def features_point(self) -> SplitPoint:
        """The pooled features: the whole backbone is the prefix (linear probes, heads-only runs)."""
        return SplitPoint("features")

    def grid_point(self, stage: int | None = None) -> SplitPoint:
        """The split point of :meth:`forward_grid` (``stage`` for CNNs) with the modules computing it; the base
        has no grid, so its point is the prepared pixels (prefix: the pixel prompts)."""
        return SplitPoint("grid", "pixels", None, ("input_prompts",))

    def split_points(self) -> list[SplitPoint]:
        """Where this backbone can be cut, deepest first: the features, then grids (CNN stages from the last,
        or ViT patch tokens). The pixels are no point: caching them saves nothing but the decoding."""
        return [self.features_point()]

    def forward_prefix(self, x: torch.Tensor, point: SplitPoint) -> torch.Tensor:
        """What ``point``'s prefix computes from images ``x`` (B, 3, H, W): the features or the grid."""
        return self.forward_features(x) if point.kind == "features" else self.forward_grid(x, point.stage)

    @contextmanager
    def cached_input(self, point: SplitPoint) -> Iterator[None]:
        """Inside this block, :meth:`forward_features` takes ``point``'s output (e.g. from a cache) instead of
        images and runs only the rest of the network."""
        if point not in self.split_points():
            raise ValueError(f"{point.name} is not a split point of {self.spec!r}")
        before, self._cached_point = self._cached_point, point
        try:
            yield
        finally:
            self._cached_point = before

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
