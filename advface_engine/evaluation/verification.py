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


SCORE_BINS = 1 << 12  # gallery_histograms' bins over [-1, 1]: thresholds 5e-4 apart (the best balanced accuracy
#                       is flat at its maximum, so the grid moves it by far less than a hundredth of a point)


def gallery_histograms(stored: Tensor, clean: Tensor, labels, block: int = 512) -> tuple[Tensor, Tensor]:
    """The scores cos(stored_i, clean_j) of every ordered pair (i, j), i != j, of a gallery, counted in
    SCORE_BINS bins over [-1, 1] per identity of i: (genuine, impostor), each (identities, SCORE_BINS) float64,
    the identities in ``np.unique(labels)`` order; genuine when the labels agree. ``block`` rows at a time:
    memory stays O(block N)."""
    a = F.normalize(stored.detach().double(), dim=1)
    b = F.normalize(clean.detach().to(a.device).double(), dim=1)
    names, identity = np.unique(np.asarray(labels, dtype=np.int64), return_inverse=True)
    identity = torch.as_tensor(identity.reshape(-1), device=a.device)
    if a.shape != b.shape or identity.shape != (a.shape[0],):
        raise ValueError("stored, clean and labels must describe the same N images")
    genuine = torch.zeros(len(names) * SCORE_BINS, dtype=torch.float64, device=a.device)
    impostor = torch.zeros_like(genuine)
    for start in range(0, a.shape[0], block):
        rows = torch.arange(start, min(start + block, a.shape[0]), device=a.device)
        scores = a[rows] @ b.T
        same = identity[rows, None] == identity[None, :]
        other = torch.ones_like(same)
        other[torch.arange(len(rows)), rows] = False  # a row never meets itself
        index = ((scores.clamp(-1, 1) + 1) / 2 * (SCORE_BINS - 1)).round().long()
        index += (identity[rows] * SCORE_BINS)[:, None]
        genuine += torch.bincount(index[same & other], minlength=len(genuine)).double()
        impostor += torch.bincount(index[~same], minlength=len(impostor)).double()
    genuine, impostor = genuine.view(len(names), SCORE_BINS), impostor.view(len(names), SCORE_BINS)
    if not genuine.sum() or not impostor.sum():
        raise ValueError("a gallery accuracy needs two images of one identity and two identities")
    return genuine, impostor


def best_balanced_accuracy(genuine: Tensor, impostor: Tensor) -> Tensor:
    """The best balanced accuracy (the mean of the genuine accept and impostor reject rates) of score >= t, t
    among the bin edges, of score counts binned as ``gallery_histograms``' (bins on the last dim; any leading
    dims are batched)."""
    # threshold at bin k: bins >= k accepted
    accepted = genuine.flip(-1).cumsum(-1).flip(-1) / genuine.sum(-1, keepdim=True)
    rejected = (impostor.cumsum(-1) - impostor) / impostor.sum(-1, keepdim=True)
    return ((accepted + rejected) / 2).amax(-1)


def gallery_accuracy(stored: Tensor, clean: Tensor, labels, block: int = 512) -> float:
    """Balanced accuracy at the best threshold over every ordered pair (i, j), i != j, of a gallery: score
    cos(stored_i, clean_j), genuine when labels agree (``gallery_histograms``). Every image meets every other,
    so it rests on far more pairs than a pair list (N (N - 1) of them, N (n - 1) genuine for n images per
    identity); offline when ``stored`` is protected and ``clean`` is not."""
    genuine, impostor = gallery_histograms(stored, clean, labels, block)
    return float(best_balanced_accuracy(genuine.sum(0), impostor.sum(0)))


def resampled_gallery_accuracy(histograms: tuple[Tensor, Tensor], counts: np.ndarray, block: int = 256) -> np.ndarray:
    """``gallery_accuracy`` of each bootstrap resample of the identities, given as counts (R, identities)
    (``bootstrap.resample_counts``): a resample takes identity c's probe rows, and so its pairs, counts[r, c]
    times. (R,) float64."""
    genuine, impostor = histograms
    counts = torch.as_tensor(np.atleast_2d(counts), dtype=torch.float64, device=genuine.device)
    if counts.shape[1] != genuine.shape[0]:
        raise ValueError(f"counts have {counts.shape[1]} columns for {genuine.shape[0]} identities")
    return torch.cat([best_balanced_accuracy(w @ genuine, w @ impostor)
                      for w in counts.split(block)]).cpu().numpy()


