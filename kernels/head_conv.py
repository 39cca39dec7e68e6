"""The decoder's last convolution fused with its head and the L1 sign, and that convolution's
input gradient fused with the backward of the activation in front of it.

The decoder families end with Conv2d(C, 3, 3x3, padding 1) and a tanh. Three output channels
leave cuDNN's tensor-core tiles (8 channels and more) nearly empty, so that convolution and its
input gradient cost far more than their arithmetic (docs/benchmarks.md has the figure), and
around them the bias, the head and the sign made three more passes over the image. Here, per
block of pixels of one sample:

    forward (targets):  x~ = head(conv(a) + b)                  written in a's dtype
    forward (steps):    g  = sign(y - x~) * head'(y),  y = head(conv(a) + b) rounded like x~,
                        and optionally loss += sum |y - x~|     (y never goes to memory)
    backward:           g_a = act'(pre) * scale * conv^T(g)     (the gradient at the activation's input)

Both are implicit GEMMs over the kernel taps, the few output channels padded to 16 (the
smallest tl.dot tile): per tap, a (16, C) weight slice times a (C, pixels) block of ``a``.
Stride 1, no dilation, one group, "same" padding; ``a`` and the gradient in NCHW or NHWC.
The targets and the steps run the same arithmetic, so z_t == z gives exact ties (sign 0).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, check_device, is_nhwc, same_layout
from .act_backward import ACT_CODES, INT32_MAX, act_grad, check_act
from .l1_sign import HEADS, l1_sign
from .variants import GPU, Launches, Variant, tensor, variant

MAX_OUT_CHANNELS = 16  # one tl.dot tile
# one stage: the loop over channel blocks is short (one block at the families' 32 channels), and
# staging nine taps' tiles would ask for more shared memory than a GPU has in fp32
LAUNCH = dict(num_warps=4, num_stages=1, **COMPILE_OPTIONS)


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp alone (no libdevice, so it also runs under the interpreter): a series
    below |x| = 1/8, where 1 - exp(-2|x|) would cancel, else (1 - t) / (1 + t), t = exp(-2|x|)."""
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    large = (1.0 - t) / (1.0 + t)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    r = tl.where(ax < 0.125, small, large)
    return tl.where(x < 0, -r, r)


