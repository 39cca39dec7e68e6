"""A hidden activation's forward with the affine map in front of it, in one pass:

    a = act(scale_c * x + shift_c)      (scale: an unfolded BatchNorm; shift: its shift, or the bias
                                         of the convolution before, which then skips its own bias pass)

The backward needs where a > 0 was decided. With non-negative slopes (ReLU, LeakyReLU(0.2),
PReLU with slopes >= 0) a > 0 exactly when the pre-activation is, so ``a`` itself is saved and
the pass writes in place; otherwise the pre-activation is written as well.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, block_size, check_device, same_layout
from .act_backward import ACTS, INT32_MAX
from .variants import GPU, Launches, Variant, tensor, variant


@triton.jit
def _bias_act_kernel(x_ptr, out_ptr, pre_ptr, slope_ptr, scale_ptr, shift_ptr, n, channels, inner,
                     HAS_SLOPE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SAVE_PRE: tl.constexpr,
                     WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    channel = (offs // inner) % channels
    if HAS_SCALE:
        x = x * tl.load(scale_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x = x + tl.load(shift_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    if SAVE_PRE:
        tl.store(pre_ptr + offs, x.to(pre_ptr.dtype.element_ty), mask=mask)
    if HAS_SLOPE:
        a = tl.where(x > 0, x, x * tl.load(slope_ptr + channel, mask=mask, other=0.0).to(tl.float32))
    else:
        a = tl.where(x > 0, x, 0.0)
    tl.store(out_ptr + offs, a.to(out_ptr.dtype.element_ty), mask=mask)


def bias_act(x: torch.Tensor, act: str = "relu", slope: torch.Tensor | None = None, scale: torch.Tensor | None = None,
             shift: torch.Tensor | None = None, inplace: bool = False,
             save_pre: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, pre): a = act(scale * x + shift) per channel (dim 1; contiguous or channels_last, kept),
    pre the pre-activation if ``save_pre`` else None. ``inplace`` writes a over x."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (B, C, ...), got {tuple(x.shape)}")
    channels = x.shape[1]
    if act != "relu" and (slope is None or slope.numel() != channels):
        got = None if slope is None else slope.numel()
        raise ValueError(f"{act} needs a slope per channel ({channels}), got {got}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and t.numel() != channels:
            raise ValueError(f"{name} must have one value per channel ({channels}), got {t.numel()}")
    check_device(x, *(t for t in (slope, scale, shift) if t is not None))
    (laid,), nhwc = same_layout(x)
    out = laid if inplace and laid is x else torch.empty_like(laid)
    pre = torch.empty_like(laid) if save_pre else None
    n = laid.numel()
    if n == 0:
        return out, pre
    block = block_size(n, x.device)
    _bias_act_kernel[(triton.cdiv(n, block),)](
        laid, out, pre if pre is not None else out, slope.contiguous() if act != "relu" else laid,
        scale.contiguous() if scale is not None else laid, shift.contiguous() if shift is not None else laid,
        n, channels, 1 if nhwc else n // (x.shape[0] * channels), HAS_SLOPE=act != "relu",
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SAVE_PRE=save_pre, WIDE=n + block > INT32_MAX,
        BLOCK=block, **COMPILE_OPTIONS,
    )
    return out, pre


def aot_variants(launches: Launches) -> list[Variant]:
    """The specialisations bias_act launches (aot.py): each dtype but tf32 (fp32's kernel) and layout,
    each activation with and without a BatchNorm scale and a shift, and PReLU saving its input too
    (slopes < 0)."""
    out, elements = [], 64 * 16 * 56 * 56
    for (dname, dtype), nhwc in itertools.product(launches.dtypes.items(), (False, True)):
        if dname == "tf32":
            continue
        for (kind, has_scale), has_shift in itertools.product(launches.acts, (False, True)):
            for save_pre in (False, True) if kind == "prelu" else (False,):
                out.append(variant(
                    f"bias_act {dname} {kind}{' +bn' if has_scale else ''}{' +shift' if has_shift else ''}"
                    f"{' +pre' if save_pre else ''}{' nhwc' if nhwc else ''}", "bias_act", "_bias_act_kernel",
                    [tensor(dtype)] * 6 + [elements, 64, 1 if nhwc else 56 * 56],
                    HAS_SLOPE=kind != "relu", HAS_SCALE=has_scale, HAS_SHIFT=has_shift, SAVE_PRE=save_pre,
                    WIDE=False, BLOCK=block_size(elements, GPU)))
    return out
