"""The L1-gradient sign fused with the decoder head's backward (Eq. 4 at the output).

From the decoder output y = act(a) and the shadow image x~, one pass writes the gradient of
sum |y - x~| with respect to the head's input a:

    g = sign(y - x~) * act'(y),   act' = 1 - y^2 (tanh), y (1 - y) (sigmoid), 1 (identity)

and optionally adds the per-sample L1 loss sum |y - x~| into ``loss`` for monitoring.
A tie y == x~ gives 0, as torch.sign does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, block_size, check_device, same_layout
from .variants import GPU, Launches, Variant, tensor, variant

HEADS = {"identity": 0, "tanh": 1, "sigmoid": 2}


@triton.jit
def l1_sign(y, target, HEAD: tl.constexpr):
    """On fp32 tiles: sign(y - target) * head'(y), and y - target (for the loss)."""
    diff = y - target
    grad = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    if HEAD == 1:
        grad = grad * (1.0 - y * y)
    elif HEAD == 2:
        grad = grad * (1.0 - y) * y
    return grad, diff


@triton.jit
def _l1_sign_kernel(y_ptr, target_ptr, g_ptr, loss_ptr, per_sample, HEAD: tl.constexpr, HAS_LOSS: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < per_sample
    offs = row * per_sample + cols
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad, diff = l1_sign(y, target, HEAD)
    tl.store(g_ptr + offs, grad.to(g_ptr.dtype.element_ty), mask=mask)
    if HAS_LOSS:
        tl.atomic_add(loss_ptr + row, tl.sum(tl.abs(diff), axis=0))


def l1_sign_backward(y: torch.Tensor, target: torch.Tensor, head: str = "tanh",
                     loss: torch.Tensor | None = None) -> torch.Tensor:
    """g = sign(y - target) * head'(y), shaped (and laid out, contiguous or channels_last) like y;
    ``loss`` (B,) fp32, if given, gets += sum |y - target|."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    if y.shape != target.shape or y.dim() < 1:
        raise ValueError(f"y and target must have the same shape (B, ...), got {tuple(y.shape)}, {tuple(target.shape)}")
    check_device(y, target, *([] if loss is None else [loss]))
    (y, target), _ = same_layout(y, target)  # elementwise, per-sample sums: any dense order shared by both
    grad = torch.empty_like(y)
    batch = y.shape[0]
    per_sample = y.numel() // max(batch, 1)
    if batch == 0 or per_sample == 0:
        return grad
    if loss is not None and (loss.shape != (batch,) or loss.dtype != torch.float32):
        raise ValueError(f"loss must be a float32 tensor of shape ({batch},), got {loss.dtype} {tuple(loss.shape)}")
    block = block_size(per_sample, y.device)
    grid = (batch, triton.cdiv(per_sample, block))
    _l1_sign_kernel[grid](y, target, grad, loss if loss is not None else grad, per_sample,
                          HEAD=HEADS[head], HAS_LOSS=loss is not None, BLOCK=block, **COMPILE_OPTIONS)
    return grad


def aot_variants(launches: Launches) -> list[Variant]:
    """The specialisations l1_sign_backward launches (aot.py): each dtype but tf32 (fp32's kernel) and
    each head, with and without the per-sample loss."""
    f32, n = torch.float32, launches.per_sample
    return [variant(f"l1_sign {dname} {head}{' +loss' if has_loss else ''}", "l1_sign", "_l1_sign_kernel",
                    [tensor(dtype)] * 3 + [tensor(f32) if has_loss else tensor(dtype), n],
                    HEAD=HEADS[head], HAS_LOSS=has_loss, BLOCK=block_size(n, GPU))
            for dname, dtype in launches.dtypes.items() if dname != "tf32"
            for head in launches.heads for has_loss in (False, True)]
