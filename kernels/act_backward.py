"""Backward of a hidden activation, optionally after an eval-mode BatchNorm that could not be folded.

For a saved pre-activation a (B, C, ...) and the incoming gradient g:

    relu:                g * [a > 0]
    leaky_relu / prelu:  g * ([a > 0] + slope_c [a <= 0])   (slope per channel)

then, when ``scale`` is given (the BatchNorm in front of the activation, a = scale_c x + shift_c),
times scale_c, so the result is the gradient with respect to x.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, block_size, check_device, same_layout
from .variants import GPU, Launches, Variant, tensor, variant

ACTS = ("relu", "leaky_relu", "prelu")
ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "prelu": 2}  # the kernels' ACT: none, relu, a slope per channel
INT32_MAX = 2**31 - 1


@triton.jit
def act_grad(g, pre, slope, ACT: tl.constexpr):
    """g (fp32) through the activation's backward, for every kernel that runs one: g where pre > 0, else 0
    (ACT 1, relu) or g times the channel's slope (ACT 2, leaky_relu / prelu); ACT 0: no activation."""
    if ACT == 2:
        g = tl.where(pre > 0, g, g * slope)
    elif ACT == 1:
        g = tl.where(pre > 0, g, 0.0)
    return g


def check_act(act: str | None, slope: torch.Tensor | None, scale: torch.Tensor | None, channels: int,
              optional: bool = False) -> None:
    """The activation and its per-channel tensors as the kernels take them (``optional``: None allowed)."""
    if act not in ACTS and not (optional and act is None):
        raise ValueError(f"act must be one of {ACTS}{' or None' if optional else ''}, got {act!r}")
    if ACT_CODES[act] == 2 and (slope is None or slope.numel() != channels):
        got = None if slope is None else slope.numel()
        raise ValueError(f"{act} needs a slope per channel ({channels}), got {got}")
    if scale is not None and scale.numel() != channels:
        raise ValueError(f"scale must have one value per channel ({channels}), got {scale.numel()}")


@triton.jit
def _act_backward_kernel(g_ptr, pre_ptr, out_ptr, slope_ptr, scale_ptr, n, channels, inner,
                         ACT: tl.constexpr, HAS_SCALE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:  # 64-bit offsets only when needed: the channel's integer division is emulated in 64 bits
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    channel = (offs // inner) % channels
    slope = 0.0
    if ACT == 2:
        slope = tl.load(slope_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    g = act_grad(g, pre, slope, ACT)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


def act_backward(grad: torch.Tensor, pre: torch.Tensor, act: str = "relu", slope: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient through act (and the BatchNorm scale before it); channels are dim 1 of ``pre``, which
    may be contiguous or channels_last (the result is laid out like it).

    ``slope``: (C,) negative slopes for leaky_relu / prelu; ``scale``: (C,) or None; ``out`` may be
    ``grad``: then it is written in place where grad is already laid out like pre.
    """
    if grad.shape != pre.shape or pre.dim() < 2:
        raise ValueError(f"grad and pre must have one shape (B, C, ...), got {tuple(grad.shape)}, {tuple(pre.shape)}")
    channels = pre.shape[1]
    check_act(act, slope, scale, channels)
    if out is not None and out is not grad:
        raise ValueError("out may only be grad itself (an in-place backward)")
    check_device(grad, pre, *(t for t in (slope, scale) if t is not None))
    (pre, laid), nhwc = same_layout(pre, grad)  # pre's layout (it is saved once, grad comes every step)
    out = laid if out is not None and laid is grad else torch.empty_like(laid)  # in place unless grad was copied
    grad, n = laid, laid.numel()
    if n == 0:
        return out
    block = block_size(n, grad.device)
    code = ACT_CODES[act]
    _act_backward_kernel[(triton.cdiv(n, block),)](
        grad, pre, out, slope.contiguous() if code == 2 else pre, scale.contiguous() if scale is not None else pre,
        n, channels, 1 if nhwc else n // (pre.shape[0] * channels), ACT=code, HAS_SCALE=scale is not None,
        WIDE=n + block > INT32_MAX, BLOCK=block, **COMPILE_OPTIONS,
    )
    return out


def aot_variants(launches: Launches) -> list[Variant]:
    """The specialisations act_backward launches (aot.py): each dtype but tf32 (fp32's kernel), each
    activation with and without a BatchNorm scale, NCHW and NHWC (channel = offset % C)."""
    out = []
    for dname, dtype in launches.dtypes.items():
        if dname == "tf32":
            continue
        for (kind, has_scale), nhwc in itertools.product(launches.acts, (False, True)):
            n, channels, inner = 64 * 16 * 56 * 56, 64, 1 if nhwc else 56 * 56
            out.append(variant(f"act_backward {dname} {kind}{' +bn' if has_scale else ''}{' nhwc' if nhwc else ''}",
                               "act_backward", "_act_backward_kernel", [tensor(dtype)] * 5 + [n, channels, inner],
                               ACT=ACT_CODES[kind], HAS_SCALE=has_scale, WIDE=False, BLOCK=block_size(n, GPU)))
    return out
