"""The fused kernels' formulas in plain PyTorch, with the kernels' signatures and precision
(fp32 arithmetic, results in the input's dtype): stand-ins that let the fused backend run in
bfloat16 on a CPU, where Triton's interpreter cannot, to check everything around the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from advface_engine.backends.reference import guard as cap
from advface_engine.backends.reference import project, step_direction
from advface_engine.config import ProtectConfig

HEAD_SLOPES = {"tanh": lambda y: 1 - y * y, "sigmoid": lambda y: y * (1 - y), "identity": torch.ones_like}


def l1_sign_backward(y: Tensor, target: Tensor, head: str = "tanh", loss: Tensor | None = None) -> Tensor:
    diff = y.float() - target.float()
    if loss is not None:
        loss += diff.abs().flatten(1).sum(1)
    return (diff.sign() * HEAD_SLOPES[head](y.float())).to(y.dtype)


def act_backward(grad: Tensor, pre: Tensor, act: str = "relu", slope: Tensor | None = None,
                 scale: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    view = (-1,) + (1,) * (pre.dim() - 2)
    g = grad.float()
    negative = torch.zeros_like(g) if slope is None else g * slope.float().view(view)
    g = torch.where(pre.float() > 0, g, negative)
    if scale is not None:
        g = g * scale.float().view(view)
    return g.to(grad.dtype)


def sign_step_project(z: Tensor, grad: Tensor, anchor: Tensor, alpha: float, eps: float, norm: str = "linf",
                      constraint: str = "ball", normalize: bool = False, z_low: Tensor | None = None,
                      guard: tuple | None = None) -> Tensor:
    cfg = ProtectConfig(eps=eps, alpha=alpha, norm=norm, constraint=constraint)
    grad = grad.float() if grad.dim() == 2 else grad.float().sum(0)
    z_next = project(z + alpha * step_direction(grad, norm), z, anchor, cfg)
    if guard is not None:
        z_next = cap(z_next, guard[:2], guard[2])
    z.copy_(F.normalize(z_next, dim=1) if normalize else z_next)
    if z_low is not None:
        z_low.copy_(z)
    return z


def linear_sign_step(grad_h: Tensor, weight: Tensor, z: Tensor, anchor: Tensor, alpha: float, eps: float,
                     norm: str = "linf", constraint: str = "ball", normalize: bool = False, split_k=None,
                     tf32: bool = False, z_low: Tensor | None = None, act: str | None = None, pre: Tensor | None = None,
                     slope: Tensor | None = None, scale: Tensor | None = None, channels: int | None = None,
                     inner: int = 1, guard: tuple | None = None) -> Tensor:
    if act is not None:  # grad_h is at the stem activation's output: its backward first
        channel = (torch.arange(grad_h.shape[1], device=grad_h.device) // inner) % channels
        g = grad_h.float()
        g = torch.where(pre.float() > 0, g, g * slope.float()[channel] if slope is not None else torch.zeros_like(g))
        grad_h = (g * scale.float()[channel] if scale is not None else g).to(grad_h.dtype)
    return sign_step_project(z, grad_h.float() @ weight.float(), anchor, alpha, eps, norm, constraint, normalize,
                             z_low, guard)


def _per_channel(t: Tensor | None, like: Tensor) -> Tensor | None:
    return None if t is None else t.float().view((-1,) + (1,) * (like.dim() - 2))


def bias_act(x: Tensor, act: str = "relu", slope: Tensor | None = None, scale: Tensor | None = None,
             shift: Tensor | None = None, inplace: bool = False, save_pre: bool = False):
    pre = x.float()
    if scale is not None:
        pre = pre * _per_channel(scale, x)
    if shift is not None:
        pre = pre + _per_channel(shift, x)
    a = torch.where(pre > 0, pre, pre * _per_channel(slope, x) if slope is not None else torch.zeros_like(pre))
    a = a.to(x.dtype)
    if inplace:
        a = x.copy_(a)
    return a, pre.to(x.dtype) if save_pre else None


HEADS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda y: y}


def head_conv(a: Tensor, weight: Tensor, bias: Tensor | None, head: str = "tanh", target: Tensor | None = None,
              loss: Tensor | None = None, tf32: bool = False) -> Tensor:
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    y = HEADS[head](F.conv2d(a.float(), weight.float(), None if bias is None else bias.float(), padding=padding))
    y = y.to(a.dtype).contiguous()
    return y if target is None else l1_sign_backward(y, target, head, loss)


def head_conv_backward(grad: Tensor, weight: Tensor, pre: Tensor | None = None, act: str | None = None,
                       slope: Tensor | None = None, scale: Tensor | None = None, tf32: bool = False) -> Tensor:
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    g = F.conv_transpose2d(grad.float(), weight.float(), padding=padding)
    if act is not None:
        g = torch.where(pre.float() > 0, g, g * _per_channel(slope, g) if slope is not None else torch.zeros_like(g))
    if scale is not None:
        g = g * _per_channel(scale, g)
    layout = torch.channels_last if pre is not None and pre.dim() == 4 and not pre.is_contiguous() else None
    g = g.to(grad.dtype)
    return g.contiguous(memory_format=layout) if layout is not None else g.contiguous()
