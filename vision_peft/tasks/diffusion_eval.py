"""The diffusion task's sample metrics: KID in EfficientNet-Lite0 feature space, the top-1 of a fixed sample classifier,
and a Fréchet distance on a low-dimensional PCA projection of those features.

Features: EfficientNet-Lite0 pooled features (1280-d, images resized to 224², mean/std 0.5) — not Inception-v3, so
neither number is "FID"/"KID" as published; compare only within one table.

- **KID** (Bińkowski et al. 2018): the unbiased estimator of MMD² with the cubic polynomial kernel
  k(x, y) = (xᵀy / d + 1)³. Unbiased at any sample count, so it ranks methods at the 100–300 samples a CPU run
  affords; its CI comes from a bootstrap over generated *and* real samples (:func:`kid_bootstrap`) and from the
  spread over sample seeds.
- A Fréchet distance on the 1280-d features is not reported: with n ≤ 300 samples the covariance has rank ≤ n − 1
  ≪ d and the matrix square root is dominated by that rank deficiency. :func:`frechet_pca` gives the Fréchet distance
  on a k-dimensional PCA projection (k ≪ n; the projection fitted on the real *training* images' features), named
  ``frechet_pca<k>`` for what it is.
- The classifier is a softmax regression on standardised features of the real training images, fitted
  deterministically (L-BFGS), identical for every method; its top-1 on samples comes with a Wilson 95 % interval.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_FEATURE_NET = None


def effnet_features(images: torch.Tensor, batch: int = 50) -> np.ndarray:
    """EfficientNet-Lite0 pooled features (N, 1280) of images in [0, 1] (resized to 224², mean/std 0.5)."""
    global _FEATURE_NET
    if _FEATURE_NET is None:
        from vision_peft.backbones import build_backbone
        from vision_peft.config import BackboneConfig

        _FEATURE_NET = build_backbone(BackboneConfig(name="effnet_lite0")).eval().requires_grad_(False)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = F.interpolate(images[i : i + batch].float(), size=(224, 224), mode="bilinear", align_corners=False)
            out.append(_FEATURE_NET.forward_features((x - 0.5) / 0.5).double().numpy())
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between two feature sets (rows = samples)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # (n, 1) gives 0-d
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (xᵀy / d + 1)³ between the rows of a and b."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = kxx.shape[0], kyy.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {m} and {n}")
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² between feature sets a (m, d) and b (n, d) with the cubic polynomial kernel (KID):
    mean over i ≠ j of k(aᵢ, aⱼ) + mean over i ≠ j of k(bᵢ, bⱼ) − 2 · mean over all i, j of k(aᵢ, bⱼ).
    Zero in expectation when a and b come from one distribution (it can be negative)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs two (n, d) feature sets of one width, got {a.shape} and {b.shape}")
    return _mmd2_unbiased(poly_kernel(a, a), poly_kernel(b, b), poly_kernel(a, b))


def kid_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 500, seed: int = 0) -> tuple[float, float, float]:
    """(KID, 2.5 %, 97.5 % percentiles) over a bootstrap that resamples both sets with replacement. A resample holds
    copies of one sample: pairs of copies of the same sample are left out of the within-set means (they would be
    k(x, x) terms, which the unbiased estimator excludes), so each replicate stays unbiased."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    kaa, kbb, kab = poly_kernel(a, a), poly_kernel(b, b), poly_kernel(a, b)
    rng = np.random.RandomState(seed)
    reps = []
    for _ in range(n_boot):
        i = rng.randint(0, len(a), len(a))
        j = rng.randint(0, len(b), len(b))
        reps.append(_within(kaa, i) + _within(kbb, j) - 2.0 * kab[np.ix_(i, j)].mean())
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return _mmd2_unbiased(kaa, kbb, kab), float(lo), float(hi)


def _within(k: np.ndarray, idx: np.ndarray) -> float:
    """Mean of k over pairs of a resample whose members are distinct original samples."""
    sub = k[np.ix_(idx, idx)]
    distinct = idx[:, None] != idx[None, :]
    return float(sub[distinct].mean())


def pca_basis(feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, (d, k) top-k principal directions) of ``feats`` — the projection of :func:`frechet_pca`."""
    feats = np.asarray(feats, np.float64)
    if not 1 <= k < min(feats.shape):
        raise ValueError(f"PCA dimension {k} must lie in [1, {min(feats.shape) - 1}] for features {feats.shape}")
    mu = feats.mean(0)
    _, _, vt = np.linalg.svd(feats - mu, full_matrices=False)
    return mu, vt[:k].T


def frechet_pca(a: np.ndarray, b: np.ndarray, basis: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance between a and b projected on a PCA basis (mean, (d, k) directions) with k ≪ n."""
    mu, p = basis
    return frechet_distance((np.asarray(a, np.float64) - mu) @ p, (np.asarray(b, np.float64) - mu) @ p)


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion hits / n."""
    if n <= 0:
        return float("nan"), float("nan")
    p = hits / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(c - h), float(c + h)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % Student-t interval) over independent repeats (e.g. sample seeds)."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def fit_probe(feats: np.ndarray, labels: np.ndarray, n_classes: int, steps: int = 300) -> tuple[torch.Tensor, ...]:
    """Deterministic softmax regression on standardised features (the fixed sample classifier)."""
    x = torch.from_numpy(feats).float()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    y = torch.from_numpy(labels).long()
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mu, sd, w.detach(), b.detach()


def probe_predict(probe, feats: np.ndarray) -> np.ndarray:
    mu, sd, w, b = probe
    return (((torch.from_numpy(feats).float() - mu) / sd) @ w + b).argmax(1).numpy()
