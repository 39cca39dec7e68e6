"""One protection step on whole feature rows (Eq. 2, 5 and the project's constraint):

    z <- Proj(z + alpha * dir(g)),   dir = sign(g) (linf) or g / ||g||_2 (l2)
    Proj: onto the eps-ball around the anchor ("ball") or around z itself ("per_step")
    and, on the last step when features are unit-norm, z <- z / ||z||_2.

``step_project`` is the shared epilogue (also used by the Linear-gradient matmul in
linear_step.py); ``sign_step_project`` is the standalone kernel for decoders whose first
layer is not Linear. z is updated in place; everything is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, check_device


@triton.jit
def step_project(z, g, anchor, alpha, eps, L2: tl.constexpr, BALL: tl.constexpr, NORMALIZE: tl.constexpr):
    """The step on fp32 (rows, BLOCK_D) tiles that hold whole rows (masked entries are 0)."""
    if L2:
        g_norm = tl.sqrt_rn(tl.sum(g * g, axis=1))
        direction = tl.div_rn(g, tl.maximum(g_norm, 1e-12)[:, None])
    else:
        direction = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    if BALL:
        center = anchor
    else:
        center = z
    delta = (z + alpha * direction) - center
    if L2:
        d_norm = tl.sqrt_rn(tl.sum(delta * delta, axis=1))
        delta = delta * tl.minimum(tl.div_rn(eps + tl.zeros_like(d_norm), tl.maximum(d_norm, 1e-12)), 1.0)[:, None]
    else:
        delta = tl.minimum(tl.maximum(delta, -eps), eps)
    z = center + delta
    if NORMALIZE:
        z_norm = tl.sqrt_rn(tl.sum(z * z, axis=1))
        z = tl.div_rn(z, tl.maximum(z_norm, 1e-12)[:, None])
    return z


@triton.jit
def _part_offsets(part, n_rows, rows, cols, dim):
    """Offsets of rows' partial sums number ``part`` in the (P, B, D) buffer (rows is int64: no overflow)."""
    return (part * n_rows + rows)[:, None] * dim + cols[None, :]


@triton.jit
def store_z(z_ptr, low_ptr, offs, z, mask, HAS_LOW: tl.constexpr):
    """z (fp32) back in place and, if asked, its copy in the decoder's dtype (the next step's input)."""
    tl.store(z_ptr + offs, z, mask=mask)
    if HAS_LOW:
        tl.store(low_ptr + offs, z.to(low_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sign_step_kernel(z_ptr, g_ptr, anchor_ptr, low_ptr, n_rows, dim, n_parts, alpha, eps, L2: tl.constexpr,
                      BALL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_LOW: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    offs = rows[:, None] * dim + cols[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for first in range(1, n_parts, 4):  # split-K partial sums added in a fixed order, four loads in flight
        index = first + 0 * cols[None, :]  # a tensor, for the masks below
        g0 = tl.load(g_ptr + _part_offsets(first, n_rows, rows, cols, dim), mask=mask, other=0.0)
        g1 = tl.load(g_ptr + _part_offsets(first + 1, n_rows, rows, cols, dim), mask=mask & (index + 1 < n_parts),
                     other=0.0)
        g2 = tl.load(g_ptr + _part_offsets(first + 2, n_rows, rows, cols, dim), mask=mask & (index + 2 < n_parts),
                     other=0.0)
        g3 = tl.load(g_ptr + _part_offsets(first + 3, n_rows, rows, cols, dim), mask=mask & (index + 3 < n_parts),
                     other=0.0)
        g = (((g + g0.to(tl.float32)) + g1.to(tl.float32)) + g2.to(tl.float32)) + g3.to(tl.float32)
    anchor = tl.load(anchor_ptr + offs, mask=mask, other=0.0)
    z = step_project(z, g, anchor, alpha, eps, L2, BALL, NORMALIZE)
    store_z(z_ptr, low_ptr, offs, z, mask, HAS_LOW)


def check_step_args(z: torch.Tensor, anchor: torch.Tensor, norm: str, constraint: str,
                    z_low: torch.Tensor | None = None) -> None:
    if norm not in ("linf", "l2") or constraint not in ("ball", "per_step"):
        raise ValueError(f"norm must be linf/l2 and constraint ball/per_step, got {norm!r}, {constraint!r}")
    if z.dtype != torch.float32 or anchor.dtype != torch.float32:
        raise ValueError(f"z and anchor must be float32, got {z.dtype} and {anchor.dtype}")
    if z.dim() != 2 or anchor.shape != z.shape or not z.is_contiguous() or not anchor.is_contiguous():
        raise ValueError(f"z and anchor must be contiguous (B, D) tensors, got {tuple(z.shape)}, {tuple(anchor.shape)}")
    if z_low is not None and (z_low.shape != z.shape or not z_low.is_contiguous() or not z_low.is_floating_point()):
        raise ValueError(f"z_low must be a contiguous floating tensor of z's shape {tuple(z.shape)}, "
                         f"got {tuple(z_low.shape)} {z_low.dtype}")


def blocks(dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): whole rows per program; about 4096 values per program on a GPU."""
    block_d = max(16, triton.next_power_of_2(dim))
    return (max(1, min(16, 4096 // block_d)) if device.type == "cuda" else 64), block_d


def sign_step_project(z: torch.Tensor, grad: torch.Tensor, anchor: torch.Tensor, alpha: float, eps: float,
                      norm: str = "linf", constraint: str = "ball", normalize: bool = False,
                      z_low: torch.Tensor | None = None) -> torch.Tensor:
    """z (B, D) fp32 <- Proj(z + alpha * dir(grad)) in place, then unit-norm rows if ``normalize``; returns z.

    ``grad`` is (B, D), or (P, B, D) partial sums whose total is the gradient (added in order 0..P-1).
    ``z_low``: also gets the new z, cast to its dtype (the decoder's input at the next step: no cast
    kernel of its own).
    """
    check_step_args(z, anchor, norm, constraint, z_low)
    if grad.shape != z.shape and (grad.dim() != 3 or grad.shape[1:] != z.shape or grad.shape[0] < 1):
        raise ValueError(f"grad must have z's shape {tuple(z.shape)} or (P, *that), got {tuple(grad.shape)}")
    check_device(z, grad, anchor, z_low)
    if z.numel() == 0:
        return z
    block_m, block_d = blocks(z.shape[1], z.device)
    _sign_step_kernel[(triton.cdiv(z.shape[0], block_m),)](
        z, grad.contiguous(), anchor, z if z_low is None else z_low, z.shape[0], z.shape[1], grad.numel() // z.numel(),
        float(alpha), float(eps), L2=norm == "l2", BALL=constraint == "ball", NORMALIZE=bool(normalize),
        HAS_LOW=z_low is not None, BLOCK_M=block_m, BLOCK_D=block_d, **COMPILE_OPTIONS,
    )
    return z
