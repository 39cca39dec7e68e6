"""The standard 10-fold verification protocol on cosine scores (LFW / CFP-FP / AgeDB-30 style).

Pairs are split into contiguous folds; for each fold the threshold with the best accuracy on the
other nine folds is applied to it. A pair is accepted as the same person when score >= threshold.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train import encode


def best_threshold(scores, issame) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score >= threshold`` on these pairs.

    Candidates are the midpoints between consecutive distinct scores, plus one just below the
    lowest and one just above the highest; ties go to the lowest candidate.
    """
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    if len(scores) == 0 or scores.shape != issame.shape:
        raise ValueError("scores and issame must be non-empty and of the same length")
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order]
    # threshold between s[k-1] and s[k]: the first k pairs are rejected, the rest accepted
    rejected_different = np.concatenate([[0], np.cumsum(~y)])
    accepted_same = y.sum() - np.concatenate([[0], np.cumsum(y)])
    correct = rejected_different + accepted_same
    valid = np.ones(len(s) + 1, dtype=bool)
    valid[1:-1] = s[1:] > s[:-1]
    k = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if k == 0:
        threshold = s[0] - 1e-6
    elif k == len(s):
        threshold = s[-1] + 1e-6
    else:
        threshold = (s[k - 1] + s[k]) / 2
    return float(threshold), float(correct[k] / len(s))


def fold_accuracies(scores, issame, folds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold test accuracies and thresholds (each threshold chosen on the other folds)."""
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    if scores.shape != issame.shape or scores.ndim != 1:
        raise ValueError("scores and issame must be 1-D and of the same length")
    if folds < 2 or len(scores) < folds:
        raise ValueError(f"need folds >= 2 and at least {folds} pairs, got {len(scores)} pairs")
    accuracies, thresholds = [], []
    for test in np.array_split(np.arange(len(scores)), folds):
        train = np.setdiff1d(np.arange(len(scores)), test)
        threshold, _ = best_threshold(scores[train], issame[train])
        accuracies.append(np.mean((scores[test] >= threshold) == issame[test]))
        thresholds.append(threshold)
    return np.array(accuracies), np.array(thresholds)


def ten_fold_accuracy(scores, issame, folds: int = 10) -> tuple[float, float, float]:
    """(mean accuracy, std of fold accuracies, mean of the fold thresholds); accuracies in [0, 1]."""
    accuracies, thresholds = fold_accuracies(scores, issame, folds)
    return float(accuracies.mean()), float(accuracies.std()), float(thresholds.mean())


def cosine_scores(a: Tensor, b: Tensor) -> np.ndarray:
    """Row-wise cosine similarity of two (P, D) feature tensors."""
    return F.cosine_similarity(a.double(), b.double(), dim=1).numpy()


@torch.no_grad()
def embed(encoder: nn.Module, images: Tensor, flip: bool = False, batch_size: int = 256) -> Tensor:
    """Unit-norm features; with ``flip`` the normalised sum of E(x) and E(mirrored x)."""
    z = encode(encoder, images, batch_size=batch_size, normalize=not flip)
    if flip:
        z = F.normalize(z + encode(encoder, images.flip(-1), batch_size=batch_size, normalize=False), dim=1)
    return z


def verification_accuracy(gallery: Tensor, probe: Tensor, issame, folds: int = 10) -> dict:
    """10-fold accuracy of the pairs (gallery[k], probe[k]): {"accuracy", "std", "threshold"}."""
    mean, std, threshold = ten_fold_accuracy(cosine_scores(gallery, probe), issame, folds)
    return {"accuracy": mean, "std": std, "threshold": threshold}
