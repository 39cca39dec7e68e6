"""Backends run the T-step loop. Each takes (shadow, encoder, config) and has ``run(z)``.

``reference`` is the specification; ``fused`` (Triton + CUDA graphs) must equal it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import ProtectConfig
from .reference import ReferenceBackend

BACKEND_NAMES = ("auto", "reference", "fused")
FUSED_OPTIONS = ("dtype", "graphs", "split_k", "record_loss", "channels_last")  # FusedBackend's keyword arguments


class UnsupportedModelError(ValueError):
    """The fused backend cannot plan this decoder (names the module)."""


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def make_backend(name: str, shadow: nn.Module, encoder: nn.Module, config: ProtectConfig, **options):
    """Build backend ``name``; "auto" picks fused on a CUDA device, else reference.

    ``options`` go to the fused backend (e.g. dtype="bf16", graphs=False); the reference takes none.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "reference":
        if options:
            raise ValueError(f"the reference backend takes no options, got {sorted(options)}")
        return ReferenceBackend(shadow, encoder, config)
    if name == "fused":
        from .fused import FusedBackend

        return FusedBackend(shadow, encoder, config, **options)
    unknown = sorted(set(options) - set(FUSED_OPTIONS))
    if unknown:  # checked here too, or a typo would surface only on the first GPU machine
        raise ValueError(f"unknown fused backend options {unknown}; known: {list(FUSED_OPTIONS)}")
    if _device_of(shadow).type != "cuda":
        return ReferenceBackend(shadow, encoder, config)
    try:
        from .fused import FusedBackend

        return FusedBackend(shadow, encoder, config, **options)
    except (ImportError, UnsupportedModelError) as err:
        warnings.warn(f"fused backend unavailable ({err}); using the reference backend", stacklevel=3)
        return ReferenceBackend(shadow, encoder, config)
