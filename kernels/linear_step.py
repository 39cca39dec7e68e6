"""The decoder's first Linear layer backward fused with the protection step.

For h = z W^T + b, the feature gradient is g = g_h W (B, N) @ (N, D). The matmul keeps whole
rows of g per program, so its epilogue applies ``step_project`` (sign, alpha step, projection,
last-step L2 normalisation) and writes only z (and, optionally, z in the decoder's dtype for the
next step): the gradient never goes to memory.

Rows wider than MAX_FUSED_DIM would not fit the accumulator in registers (it spills: see
aot.py), so those take a cuBLAS matmul and the standalone step kernel instead; with the utility
guard, whose epilogue holds two more row tiles, rows wider than MAX_GUARDED_DIM do.

Small batches leave most of the GPU idle, so the reduction over N is then split over
``split_k`` programs that write their partial sums to a float32 (split_k, B, D) buffer, and the
standalone step kernel (sign_step.py) adds them in a fixed order and finishes: no atomics, so
the result does not depend on which program finishes first (a resumed gallery job must
reproduce an interrupted one bit for bit).

When an activation follows the Linear (the decoders' stem: Linear, BatchNorm folded into it,
ReLU), g_h arrives as the gradient at the activation's output, and the kernel applies the
activation's backward to each tile of it as it loads it: one pass over g_h fewer per step.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, check_device
from .act_backward import ACT_CODES, act_backward, act_grad, check_act
from .sign_step import check_step_args, guard_args, load_guard, sign_step_project, step_project, store_z
from .variants import Launches, Variant, tensor, variant

MAX_FUSED_DIM = 1024
MAX_GUARDED_DIM = 512


@triton.jit
def _linear_step_kernel(gh_ptr, w_ptr, z_ptr, anchor_ptr, partial_ptr, low_ptr, pre_ptr, slope_ptr, scale_ptr,
                        hat_ptr, fallback_ptr, n_rows, k_dim, dim, k_chunk, channels, inner, alpha, eps, min_cos,
                        L2: tl.constexpr, BALL: tl.constexpr, NORMALIZE: tl.constexpr, SPLIT: tl.constexpr,
                        HAS_LOW: tl.constexpr, GUARD: tl.constexpr, ACT: tl.constexpr, HAS_SCALE: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < dim
    k_start = tl.program_id(1) * k_chunk
    k_end = tl.minimum(k_start + k_chunk, k_dim)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        a_offs = rows[:, None] * k_dim + ks[None, :]
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(gh_ptr + a_offs, mask=a_mask, other=0.0)
        if ACT > 0:  # the stem activation's backward on the gradient as it is loaded, as act_backward computes it
            pre = tl.load(pre_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
            channel = (ks // inner) % channels
            slope = 0.0
            if ACT == 2:
                slope = tl.load(slope_ptr + channel, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            g = act_grad(a.to(tl.float32), pre, slope, ACT)
            if HAS_SCALE:
                g = g * tl.load(scale_ptr + channel, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            a = g.to(gh_ptr.dtype.element_ty)
        b = tl.load(w_ptr + ks[:, None].to(tl.int64) * dim + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * dim + cols[None, :]
    if SPLIT:
        tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * n_rows * dim + offs, acc, mask=mask)
    else:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0)
        anchor = tl.load(anchor_ptr + offs, mask=mask, other=0.0)
        z_hat, fallback = load_guard(hat_ptr, fallback_ptr, offs, mask, GUARD)
        z = step_project(z, acc, anchor, alpha, eps, L2, BALL, NORMALIZE, z_hat, fallback, min_cos, GUARD)
        store_z(z_ptr, low_ptr, offs, z, mask, HAS_LOW)


def blocks(batch: int, dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_D, num_warps): whole rows of z per program, the accumulator in registers."""
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = 16 if (batch <= 16 or block_d > 256) else 32
    block_k = 32 if block_d <= 512 else 16
    return block_m, block_k, block_d, 8 if block_d >= 512 else 4


