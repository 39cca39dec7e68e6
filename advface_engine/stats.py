"""What a protection did to each row, and whether the shadow fits the encoder and the data.

The protection is only as good as its anchor E(S(z)): a shadow trained for another encoder or other
faces gives anchors far from z, and then either recognition (without the guard) or protection (with
it) is lost. ``protection_stats`` measures each row after the fact; ``fit_report`` measures the anchor
on a sample before any work, so a gallery job can refuse a shadow that does not fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.reference import guard, guard_frame, shadow_targets
from .config import ProtectConfig
from .ensemble import members

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
MIN_ANCHOR_COSINE = 0.5  # the preflight's default: trained shadows sit well above, mismatched ones near 0
FIT_ROWS = 256  # rows of the preflight's sample
AT_EDGE = 1e-5  # a row within this of min_cosine is held by the guard


def quantiles(values: np.ndarray | Tensor) -> dict[str, float]:
    """{"min", "p05", "p25", "median", "p75", "p95", "max"} of the finite values (NaN where none are)."""
    values = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    values = values[np.isfinite(values)]
    names = ("min", "p05", "p25", "median", "p75", "p95", "max")
    if values.size == 0:
        return dict.fromkeys(names, float("nan"))
    return {name: float(v) for name, v in zip(names, np.quantile(values, QUANTILES))}


@dataclass
class ProtectionStats:
    """Per-row figures of one protection (tensors of shape (B,), on the CPU).

    anchor_cosine: cos(z_0, z), z_0 the anchor before the guard (E(S(z)), or z itself).
    cosine:        cos(z_adv, z), what recognition keeps.
    guard_active:  the guard moved the anchor or holds the output on its cap's edge.
    l1_gain:       |S(z_adv) - x~|_1 / |S(z_0') - x~|_1, z_0' the guarded anchor: how much further the
                   steps took the shadow's reconstruction from x~ = S(z) (NaN where S(z_0') is x~ itself
                   to rounding, as with anchor "original"); each |.|_1 summed over an ensemble's shadows.
    """

    anchor_cosine: Tensor
    cosine: Tensor
    guard_active: Tensor
    l1_gain: Tensor

    def summary(self) -> dict:
        """Quantiles of each figure and the fraction of rows the guard held (JSON-ready)."""
        return {"rows": int(self.cosine.numel()),
                "anchor_cosine": quantiles(self.anchor_cosine), "cosine": quantiles(self.cosine),
                "guard_active": float(self.guard_active.float().mean()) if self.cosine.numel() else 0.0,
                "l1_gain": quantiles(self.l1_gain)}

    def __getitem__(self, rows) -> ProtectionStats:
        return ProtectionStats(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    @staticmethod
    def cat(parts: list[ProtectionStats]) -> ProtectionStats:
        return ProtectionStats(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                                  for f in dataclasses.fields(ProtectionStats)})


def _l1(shadow: nn.Module, z: Tensor, targets: list[Tensor]) -> Tensor:
    """Per row, sum_k |S_k(z) - x~_k|_1 over the shadows (one, or an ensemble's)."""
    return sum((s(z) - x).abs().flatten(1).sum(1) for s, x in zip(members(shadow), targets))


def protection_stats(z: Tensor, z_adv: Tensor, shadow: nn.Module, encoder: nn.Module,
                     config: ProtectConfig) -> ProtectionStats:
    """ProtectionStats of z -> z_adv, computed with the reference functions (S(z), E(S(z)), S(z_0') and
    S(z_adv): four forward passes, no gradient). z and z_adv in the models' dtype and device, the models
    frozen by the caller."""
    with torch.no_grad():
        z_adv = z_adv.to(z)
        x_shadow, anchor = shadow_targets(z, shadow, encoder, config)
        anchor_cosine = F.cosine_similarity(anchor, z, dim=1)
        cosine = F.cosine_similarity(z_adv, z, dim=1)
        c = config.min_cosine
        start = anchor if c is None else guard(anchor, guard_frame(z), c)
        before = _l1(shadow, start, x_shadow)
        gain = _l1(shadow, z_adv, x_shadow) / before
        size = sum(x.abs().flatten(1).sum(1) for x in x_shadow)
        exact = before <= 1e-4 * size  # the start gives x~ itself, to rounding
        gain = torch.where(exact, torch.full_like(gain, float("nan")), gain)
        active = torch.zeros_like(cosine, dtype=torch.bool) if c is None else \
            (anchor_cosine < c) | (cosine <= c + AT_EDGE)
    return ProtectionStats(*(t.detach().float().cpu() for t in (anchor_cosine, cosine, active, gain)))


@dataclass
class FitReport:
    """How near the shadow's anchor E(S(z)) is to z on a sample of features (Protector.check_fit): whether
    the shadow inverts this encoder on these features. A shadow that does not wrecks recognition when it
    anchors the steps (anchor "shadow"), and protects little either way (its gradient is not the
    attacker's)."""

    rows: int
    anchor_cosine: dict  # quantiles (``quantiles``); of the worst-fitting shadow of an ensemble
    anchor: str = "shadow"  # the config's anchor: what a poor fit costs, said in ``message``
    shadows: int = 1  # how many shadows protect together
    shadow: int = 0  # which of them the figures are of (the lowest median), from 0

    @property
    def median(self) -> float:
        return self.anchor_cosine["median"]

    def fits(self, min_anchor_cosine: float = MIN_ANCHOR_COSINE) -> bool:
        return self.median >= min_anchor_cosine

    def message(self, min_anchor_cosine: float = MIN_ANCHOR_COSINE) -> str:
        """One line: the figure, and what to do when it is too low."""
        figure = (f"median cos(E(S(z)), z) = {self.median:.3f} on {self.rows} rows "
                  f"(p05 {self.anchor_cosine['p05']:.3f}, p95 {self.anchor_cosine['p95']:.3f})")
        name = "the shadow" if self.shadows == 1 else f"shadow {self.shadow + 1} of {self.shadows}"
        if self.fits(min_anchor_cosine):
            return f"{name} fits{'' if self.shadows == 1 else ', the worst of the ensemble'}: {figure}"
        train = "Train the shadow for this encoder on data like the gallery's (advface train-shadow --encoder ...)"
        head = f"{name} does not fit this encoder and these features: {figure}, below {min_anchor_cosine}. "
        if self.anchor == "original":
            return (head + "Steps against a shadow that does not invert the encoder protect little (the guard "
                           f"keeps recognition, but an attacker's network is not fooled). {train}")
        return (head + "Its anchors are far from the features, so the protection would spend its budget pulling "
                       f"them back and recognition suffers. {train}, or protect around the features themselves "
                       "(--anchor original --random-start; such a shadow then protects little)")


def sample_rows(n: int, rows: int = FIT_ROWS, seed: int = 0) -> np.ndarray:
    """Indices of a seeded sample of ``rows`` of n rows (all of them, in order, when n <= rows)."""
    if n <= rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))


def fit_report(z: Tensor, shadow: nn.Module, encoder: nn.Module, config: ProtectConfig) -> FitReport:
    """FitReport of the features z (already sampled), the models frozen by the caller: of the shadow, or of
    the ensemble's shadow that fits worst (each must fit: each one's gradient steers the step)."""
    shadows, fits = members(shadow), []
    with torch.no_grad():
        for one in shadows:
            _, anchor = shadow_targets(z, one, encoder, config.replace(anchor="shadow"))
            fits.append(quantiles(F.cosine_similarity(anchor, z, dim=1)))
    worst = min(range(len(fits)), key=lambda k: np.nan_to_num(fits[k]["median"], nan=-np.inf))  # NaN: worst
    return FitReport(rows=int(z.shape[0]), anchor_cosine=fits[worst], anchor=config.anchor, shadows=len(shadows),
                     shadow=worst)
