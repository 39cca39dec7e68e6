"""Reconstruction quality of an attacker's output against the original face.

Images are (B, 3, H, W) or (3, H, W) tensors in [-1, 1]. ``l1`` is the mean absolute error on
that [-1, 1] scale (the loss of Eq. 1); ``psnr`` and ``ssim`` come from scikit-image
(``peak_signal_noise_ratio``, ``structural_similarity``) on images mapped to [0, 1]
(data_range 1); all three are averaged over the batch.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def _pairs(a: Tensor, b: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Both batches as (B, H, W, 3) float64 arrays in [0, 1], shapes checked."""
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a[None], b[None]
    if a.dim() != 4 or a.shape[1] != 3 or len(a) == 0:
        raise ValueError(f"images must be (B, 3, H, W) or (3, H, W) with B >= 1, got {tuple(a.shape)}")

    def unit(x: Tensor) -> np.ndarray:
        return ((x.detach().cpu().double().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()

    return unit(a), unit(b)


def l1(a: Tensor, b: Tensor) -> float:
    """Mean absolute pixel error on the [-1, 1] scale."""
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().mean())


def _skimage_metrics():
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError as err:  # optional dependency (extra "eval")
        raise ImportError("PSNR/SSIM need scikit-image: pip install 'advface-engine[eval]'") from err
    return peak_signal_noise_ratio, structural_similarity


def psnr(a: Tensor, b: Tensor) -> float:
    """Mean PSNR in dB over the batch (identical images give inf)."""
    peak_signal_noise_ratio, _ = _skimage_metrics()
    x, y = _pairs(a, b)
    with np.errstate(divide="ignore"):
        return float(np.mean([peak_signal_noise_ratio(p, q, data_range=1.0) for p, q in zip(x, y, strict=True)]))


def ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM over the batch (Gaussian-free 7x7 window, colour channels averaged)."""
    _, structural_similarity = _skimage_metrics()
    x, y = _pairs(a, b)
    values = [structural_similarity(p, q, data_range=1.0, channel_axis=-1) for p, q in zip(x, y, strict=True)]
    return float(np.mean(values))


def reconstruction_quality(reconstructed: Tensor, original: Tensor) -> dict:
    """{"l1", "psnr", "ssim"} of reconstructions against the originals."""
    return {"l1": l1(reconstructed, original), "psnr": psnr(reconstructed, original),
            "ssim": ssim(reconstructed, original)}
