"""PVeRA: probabilistic vector-based random matrix adaptation (Fillioux et al., WACV 2026, arXiv 2512.07703),
built on VeRA (Kopiczko et al., ICLR 2024, arXiv 2310.11454).

One pair of frozen random matrices is shared by every adapted layer: A ∈ R^{2r×d_in} and B ∈ R^{d_out×r},
sized for the largest fan-in / fan-out among the targets, and each layer uses the leading rows/columns it
needs (the sharing scheme of VeRA). Per layer only two vectors train: λ_d ∈ R^{2r} (init ``lambda_d_init``,
0.1) and λ_b ∈ R^{d_out} (init 0, so the adapted model equals the frozen one at step 0):

    [μ ; log σ²] = λ_d ⊙ (A x)       z = μ + ε · exp(½ log σ²) in training,   z = μ at inference
    h = W0 x + λ_b ⊙ (B z)

At inference the update is linear in x, so ``merge()`` folds it into the weight:
W = W0 + diag(λ_b) · B · diag(λ_d[:r]) · A[:r].

Where this implementation differs from the paper's code (which covers ``nn.Linear`` only): the sampled
activation path runs on ``nn.Linear`` and on 1×1 convolutions (groups = 1; EfficientNet's pointwise convs,
PointNet's shared MLPs). k×k / grouped convolutions and open_clip's fused ``nn.MultiheadAttention`` projections
are adapted in weight space with z = μ (the deterministic VeRA-style update), because their input is not a
vector per position; ``handle.report`` lists which layers sample. A and B are saved with the adapter (buffers
under ``pvera_shared``) so a checkpoint never depends on a random-number generator's version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vision_peft.adapters.base import (
    ADAPTERS,
    AdapterHandle,
    DeltaLinear,
    Target,
    add_weight_delta,
    find_targets,
    merge_targets,
    set_module,
)


@dataclass
class PVeRAConfig:
    """Shared frozen random A/B, per-layer trainable scaling vectors, latent sampled in training."""

    name: str = "pvera"  # registry name
    r: int = 256  # latent width (the paper uses 256 on DINOv2-B; A has 2r rows: mean and log-variance)
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # portable groups or module-name patterns
    lambda_d_init: float = 0.1  # initial value of every λ_d entry (VeRA's d_init)
    sample: bool = True  # draw z ~ N(μ, σ²) while training; false = z = μ always (VeRA with a 2r-row A)
    seed: int = 0  # seed of the shared random A and B

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"PVeRA latent width must be positive, got r={self.r}")
        if self.lambda_d_init == 0:
            raise ValueError("PVeRA lambda_d_init must be non-zero: with λ_b = 0 as well, no gradient would flow")
        if not self.targets:
            raise ValueError("PVeRA needs at least one target (e.g. qkv, mlp, conv_pw or a module-name pattern)")


class PVeRAShared(nn.Module):
    """The frozen random projections every adapted layer slices: A (2r × max fan-in), B (max fan-out × r)."""

    def __init__(self, r: int, fan_in: int, fan_out: int, seed: int, like: torch.Tensor) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        # Kaiming-uniform (VeRA's initialisation; bound √(6 / fan)), drawn on the full matrices, A first, so every
        # slice has the same scale and the same seed gives the same projections everywhere
        a = nn.init.kaiming_uniform_(torch.empty(2 * r, fan_in), generator=gen)
        b = nn.init.kaiming_uniform_(torch.empty(fan_out, r), generator=gen)
        self.register_buffer("A", a.to(device=like.device, dtype=like.dtype))
        self.register_buffer("B", b.to(device=like.device, dtype=like.dtype))


class PVeRAVectors(nn.Module):
    """λ_d (2r) and λ_b (fan_out) of one layer; the shared module is referenced, not owned (saved once)."""

    def __init__(self, shared: PVeRAShared, fan_in: int, fan_out: int, cfg: PVeRAConfig, like: torch.Tensor) -> None:
        super().__init__()
        self._shared = [shared]  # a list keeps it out of this module's children and state dict
        self.fan_in, self.fan_out, self.r, self.sample = fan_in, fan_out, cfg.r, cfg.sample
        self.weight_space = False  # true for k×k convs / fused MHA: z = μ always
        self.mc = False  # set by vision_peft.adapters.mc_sampling(): sample at inference too (Monte Carlo)
        self.lambda_d = nn.Parameter(torch.full((2 * cfg.r,), float(cfg.lambda_d_init), device=like.device))
        self.lambda_b = nn.Parameter(torch.zeros(fan_out, device=like.device))

    @property
    def supports_mc(self) -> bool:
        """True when this layer's latent is sampled (the contract of ``vision_peft.adapters.mc_sampling``)."""
        return self.sample and not self.weight_space

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._shared[0]
        return s.A[:, : self.fan_in].to(dtype), s.B[: self.fan_out].to(dtype)

    def latent(self, ax: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Projections A x with 2r entries along ``dim`` → z with r entries there: sampled in training (or under
        ``mc_sampling``), the mean otherwise. ``dim`` = 1 for channels-first conv activations."""
        shape = [1] * ax.dim()
        shape[dim] = -1
        h = ax * self.lambda_d.to(ax.dtype).view(shape)
        mu, logvar = h.split(self.r, dim=dim)
        if self.sample and (self.training or self.mc):
            return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return mu

    def side(self, x: torch.Tensor) -> torch.Tensor:
        """The activation path of a Linear (…, fan_in) → (…, fan_out): λ_b ⊙ B z with z from λ_d ⊙ (A x)."""
        a, b = self.factors(x.dtype)
        return F.linear(self.latent(F.linear(x, a)), b) * self.lambda_b.to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The inference-time weight update (fan_out, fan_in), float32."""
        a, b = self.factors(torch.float32)
        mu_rows = a[: self.r] * self.lambda_d[: self.r].float()[:, None]
        return (b @ mu_rows) * self.lambda_b.float()[:, None]


def _pointwise_hook(conv: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted 1×1 conv (1-D or 2-D, groups = 1): adds the sampled side path over channels,
    computed channels-first with 1×1 convolutions (the conv's own stride, so strided convs subsample alike).

    A hook (not a wrapper module) keeps the conv's own class, forward and state-dict keys."""
    x = args[0]
    vec: PVeRAVectors = conv.pvera
    op = F.conv2d if x.dim() == 4 else F.conv1d
    a, b = vec.factors(x.dtype)
    kernel = (1,) * (x.dim() - 2)
    z = vec.latent(op(x, a.view(*a.shape, *kernel), stride=conv.stride), dim=1)  # (N, 2r, *sp) -> (N, r, *sp)
    side = op(z, b.view(*b.shape, *kernel))  # (N, fan_out, *spatial)
    return out + side * vec.lambda_b.to(x.dtype).view(1, -1, *kernel)


def _pointwise(mod: nn.Module) -> bool:
    """A 1×1 conv without groups: its output at each position is a Linear map of the input there."""
    padding = mod.padding if isinstance(mod, (nn.Conv1d, nn.Conv2d)) else None
    return (
        isinstance(mod, (nn.Conv1d, nn.Conv2d))
        and all(k == 1 for k in mod.kernel_size)
        and mod.groups == 1
        and (isinstance(padding, str) or all(p == 0 for p in padding))  # 'same'/'valid' pad nothing at k = 1
        and all(d == 1 for d in mod.dilation)
    )


@ADAPTERS.register(
    "pvera", config_cls=PVeRAConfig, help="PVeRA: shared random A/B, trainable vectors, sampled latent", spec={"r": 2}
)
def apply_pvera(backbone: nn.Module, cfg: PVeRAConfig) -> AdapterHandle:
    """Adapt every targeted Linear / Conv / fused-MHA module; λ_b = 0 so outputs are unchanged at step 0."""
    if hasattr(backbone, "pvera_shared"):
        raise ValueError("PVeRA is already applied to this backbone")
    # MHA's fused forward reads its own tensors: the MHA module itself is the target, never its out_proj
    targets: list[Target] = find_targets(backbone, cfg.targets, "PVeRA", mha_children=False)
    fan_in = max(t.fan_in for t in targets)
    fan_out = max(t.fan_out for t in targets)
    shared = PVeRAShared(cfg.r, fan_in, fan_out, cfg.seed, targets[0].weight)
    backbone.pvera_shared = shared
    touched, sampled, hooks = [], [], {}
    for t in targets:
        mod = t.module
        vec = PVeRAVectors(shared, t.fan_in, t.fan_out, cfg, t.weight).train(mod.training)  # sample only if training
        if t.activation:
            set_module(backbone, t.name, DeltaLinear(mod, "pvera", vec))
            sampled.append(t.name)
        elif _pointwise(mod):
            mod.pvera = vec
            hooks[t.name] = mod.register_forward_hook(_pointwise_hook)
            sampled.append(t.name)
        else:
            vec.weight_space = True
            add_weight_delta(mod, t.tensor, "pvera", vec)
        touched.append(t.name)
    report = {
        "sampled_layers": len(sampled) if cfg.sample else 0,
        "weight_space_layers": len(touched) - len(sampled),
        "shared_A": list(shared.A.shape),
        "shared_B": list(shared.B.shape),
    }

    def merge() -> None:
        for name, hook in hooks.items():  # the hooked 1×1 convs: fold the μ-path update into the kernel
            mod = backbone.get_submodule(name)
            hook.remove()
            with torch.no_grad():
                mod.weight.copy_(mod.weight + mod.pvera.delta().view_as(mod.weight).to(mod.weight.dtype))
            del mod.pvera
        merge_targets(backbone, [n for n in touched if n not in hooks])
        del backbone.pvera_shared

    return AdapterHandle("pvera", touched=touched, merge_fn=merge, report=report)
