"""FISH's empirical Fisher (Sung et al., NeurIPS 2021, "Training Neural Networks with Fixed Sparse Masks"), per
example: F̂ = 1/N Σ_i (∂ℓ_i/∂θ)², ℓ_i the loss (negative log-likelihood) of example i alone, averaged over N examples
(FISH uses ~1k). Squaring the gradient of a *batch-mean* loss is not this: it adds the cross terms
2 ∂ℓ_i ∂ℓ_j of every pair in the batch and scales by 1/B². The sparse engine that trains the selected entries is
:mod:`vision_peft.adapters.sara`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class _LossCall(nn.Module):
    """``loss_fn`` as a module holding ``model`` (so torch.func.functional_call can swap the model's tensors)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.m = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(batch)


def _is_batch(b: Any) -> bool:
    if torch.is_tensor(b):
        return b.dim() > 0
    if isinstance(b, dict):
        return bool(b) and all(torch.is_tensor(v) and v.dim() > 0 for v in b.values())
    return False


def _batch_len(b: Any) -> int:
    return len(b) if torch.is_tensor(b) else len(next(iter(b.values())))


def _slice(b: Any, i: int, j: int) -> Any:
    return b[i:j] if torch.is_tensor(b) else {k: v[i:j] for k, v in b.items()}


def _param_path(model: nn.Module, name: str) -> str:
    """A parameter name, or (the older key) the module name of an ``nn.Linear`` whose weight is meant."""
    try:
        model.get_parameter(name)
        return name
    except AttributeError:
        m = model.get_submodule(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{name!r} is neither a parameter nor an nn.Linear of the model") from None
        return f"{name}.weight"


def fisher_scores(
    model: nn.Module,
    names: list[str],
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    method: str = "vmap",
    chunk: int = 16,
) -> dict[str, torch.Tensor]:
    """FISH's empirical Fisher diagonal F̂ = 1/N Σ_i (∂ℓ_i/∂θ)², ℓ_i the loss of example i, over all N examples.

    Args:
        model: the frozen model whose tensors are scored (its ``requires_grad`` flags are left as they were).
        names: parameter names (``blocks.0.attn.qkv.weight``) or, for an ``nn.Linear``'s weight, its module name
            (the keys of older fisher files); the result is keyed as given.
        loss_fn: ``batch -> mean loss of the batch``. It is called on one-example batches, so ℓ_i is example i's
            own loss (the mean-loss gradient of a batch, squared, is *not* the Fisher: cross terms).
        batches: tensors or dicts of tensors with a leading example dimension (split into examples); any other
            item (e.g. a seed) is taken as one example whose loss ``loss_fn`` returns.
        method: ``vmap`` — ``torch.func.vmap(grad)`` over ``chunk`` examples at a time through
            ``torch.func.functional_call`` (random ops draw independently per example); ``loop`` — one backward per
            example. Both give the same scores.
    """
    if method not in ("vmap", "loop"):
        raise ValueError(f"fisher method must be vmap or loop, got {method!r}")
    paths = {n: _param_path(model, n) for n in names}
    base = {n: model.get_parameter(p) for n, p in paths.items()}
    acc = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in base.items()}
    count = 0
    flags = {n: t.requires_grad for n, t in base.items()}

    def add(grads: dict[str, torch.Tensor], per_example_dim: bool) -> None:
        for n, g in grads.items():
            g = g.detach().float()
            acc[n] += (g**2).sum(0) if per_example_dim else g**2

    try:
        for t in base.values():
            t.requires_grad_(True)
        if method == "vmap":
            from torch.func import functional_call, grad, vmap

            wrap = _LossCall(model, loss_fn)

            def one(params: dict[str, torch.Tensor], ex: Any) -> torch.Tensor:
                ex1 = ex.unsqueeze(0) if torch.is_tensor(ex) else {k: v.unsqueeze(0) for k, v in ex.items()}
                return functional_call(wrap, {f"m.{paths[n]}": v for n, v in params.items()}, (ex1,))

            per_example = vmap(grad(one), in_dims=(None, 0), randomness="different")
            params = {n: t.detach() for n, t in base.items()}
        for b in batches:
            if not _is_batch(b):  # an opaque item: one example
                loss = loss_fn(b)
                gs = torch.autograd.grad(loss, list(base.values()), allow_unused=True)
                add({n: torch.zeros_like(base[n]) if g is None else g for n, g in zip(base, gs, strict=True)}, False)
                count += 1
                continue
            n_b = _batch_len(b)
            if method == "vmap":
                for i in range(0, n_b, chunk):
                    add(per_example(params, _slice(b, i, min(n_b, i + chunk))), True)
            else:
                for i in range(n_b):
                    gs = torch.autograd.grad(loss_fn(_slice(b, i, i + 1)), list(base.values()), allow_unused=True)
                    zs = {n: torch.zeros_like(base[n]) if g is None else g for n, g in zip(base, gs, strict=True)}
                    add(zs, False)
            count += n_b
    finally:
        for n, t in base.items():
            t.requires_grad_(flags[n])
    return {n: (a / max(1, count)).to(base[n].dtype) for n, a in acc.items()}