def ten_fold_accuracy(scores, issame, folds: int = 10) -> tuple[float, float, float]:
    """(mean accuracy, std of fold accuracies, mean of the fold thresholds); accuracies in [0, 1]."""
    accuracies, thresholds = fold_accuracies(scores, issame, folds)
    return float(accuracies.mean()), float(accuracies.std()), float(thresholds.mean())


def resampled_accuracy(scores, issame, counts: np.ndarray, folds: int = 10, block: int = 64) -> np.ndarray:
    """The 10-fold accuracy of each bootstrap resample given as counts (R, n) drawn within the folds
    (``bootstrap.resample_counts`` with the fold as stratum): for each row, exactly what ``fold_accuracies``
    gives (mean over folds) on the resampled pair list, its folds kept in place, without building that
    list. Each fold's threshold is chosen on the resampled other folds by ``best_threshold``'s rule."""
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    counts = np.atleast_2d(np.asarray(counts))
    n = len(scores)
    if scores.shape != issame.shape or scores.ndim != 1 or counts.shape[1] != n:
        raise ValueError("scores, issame and the counts' columns must have the same length")
    if folds < 2 or n < folds:
        raise ValueError(f"need folds >= 2 and at least {folds} pairs, got {n} pairs")
    out = np.empty((len(counts), folds))
    for f, test in enumerate(np.array_split(np.arange(n), folds)):
        train = np.setdiff1d(np.arange(n), test)
        order = train[np.argsort(scores[train], kind="stable")]
        s, y = scores[order], issame[order]
        threshold = _thresholds if np.all(s[1:] > s[:-1]) else _thresholds_with_ties
        for start in range(0, len(counts), block):
            w = counts[start:start + block]
            t = threshold(s, y, w[:, order].astype(np.int32))
            right = (scores[test][None, :] >= t[:, None]) == issame[test][None, :]
            test_w = w[:, test]
            out[start:start + block, f] = (test_w * right).sum(1) / test_w.sum(1)
    return out.mean(axis=1)


def _correct(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(R, m + 1): pairs right when the first k sorted training pairs are rejected and the rest accepted."""
    signed = np.where(y, -w, w)  # a rejected different pair is right, a rejected same pair wrong
    correct = np.empty((w.shape[0], w.shape[1] + 1), dtype=np.int32)
    correct[:, 0] = (w * y).sum(1)
    np.cumsum(signed, axis=1, out=correct[:, 1:])
    correct[:, 1:] += correct[:, :1]
    return correct


def _thresholds(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """best_threshold of each resample (counts ``w`` of the sorted training pairs), all scores distinct.

    ``correct`` is flat across pairs not drawn, so its first maximum sits just after a drawn pair p (or
    at 0): the resample's best cut lies between p and the next drawn pair q."""
    r, m = w.shape
    k = np.argmax(_correct(y, w), axis=1)
    drawn_after = (w > 0) & (np.arange(m)[None, :] >= k[:, None])
    q = np.where(drawn_after.any(1), np.argmax(drawn_after, axis=1), m)
    p = k - 1
    q_in, p_in = q.clip(max=m - 1), p.clip(0)
    return np.where(q == m, s[p_in] + 1e-6, np.where(p < 0, s[q_in] - 1e-6, (s[p_in] + s[q_in]) / 2))


def _thresholds_with_ties(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """As ``_thresholds`` where scores repeat: a cut just before a drawn pair is a candidate only when the
    drawn pair before it has a lower score (best_threshold's distinct-score rule)."""
    r, m = w.shape
    correct = _correct(y, w)
    drawn = w > 0
    last = np.maximum.accumulate(np.where(drawn, np.arange(m), -1), axis=1)  # last drawn pair at or before j
    before = np.concatenate([np.full((r, 1), -1), last[:, :-1]], axis=1)  # last drawn pair before j
    lower = np.where(before >= 0, s[before.clip(0)], -np.inf) < s
    valid = np.concatenate([drawn & lower, np.ones((r, 1), dtype=bool)], axis=1)
    k = np.argmax(np.where(valid, correct, -1), axis=1)  # the first best: ties go to the lowest threshold
    k_in = k.clip(max=m - 1)
    prev = before[np.arange(r), k_in]
    return np.where(k == m, s[last[:, -1]] + 1e-6,
                    np.where(prev < 0, s[k_in] - 1e-6, (s[prev.clip(0)] + s[k_in]) / 2))


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
