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
FUSED_OPTIONS = ("dtype", "graphs", "split_k", "record_loss", "channels_last", "compile_encoder")  # its keywords
# decoder precision of the fused backend: tf32 is float32 with TF32 matmuls and convolutions
FUSED_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UnsupportedModelError(ValueError):
    """The fused backend cannot plan this decoder (names the module)."""


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def check_fused_options(options: dict) -> None:
    """Names and types of the fused backend's options, checked wherever they are given (on a CPU too,
    where "auto" does not build the fused backend: a mistake would surface only on a GPU)."""
    unknown = sorted(set(options) - set(FUSED_OPTIONS))
    if unknown:
        raise ValueError(f"unknown fused backend options {unknown}; known: {list(FUSED_OPTIONS)}")
    for flag in ("graphs", "record_loss", "compile_encoder"):
        if flag in options and not isinstance(options[flag], bool):
            raise TypeError(f"fused backend option {flag} must be True or False, got {options[flag]!r}")
    layout = options.get("channels_last")
    if layout is not None and not isinstance(layout, bool):  # None: chosen by the dtype
        raise TypeError(f"fused backend option channels_last must be True, False or None, got {layout!r}")
    if "dtype" in options and options["dtype"] not in FUSED_DTYPES:
        raise ValueError(f"fused backend dtype must be one of {sorted(FUSED_DTYPES)}, got {options['dtype']!r}")
    split_k = options.get("split_k")
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"fused backend option split_k must be None or an int >= 1, got {split_k!r}")


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
    check_fused_options(options)
    if name == "fused":
        from .fused import FusedBackend

        return FusedBackend(shadow, encoder, config, **options)
    if _device_of(shadow).type != "cuda":
        return ReferenceBackend(shadow, encoder, config)
    try:
        from .fused import FusedBackend

        return FusedBackend(shadow, encoder, config, **options)
    except (ImportError, UnsupportedModelError) as err:
        warnings.warn(f"fused backend unavailable ({err}); using the reference backend", stacklevel=3)
        return ReferenceBackend(shadow, encoder, config)
