"""One protection step on whole feature rows (Eq. 2, 5 and the project's constraint):

    z <- Proj(z + alpha * dir(g)),   dir = sign(g) (linf) or g / ||g||_2 (l2)
    Proj: onto the eps-ball around the anchor ("ball") or around z itself ("per_step")
    then, with the utility guard, z <- Cap(z): rows with cos(z, z_orig) < min_cos rotated toward z_orig
    onto that cosine, their norm kept (backends/reference.py: guard);
    and, on the last step when features are unit-norm, z <- z / ||z||_2.

``step_project`` is the shared epilogue (also used by the Linear-gradient matmul in
linear_step.py); ``sign_step_project`` is the standalone kernel for decoders whose first
layer is not Linear. z is updated in place; everything is fp32.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, check_device
from .variants import GPU, Launches, Variant, tensor, variant


@triton.jit
def guard_cap(z, z_hat, fallback, min_cos):
    """The utility guard on fp32 (rows, BLOCK_D) tiles of whole rows, as reference.guard computes it:
    z_hat is the unit original feature, fallback the unit direction orthogonal to it (guard_frame)."""
    along = tl.sum(z * z_hat, axis=1)
    norm = tl.sqrt_rn(tl.sum(z * z, axis=1))
    outside = (along < min_cos * norm) | (norm == 0)
    radius = tl.where(norm > 0, norm, 1.0)
    across = z - along[:, None] * z_hat
    across = across - tl.sum(across * z_hat, axis=1)[:, None] * z_hat  # twice: exact even when z is near -z_hat
    across_norm = tl.sqrt_rn(tl.sum(across * across, axis=1))
    bent = across_norm > 1e-6 * radius
    turn = tl.where(bent[:, None], tl.div_rn(across, tl.maximum(across_norm, 1e-30)[:, None]), fallback)
    edge = radius[:, None] * (min_cos * z_hat + tl.sqrt_rn(1.0 - min_cos * min_cos) * turn)
    return tl.where(outside[:, None], edge, z)


@triton.jit
def step_project(z, g, anchor, alpha, eps, L2: tl.constexpr, BALL: tl.constexpr, NORMALIZE: tl.constexpr,
                 z_hat, fallback, min_cos, GUARD: tl.constexpr):
    """The step on fp32 (rows, BLOCK_D) tiles that hold whole rows (masked entries are 0), then the
    guard (GUARD: z_hat and fallback tiles, min_cos) and the last step's normalisation."""
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
    if GUARD:
        z = guard_cap(z, z_hat, fallback, min_cos)
    if NORMALIZE:
        z_norm = tl.sqrt_rn(tl.sum(z * z, axis=1))
        z = tl.div_rn(z, tl.maximum(z_norm, 1e-12)[:, None])
    return z


