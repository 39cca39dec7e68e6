"""The principal directions of clean features, which the steps can be kept out of (``keep_out``).

Verification reads a stored feature through the directions along which clean features vary, and an
impostor probe projects onto them as much as a genuine one does: a protective change along them spreads
the impostor scores, and costs accuracy. Kept out of the top k of them, the steps cost less accuracy
at the same guard (docs/evaluation.md, "Keeping the steps out of the principal directions").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

BASIS_KEY = "basis"  # the tensor a basis file holds
ORTHONORMAL_TOLERANCE = 1e-3  # |B B^T - I| beyond this is not an orthonormal basis (float16 files round)
# k None (keep_out "auto"): the fewest principal directions holding this share of the variance, a count that
# follows the features' dimension and spectrum (chosen on 128- and 512-dim features: docs/evaluation.md)
AUTO_SHARE = 0.9


class Moments:
    """Running count, sum and sum of outer products (float64) of feature rows, added chunk by chunk: the
    principal directions of a gallery too large to hold, in one pass."""

    def __init__(self, dim: int):
        self.count, self.total = 0, torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self._eigen: tuple[Tensor, Tensor] | None = None  # of the rows added so far (``_spectrum``)

    def add(self, rows: Tensor | np.ndarray) -> None:
        rows = torch.as_tensor(rows).detach().to(device="cpu", dtype=torch.float64)
        if rows.ndim != 2 or rows.shape[1] != self.total.shape[0]:
            raise ValueError(f"features must be a (N, {self.total.shape[0]}) matrix, got shape {tuple(rows.shape)}")
        if not torch.isfinite(rows).all():
            raise ValueError("features hold NaN or Inf: principal directions need finite rows")
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer += rows.T @ rows
        self._eigen = None

    def directions(self, k: int | None = None) -> Tensor:
        """The top ``k`` principal directions of the rows added (None: as many as hold AUTO_SHARE of their
        variance, ``directions_for``): a float32 (k, D) tensor with orthonormal rows, the eigenvectors of
        their covariance with the largest eigenvalues, each signed so its largest coordinate is positive
        (the same rows give the same basis)."""
        k = self.directions_for(AUTO_SHARE) if k is None else k
        self._check(k)
        basis = self._spectrum()[1][:, :k].T
        top = basis.abs().argmax(dim=1, keepdim=True)
        return (basis * basis.gather(1, top).sign()).float().contiguous()

    def variance_share(self, k: int) -> float:
        """The share of the rows' variance that their top ``k`` principal directions hold."""
        self._check(k)
        values = self._spectrum()[0]
        return float(values[:k].sum() / values.sum()) if values.sum() > 0 else float("nan")

    def directions_for(self, share: float) -> int:
        """The fewest top principal directions that hold at least ``share`` of the rows' variance (at most
        D - 1): how many a basis needs, whatever the features' dimension."""
        if not 0 < share < 1:
            raise ValueError(f"share must be in (0, 1), got {share!r}")
        self._check(1)
        values = self._spectrum()[0]
        if not values.sum() > 0:
            raise ValueError("the rows do not vary: they have no principal directions")
        held = values.cumsum(0) / values.sum()
        return min(int((held < share).sum()) + 1, len(values) - 1)

    def _check(self, k: int) -> None:
        """Refuse a k outside [1, D - 1], or one the rows added so far cannot give."""
        dim = self.total.shape[0]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < dim:
            raise ValueError(f"k must be an integer in [1, {dim - 1}] (below the feature dim {dim}), got {k!r}")
        if self.count <= k:
            raise ValueError(f"{k} principal directions need more than {k} feature rows, got {self.count}")

    def _spectrum(self) -> tuple[Tensor, Tensor]:
        """The covariance's eigenvalues (clamped at 0) and eigenvectors (columns), largest first: one
        decomposition for directions, shares and counts until more rows are added."""
        if self._eigen is None:
            mean = self.total / self.count
            values, vectors = torch.linalg.eigh(self.outer / self.count - torch.outer(mean, mean))  # ascending
            self._eigen = values.flip(0).clamp_min(0), vectors.flip(1)
        return self._eigen


def principal_directions(features: Tensor | np.ndarray, k: int | None = None) -> Tensor:
    """The top ``k`` principal directions of ``features`` (N, D), None: as many as hold AUTO_SHARE of their
    variance (``Moments.directions`` of those rows)."""
    z = torch.as_tensor(features)
    if z.ndim != 2:
        raise ValueError(f"features must be a (N, D) matrix, got shape {tuple(z.shape)}")
    moments = Moments(z.shape[1])
    moments.add(z)
    return moments.directions(k)


def check_basis(basis: Tensor | np.ndarray) -> Tensor:
    """``basis`` as a (k, D) float tensor with orthonormal rows, k >= 1, or a ValueError saying what is wrong."""
    b = torch.as_tensor(basis).detach()
    if b.ndim != 2 or b.shape[0] < 1 or b.shape[0] >= b.shape[1]:
        raise ValueError(f"keep_out must be a (k, D) basis with 1 <= k < D, got shape {tuple(b.shape)}")
    if not b.is_floating_point() or not torch.isfinite(b).all():
        raise ValueError("keep_out must hold finite floating-point numbers")
    gram = b.double() @ b.double().T
    off = (gram - torch.eye(b.shape[0], dtype=torch.float64)).abs().max().item()
    if off > ORTHONORMAL_TOLERANCE:
        raise ValueError(f"keep_out's rows must be orthonormal (|B B^T - I| is {off:.3g}): make it with "
                         "principal_directions(features, k)")
    return b


def save_basis(path: str | os.PathLike, basis: Tensor) -> None:
    """Write a basis as a safetensors file (tensor "basis", float32), through a temporary file and a rename."""
    from safetensors.torch import save

    from .gallery.store import write_atomic

    write_atomic(Path(path), save({BASIS_KEY: check_basis(basis).float().contiguous().cpu()}))


def load_basis(path: str | os.PathLike) -> Tensor:
    """The basis a safetensors file holds (tensor "basis"), checked (``check_basis``); no code runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable basis file ({err})") from None
    if BASIS_KEY not in tensors:
        raise ValueError(f"{path}: holds no tensor {BASIS_KEY!r} (found {sorted(tensors)}); make one with "
                         "advface basis")
    try:
        return check_basis(tensors[BASIS_KEY])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def basis_checksum(basis: Tensor) -> str:
    """sha256 of the basis as float32 bytes: what a gallery job's fingerprint records of it."""
    from .gallery.store import sha256_of

    return sha256_of(basis.detach().float().cpu().numpy())


def variance_share(basis: Tensor, features: Tensor | np.ndarray) -> float:
    """The share of the centred features' variance along the basis's span: near k's share of the features'
    own principal directions when the basis was made from this encoder's features, far lower when not (a
    basis of another encoder keeps out directions these features hardly use, and protects as without it)."""
    z = torch.as_tensor(features).detach().to(device="cpu", dtype=torch.float64)
    centred = z - z.mean(0)
    total = centred.square().sum().item()
    return (centred @ basis.double().cpu().T).square().sum().item() / total if total > 0 else float("nan")
