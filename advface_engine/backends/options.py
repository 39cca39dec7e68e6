"""The fused backend's options, checked wherever they are given: by ``make_backend`` (on any device),
by the fused backend itself and by the kernels' ahead-of-time check (its dtypes)."""

from __future__ import annotations

import torch

FUSED_OPTIONS = ("dtype", "graphs", "split_k", "record_loss", "channels_last", "compile_encoder")  # its keywords
# decoder precision of the fused backend: tf32 is float32 with TF32 matmuls and convolutions
FUSED_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DTYPES = ("bf16", "fp16")  # where the encoder runs under autocast


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
