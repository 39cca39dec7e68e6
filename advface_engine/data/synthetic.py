"""Deterministic synthetic faces, so every job runs offline.

Identity traits (face shape, skin tone, eye/nose/mouth geometry, iris, hair, beard,
glasses) come from ``(seed, identity)``; nuisance (pose, lighting, expression,
background, noise) from ``(seed, identity, sample)``. Images are rendered in one
vectorised pass from soft ellipses, at any size, in [-1, 1]. Figures computed on
these faces are synthetic and are labelled so.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SKIN = np.array([[0.98, 0.85, 0.74], [0.90, 0.72, 0.58], [0.76, 0.57, 0.42], [0.55, 0.38, 0.27], [0.36, 0.24, 0.17]])
HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.10], [0.62, 0.45, 0.25], [0.85, 0.75, 0.50], [0.55, 0.20, 0.08],
                 [0.60, 0.60, 0.62]])
IRIS = np.array([[0.25, 0.15, 0.08], [0.20, 0.40, 0.75], [0.25, 0.55, 0.30], [0.45, 0.35, 0.20]])
IDENTITY_TRAITS = 24
NUISANCE_TRAITS = 16


def identity_traits(identities: np.ndarray, seed: int) -> np.ndarray:
    """(N, IDENTITY_TRAITS) uniform [0, 1) numbers fixed by (seed, identity)."""
    return np.stack([np.random.default_rng([seed, 0, int(i)]).random(IDENTITY_TRAITS) for i in identities])


def nuisance_traits(identities: np.ndarray, samples: np.ndarray, seed: int) -> np.ndarray:
    """(N, NUISANCE_TRAITS) numbers fixed by (seed, identity, sample)."""
    return np.stack([np.random.default_rng([seed, 1, int(i), int(s)]).random(NUISANCE_TRAITS)
                     for i, s in zip(identities, samples)])


def _palette(colors: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Interpolate a colour table at t in [0, 1)."""
    pos = t * (len(colors) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(colors) - 1)
    w = (pos - lo)[:, None]
    return colors[lo] * (1 - w) + colors[hi] * w


EXPRESSIONS = 3  # neutral, open mouth, half-closed eyes


