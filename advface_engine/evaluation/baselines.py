"""Baselines at AdvFace's budget eps, measured in AdvFace's norm (``config.norm``).

Random: AdvFace's anchor plus a random perturbation of size eps (so it differs only in the direction
of the perturbation: random instead of against the shadow decoder): ``anchor + eps * sign(u)``, u
uniform, for L-inf (a corner of the eps-ball); ``anchor + eps * u / ||u||``, u standard normal, for L2
(a uniform point on the eps-sphere).

DP: the Laplace mechanism on the original feature, ``z + Laplace(0, b)`` per coordinate, with the
noise's root mean square equal to eps in AdvFace's norm: ``b = eps / sqrt(2)`` for L-inf (RMS eps per
coordinate), ``b = eps / sqrt(2 D)`` for L2 (RMS L2 norm eps over D coordinates). For unit-norm
features the L1 sensitivity of the released feature is ``2 * sqrt(D)`` (two unit vectors differ by at
most 2 in L2, hence 2 * sqrt(D) in L1), so the release is ``epsilon = 2 * sqrt(D) / b``-differentially
private. Both baselines normalise their output when the configuration does.

The utility guard (``min_cosine``) applies to both as to AdvFace: Random's anchor and result, and DP's
result, are rotated toward z onto the cap cos >= min_cosine, so that at the same budget and guard the
methods differ only in the direction of the perturbation. (The guard reads z: DP's epsilon, no
meaningful guarantee at these budgets anyway, does not hold for the guarded release.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends.reference import guard, guard_frame, shadow_targets
from ..config import ProtectConfig


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_baseline(z: Tensor, shadow: nn.Module, encoder: nn.Module, config: ProtectConfig, seed: int = 0) -> Tensor:
    """AdvFace's anchor plus a random step of size eps: a random sign (L-inf) or a random unit direction (L2);
    anchor and result guarded as AdvFace's are (``config.min_cosine``)."""
    with torch.no_grad():
        _, anchor = shadow_targets(z, shadow.eval(), encoder.eval(), config)
    frame = guard_frame(z.to(anchor)) if config.min_cosine is not None else None
    anchor = guard(anchor, frame, config.min_cosine)
    if config.norm == "l2":
        u = torch.randn(anchor.shape, generator=_generator(seed)).to(anchor)
        out = anchor + config.eps * F.normalize(u, dim=1)
    else:
        signs = torch.randint(0, 2, anchor.shape, generator=_generator(seed)).to(anchor) * 2 - 1
        out = anchor + config.eps * signs
    out = guard(out, frame, config.min_cosine)
    return F.normalize(out, dim=1) if config.normalize else out


def dp_scale(eps: float, dim: int, norm: str = "linf") -> float:
    """Laplace scale b whose noise has RMS eps per coordinate (L-inf: sqrt(2) b = eps) or in L2 norm
    over ``dim`` coordinates (L2: sqrt(2 D) b = eps)."""
    return eps / math.sqrt(2 * dim if norm == "l2" else 2)


def dp_epsilon(eps: float, dim: int, norm: str = "linf") -> float:
    """Privacy budget of the DP baseline: L1 sensitivity 2 * sqrt(D) of a unit feature over b."""
    return 2 * math.sqrt(dim) / dp_scale(eps, dim, norm)


def dp_baseline(z: Tensor, eps: float, normalize: bool = True, seed: int = 0, norm: str = "linf",
                min_cosine: float | None = None) -> Tensor:
    """Laplace mechanism z + Laplace(0, b) per coordinate, b = dp_scale(eps, D, norm) (see the module docstring),
    guarded to cos >= ``min_cosine`` with z when given."""
    u = torch.rand(z.shape, generator=_generator(seed), dtype=torch.float64).clamp(1e-12, 1 - 1e-12) - 0.5
    noise = -dp_scale(eps, z.shape[1], norm) * u.sign() * torch.log1p(-2 * u.abs())  # inverse CDF of the Laplace law
    out = z + noise.to(z)
    if min_cosine is not None:
        out = guard(out, guard_frame(z), min_cosine)
    return F.normalize(out, dim=1) if normalize else out
