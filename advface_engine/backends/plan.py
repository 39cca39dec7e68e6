"""The shadow decoder as an explicit plan: BatchNorm folded, a forward that saves only what the
input-gradient backward needs, and that backward written out (no autograd, no weight gradients).

Supported modules: Linear, Unflatten/Flatten, Conv2d, ConvTranspose2d, BatchNorm1d/2d (eval
statistics), ReLU/LeakyReLU/PReLU, Upsample (nearest, bilinear), Identity/Dropout (no-ops),
the project's DenseBlock, and a Tanh/Sigmoid/Identity head as the last module. Convolutions
stay in PyTorch (cuDNN), except a last Conv2d with few output channels (the families' RGB
layer), which runs with the head and the L1 sign in one Triton kernel and its input gradient
with the activation backward in another (kernels/head_conv.py). Activations run with the
bias or BatchNorm in front of them in one pass (kernels/bias_act.py: the convolution before
then skips its own bias pass), and their backward is kernels/act_backward.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..kernels import is_nhwc, layout_of
from ..kernels.act_backward import act_backward
from ..kernels.bias_act import bias_act
from ..kernels.head_conv import head_conv, head_conv_backward, supported
from ..kernels.l1_sign import l1_sign_backward
from ..kernels.linear_step import linear_sign_step
from ..kernels.sign_step import sign_step_project
from ..models.decoders import DenseBlock
from .modules import batchnorm_site, opens_image, unflattened_shape

HEAD_MODULES = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}
HEAD_FUNCTIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda x: x}


def _unsupported(module: nn.Module, why: str = "") -> Exception:
    return UnsupportedModelError(f"the fused backend does not support {module!r} in the shadow decoder{why}")


def bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift (per channel), in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise _unsupported(bn, " (BatchNorm without running statistics)")
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


class Linear:
    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight, self.bias, self.folded = weight, bias, False

    def fold(self, scale: Tensor, shift: Tensor, per_channel: int) -> None:
        """BatchNorm after this layer (its output viewed as channels of ``per_channel`` values), in float64."""
        scale, shift = scale.repeat_interleave(per_channel), shift.repeat_interleave(per_channel)
        bias = self.bias if self.bias is not None else torch.zeros_like(shift)
        self.weight, self.bias = self.weight * scale[:, None], bias * scale + shift
        self.folded = True

    def to_channels_last(self, shape: tuple[int, int, int]) -> None:
        """Reorder the output from (C, H, W) to (H, W, C) order, so that viewed as an image it is NHWC."""
        channels, height, width = shape
        self.weight = self.weight.view(channels, height, width, -1).permute(1, 2, 0, 3).reshape(self.weight.shape)
        if self.bias is not None:
            self.bias = self.bias.view(shape).permute(1, 2, 0).flatten()

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return F.linear(x, self.weight, self.bias), None

    def backward(self, grad: Tensor, saved: None) -> Tensor:
        return grad @ self.weight


class Reshape:
    """Unflatten/Flatten; ``image``: it makes the decoder's first images (``opens_image``). ``nhwc`` (such
    an image after a Linear reordered by to_channels_last): the input is in (H, W, C) order and the image
    a channels_last view of it, both ways without a copy."""

    def __init__(self, shape: tuple[int, ...], image: bool = False):
        self.shape, self.image, self.nhwc = tuple(shape), image, False

    def forward(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        if self.nhwc:
            channels, height, width = self.shape
            return x.view(x.shape[0], height, width, channels).permute(0, 3, 1, 2), x.shape
        return x.reshape(x.shape[0], *self.shape), x.shape

    def backward(self, grad: Tensor, in_shape: torch.Size) -> Tensor:
        if self.nhwc:
            return grad.permute(0, 2, 3, 1).reshape(in_shape)
        return grad.reshape(in_shape)


class Conv:
    """Conv2d or ConvTranspose2d, in cuDNN both ways (the input gradient is the adjoint's forward)."""

    def __init__(self, module: nn.Module):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise _unsupported(module, " (only zero padding given as numbers)")
        self.transposed = isinstance(module, nn.ConvTranspose2d)
        self.weight, self.bias = module.weight.detach().double(), None
        if module.bias is not None:
            self.bias = module.bias.detach().double()
        self.stride, self.padding, self.dilation = list(module.stride), list(module.padding), list(module.dilation)
        self.output_padding = list(module.output_padding) if self.transposed else [0, 0]
        self.groups, self.folded = module.groups, False

    def fold(self, scale: Tensor, shift: Tensor, per_channel: int = 1) -> None:
        """BatchNorm after this convolution (per output channel), in float64."""
        out_dim = 1 if self.transposed else 0
        view = [1, 1, 1, 1]
        view[out_dim] = -1
        bias = self.bias if self.bias is not None else torch.zeros_like(shift)
        self.weight, self.bias = self.weight * scale.view(view), bias * scale + shift
        self.folded = True

    def forward(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        if self.transposed:
            y = F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                   self.groups, self.dilation)
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y, x.shape

    def backward(self, grad: Tensor, in_shape: torch.Size) -> Tensor:
        """The input gradient as the adjoint convolution's forward: a transposed convolution's is a
        convolution with the same weight, and a convolution's a transposed one (with the output
        padding that restores the input size). aten.convolution_backward would take the same
        kernels, but in channels_last it first writes its (unused) input argument out in full, a
        copy as large as the input at every step (docs/benchmarks.md has what it cost)."""
        if self.transposed:  # an output padding >= the stride (allowed below the dilation) gives extra rows
            grad_in = F.conv2d(grad, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
            if grad_in.shape[2:] == in_shape[2:]:
                return grad_in
            return grad_in[:, :, :in_shape[2], :in_shape[3]].contiguous(memory_format=layout_of(grad_in))
        sizes = zip(in_shape[2:], grad.shape[2:], self.stride, self.padding, self.dilation, self.weight.shape[2:],
                    strict=True)
        output_padding = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in sizes]
        return F.conv_transpose2d(grad, self.weight, None, self.stride, self.padding, output_padding, self.groups,
                                  self.dilation)


class Act:
    """Activation, optionally after an affine map: a = act(scale * x + shift) (scale: an unfolded
    BatchNorm; shift: its shift and/or the bias of the layer before). Saves a when a > 0 tells
    where the pre-activation was > 0 (slopes >= 0), else the pre-activation.

    ``inplace`` (set by build_plan) when x is a fresh tensor that nothing else holds."""

    def __init__(self, module: nn.Module):
        self.scale = self.shift = None
        self.inplace = False
        self._slopes: dict[int, Tensor] = {}
        if isinstance(module, nn.ReLU):
            self.kind, self.slope = "relu", None
        elif isinstance(module, nn.LeakyReLU):
            self.kind, self.slope = "leaky_relu", torch.tensor([float(module.negative_slope)], dtype=torch.float64)
        elif isinstance(module, nn.PReLU):
            self.kind, self.slope = "prelu", module.weight.detach().double().flatten()
        else:
            raise _unsupported(module)
        self.saves_output = self.slope is None or bool((self.slope >= 0).all())  # decided here: no host sync later

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        slopes = None if self.slope is None else self.slopes(x.shape[1])
        a, pre = bias_act(x, self.kind, slopes, self.scale, self.shift, inplace=self.inplace,
                          save_pre=not self.saves_output)
        return a, a if self.saves_output else pre

    def backward(self, grad: Tensor, pre: Tensor) -> Tensor:
        slopes = None if self.slope is None else self.slopes(pre.shape[1])
        return act_backward(grad, pre, self.kind, slopes, self.scale, out=grad)

    def slopes(self, channels: int) -> Tensor:
        """The negative slope per channel (LeakyReLU and a one-parameter PReLU share one), made once:
        the kernels read it densely, and a copy at every call would be one more kernel per step."""
        if self.slope.numel() != 1:
            return self.slope
        made = self._slopes.get(channels)
        if made is None or made.device != self.slope.device or made.dtype != self.slope.dtype:
            made = self._slopes[channels] = self.slope.expand(channels).contiguous()
        return made


class HeadConv:
    """The last Conv2d (few output channels, stride 1, "same" padding) with the head: y = head(conv(x)),
    and in the steps the L1 sign at its output, one Triton kernel; its backward also runs the backward
    of the activation in front of it (``act``, whose saved tensor it is given)."""

    def __init__(self, conv: Conv, head: str, act: Act | None, tf32: bool = False):
        self.weight, self.bias, self.head, self.act, self.tf32 = conv.weight, conv.bias, head, act, tf32

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return head_conv(x, self.weight, self.bias, self.head, tf32=self.tf32), None

    def gradient(self, x: Tensor, target: Tensor, loss: Tensor | None) -> Tensor:
        return head_conv(x, self.weight, self.bias, self.head, target, loss, tf32=self.tf32)

    def backward(self, grad: Tensor, act_saved: Tensor | None) -> Tensor:
        act = self.act
        if act is None:
            return head_conv_backward(grad, self.weight, tf32=self.tf32)
        slopes = None if act.slope is None else act.slopes(self.weight.shape[1])
        return head_conv_backward(grad, self.weight, act_saved, act.kind, slopes, act.scale, tf32=self.tf32)


class Affine:
    """A BatchNorm that is neither folded nor followed by an activation."""

    def __init__(self, scale: Tensor, shift: Tensor):
        self.scale, self.shift = scale, shift

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape)), None

    def backward(self, grad: Tensor, saved: None) -> Tensor:
        return grad * self.scale.view((-1,) + (1,) * (grad.dim() - 2))