def _templates(a: np.ndarray, expression: np.ndarray, size: int) -> Tensor:
    """Canonical-pose RGBA faces for identity traits ``a`` (M, K) and expression levels (M,)."""
    m = len(a)

    def col(x):  # (M,) -> (M, 1, 1) float32 tensor
        return torch.as_tensor(np.asarray(x, dtype=np.float32)).view(-1, 1, 1)

    lin = torch.linspace(-1, 1, size)
    u, v = lin.view(1, 1, -1), lin.view(1, -1, 1)  # x along columns, y along rows
    soft = 2.0 / size

    def ellipse(cx, cy, rx, ry):
        rx, ry = torch.as_tensor(rx).clamp_min(soft), torch.as_tensor(ry).clamp_min(soft)
        # separable: the x term per column and the y term per row, one (M, H, W) pass to add them
        d = (((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2).sqrt_()
        return d.neg_().add_(1).mul_(torch.minimum(rx, ry)).div_(soft).sigmoid_()

    def paint(img, mask, rgb):
        rgb = torch.as_tensor(np.asarray(rgb, dtype=np.float32)).view(-1, 3, 1, 1)
        return img.lerp_(rgb.expand_as(img), mask.unsqueeze(1))

    open_mouth = col(expression == 1)
    eyes_open = 1.0 - 0.5 * (expression == 2)
    skin, hair = _palette(SKIN, a[:, 0]), _palette(HAIR, a[:, 1])
    img = torch.zeros(m, 3, size, size)
    face_rx, face_ry = col(0.50 + 0.18 * a[:, 2]), col(0.62 + 0.16 * a[:, 3])
    volume = col(1.04 + 0.20 * a[:, 4])
    back_hair = ellipse(0.0, col(0.02 - 0.06 * a[:, 4]), face_rx * volume, face_ry * volume) \
        * torch.sigmoid((col(0.05 + 0.5 * a[:, 5]) - v) / soft)
    face = ellipse(0.0, 0.05, face_rx, face_ry)
    alpha = torch.maximum(back_hair, face)
    img = paint(img, back_hair, hair)
    img = paint(img, face, skin)
    img = paint(img, face * torch.sigmoid((col(-0.75 + 0.35 * a[:, 6]) - v) / soft), hair)  # fringe
    beard = col(a[:, 7] > 0.66)
    img = paint(img, face * torch.sigmoid((v - 0.45) / soft) * beard, hair * 0.8)
    eye_dx, eye_y = 0.16 + 0.12 * a[:, 8], col(-0.12 + 0.12 * a[:, 9])
    eye_rx = col(0.07 + 0.05 * a[:, 10])
    eye_ry = col((0.035 + 0.03 * a[:, 11]) * eyes_open)
    iris = _palette(IRIS, a[:, 12])
    brow_y = eye_y - col(0.11 + 0.06 * a[:, 13])
    glasses = col(a[:, 15] > 0.75)
    for sign in (-1.0, 1.0):
        cx = col(sign * eye_dx)
        img = paint(img, ellipse(cx, eye_y, eye_rx, eye_ry), np.full((m, 3), 0.95))
        img = paint(img, ellipse(cx, eye_y, eye_ry * 0.9, eye_ry * 0.9), iris)
        img = paint(img, ellipse(cx, brow_y, eye_rx * 1.3, col(0.018 + 0.02 * a[:, 14])), hair * 0.7)
        ring = ellipse(cx, eye_y, eye_rx * 1.6, eye_rx * 1.3) - ellipse(cx, eye_y, eye_rx * 1.35, eye_rx * 1.05)
        img = paint(img, ring.clamp(0, 1) * glasses, np.full((m, 3), 0.1))
    nose_len = col(0.10 + 0.10 * a[:, 16])
    img = paint(img, ellipse(0.0, eye_y + 0.05 + nose_len, col(0.04 + 0.05 * a[:, 17]), nose_len * 0.5), skin * 0.78)
    mouth_y, mouth_rx = col(0.36 + 0.12 * a[:, 18]), col(0.10 + 0.10 * a[:, 19])
    mouth_ry = col(0.02 + 0.02 * a[:, 20]) + 0.04 * open_mouth
    lips = np.clip(skin * np.array([0.85, 0.45, 0.45]) + 0.25 * a[:, 21:22], 0, 1)
    img = paint(img, ellipse(0.0, mouth_y, mouth_rx, mouth_ry), lips)
    img = paint(img, ellipse(0.0, mouth_y, mouth_rx * 0.8, mouth_ry * 0.4) * open_mouth, np.full((m, 3), 0.15))
    return torch.cat([img * alpha.unsqueeze(1), alpha.unsqueeze(1)], dim=1)  # premultiplied RGBA


def render(identities, samples, size: int = 112, seed: int = 0) -> Tensor:
    """Render faces of ``identities[k]``, variation ``samples[k]``: (N, 3, size, size) float32 in [-1, 1].

    Each (identity, expression) is drawn once in a canonical pose; pose is then an affine
    warp, followed by background, lighting and sensor noise.
    """
    identities = np.asarray(identities, dtype=np.int64).ravel()
    samples = np.asarray(samples, dtype=np.int64).ravel()
    if identities.shape != samples.shape:
        raise ValueError("identities and samples must have the same length")
    n = len(identities)
    if n == 0:
        return torch.zeros(0, 3, size, size)
    b = nuisance_traits(identities, samples, seed)
    expression = np.minimum((b[:, 8] * EXPRESSIONS).astype(np.int64), EXPRESSIONS - 1)
    keys, index = np.unique(identities * EXPRESSIONS + expression, return_inverse=True)
    rgba = _templates(identity_traits(keys // EXPRESSIONS, seed), keys % EXPRESSIONS, size)[torch.as_tensor(index)]
    # pose: rotation, scale, translation (and a slight horizontal squeeze for yaw)
    t = torch.as_tensor(b, dtype=torch.float32)
    theta, scale = (t[:, 0] - 0.5) * 0.30, 0.94 + 0.12 * t[:, 3]
    squeeze = 1 + (t[:, 4] - 0.5) * 0.15
    cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
    affine = torch.stack([torch.stack([cos * squeeze, -sin, (t[:, 1] - 0.5) * 0.12], 1),
                          torch.stack([sin * squeeze, cos, (t[:, 2] - 0.5) * 0.12], 1)], 1)
    grid = torch.nn.functional.affine_grid(affine, [n, 4, size, size], align_corners=False)
    rgba = torch.nn.functional.grid_sample(rgba, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    background = (t[:, 5:8] * 0.6 + 0.2).view(n, 3, 1, 1)
    img = rgba[:, :3].addcmul_(background, 1 - rgba[:, 3:])
    # lighting: directional gradient, brightness, colour cast; then sensor noise
    lin = torch.linspace(-1, 1, size)
    light = (t[:, 10:12] - 0.5) * 0.7
    shade = (1 + light[:, 0].view(n, 1, 1, 1) * lin.view(1, 1, 1, -1)
             + light[:, 1].view(n, 1, 1, 1) * lin.view(1, 1, -1, 1))
    gain = ((0.8 + 0.4 * t[:, 12:13]) * (0.92 + 0.16 * t[:, 13:16])).view(n, 3, 1, 1)
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 2, int(identities[0]), int(samples[0])])
                                            .integers(2**62)))
    img.mul_(shade).mul_(gain).add_(torch.randn(img.shape, generator=gen), alpha=0.02)
    return img.clamp_(0, 1).mul_(2).sub_(1)


def synthetic_faces(num_identities: int, per_identity: int, size: int = 112, seed: int = 0,
                    first_identity: int = 0, first_sample: int = 0) -> tuple[Tensor, Tensor]:
    """``per_identity`` faces of each identity in [first_identity, first_identity + num_identities).

    Returns (images (N, 3, size, size) in [-1, 1], labels (N,) int64), identity-major.
    Disjoint identity or sample ranges give disjoint data (e.g. attacker vs gallery).
    """
    if num_identities < 0 or per_identity < 0:
        raise ValueError("num_identities and per_identity must be >= 0")
    ids = np.repeat(np.arange(first_identity, first_identity + num_identities), per_identity)
    samples = np.tile(np.arange(first_sample, first_sample + per_identity), num_identities)
    images = torch.cat([render(ids[i:i + 1024], samples[i:i + 1024], size, seed) for i in range(0, len(ids), 1024)]) \
        if len(ids) else torch.zeros(0, 3, size, size)
    return images, torch.as_tensor(ids, dtype=torch.int64)
