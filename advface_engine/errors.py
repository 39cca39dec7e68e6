"""What advface-engine refuses, as types another tool can catch.

Every refusal below is an ``AdvFaceError``, itself a ``ValueError``, so code that catches ValueError
keeps working; the message still names the file, rows or module and what to do.
"""

from __future__ import annotations


class AdvFaceError(ValueError):
    """Base of advface-engine's refusals."""


class BadFeaturesError(AdvFaceError):
    """Feature rows that cannot be protected (NaN or Inf, all zero), or an array that is no (B, D) float
    matrix. ``rows``: the indices of the bad rows, all of them (empty when the array as a whole is refused)."""

    def __init__(self, message: str, rows=()):
        super().__init__(message)
        self.rows = [int(i) for i in rows]


class ModelMismatchError(AdvFaceError):
    """The shadow decoder, the encoder and the features do not fit together: a feature dimension one of
    them does not take, an image size the encoder does not take, models on two devices."""


class UnsupportedModelError(AdvFaceError):
    """A backend cannot run this model (the fused backend names the module it cannot plan)."""


class IncompatibleCheckpointError(AdvFaceError):
    """A readable checkpoint that is not what was asked for: weights of another architecture, a decoder
    given as an encoder, a training checkpoint of another run."""


class RefusedFileError(AdvFaceError):
    """An input file refused before it is used: a pickle that would run code, a header that does not
    describe the file (truncated, corrupt, tensors that do not fit it), an image bomb."""


class FeatureNormWarning(UserWarning):
    """Features protected with ``normalize=True`` whose norm is far from 1: they come back unit-norm."""


__all__ = ["AdvFaceError", "BadFeaturesError", "FeatureNormWarning", "IncompatibleCheckpointError",
           "ModelMismatchError", "RefusedFileError", "UnsupportedModelError"]
