"""The fused kernels' formulas in plain PyTorch, with the kernels' signatures and precision
(fp32 arithmetic, results in the input's dtype): stand-ins that let the fused backend run in
bfloat16 on a CPU, where Triton's interpreter cannot, to check everything around the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
                      constraint: str = "ball", normalize: bool = False) -> Tensor:
    cfg = ProtectConfig(eps=eps, alpha=alpha, norm=norm, constraint=constraint)
    grad = grad.float() if grad.dim() == 2 else grad.float().sum(0)
    z_next = project(z + alpha * step_direction(grad, norm), z, anchor, cfg)
    return z.copy_(F.normalize(z_next, dim=1) if normalize else z_next)


def linear_sign_step(grad_h: Tensor, weight: Tensor, z: Tensor, anchor: Tensor, alpha: float, eps: float,
                     norm: str = "linf", constraint: str = "ball", normalize: bool = False, split_k=None,
                     tf32: bool = False) -> Tensor:
    return sign_step_project(z, grad_h.float() @ weight.float(), anchor, alpha, eps, norm, constraint, normalize)
