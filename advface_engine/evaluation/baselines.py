"""Baselines at AdvFace's budget: a random sign step and the Laplace mechanism.

Random: ``anchor + eps * sign(u)``, u uniform, with the same anchor as AdvFace (so it differs
only in the direction of the perturbation: random instead of against the shadow decoder).

DP: the Laplace mechanism on the original feature, ``z + Laplace(0, b)`` per coordinate, with
``b = eps / sqrt(2)`` so that the noise's root mean square per coordinate equals eps, the size
of Random's step and AdvFace's largest one. For unit-norm features the L1 sensitivity of the
released feature is ``2 * sqrt(D)`` (two unit vectors differ by at most 2 in L2, hence
2 * sqrt(D) in L1), so the release is ``epsilon = 2 * sqrt(D) / b``-differentially private.
Both baselines normalise their output when the configuration does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends.reference import shadow_targets
from ..config import ProtectConfig


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_baseline(z: Tensor, shadow: nn.Module, encoder: nn.Module, config: ProtectConfig, seed: int = 0) -> Tensor:
    """AdvFace's anchor plus eps times a random sign (uniform random direction in the L-inf ball's corners)."""
    with torch.no_grad():
        _, anchor = shadow_targets(z, shadow.eval(), encoder.eval(), config)
    signs = torch.randint(0, 2, anchor.shape, generator=_generator(seed)).to(anchor) * 2 - 1
    out = anchor + config.eps * signs
    return F.normalize(out, dim=1) if config.normalize else out


def dp_scale(eps: float) -> float:
    """Laplace scale b whose per-coordinate root mean square (sqrt(2) * b) equals eps."""
    return eps / math.sqrt(2)


def dp_epsilon(eps: float, dim: int) -> float:
    """Privacy budget of the DP baseline: L1 sensitivity 2 * sqrt(D) of a unit feature over b."""
    return 2 * math.sqrt(dim) / dp_scale(eps)


def dp_baseline(z: Tensor, eps: float, normalize: bool = True, seed: int = 0) -> Tensor:
    """Laplace mechanism z + Laplace(0, eps / sqrt(2)) per coordinate (see the module docstring)."""
    u = torch.rand(z.shape, generator=_generator(seed), dtype=torch.float64).clamp(1e-12, 1 - 1e-12) - 0.5
    noise = -dp_scale(eps) * u.sign() * torch.log1p(-2 * u.abs())  # inverse CDF of the Laplace law
    out = z + noise.to(z)
    return F.normalize(out, dim=1) if normalize else out
