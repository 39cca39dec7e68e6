"""The input policy, in one place: which feature rows are protected, and what is said about the others.

A row is bad when it has NaN or Inf, or is all zero. A zero row has no direction (a placeholder, e.g. a
failed enrolment): protected, every such row would become the same unit vector and match the others,
and probes, where before it matched nothing. ``protect``/``Protector`` refuse bad rows
(``BadFeaturesError`` naming them); the gallery job applies its ``on_bad_rows`` policy to the same rows.
Rows whose norm is far from 1 under ``normalize=True`` are protected, with a warning: they come back
unit-norm.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch
from torch import Tensor

from .errors import BadFeaturesError, FeatureNormWarning

BAD_ROWS = "NaN, Inf or all zero"  # the rule in words (the gallery job's fingerprint holds it)
NORM_TOLERANCE = 0.01  # | ||z|| - 1 | beyond this is "far from 1": well above a unit row's rounding in float16


def bad_row_mask(rows: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """True for the bad rows of a (B, D) tensor or array, in its own library (a tensor stays on its device)."""
    if isinstance(rows, Tensor):
        return ~torch.isfinite(rows).all(dim=1) | ~rows.any(dim=1)
    return ~np.isfinite(rows).all(axis=1) | ~rows.any(axis=1)


def bad_rows_of(rows: np.ndarray) -> np.ndarray:
    """Indices of the bad rows of a (B, D) array."""
    return np.flatnonzero(bad_row_mask(rows))


def as_tensor(z: Tensor | np.ndarray) -> Tensor:
    """z as a tensor: a NumPy array (float16, float32 or float64, C- or F-ordered, any byte order) is
    copied into a C-ordered CPU tensor of its dtype; a tensor is returned as it is."""
    if not isinstance(z, np.ndarray):
        return z
    if z.dtype.kind != "f" or z.dtype.itemsize not in (2, 4, 8):
        raise BadFeaturesError(f"z must be a float16, float32 or float64 array, got {z.dtype}")
    return torch.from_numpy(np.array(z, dtype=z.dtype.newbyteorder("="), order="C"))


def _named(rows: list[int]) -> str:
    return f"{rows[:10]}" + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


def check_features(z: Tensor, normalize: bool = False) -> int:
    """Refuse z unless it is a (B, D) floating tensor without bad rows (``BadFeaturesError`` naming them);
    with ``normalize``, the number of rows whose norm is far from 1 (``NORM_TOLERANCE``), else 0. One host
    sync when all is well."""
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor or a NumPy array, got {type(z).__name__}")
    if z.dim() != 2:
        raise BadFeaturesError(f"z must have shape (B, D), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise BadFeaturesError(f"z must be a floating tensor, got {z.dtype}")
    bad = bad_row_mask(z)
    far = torch.zeros_like(bad)
    if normalize:
        norm = torch.linalg.vector_norm(z, dim=1, dtype=torch.promote_types(z.dtype, torch.float32))
        far = (norm - 1).abs() > NORM_TOLERANCE
    num_bad, num_far = torch.stack((bad.sum(), far.sum())).tolist()
    if num_bad:
        nonfinite = (~torch.isfinite(z)).any(dim=1)
        rows = bad.nonzero().flatten().tolist()
        for name, which in (("NaN or Inf in", nonfinite), ("all-zero", bad & ~nonfinite)):
            named = which.nonzero().flatten().tolist()
            if named:
                raise BadFeaturesError(f"z has {name} rows {_named(named)} (rows with NaN, Inf or all zero "
                                       "cannot be protected)", rows)
    return num_far


def warn_far_from_unit(count: int, rows: int) -> None:
    """The warning for ``count`` of ``rows`` rows whose norm is far from 1 under ``normalize=True``, at the
    caller's line (the first frame outside this package)."""
    package, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{count} of {rows} feature rows have a norm far from 1 (by more than {NORM_TOLERANCE}); "
                  "with normalize=True their protected rows come back unit-norm. Normalise the features first "
                  "(the ArcFace convention), or protect them with ProtectConfig(normalize=False)",
                  FeatureNormWarning, stacklevel=level)
