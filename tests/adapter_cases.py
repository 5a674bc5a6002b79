"""The registry-generated adapter cases shared by tests/test_adapters_*.py: tiny backbones (built once, deep-copied
per test), their capability tags, each adapter's registered tiny config, every (adapter, backbone) pair and the
compatible ones, and the helpers that apply an adapter, randomise its tensors and read the frozen state."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import torch
from conftest import adapter_data_files
from torch import nn

from vision_peft.adapters import ADAPTERS, AdapterHandle, apply_adapter
from vision_peft.backbones import build_backbone
from vision_peft.config import BackboneConfig
from vision_peft.registry import satisfied, unmet
from vision_peft.tasks import TASKS

SIZE = 32
IMAGE_BACKBONES = ["timm:test_vit", "timm:test_efficientnet", "open_clip:vp-tiny-clip"]
# one tiny backbone of every other kind, so adapters that need a DiT or a point encoder are exercised here too
OTHER_BACKBONES = ["dit:d1-w32-h2-c3", "pointnet"]
TINY_BACKBONES = IMAGE_BACKBONES + OTHER_BACKBONES
GROUPS = ("qkv", "attn_out", "mlp", "conv_pw", "conv_dw")  # portable target groups tried, in this order
# the error an adapter raises on a backbone lacking one of its registered requirements: it says what is needed
REFUSALS = {
    "tokens": r"(?i)token backbone.*pad_prompt",
    "linear": r"matched no nn.Linear",
    "denoiser": r"KIND needs a class-conditional backbone",
    "points": r"needs a point backbone",
    "image": r"needs an image backbone|needs ViT blocks or CNN stages",
    "image|points": r"needs an image backbone .*or a point backbone|needs ViT blocks, CNN stages or point stages",
}
MERGE_TOL = 1e-5
# scale of the random values given to trainable tensors: PVeRA's update is a product of two scaling vectors on
# tiny shared random matrices (r = 2 here), so 0.05-sized vectors barely move the output
RANDOM_STD = {"pvera": 1.0}
_PRISTINE: dict[str, nn.Module] = {}
_FISHER_DIR = Path(tempfile.mkdtemp(prefix="vp-fisher-"))


def backbone(spec: str) -> nn.Module:
    """A fresh copy of a tiny random backbone (built once per spec, deep-copied per test)."""
    if spec not in _PRISTINE:
        kw = {"image_size": SIZE} if spec in IMAGE_BACKBONES else {}
        bb = build_backbone(BackboneConfig(name=spec, pretrained=False, **kw)).eval()
        if spec.startswith("dit:"):  # adaLN-Zero outputs 0 at init: give every weight some value so gradients flow
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in bb.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        _PRISTINE[spec] = bb
    return copy.deepcopy(_PRISTINE[spec])


def capabilities(bb: nn.Module) -> set[str]:
    """What a backbone instance offers, in the registry's capability tags (``Entry.requires`` of adapters)."""
    kind = getattr(bb, "kind", "image")
    caps = {kind}
    if hasattr(bb, "token_blocks") and bb.token_blocks() is not None:
        caps.add("tokens")
    if any(isinstance(bb.get_submodule(n), nn.Linear) for n in _group_targets(bb)):
        caps.add("linear")
    return caps


def _group_targets(bb: nn.Module) -> list[str]:
    groups = [g for g in GROUPS if g in bb.target_groups]
    return bb.resolve_targets(groups) if groups else []


def tiny_adapter_cfg(name: str, bb: nn.Module, **kw):
    """The adapter's registered tiny spec, pointed at targets the backbone has (and a Fisher file for FISH)."""
    entry = ADAPTERS.get(name)
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    tiny = dict(entry.spec or {})
    groups = [g for g in GROUPS if g in bb.target_groups]
    if "targets" in fields:
        tiny["targets"] = groups
    tiny.update(adapter_data_files(entry.config_cls, bb, groups, _FISHER_DIR))  # FISH: stand-in Fisher scores
    return entry.config_cls(**{**tiny, **kw})


# tags a task offers (a head on pooled features, a bound text encoder): the task's side of a pairing, checked by
# vision_peft.recipe.check_compatible before training, not by the adapter on a bare backbone
TASK_TAGS = {t for _, e in TASKS.items() for t in e.provides}


def compatible(name: str, bb: nn.Module) -> bool:
    return satisfied(ADAPTERS.get(name).requires, capabilities(bb) | TASK_TAGS)


def refusal(name: str, bb: nn.Module) -> str:
    """The error an incompatible pair must raise: it names the first unmet requirement."""
    missing = sorted(unmet(ADAPTERS.get(name).requires, capabilities(bb) | TASK_TAGS))
    return REFUSALS[missing[0]]


PAIRS = [(a, b) for a in ADAPTERS.names() for b in TINY_BACKBONES]
IDS = [f"{a}-{b}" for a, b in PAIRS]


def tiny_input(spec: str, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Positional inputs of one forward of a tiny backbone: images, points, or (latent, timestep, class) for the DiT."""
    g = torch.Generator().manual_seed(seed)
    if spec.startswith("dit:"):
        return torch.randn(n, 32, 4, 4, generator=g), torch.tensor([10, 700][:n]), torch.tensor([0, 1][:n])
    if spec == "pointnet":
        return (torch.randn(n, 64, 3, generator=g),)
    return (torch.randn(n, 3, SIZE, SIZE, generator=g),)


def features(bb: nn.Module, spec: str, seed: int = 0) -> torch.Tensor:
    """The backbone's output on :func:`tiny_input` (features; the denoiser's noise prediction for the DiT)."""
    inputs = tiny_input(spec, seed=seed)
    return bb(*inputs) if spec.startswith("dit:") else bb.forward_features(*inputs)


def x_input(n: int = 2, seed: int = 0) -> torch.Tensor:
    return tiny_input(IMAGE_BACKBONES[0], n, seed)[0]


def apply(name: str, spec: str, **kw) -> tuple[nn.Module, nn.Module, AdapterHandle, dict[str, torch.Tensor]]:
    """(frozen reference, adapted copy, handle, the reference state before the adapter)."""
    ref = backbone(spec)
    bb = copy.deepcopy(ref)
    before = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    bb._orig_ids = {id(p) for p in bb.parameters()}  # type: ignore[attr-defined]
    handle = apply_adapter(bb, tiny_adapter_cfg(name, bb, **kw))
    return ref, bb, handle, before


def randomise_trainable(bb: nn.Module, std: float = 0.05, seed: int = 1) -> int:
    """Give every new trainable tensor random values (LoRA's B is zero at step 0); returns how many."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad and id(p) not in bb._orig_ids:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def original_state(bb: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen tensors after the adapter, keyed like ``before`` (parametrized weights live under .original)."""
    sd = bb.state_dict()
    out = {}
    for k in before:
        if k in sd:
            out[k] = sd[k]
        else:
            mod, _, leaf = k.rpartition(".")
            out[k] = sd[f"{mod}.parametrizations.{leaf}.original"]
    return out


def _under(name: str, modules: list[str]) -> bool:
    return any(t == "" or name.startswith(t + ".") for t in modules)


def _compatible_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a, b in PAIRS if compatible(a, backbone(b))]


COMPAT = _compatible_pairs()
COMPAT_IDS = [f"{a}-{b}" for a, b in COMPAT]
