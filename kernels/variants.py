"""What a kernel launcher declares of its own specialisations, for the ahead-of-time check (aot.py): each
launcher module has ``aot_variants(launches)`` next to its launcher, giving the variants it launches for
what the fused backend runs (``Launches``); the check only iterates them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GPU = torch.device("cuda")  # launch configurations are chosen as for this device type


@dataclass(frozen=True)
class Variant:
    """One kernel specialisation: stand-in arguments (dtype, shape) and launch keywords."""

    name: str
    module: str  # advface_engine.kernels.<module>
    kernel: str
    args: tuple  # ("tensor", dtype name, numel) or a Python scalar
    kwargs: tuple  # sorted (key, value) pairs: constexprs and num_warps


@dataclass(frozen=True)
class Launches:
    """What the fused backend launches kernels for: its dtypes (name: decoder dtype), the decoder heads,
    the (activation, BatchNorm scale?) pairs of the decoders' plans, the feature dims and the values per
    sample of the images."""

    dtypes: dict
    heads: list[str]
    acts: list[tuple[str, bool]]
    dims: tuple[int, ...] = (128, 512, 1024, 4096)
    per_sample: int = 3 * 112 * 112


def tensor(dtype: torch.dtype, numel: int = 16) -> tuple:
    """A stand-in tensor argument: its dtype and size (the check makes an empty one)."""
    return ("tensor", str(dtype).removeprefix("torch."), numel)


def variant(name: str, module: str, kernel: str, args: list, **kwargs) -> Variant:
    return Variant(name, module, kernel, tuple(args), tuple(sorted(kwargs.items())))
