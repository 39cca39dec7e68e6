"""Protection configuration: every decision of ALGORITHM.md is a field here."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

NORMS = ("linf", "l2")
CONSTRAINTS = ("ball", "per_step")
ANCHORS = ("shadow", "original")
OBJECTIVES = ("pixel", "identity", "pixel+identity")
ENSEMBLE_ANCHORS = ("first", "mean")
MAX_BUDGET = 1e30  # eps and alpha beyond this overflow the float32 step arithmetic
MAX_STEPS = 10_000  # far beyond any useful T (eps / alpha steps cross the ball): a typo, not a week's run
MAX_COPIES = 1_000  # smoothing's noisy copies per step: each costs a plain step


@dataclass(frozen=True)
class ProtectConfig:
    """How adversarial features are made.

    eps:          radius of the perturbation budget (L-inf or L2, see ``norm``).
    alpha:        step size of each sign (or L2-normalised) gradient step.
    steps:        number of steps T; 0 returns the (normalised) start point: the anchor, or
                  with ``random_start`` the random point in the ball.
    norm:         "linf" (sign steps, L-inf ball) or "l2" (L2-normalised steps, L2 ball).
    constraint:   "ball": project onto the eps-ball around the anchor after every
                  step (PGD form); "per_step": clip each single step to eps (the
                  poster's literal ||z_{t+1} - z_t|| < eps).
    anchor:       "shadow": z_0 = E(S(z)) (Eq. 5); "original": z_0 = z. Anchored at z, S(z_0) equals
                  the target x~ and the L1 gradient is exactly 0 (sign(0) = 0): hence random_start.
                  The defaults (eps, alpha, steps, anchor, random_start, min_cosine) are the evaluation's
                  choice (docs/evaluation.md: the rule and the sweep behind it).
    normalize:    features are unit-norm (ArcFace convention): the anchor is
                  normalised before the loop and z_T after it.
    random_start: start from a uniform point in the ball, drawn from ``seed`` and
                  the row's content, so a row's result never depends on batching.
    seed:         seed of the random start (a non-negative integer).
    min_cosine:   the utility guard: every output row has cos(z_adv, z) >= min_cosine, z the caller's
                  feature. The anchor, the start and every step's iterate are rotated toward z onto
                  that cap (ALGORITHM.md). None switches the guard off.
    objective:    what each step ascends: "pixel", the shadow's L1 reconstruction error (Eq. 4);
                  "identity", 1 - cos(E(S(z_t)), z), how far the shadow's reconstruction is from the
                  person to the encoder (needs a differentiable torch encoder; reference backend);
                  "pixel+identity", the per-pixel mean L1 error + identity_weight * that.
    identity_weight: the identity term's weight in "pixel+identity" (>= 0).
    ensemble_anchor: with several shadows and anchor "shadow", whose E(S_k(z)) anchors the steps: "first",
                  the first shadow's; "mean", the normalised mean of every shadow's normalised anchor.
    smoothing:    each step's gradient is the mean of the gradients at this many noisy copies of z_t,
                  z_t + smoothing_scale * ||z_t|| / sqrt(D) * n, n ~ N(0, I) drawn from the seed, the row
                  and the step: a direction that holds around z_t rather than at it, which transfers
                  better to attackers the server has not seen. Costs that many times the plain step;
                  0 (default): the plain gradient. Reference backend.
    smoothing_scale: the copies' noise, relative to ||z_t|| / sqrt(D) (>= 0).
    """

    eps: float = 0.1
    alpha: float = 0.025
    steps: int = 10
    norm: str = "linf"
    constraint: str = "ball"
    anchor: str = "original"
    normalize: bool = True
    random_start: bool = True
    seed: int = 0
    min_cosine: float | None = 0.875
    objective: str = "pixel"
    identity_weight: float = 1.0
    ensemble_anchor: str = "first"
    smoothing: int = 0
    smoothing_scale: float = 0.6

    def __post_init__(self) -> None:
        for name in ("eps", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or not 0 < value <= MAX_BUDGET:
                raise ValueError(f"{name} must be a finite number in (0, {MAX_BUDGET:g}], got {value}")
            object.__setattr__(self, name, float(value))  # NumPy scalars become plain floats (JSON, repr)
        for name in ("steps", "seed", "smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS}, got {self.steps}")
        if self.smoothing > MAX_COPIES:
            raise ValueError(f"smoothing must be at most {MAX_COPIES} copies, got {self.smoothing}")
        if self.min_cosine is not None:
            value = self.min_cosine
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"min_cosine must be a number in (-1, 1) or None, got {type(value).__name__}")
            if not -1 < value < 1:  # NaN fails too
                raise ValueError(f"min_cosine must be in (-1, 1) or None (no guard), got {value}")
            object.__setattr__(self, "min_cosine", float(value))
        for name in ("identity_weight", "smoothing_scale"):
            weight = getattr(self, name)
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(weight).__name__}")
            if not math.isfinite(weight) or not 0 <= weight <= MAX_BUDGET:
                raise ValueError(f"{name} must be a finite number >= 0, got {weight}")
            object.__setattr__(self, name, float(weight))
        for name, allowed in (("norm", NORMS), ("constraint", CONSTRAINTS), ("anchor", ANCHORS),
                              ("objective", OBJECTIVES), ("ensemble_anchor", ENSEMBLE_ANCHORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("normalize", "random_start"):
            if not isinstance(getattr(self, name), bool):  # "false" would read as true
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def replace(self, **changes) -> ProtectConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProtectConfig:
        if not isinstance(data, Mapping):
            raise TypeError(f"a ProtectConfig is read from a mapping of field names, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ProtectConfig fields: {sorted(unknown)}")
        return cls(**data)
