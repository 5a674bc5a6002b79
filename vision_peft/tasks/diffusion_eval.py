"""The diffusion task's sample metrics: Fréchet distance in EfficientNet-Lite0 feature space and the top-1 of a fixed
sample classifier.

Features: EfficientNet-Lite0 pooled features (1280-d, images resized to 224², mean/std 0.5). The distance is the
Fréchet distance between Gaussian fits of generated and real features — not "FID", which is defined on Inception-v3.
The classifier is a softmax regression on standardised features of the real training images, fitted
deterministically (L-BFGS), identical for every method.
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
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


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