def pick_split_k(batch: int, k_dim: int, block_m: int, block_k: int, device: torch.device) -> int:
    """Enough programs to fill the GPU's SMs, each with at least 8 K-blocks of work; 1 on CPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs_m = triton.cdiv(batch, block_m)
    return max(1, min(sms // programs_m, triton.cdiv(k_dim, 8 * block_k)))


def _check_act(act: str | None, pre, slope, scale, grad_h: torch.Tensor, channels: int, inner: int) -> None:
    if act is None:
        if pre is not None or slope is not None or scale is not None:
            raise ValueError("pre, slope and scale belong to an activation: give act too")
        return
    if pre is None or pre.shape != grad_h.shape or pre.dtype != grad_h.dtype:
        raise ValueError(f"{act} needs its saved pre-activation with grad_h's shape {tuple(grad_h.shape)} and dtype")
    width = grad_h.shape[1]
    if channels < 1 or inner < 1 or (width % channels if inner == 1 else channels * inner != width):
        raise ValueError(f"channels x inner must be grad_h's width {width} (or, with inner 1, divide it), "
                         f"got {channels} x {inner}")
    check_act(act, slope, scale, channels)


def _as_image(flat: torch.Tensor, channels: int, inner: int) -> torch.Tensor:
    """(B, N) as (B, C, ...) with value k in channel (k // inner) % C: NHWC (B, C, P, 1) when inner is 1,
    else (B, C, inner); views both."""
    if inner == 1:
        return flat.view(flat.shape[0], -1, 1, channels).permute(0, 3, 1, 2)
    return flat.view(flat.shape[0], channels, inner)


def _flat(image: torch.Tensor, inner: int) -> torch.Tensor:
    """_as_image undone (act_backward lays its result out like its input)."""
    if inner == 1:
        return image.permute(0, 2, 3, 1).reshape(image.shape[0], -1)
    return image.reshape(image.shape[0], -1)


def linear_sign_step(grad_h: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, anchor: torch.Tensor,
                     alpha: float, eps: float, norm: str = "linf", constraint: str = "ball", normalize: bool = False,
                     split_k: int | None = None, tf32: bool = False, z_low: torch.Tensor | None = None,
                     act: str | None = None, pre: torch.Tensor | None = None, slope: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None, channels: int | None = None, inner: int = 1,
                     guard: tuple | None = None) -> torch.Tensor:
    """z (B, D) fp32 <- Proj(z + alpha * dir(grad_h @ weight)) in place; ``weight`` is the Linear's (N, D).
    ``z_low``: also gets the new z in its dtype; ``guard``: the utility guard after the projection (see
    sign_step_project).

    ``act`` (with ``pre`` (B, N), ``slope`` and ``scale`` per channel, as act_backward takes them):
    ``grad_h`` is the gradient at the output of the activation after the Linear, whose backward
    the kernel runs on each tile it loads (the same bits as act_backward, without its pass). Value k
    of a row belongs to channel (k // inner) % channels: inner 1 for an NHWC image (k % C) or a flat
    feature, H * W for an NCHW one (channels * inner is then the width)."""
    check_step_args(z, anchor, norm, constraint, z_low, guard)
    batch, dim = z.shape
    if grad_h.dim() != 2 or grad_h.shape[0] != batch or weight.shape != (grad_h.shape[1], dim):
        raise ValueError(f"need grad_h (B, N) and weight (N, D) for z {tuple(z.shape)}, "
                         f"got {tuple(grad_h.shape)} and {tuple(weight.shape)}")
    if grad_h.dtype != weight.dtype:
        raise ValueError(f"grad_h and weight must share a dtype, got {grad_h.dtype} and {weight.dtype}")
    channels = grad_h.shape[1] if channels is None else channels
    _check_act(act, pre, slope, scale, grad_h, channels, inner)
    check_device(grad_h, weight, z, anchor, z_low, pre, slope, scale, *(guard or (None, None))[:2])
    if z.numel() == 0:
        return z
    if dim > (MAX_FUSED_DIM if guard is None else MAX_GUARDED_DIM):  # the gradient through cuBLAS (act_backward first)
        if act is not None:
            image = _as_image(grad_h, channels, inner), _as_image(pre, channels, inner)
            grad_h = _flat(act_backward(*image, act, slope, scale), inner)
        return sign_step_project(z, grad_h.float() @ weight.float(), anchor, alpha, eps, norm, constraint, normalize,
                                 z_low, guard)
    grad_h, weight = grad_h.contiguous(), weight.contiguous()
    k_dim = grad_h.shape[1]
    block_m, block_k, block_d, num_warps = blocks(batch, dim)
    split = split_k or pick_split_k(batch, k_dim, block_m, block_k, z.device)
    k_chunk = triton.cdiv(triton.cdiv(k_dim, split), block_k) * block_k
    split = triton.cdiv(k_dim, k_chunk)
    partial = z.new_empty((split, batch, dim)) if split > 1 else z
    precision = "tf32" if (tf32 and weight.dtype == torch.float32) else "ieee"
    fused_low = z_low if split == 1 else None  # split: the finisher writes it
    has_slope = ACT_CODES[act] == 2
    hat, fallback, min_cos = guard_args(guard, z)
    _linear_step_kernel[(triton.cdiv(batch, block_m), split)](
        grad_h, weight, z, anchor, partial, z if fused_low is None else fused_low,
        grad_h if act is None else pre.contiguous(), slope.contiguous() if has_slope else grad_h,
        scale.contiguous() if scale is not None else grad_h, hat, fallback, batch, k_dim, dim, k_chunk, channels,
        inner, float(alpha), float(eps), min_cos, L2=norm == "l2", BALL=constraint == "ball",
        NORMALIZE=bool(normalize), SPLIT=split > 1, HAS_LOW=fused_low is not None, GUARD=guard is not None,
        ACT=ACT_CODES[act],
        HAS_SCALE=scale is not None and act is not None, PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_D=block_d, num_warps=num_warps, **COMPILE_OPTIONS,
    )
    if split > 1:
        sign_step_project(z, partial, anchor, alpha, eps, norm, constraint, normalize, z_low, guard)
    return z


def aot_variants(launches: Launches) -> list[Variant]:
    """The specialisations linear_sign_step launches (aot.py), for each dtype and feature dim it takes
    (wider rows: a matmul, then sign_step): the epilogues (norm, constraint, the last step's
    normalisation, split-K), the stem activation's backward and the guard."""
    out, f32 = [], torch.float32
    for dname, dtype in launches.dtypes.items():
        epilogues = [("linf", "ball", True, False), ("linf", "ball", False, False), ("linf", "ball", True, True)]
        if dname in ("fp32", "bf16"):
            epilogues += [("l2", "ball", True, False), ("linf", "per_step", True, False)]
        for dim in (d for d in launches.dims if d <= MAX_FUSED_DIM):
            for batch in (1024,) if dim != 128 else (1, 1024):  # block_m depends on the batch only at 128
                block_m, block_k, block_d, warps = blocks(batch, dim)
                # the stem activation's backward in the A-tile loads (relu; a slope per channel) at D=512
                stems = [None, "relu", "leaky_relu"] if dim == 512 else [None]
                # the guard (the default config's) on every variant it runs in, one without it at D=512; wider
                # guarded rows take the standalone step kernel
                guards = [g for g in ((True, False) if dim >= 512 else (True,)) if dim <= MAX_GUARDED_DIM or not g]
                for (norm, constraint, normalize, split), stem, guard in itertools.product(
                        epilogues if dim == 512 else epilogues[:1], stems, guards):
                    if (stem and (norm, constraint) != ("linf", "ball")) or (not guard and (stem or split)):
                        continue
                    out.append(variant(
                        f"linear_step {dname} D={dim} B={batch} {norm} {constraint}"
                        f"{' normalize' if normalize else ''}{' split-K' if split else ''}"
                        f"{f' {stem} in' if stem else ''}{'' if guard else ' unguarded'}",
                        "linear_step", "_linear_step_kernel",
                        [tensor(dtype), tensor(dtype), tensor(f32), tensor(f32), tensor(f32), tensor(dtype),
                         tensor(dtype), tensor(dtype), tensor(dtype), tensor(f32), tensor(f32), batch, 8 * dim, dim,
                         8 * dim, 64, 1, 0.01, 0.03, 0.8],
                        L2=norm == "l2", BALL=constraint == "ball", NORMALIZE=normalize, SPLIT=split,
                        # z_low in the decoder's dtype: written by unsplit steps but the last (it normalises)
                        HAS_LOW=dtype != f32 and not split and not normalize,
                        GUARD=guard, ACT={None: 0, "relu": 1}.get(stem, 2), HAS_SCALE=False,
                        PRECISION="tf32" if dname == "tf32" else "ieee", BLOCK_M=block_m, BLOCK_K=block_k,
                        BLOCK_D=block_d, num_warps=warps))
    return out