@triton.jit
def _pixels(n, height, width, WIDE: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's block of the n = B * H * W output pixels: sample, pixel in sample, mask, row, column.
    Offsets are 32-bit unless a tensor passes 2**31 elements (WIDE): 64-bit multiplies and divisions
    are emulated, and each of the nine taps computes a tile's addresses."""
    q = tl.program_id(0)
    if WIDE:
        q = q.to(tl.int64)
    q = q * BLOCK_P + tl.arange(0, BLOCK_P)
    pixels = height * width
    sample, p = q // pixels, q % pixels
    return sample, p, q < n, p // width, p % width


@triton.jit
def _head_conv_kernel(a_ptr, w_ptr, b_ptr, target_ptr, out_ptr, loss_ptr, n, channels, height, width, stride_c,
                      stride_p, COUT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HEAD: tl.constexpr,
                      GRAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOSS: tl.constexpr, PRECISION: tl.constexpr,
                      WIDE: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    sample, p, p_ok, h, w = _pixels(n, height, width, WIDE, BLOCK_P)
    pixels = height * width
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    a_base = sample * channels * pixels  # (BLOCK_P,) offsets: a block may span samples
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                hh, ww = h + (kh - KH // 2), w + (kw - KW // 2)
                inside = p_ok & (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)
                x = tl.load(a_ptr + a_base[None, :] + c[:, None] * stride_c + (hh * width + ww)[None, :] * stride_p,
                            mask=c_ok[:, None] & inside[None, :], other=0.0)
                wt = tl.load(w_ptr + ((co[:, None] * channels + c[None, :]) * KH + kh) * KW + kw,
                             mask=co_ok[:, None] & c_ok[None, :], other=0.0)
                acc = tl.dot(wt, x, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    if HEAD == 1:
        y = _tanh(acc)
    elif HEAD == 2:
        y = 1.0 / (1.0 + tl.exp(-acc))
    else:
        y = acc
    y = y.to(out_ptr.dtype.element_ty)
    offs = (sample * COUT * pixels + p)[None, :] + co[:, None] * pixels
    mask = co_ok[:, None] & p_ok[None, :]
    if GRAD:
        y = y.to(tl.float32)  # rounded as the targets were
        grad, diff = l1_sign(y, tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32), HEAD)
        tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_LOSS:  # one atomic for the block's first sample, one per pixel for any others (block edges)
            per_pixel = tl.sum(tl.where(mask, tl.abs(diff), 0.0), axis=0)
            first = tl.min(tl.where(p_ok, sample, n), axis=0)
            tl.atomic_add(loss_ptr + first, tl.sum(tl.where(sample == first, per_pixel, 0.0), axis=0))
            tl.atomic_add(loss_ptr + sample, per_pixel, mask=p_ok & (sample != first))
    else:
        tl.store(out_ptr + offs, y, mask=mask)


@triton.jit
def _head_conv_backward_kernel(g_ptr, w_ptr, pre_ptr, slope_ptr, scale_ptr, out_ptr, n, channels, height, width,
                               stride_c, stride_p, COUT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                               ACT: tl.constexpr, HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
                               BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    sample, p, p_ok, h, w = _pixels(n, height, width, WIDE, BLOCK_P)
    pixels = height * width
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    g_base = sample * COUT * pixels
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    # g_a[c, h, w] = sum over co and taps of g[co, h - kh + KH // 2, w - kw + KW // 2] * W[co, c, kh, kw]
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            hh, ww = h - (kh - KH // 2), w - (kw - KW // 2)
            inside = p_ok & (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)
            g = tl.load(g_ptr + (g_base + hh * width + ww)[None, :] + co[:, None] * pixels,
                        mask=co_ok[:, None] & inside[None, :], other=0.0)
            wt = tl.load(w_ptr + ((co[None, :] * channels + c[:, None]) * KH + kh) * KW + kw,
                         mask=c_ok[:, None] & co_ok[None, :], other=0.0)
            acc = tl.dot(wt, g, acc, input_precision=PRECISION)
    offs = (sample * channels * pixels + p * stride_p)[None, :] + c[:, None] * stride_c
    mask = c_ok[:, None] & p_ok[None, :]
    if ACT > 0:
        pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        slope = 0.0
        if ACT == 2:
            slope = tl.load(slope_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        acc = act_grad(acc, pre, slope, ACT)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def supported(weight_shape: tuple, stride, padding, dilation, groups: int) -> bool:
    """Whether a Conv2d of this form can take the fused head: few outputs, stride 1, "same" size."""
    return (_weight_fits(weight_shape) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1
            and tuple(padding) == (weight_shape[2] // 2, weight_shape[3] // 2))


def _weight_fits(weight_shape: tuple) -> bool:
    """At most MAX_OUT_CHANNELS outputs (one tl.dot tile) and an odd kernel (a centre tap)."""
    cout, _, kh, kw = weight_shape
    return cout <= MAX_OUT_CHANNELS and kh % 2 == 1 and kw % 2 == 1


def _check_weight(weight: torch.Tensor, like: torch.Tensor) -> None:
    if not _weight_fits(weight.shape):
        raise ValueError(f"weight {tuple(weight.shape)}: at most {MAX_OUT_CHANNELS} output channels and an odd kernel")
    if weight.dtype != like.dtype:
        raise ValueError(f"the input and weight must share a dtype, got {like.dtype} and {weight.dtype}")


def _blocks(channels: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): a GPU program holds one tile (fp32 tiles half as wide: all nine taps'
    loads in flight must fit the registers); the interpreter runs few, large programs."""
    block_c = min(64, max(16, triton.next_power_of_2(channels)))
    if device.type == "cuda":
        return block_c, 128 if dtype.itemsize <= 2 else 64
    return block_c, min(8192, max(16, triton.next_power_of_2(n)))


def _wide(block: int, *tensors: torch.Tensor) -> bool:
    """Whether an offset into these tensors (or a pixel index one block past the end) can pass int32."""
    return max(t.numel() for t in tensors) + block * MAX_OUT_CHANNELS > INT32_MAX


def _check(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if a.dim() != 4 or weight.dim() != 4 or weight.shape[1] != a.shape[1]:
        raise ValueError(f"need a (B, C, H, W) and weight (Cout, C, kh, kw), got {tuple(a.shape)} and "
                         f"{tuple(weight.shape)}")
    _check_weight(weight, a)
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have one value per output channel ({weight.shape[0]}), got {tuple(bias.shape)}")


def head_conv(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: str = "tanh",
              target: torch.Tensor | None = None, loss: torch.Tensor | None = None, tf32: bool = False) -> torch.Tensor:
    """Without ``target``: y = head(conv(a, weight, padding k//2) + bias). With it: the L1 sign
    gradient at the convolution's output, g = sign(y - target) * head'(y), and ``loss`` (B,) fp32,
    if given, gets += sum |y - target|. (B, Cout, H, W), contiguous, in a's dtype."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    _check(a, weight, bias)
    batch, channels, height, width = a.shape
    shape = (batch, weight.shape[0], height, width)
    if target is not None and target.shape != shape:
        raise ValueError(f"target must have the output's shape {shape}, got {tuple(target.shape)}")
    if loss is not None and (loss.shape != (batch,) or loss.dtype != torch.float32):
        raise ValueError(f"loss must be a float32 tensor of shape ({batch},), got {loss.dtype} {tuple(loss.shape)}")
    check_device(*(t for t in (a, weight, bias, target, loss) if t is not None))
    (a,), nhwc = same_layout(a)
    out = a.new_empty(shape)
    if out.numel() == 0:
        return out
    weight = weight.contiguous()
    target = None if target is None else target.contiguous()
    n = batch * height * width
    block_c, block_p = _blocks(channels, n, a.dtype, a.device)
    _head_conv_kernel[(triton.cdiv(n, block_p),)](
        a, weight, bias if bias is not None else weight, target if target is not None else out,
        out, loss if loss is not None else out, n, channels, height, width,
        1 if nhwc else height * width, channels if nhwc else 1,
        COUT=weight.shape[0], KH=weight.shape[2], KW=weight.shape[3], HEAD=HEADS[head], GRAD=target is not None,
        HAS_BIAS=bias is not None, HAS_LOSS=loss is not None, PRECISION=_precision(a, tf32),
        WIDE=_wide(block_p, a, out), BLOCK_CO=MAX_OUT_CHANNELS, BLOCK_C=block_c, BLOCK_P=block_p, **LAUNCH,
    )
    return out


def head_conv_backward(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor | None = None,
                       act: str | None = None, slope: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                       tf32: bool = False) -> torch.Tensor:
    """The gradient at the input of the activation in front of the convolution: conv^T(grad),
    times act'(pre) (relu; leaky_relu / prelu with ``slope`` per channel) and ``scale`` per channel
    (an unfolded BatchNorm before the activation). Laid out like ``pre`` (or contiguous)."""
    if grad.dim() != 4 or weight.dim() != 4 or grad.shape[1] != weight.shape[0]:
        raise ValueError(f"need grad (B, Cout, H, W) and weight (Cout, C, kh, kw), got {tuple(grad.shape)} and "
                         f"{tuple(weight.shape)}")
    batch, _, height, width = grad.shape
    channels = weight.shape[1]
    shape = (batch, channels, height, width)
    check_act(act, slope, scale, channels, optional=True)
    if act is not None and (pre is None or pre.shape != shape):
        raise ValueError(f"{act} needs the saved pre-activation of shape {shape}")
    _check_weight(weight, grad)
    check_device(*(t for t in (grad, weight, pre, slope, scale) if t is not None))
    nhwc = pre is not None and is_nhwc(pre)
    out = torch.empty(shape, dtype=grad.dtype, device=grad.device,
                      memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    if out.numel() == 0:
        return out
    if pre is not None:
        (pre,), _ = same_layout(pre)
    n = batch * height * width
    block_c, block_p = _blocks(channels, n, grad.dtype, grad.device)
    _head_conv_backward_kernel[(triton.cdiv(n, block_p), triton.cdiv(channels, block_c))](
        grad.contiguous(), weight.contiguous(), pre if pre is not None else out,
        slope.contiguous() if ACT_CODES[act] == 2 else out, scale.contiguous() if scale is not None else out, out,
        n, channels, height, width, 1 if nhwc else height * width, channels if nhwc else 1,
        COUT=weight.shape[0], KH=weight.shape[2], KW=weight.shape[3], ACT=ACT_CODES[act], HAS_SCALE=scale is not None,
        PRECISION=_precision(grad, tf32), WIDE=_wide(block_p, out, grad), BLOCK_CO=MAX_OUT_CHANNELS, BLOCK_C=block_c,
        BLOCK_P=block_p, **LAUNCH,
    )
    return out


def _precision(t: torch.Tensor, tf32: bool) -> str:
    return "tf32" if (tf32 and t.dtype == torch.float32) else "ieee"


IMAGE = 64, 32, 112  # the stand-in images of the checks: batch, channels, side (the families' RGB layer)


def aot_variants(launches: Launches) -> list[Variant]:
    """The specialisations head_conv and head_conv_backward launch (aot.py), for the families' RGB layer
    (3 outputs, 3x3, from 32 channels at 112 px): the forward for the targets and the steps (with the
    loss or not) with each head, the backward with each activation; each dtype and layout."""
    out, f32 = [], torch.float32
    batch, channels, side = IMAGE
    n = batch * side * side
    for (dname, dtype), nhwc in itertools.product(launches.dtypes.items(), (False, True)):
        block_c, block_p = _blocks(channels, n, dtype, GPU)
        sizes = dict(BLOCK_CO=MAX_OUT_CHANNELS, BLOCK_C=block_c, BLOCK_P=block_p, WIDE=False,
                     num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"])
        strides = [1, channels] if nhwc else [side * side, 1]
        layout, precision = " nhwc" if nhwc else "", "tf32" if dname == "tf32" else "ieee"
        for head, (grad, loss) in itertools.product(launches.heads, ((False, False), (True, False), (True, True))):
            what = ("step" + (" +loss" if loss else "")) if grad else "targets"
            args = [tensor(dtype)] * 5 + [tensor(f32) if loss else tensor(dtype), n, channels, side, side, *strides]
            out.append(variant(f"head_conv {dname} {head}{layout} {what}", "head_conv", "_head_conv_kernel", args,
                               COUT=3, KH=3, KW=3, HEAD=HEADS[head], GRAD=grad, HAS_BIAS=True, HAS_LOSS=loss,
                               PRECISION=precision, **sizes))
        for kind, has_scale in launches.acts:
            args = [tensor(dtype)] * 6 + [n, channels, side, side, *strides]
            out.append(variant(f"head_conv_backward {dname} {kind}{' +bn' if has_scale else ''}{layout}", "head_conv",
                               "_head_conv_backward_kernel", args, COUT=3, KH=3, KW=3, ACT=ACT_CODES[kind],
                               HAS_SCALE=has_scale, PRECISION=precision, **sizes))
    return out
