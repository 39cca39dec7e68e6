"""The paired bootstrap behind every interval of the evaluation.

A resample draws the verification pairs of each run (training seed) with replacement *within each
fold*, so the 10-fold protocol runs unchanged on it. It is given as counts: ``weights[r, i]`` is how
often pair i appears in resample r. The same counts serve every figure of that run (clean and
protected accuracy, each method, each attacker's success on the positive pairs' stored features),
which makes every difference a paired one: clean and protected are compared on the same resample.
Runs are independent, so a figure over several seeds is the mean of the per-run figures, resample
by resample. The interval is the percentile one: the 2.5 and 97.5 percentiles of the replicates.
It covers the sampling of pairs (and of the attacked features) for the trained models at hand;
the spread between training seeds is reported beside it, per seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

REPLICATES = 1000


def resample_counts(strata: np.ndarray, replicates: int = REPLICATES, seed: int | Sequence[int] = 0) -> np.ndarray:
    """(replicates, n) int32 counts of a bootstrap that draws, within each stratum, as many items as it
    holds, with replacement; ``strata`` (n,) labels each item (its fold)."""
    strata = np.asarray(strata)
    if strata.ndim != 1:
        raise ValueError("strata must be 1-D")
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    rng = np.random.default_rng(seed)
    n = len(strata)
    drawn = []
    for label in np.unique(strata):
        members = np.flatnonzero(strata == label)
        drawn.append(members[rng.integers(0, len(members), size=(replicates, len(members)))])
    flat = (np.concatenate(drawn, axis=1) + n * np.arange(replicates)[:, None]).ravel() if n else np.zeros(0, int)
    return np.bincount(flat, minlength=replicates * n).reshape(replicates, n).astype(np.int32)


def bootstrap_interval(statistic: Callable[[int, np.ndarray], np.ndarray], counts: Sequence[np.ndarray],
                       level: float = 0.95) -> dict:
    """The estimate and percentile interval of a figure averaged over runs.

    ``statistic(k, w)`` gives run k's figure for each row of counts ``w`` (R, n_k) -> (R,); the estimate
    is its mean over runs at all-one counts (the data as measured), each replicate the mean over runs
    of the same resample index. Returns {"estimate", "low", "high", "half_width", "replicates", "level",
    "replicate_mean"} (the last: the replicates' mean, whose distance to the estimate is the bootstrap's bias).
    """
    if not counts:
        raise ValueError("no runs to bootstrap")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    estimate = float(np.mean([statistic(k, np.ones((1, c.shape[1]), dtype=np.int32))[0]
                              for k, c in enumerate(counts)]))
    values = np.mean([statistic(k, c) for k, c in enumerate(counts)], axis=0)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": estimate, "low": float(low), "high": float(high), "half_width": float(high - low) / 2,
            "replicates": int(len(values)), "level": level, "replicate_mean": float(values.mean())}