@triton.jit
def store_z(z_ptr, low_ptr, offs, z, mask, HAS_LOW: tl.constexpr):
    """z (fp32) back in place and, if asked, its copy in the decoder's dtype (the next step's input)."""
    tl.store(z_ptr + offs, z, mask=mask)
    if HAS_LOW:
        tl.store(low_ptr + offs, z.to(low_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_guard(hat_ptr, fallback_ptr, offs, mask, GUARD: tl.constexpr):
    """The guard's z_hat and fallback tiles (zeros, unread, without the guard)."""
    if GUARD:
        z_hat = tl.load(hat_ptr + offs, mask=mask, other=0.0)
        fallback = tl.load(fallback_ptr + offs, mask=mask, other=0.0)
    else:
        z_hat = tl.zeros(offs.shape, dtype=tl.float32)
        fallback = z_hat
    return z_hat, fallback


@triton.jit
def _sign_step_kernel(z_ptr, g_ptr, anchor_ptr, low_ptr, hat_ptr, fallback_ptr, n_rows, dim, n_parts, alpha, eps,
                      min_cos, L2: tl.constexpr, BALL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_LOW: tl.constexpr,
                      GUARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    offs = rows[:, None] * dim + cols[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # split-K partial sums 1..P-1, BLOCK_P at a time (their loads in flight together), in a fixed order:
    # each group's tree sum, added to g group by group
    parts = tl.arange(0, BLOCK_P).to(tl.int64)[:, None, None]
    for first in range(1, n_parts, BLOCK_P):
        part_mask = (first + parts < n_parts) & mask[None, :, :]
        tile = tl.load(g_ptr + (first + parts) * n_rows * dim + offs[None, :, :], mask=part_mask, other=0.0)
        g = g + tl.sum(tile.to(tl.float32), axis=0)
    anchor = tl.load(anchor_ptr + offs, mask=mask, other=0.0)
    z_hat, fallback = load_guard(hat_ptr, fallback_ptr, offs, mask, GUARD)
    z = step_project(z, g, anchor, alpha, eps, L2, BALL, NORMALIZE, z_hat, fallback, min_cos, GUARD)
    store_z(z_ptr, low_ptr, offs, z, mask, HAS_LOW)


def check_step_args(z: torch.Tensor, anchor: torch.Tensor, norm: str, constraint: str,
                    z_low: torch.Tensor | None = None, guard: tuple | None = None) -> None:
    if norm not in ("linf", "l2") or constraint not in ("ball", "per_step"):
        raise ValueError(f"norm must be linf/l2 and constraint ball/per_step, got {norm!r}, {constraint!r}")
    if z.dtype != torch.float32 or anchor.dtype != torch.float32:
        raise ValueError(f"z and anchor must be float32, got {z.dtype} and {anchor.dtype}")
    if z.dim() != 2 or anchor.shape != z.shape or not z.is_contiguous() or not anchor.is_contiguous():
        raise ValueError(f"z and anchor must be contiguous (B, D) tensors, got {tuple(z.shape)}, {tuple(anchor.shape)}")
    if z_low is not None and (z_low.shape != z.shape or not z_low.is_contiguous() or not z_low.is_floating_point()):
        raise ValueError(f"z_low must be a contiguous floating tensor of z's shape {tuple(z.shape)}, "
                         f"got {tuple(z_low.shape)} {z_low.dtype}")
    if guard is not None:
        if len(guard) != 3 or not all(isinstance(t, torch.Tensor) and t.shape == z.shape and t.is_contiguous()
                                      and t.dtype == torch.float32 for t in guard[:2]):
            raise ValueError(f"guard must be (z_hat, fallback, min_cosine), contiguous float32 tensors of z's "
                             f"shape {tuple(z.shape)} and a number")
        if not -1 < float(guard[2]) < 1:
            raise ValueError(f"the guard's min_cosine must be in (-1, 1), got {guard[2]}")


def guard_args(guard: tuple | None, z: torch.Tensor) -> tuple:
    """(hat_ptr, fallback_ptr, min_cos) kernel arguments: z twice (unread) and 0 without the guard."""
    return (z, z, 0.0) if guard is None else (guard[0], guard[1], float(guard[2]))


def blocks(dim: int, device: torch.device, batch: int | None = None,
           parts: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_P, BLOCK_D, num_warps): whole rows per program, about 4096 values per program on
    a GPU; with split-K partial sums, as many of them loaded at once as keep a program's tile near
    16384 values, with 8 warps (B=1, D=512: 32 parts per load; the sum's loads are latency-bound,
    one group after the other)."""
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(1, min(16, 4096 // block_d)) if device.type == "cuda" else 64
    if batch is not None:  # no program wider than the batch (a B=1 finisher reads one row, not 8)
        block_m = min(block_m, triton.next_power_of_2(max(batch, 1)))
    block_p = max(1, min(triton.next_power_of_2(max(parts - 1, 1)), 16384 // (block_m * block_d)))
    return block_m, block_p, block_d, 8 if block_p > 1 else 4


def sign_step_project(z: torch.Tensor, grad: torch.Tensor, anchor: torch.Tensor, alpha: float, eps: float,
                      norm: str = "linf", constraint: str = "ball", normalize: bool = False,
                      z_low: torch.Tensor | None = None, guard: tuple | None = None) -> torch.Tensor:
    """z (B, D) fp32 <- Proj(z + alpha * dir(grad)) in place, then the guard if given, then unit-norm rows
    if ``normalize``; returns z. ``guard``: (z_hat, fallback, min_cosine), as reference.guard_frame gives
    the two tensors.

    ``grad`` is (B, D), or (P, B, D) partial sums whose total is the gradient (added in a fixed order:
    part 0, then the tree sum of each group of BLOCK_P parts in turn).
    ``z_low``: also gets the new z, cast to its dtype (the decoder's input at the next step: no cast
    kernel of its own).
    """
    check_step_args(z, anchor, norm, constraint, z_low, guard)
    if grad.shape != z.shape and (grad.dim() != 3 or grad.shape[1:] != z.shape or grad.shape[0] < 1):
        raise ValueError(f"grad must have z's shape {tuple(z.shape)} or (P, *that), got {tuple(grad.shape)}")
    check_device(z, grad, anchor, z_low, *(guard or (None, None))[:2])
    if z.numel() == 0:
        return z
    parts = grad.numel() // z.numel()
    block_m, block_p, block_d, num_warps = blocks(z.shape[1], z.device, z.shape[0], parts)
    hat, fallback, min_cos = guard_args(guard, z)
    _sign_step_kernel[(triton.cdiv(z.shape[0], block_m),)](
        z, grad.contiguous(), anchor, z if z_low is None else z_low, hat, fallback, z.shape[0], z.shape[1], parts,
        float(alpha), float(eps), min_cos, L2=norm == "l2", BALL=constraint == "ball", NORMALIZE=bool(normalize),
        HAS_LOW=z_low is not None, GUARD=guard is not None, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=num_warps, **COMPILE_OPTIONS,
    )
    return z


def aot_variants(launches: Launches) -> list[Variant]:
    """The specialisations sign_step_project launches (aot.py), for each feature dim: B=1024 with 1 or 4
    parts (split-K at large B) and B=1's finisher of many parts (one row); each norm and the guard, and
    the steps before the last that also write z in a bf16/fp16 decoder's dtype."""
    out, f32 = [], torch.float32
    for dim in launches.dims:
        for batch, parts in ((1024, 1), (1024, 4), (1, 98)):
            block_m, block_p, block_d, warps = blocks(dim, GPU, batch, parts)
            sizes = dict(BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps)
            split = f"{' split-K sum' if parts > 1 else ''}{' B=1' if batch == 1 else ''}"
            for norm, guard in itertools.product(("linf", "l2") if parts == 1 else ("linf",), (True, False)):
                out.append(variant(f"sign_step fp32 D={dim} {norm}{split}{'' if guard else ' unguarded'}",
                                   "sign_step", "_sign_step_kernel",
                                   [tensor(f32)] * 6 + [batch, dim, parts, 0.01, 0.03, 0.8], L2=norm == "l2",
                                   BALL=True, NORMALIZE=True, HAS_LOW=False, GUARD=guard, **sizes))
            for dname in ("bf16", "fp16"):
                out.append(variant(f"sign_step fp32 D={dim} linf -> {dname}{split}", "sign_step", "_sign_step_kernel",
                                   [tensor(f32)] * 3 + [tensor(launches.dtypes[dname])] + [tensor(f32)] * 2
                                   + [batch, dim, parts, 0.01, 0.03, 0.8],
                                   L2=False, BALL=True, NORMALIZE=False, HAS_LOW=True, GUARD=True, **sizes))
    return out
