"""Training-free merging of task vectors: pure torch functions on a (T, D) stack of flattened task vectors.

A task vector τ_t is one task's weight update (fine-tuned minus pre-trained weights), flattened; row t of ``tvs``
is τ_t. Every function returns the merged *update* τ_m (D,), which is added to the frozen weights: θ = θ0 + τ_m.

- Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023): τ_m = λ Σ_t τ_t.
- TIES-Merging (Yadav et al., NeurIPS 2023): *trim* each τ_t to its top-k fraction of entries by magnitude
  (the rest set to 0), *elect* a sign per entry, γ = sgn(Σ_t τ̂_t) (the sign of the larger total mass), *disjoint
  mean*: the mean over the tasks whose trimmed entry is non-zero and has the elected sign, then scale by λ.
- PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024), as the paper's
  equations state it: intra-balancing β_intra,i = softmax(N · Norm(τ_i ⊙ τ_i)) over the entries of task i (the
  number of tasks N is the softmax's inverse temperature: more tasks, sharper suppression of small entries);
  inter-balancing β_inter,i = Σ_j softmax(Norm(τ_i ⊙ τ_j)) (entry-wise similarity to every task, itself included);
  β_i = β_intra,i ⊙ β_inter,i; *drop*: keep the top-r fraction of β_i's entries (the rest 0, β̂_i); *rescale and
  merge*: τ_m = λ Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i (0 where no task keeps the entry). Norm is min-max normalisation to
  [0, 1] over the entries. (The authors' released script departs from these equations — exp and tanh instead of
  the two softmaxes, clamped outliers; we follow the paper.)

Entries are ranked over the whole flattened vector (all adapted tensors together), as both papers do.
"""

from __future__ import annotations

import math

import torch

METHODS = ("task_arithmetic", "ties", "pcb")


def _check(tvs: torch.Tensor) -> None:
    if tvs.dim() != 2 or tvs.shape[0] < 1 or tvs.shape[1] < 1:
        raise ValueError(f"task vectors must be a (T, D) tensor with T, D >= 1, got shape {tuple(tvs.shape)}")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} is the fraction of entries kept and must lie in (0, 1], got {value}")


def keep_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (T, D): in each row the ``ceil(fraction · D)`` largest ``scores`` (ties broken by position)."""
    _check(scores)
    _check_fraction("fraction", fraction)
    d = scores.shape[1]
    n = min(d, max(1, math.ceil(fraction * d - 1e-9)))
    idx = scores.topk(n, dim=1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def task_arithmetic(tvs: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """λ Σ_t τ_t."""
    _check(tvs)
    return lam * tvs.sum(0)


def ties_trim(tvs: torch.Tensor, k: float) -> torch.Tensor:
    """Each task vector with all but its top-``k`` fraction of entries by magnitude set to 0."""
    return tvs * keep_top(tvs.abs(), k)


def ties_elect(trimmed: torch.Tensor) -> torch.Tensor:
    """The elected sign per entry (D,): sgn of the summed trimmed values (+1, -1, or 0 where they cancel)."""
    _check(trimmed)
    return torch.sign(trimmed.sum(0))


def ties_disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean over the tasks whose trimmed value is non-zero with the elected ``sign`` (0 if none)."""
    _check(trimmed)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    return total / agree.sum(0).clamp_min(1)


def ties(tvs: torch.Tensor, k: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    """TIES-Merging: trim to the top-``k`` fraction, elect signs, disjoint mean, times λ."""
    trimmed = ties_trim(tvs, k)
    return lam * ties_disjoint_mean(trimmed, ties_elect(trimmed))


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to [0, 1] over its entries (a constant row becomes 0)."""
    lo, hi = x.min(dim=-1, keepdim=True).values, x.max(dim=-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny) * (hi > lo)


def pcb_intra(tvs: torch.Tensor) -> torch.Tensor:
    """β_intra (T, D): row i = softmax over entries of N · Norm(τ_i²); each row sums to 1."""
    _check(tvs)
    return torch.softmax(tvs.shape[0] * minmax(tvs * tvs), dim=1)


def pcb_inter(tvs: torch.Tensor) -> torch.Tensor:
    """β_inter (T, D): row i = Σ_j softmax over entries of Norm(τ_i ⊙ τ_j); each row sums to N."""
    _check(tvs)
    out = torch.zeros_like(tvs)
    for j in range(tvs.shape[0]):
        out += torch.softmax(minmax(tvs * tvs[j]), dim=1)
    return out


def pcb_scores(tvs: torch.Tensor) -> torch.Tensor:
    """β = β_intra ⊙ β_inter (T, D)."""
    return pcb_intra(tvs) * pcb_inter(tvs)


def pcb(tvs: torch.Tensor, r: float = 0.1, lam: float = 1.0) -> torch.Tensor:
    """PCB-Merging: balance, keep each task's top-``r`` fraction of scores, score-weighted mean, times λ."""
    beta = pcb_scores(tvs)
    kept = beta * keep_top(beta, r)
    total = kept.sum(0)
    merged = (kept * tvs).sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return lam * torch.where(total > 0, merged, torch.zeros_like(merged))


def merge_vectors(tvs: torch.Tensor, method: str, lam: float = 1.0, k: float = 0.2, r: float = 0.1) -> torch.Tensor:
    """The merged update (D,) of ``method`` (one of :data:`METHODS`); ``k`` is TIES's kept fraction, ``r`` PCB's."""
    if method == "task_arithmetic":
        return task_arithmetic(tvs, lam)
    if method == "ties":
        return ties(tvs, k, lam)
    if method == "pcb":
        return pcb(tvs, r, lam)
    raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