class Upsample:
    """Nearest or bilinear upsampling. The bilinear backward is written as two matmuls with the
    1-D interpolation matrices (grad_x = M_h^T grad_y M_w): PyTorch's CUDA backward adds with atomics,
    so its result would change from run to run, and gallery jobs must be repeatable bit for bit."""

    def __init__(self, module: nn.Upsample):
        if module.mode not in ("nearest", "bilinear"):
            raise _unsupported(module, " (Upsample modes: nearest, bilinear)")
        self.mode, self.size, self.align_corners = module.mode, module.size, module.align_corners
        factor = module.scale_factor
        self.scales = (None, None) if factor is None else tuple(
            float(f) for f in (factor if isinstance(factor, tuple) else (factor, factor)))
        self.scale_factor = factor
        if module.recompute_scale_factor:
            raise _unsupported(module, " (recompute_scale_factor)")
        self.matrices: dict[tuple, Tensor] = {}

    def forward(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        y = F.interpolate(x, size=self.size, scale_factor=self.scale_factor, mode=self.mode,
                          align_corners=self.align_corners)
        return y, x.shape

    def backward(self, grad: Tensor, in_shape: torch.Size) -> Tensor:
        out_size, in_size = list(grad.shape[2:]), list(in_shape)
        if self.mode == "nearest":  # a gather per input pixel on CUDA: deterministic
            return torch.ops.aten.upsample_nearest2d_backward(grad, out_size, in_size, *self.scales)
        rows = self.matrix(in_size[2], out_size[0], self.scales[0], grad)
        cols = self.matrix(in_size[3], out_size[1], self.scales[1], grad)
        if not is_nhwc(grad):
            return torch.matmul(torch.matmul(rows.T, grad), cols)
        # NHWC: along W over (B, Ho) blocks of (Wo, C), then along H over (Wi * C) columns; no copies
        batch, channels, height, _ = grad.shape
        g = torch.matmul(cols.T, grad.permute(0, 2, 3, 1))  # (B, Ho, Wi, C)
        g = torch.matmul(rows.T, g.reshape(batch, height, -1))  # (B, Hi, Wi * C)
        return g.view(batch, in_size[2], in_size[3], channels).permute(0, 3, 1, 2)

    def matrix(self, n_in: int, n_out: int, scale: float | None, like: Tensor) -> Tensor:
        """(n_out, n_in): the 1-D linear interpolation PyTorch's bilinear mode applies along one axis."""
        key = (n_in, n_out, scale, like.dtype, like.device)
        if key not in self.matrices:
            eye = torch.eye(n_in, dtype=torch.float64)[None]  # interpolating e_i gives column i
            cols = torch.ops.aten.upsample_linear1d(eye, [n_out], bool(self.align_corners), scale)
            self.matrices[key] = cols[0].T.to(device=like.device, dtype=like.dtype).contiguous()
        return self.matrices[key]


class Dense:
    """The project's DenseBlock: layer i sees cat(x, f_1 .. f_{i-1}) through BN, act, Conv; output cat of all."""

    def __init__(self, block: DenseBlock):
        self.layers = []
        for layer in block.layers:
            if len(layer) != 3 or not isinstance(layer[0], nn.BatchNorm2d) or not isinstance(layer[2], nn.Conv2d):
                raise _unsupported(layer, " (dense layer must be BatchNorm2d, activation, Conv2d)")
            act = Act(layer[1])
            act.scale, act.shift = bn_affine(layer[0])
            act.inplace = True  # its input is a new concatenation
            self.layers.append((act, Conv(layer[2])))

    def forward(self, x: Tensor) -> tuple[Tensor, list]:
        feats, saved = [x], []
        for act, conv in self.layers:
            a, pre = act.forward(torch.cat(feats, dim=1))
            f, in_shape = conv.forward(a)
            feats.append(f)
            saved.append((pre, in_shape))
        return torch.cat(feats, dim=1), saved

    def backward(self, grad: Tensor, saved: list) -> Tensor:
        grad = grad.clone()
        start, layout = grad.shape[1], layout_of(grad)
        for (act, conv), (pre, in_shape) in zip(reversed(self.layers), reversed(saved), strict=True):
            width = conv.weight.shape[0]
            start -= width
            g_out = grad[:, start:start + width].contiguous(memory_format=layout)
            g_in = act.backward(conv.backward(g_out, in_shape), pre)
            grad[:, :start] += g_in
        return grad[:, :start].contiguous(memory_format=layout)  # a channel slice: dense again for the kernels


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return [m for child in module for m in _flatten(child)]
    return [module]


class DecoderPlan:
    """ops[0] .. ops[-1] then the head; ``forward`` returns (y, saved), ``backward`` runs to ops[0]'s output.

    When ``first_linear`` is set, ops[0] is the Linear from the feature, whose input gradient is
    left to the fused step kernel (kernels/linear_step.py): ``step`` runs a whole protection step.
    ``tf32``: that kernel's matmul in TF32 (for fp32 weights).
    """

    def __init__(self, ops: list, head: str, dtype: torch.dtype, device: torch.device, channels_last: bool = False,
                 tf32: bool = False):
        self.ops, self.head, self.dtype, self.channels_last, self.tf32 = ops, head, dtype, channels_last, tf32
        parts = ops + [part for op in ops for layer in getattr(op, "layers", []) for part in layer]
        for part in parts:  # parameters were folded in float64; now the plan's device and dtype
            for name in ("weight", "bias", "scale", "shift", "slope"):
                value = getattr(part, name, None)
                if isinstance(value, Tensor):
                    value = value.to(device=device, dtype=dtype).contiguous()
                    if channels_last and isinstance(part, Conv) and name == "weight":  # cuDNN then keeps NHWC
                        # copied, not .contiguous(): a 1x1 kernel is contiguous in both layouts and would
                        # keep NCHW strides, which send the convolution backward to NCHW
                        value = torch.empty_like(value, memory_format=torch.channels_last).copy_(value)
                    setattr(part, name, value)
        self.first_linear = ops[0] if ops and isinstance(ops[0], Linear) else None
        self.head_conv = ops[-1] if ops and isinstance(ops[-1], HeadConv) else None
        # the activation right after the first Linear (past a reshape), whose backward the step kernel
        # can run on the gradient it loads (l1_gradient(stem=True)); not the head's own. Value k of the
        # Linear's output is in its channel (k // inner) % channels (stem_backward)
        reshape = ops[1] if len(ops) > 2 and isinstance(ops[1], Reshape) else None
        i = 1 if reshape is None else 2
        stem = ops[i] if self.first_linear is not None and len(ops) > i and isinstance(ops[i], Act) else None
        self.stem_act = stem if stem is not None and (self.head_conv is None or self.head_conv.act is not stem) \
            else None
        self._stem_index = i
        if reshape is not None and len(reshape.shape) > 1:  # an image: NHWC (reordered Linear) or NCHW
            self._stem_layout = reshape.shape[0], 1 if reshape.nhwc else math.prod(reshape.shape[1:])
        elif self.first_linear is not None:  # flat features
            self._stem_layout = self.first_linear.weight.shape[0], 1

    def forward(self, z: Tensor, keep: bool = True) -> tuple[Tensor, list]:
        """The decoder output y = S(z) in the plan's dtype, and what the backward needs (if ``keep``)."""
        x, saved = self.hidden(z, keep)
        if self.head_conv is not None:
            y, s = self.head_conv.forward(x)
            return y, saved + [s] if keep else saved
        return HEAD_FUNCTIONS[self.head](x), saved

    def l1_gradient(self, z: Tensor, target: Tensor, loss: Tensor | None = None,
                    stem: bool = False) -> tuple[Tensor, Tensor | None]:
        """The gradient of sum |S(z) - target| at the first Linear's output (or at z); ``loss`` (B,)
        fp32, if given, gets += the per-sample L1 loss.

        Returns (gradient, None); with ``stem`` and a ``stem_act``, (gradient at that activation's
        output, what it saved), both flat (B, N) like the Linear's output: its backward is left to
        the step kernel (kernels/linear_step.py), as act_backward(gradient, saved) would run it."""
        if self.head_conv is None:
            y, saved = self.forward(z)
            grad = l1_sign_backward(y, target, self.head, loss)
        else:
            x, saved = self.hidden(z)
            grad = self.head_conv.gradient(x, target, loss)
            saved = saved + [None]
        if not (stem and self.stem_act is not None):
            return self.backward(grad, saved), None
        grad = self.backward(grad, saved, skip=self.stem_act)
        stem_saved = saved[self._stem_index]
        if self._stem_index == 2:  # through the reshape: flat as the gradient is (both views)
            stem_saved = self.ops[1].backward(stem_saved, saved[1])
        return grad, stem_saved

    def z_gradient(self, z: Tensor, target: Tensor, loss: Tensor | None = None) -> Tensor:
        """The gradient of sum |S(z) - target| with respect to z, float32 in z's shape: l1_gradient carried
        through the first Linear by a matmul (materialised: the sum over an ensemble's shadows)."""
        grad, _ = self.l1_gradient(z, target, loss)
        if self.first_linear is not None:
            grad = grad.reshape(grad.shape[0], -1).float() @ self.first_linear.weight.float()
        return grad.reshape(z.shape).float()

    def step(self, z_t: Tensor, anchor: Tensor, target: Tensor, alpha: float, eps: float, norm: str,
             constraint: str, normalize: bool, loss: Tensor | None = None, z_in: Tensor | None = None,
             z_low: Tensor | None = None, guard: tuple | None = None, split_k: int | None = None) -> None:
        """One step of Eq. 4 on this decoder, z_t (fp32) updated in place: the L1 gradient at z_t (``z_in``, z_t
        in the plan's dtype, when given: read instead of casting z_t), then, with a first Linear, g_h @ W and
        the step in one kernel (linear_sign_step, which also runs the stem activation's backward), else the
        standalone step (sign_step_project). ``alpha`` .. ``normalize``, ``z_low`` (rewritten with the new z_t)
        and ``guard`` as those kernels take them; ``loss`` as in l1_gradient; ``split_k`` linear_sign_step's."""
        z_in = z_t if z_in is None else z_in
        args = (alpha, eps, norm, constraint, normalize)
        if self.first_linear is None:
            sign_step_project(z_t, self.z_gradient(z_in, target, loss), anchor, *args, z_low=z_low, guard=guard)
            return
        grad, stem_saved = self.l1_gradient(z_in, target, loss, stem=True)
        linear_sign_step(grad.reshape(grad.shape[0], -1), self.first_linear.weight, z_t, anchor, *args,
                         split_k=split_k, tf32=self.tf32, z_low=z_low, guard=guard,
                         **({} if stem_saved is None else self.stem_backward(stem_saved)))

    def stem_backward(self, stem_saved: Tensor) -> dict:
        """linear_sign_step's arguments for the stem activation's backward, given what it saved (flat)."""
        act, (channels, inner) = self.stem_act, self._stem_layout
        slopes = None if act.slope is None else act.slopes(channels)
        return dict(act=act.kind, pre=stem_saved, slope=slopes, scale=act.scale, channels=channels, inner=inner)

    def hidden(self, z: Tensor, keep: bool = True) -> tuple[Tensor, list]:
        """The input of the fused head convolution (or of the head), and what the ops before saved."""
        x, saved = z.to(self.dtype), []
        for op in self.ops[:-1] if self.head_conv is not None else self.ops:
            x, s = op.forward(x)
            if keep:
                saved.append(s)
        return x, saved

    def backward(self, grad: Tensor, saved: list, skip: Act | None = None) -> Tensor:
        """From the gradient at the head's input back to the first Linear's output (or to z). A fused
        head convolution's backward carries the activation before it, which is then skipped; so is
        ``skip`` (the stem activation, whose backward the step kernel runs)."""
        end = len(self.ops)
        if self.head_conv is not None:
            act = self.head_conv.act
            grad = self.head_conv.backward(grad, saved[-2] if act is not None else None)
            end -= 2 if act is not None else 1
        stop = 1 if self.first_linear is not None else 0
        for op, s in zip(reversed(self.ops[stop:end]), reversed(saved[stop:end]), strict=True):
            if op is not skip:
                grad = op.backward(grad, s)
        return grad


FRESH = (Linear, Conv, Upsample, Affine, Dense)  # ops whose output is a new tensor that nothing else holds


def build_plan(shadow: nn.Module, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
               channels_last: bool = False, tf32: bool = False) -> DecoderPlan:
    """Walk the shadow decoder once, fold eval BatchNorm into the layer before it (``batchnorm_site``, the
    reference's rule, over the decoder's modules in the order they run: nested Sequentials flattened, no-ops
    left out) and build the plan (with ``channels_last``, convolutions and the activations between them run
    in NHWC layout; with ``tf32``, the fused head convolution's and the step kernel's matmuls too)."""
    modules = [m for m in _flatten(shadow) if not isinstance(m, nn.Dropout)]
    head = "identity"
    if modules and type(modules[-1]) in HEAD_MODULES:
        head = HEAD_MODULES[type(modules.pop())]
    modules = [m for m in modules if not isinstance(m, nn.Identity)]
    ops: list = []
    made: dict[int, Linear | Conv] = {}  # the op of each Linear and convolution, by module index
    for i, module in enumerate(modules):
        last = ops[-1] if ops else None
        if isinstance(module, nn.Linear):
            ops.append(Linear(module.weight.detach().double(),
                              None if module.bias is None else module.bias.detach().double()))
            made[i] = ops[-1]
        elif type(module) in (nn.Conv2d, nn.ConvTranspose2d):
            ops.append(Conv(module))
            made[i] = ops[-1]
        elif isinstance(module, nn.Unflatten) and module.dim == 1:
            shape = unflattened_shape(module, last.weight.shape[0] if isinstance(last, Linear) else None)
            if isinstance(last, Linear) and math.prod(shape) != last.weight.shape[0]:
                raise _unsupported(module, f" (after a Linear with {last.weight.shape[0]} outputs)")
            ops.append(Reshape(shape, image=opens_image(module)))
        elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            ops.append(Reshape((-1,)))
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = bn_affine(module)
            site = batchnorm_site(modules, i)
            if site is not None and site[0] in made:
                made[site[0]].fold(scale, shift, site[1])
            else:
                ops.append(Affine(scale, shift))
        elif isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.PReLU)):
            act = Act(module)
            if isinstance(last, Affine):
                act.scale, act.shift = last.scale, last.shift
                ops[-1] = act
            else:
                ops.append(act)
        elif isinstance(module, nn.Upsample):
            ops.append(Upsample(module))
        elif isinstance(module, DenseBlock):
            ops.append(Dense(module))
        else:
            raise _unsupported(module)
    _fuse_biases(ops)
    if channels_last and len(ops) >= 2 and isinstance(ops[0], Linear) and isinstance(ops[1], Reshape) \
            and ops[1].image and min(ops[1].shape) > 0:  # the stem's image straight in NHWC: no copy
        ops[0].to_channels_last(ops[1].shape)
        ops[1].nhwc = True
    last = ops[-1] if ops else None
    if isinstance(last, Conv) and not last.transposed and supported(last.weight.shape, last.stride, last.padding,
                                                                      last.dilation, last.groups):
        ops[-1] = HeadConv(last, head, ops[-2] if len(ops) >= 2 and isinstance(ops[-2], Act) else None, tf32)
    if device is None:
        device = next((p.device for p in shadow.parameters()), torch.device("cpu"))
    return DecoderPlan(ops, head, dtype, device, channels_last, tf32)


def _fuse_biases(ops: list) -> None:
    """A Conv's bias moves into the activation after it (one pass instead of two), and activations
    whose input is a fresh tensor (past any reshapes) write in place."""
    for i, op in enumerate(ops):
        if not isinstance(op, Act):
            continue
        before = ops[i - 1] if i else None
        if isinstance(before, Conv) and before.bias is not None:
            shift = before.bias if op.scale is None else op.scale * before.bias
            op.shift = shift if op.shift is None else op.shift + shift
            before.bias = None
        j = i - 1
        while j >= 0 and isinstance(ops[j], Reshape):
            j -= 1
        op.inplace = j >= 0 and isinstance(ops[j], FRESH)
