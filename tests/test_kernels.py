"""Each Triton kernel against the PyTorch formula it replaces (under TRITON_INTERPRET=1 on a CPU).

Odd shapes (3x5x7x7, 2-D, several blocks per row) and ties: y == x~ must give sign 0, a
pre-activation of exactly 0 must follow PyTorch's convention, a zero gradient gives no step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_formulas import HEAD_SLOPES
from torch import nn

import advface_engine.kernels.act_backward as act_backward_module
import advface_engine.kernels.head_conv as head_conv_module
import advface_engine.kernels.sign_step as sign_step
from advface_engine.backends.reference import project, step_direction
from advface_engine.config import ProtectConfig
from advface_engine.kernels import is_nhwc
from advface_engine.kernels.act_backward import act_backward
from advface_engine.kernels.bias_act import bias_act
from advface_engine.kernels.head_conv import head_conv, head_conv_backward
from advface_engine.kernels.l1_sign import l1_sign_backward
from advface_engine.kernels.linear_step import linear_sign_step
from advface_engine.kernels.sign_step import sign_step_project

pytestmark = pytest.mark.interpreter  # gpu-marked tests excepted (conftest)

TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-6),  # fp32 arithmetic inside every kernel, so a float16
       torch.float16: dict(rtol=1e-3, atol=1e-3)}    # result is at most one rounding (1 ulp) away
HEADS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda a: a}
ACTS = {"relu": lambda c: nn.ReLU(), "leaky_relu": lambda c: nn.LeakyReLU(0.2), "prelu": lambda c: nn.PReLU(c)}
SHAPES = [(3, 5, 7, 7), (4, 6), (2, 3, 77, 77)]  # the last one spans two blocks per sample


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("head", sorted(HEADS))
def test_l1_sign_equals_autograd_with_ties(shape, head):
    gen = _gen()
    a = torch.randn(shape, generator=gen)
    y = HEADS[head](a)
    target = HEADS[head](torch.randn(shape, generator=gen))
    ties = torch.rand(shape, generator=gen) < 0.2
    target[ties] = y[ties]
    a_grad = a.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((HEADS[head](a_grad) - target).abs().sum(), a_grad)
    loss = torch.zeros(shape[0])
    got = l1_sign_backward(y, target, head, loss)
    assert ties.any() and (got[ties] == 0).all(), "a tie y == x~ must give sign 0"
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(loss, (y - target).abs().flatten(1).sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_l1_sign_in_half_precision(head):
    """The reduced-precision decoder's path: fp16 in and out, fp32 inside, against float64."""
    gen = _gen(5)
    y = HEADS[head](torch.randn(3, 4, 9, 9, generator=gen)).half()
    target = HEADS[head](torch.randn(3, 4, 9, 9, generator=gen)).half()
    ties = torch.rand(y.shape, generator=gen) < 0.2
    target[ties] = y[ties]
    y64, target64 = y.double(), target.double()
    want = ((y64 - target64).sign() * HEAD_SLOPES[head](y64)).half()
    loss = torch.zeros(3)
    got = l1_sign_backward(y, target, head, loss)
    assert got.dtype == torch.float16 and (got[ties] == 0).all()
    torch.testing.assert_close(got, want, **TOL[torch.float16])
    torch.testing.assert_close(loss, (y64 - target64).abs().flatten(1).sum(1).float(), rtol=1e-5, atol=1e-4)


def test_arguments_on_different_devices_are_refused():
    z = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="different devices"):
        sign_step_project(z, torch.zeros(2, 8, device="meta"), z.clone(), 0.01, 0.03)


def test_tensors_off_the_current_gpu_are_refused(monkeypatch):
    """A kernel launches on the current device: tensors on another GPU would be read there."""
    from types import SimpleNamespace

    from advface_engine.kernels import check_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on = [SimpleNamespace(device=torch.device(f"cuda:{i}"), dtype=torch.float32) for i in (0, 1)]
    check_device(on[0], on[0])
    with pytest.raises(ValueError, match=r"on cuda:1 but the current device is cuda:0.*torch.cuda.device\(1\)"):
        check_device(on[1], on[1])


def test_bf16_is_refused_under_the_interpreter():
    y = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        l1_sign_backward(y, y, "tanh")


def test_l1_sign_rejects_bad_input():
    y = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="head"):
        l1_sign_backward(y, y, "relu")
    with pytest.raises(ValueError, match="same shape"):
        l1_sign_backward(y, y[:1], "tanh")


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_act_backward_equals_autograd(shape, act, with_scale, wide, monkeypatch):
    if wide:  # the 64-bit offsets of tensors past 2**31 elements, taken here on a small one
        monkeypatch.setattr(act_backward_module, "INT32_MAX", 0)
    gen = _gen(1)
    channels = shape[1]
    module = ACTS[act](channels)
    if act == "prelu":
        module.weight.data = torch.rand(channels, generator=gen) - 0.3  # negative slopes too
    x = torch.randn(shape, generator=gen)
    x[torch.rand(shape, generator=gen) < 0.2] = 0.0  # pre-activations of exactly 0
    view = (-1,) + (1,) * (len(shape) - 2)
    scale = torch.rand(channels, generator=gen) + 0.5 if with_scale else None
    shift = torch.zeros(channels) if with_scale else None
    grad = torch.randn(shape, generator=gen)
    x_grad = x.clone().requires_grad_(True)
    pre = x_grad if scale is None else torch.addcmul(shift.view(view), x_grad, scale.view(view))
    (want,) = torch.autograd.grad(module(pre), x_grad, grad)
    slope = None
    if act == "leaky_relu":
        slope = torch.full((channels,), 0.2)
    elif act == "prelu":
        slope = module.weight.detach()
    got = act_backward(grad, pre.detach(), act, slope, scale)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_act_backward_in_channels_last_equals_contiguous(act):
    """In NHWC memory a value's channel is its offset modulo C: same numbers, the layout kept."""
    gen = _gen(4)
    shape = (3, 5, 4, 7)
    pre, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    slope = None if act == "relu" else torch.rand(5, generator=gen)
    scale = torch.rand(5, generator=gen) + 0.5
    want = act_backward(grad, pre, act, slope, scale)
    got = act_backward(_nhwc(grad), _nhwc(pre), act, slope, scale)
    assert is_nhwc(got) and torch.equal(got, want)
    in_place = _nhwc(grad)
    assert act_backward(in_place, _nhwc(pre), act, slope, scale, out=in_place) is in_place
    assert torch.equal(in_place, want)
    kept = grad.clone()  # a contiguous grad meets an NHWC pre: grad is copied, not written
    mixed = act_backward(kept, _nhwc(pre), act, slope, scale, out=kept)
    assert is_nhwc(mixed) and torch.equal(mixed, want) and torch.equal(kept, grad)
    with pytest.raises(ValueError, match="out may only be grad"):
        act_backward(grad, pre, act, slope, scale, out=torch.empty_like(grad))


@pytest.mark.parametrize("head", ["tanh", "sigmoid"])
def test_l1_sign_in_channels_last_equals_contiguous(head):
    gen = _gen(6)
    y = torch.rand(3, 5, 4, 7, generator=gen) * 1.8 - 0.9
    target = torch.rand(y.shape, generator=gen) * 1.8 - 0.9
    target[0, 1] = y[0, 1]  # ties
    loss, loss_nhwc = torch.zeros(3), torch.zeros(3)
    want = l1_sign_backward(y, target, head, loss)
    got = l1_sign_backward(_nhwc(y), _nhwc(target), head, loss_nhwc)
    assert is_nhwc(got) and torch.equal(got, want)
    torch.testing.assert_close(loss_nhwc, loss, rtol=1e-6, atol=1e-5)  # the same sums, added in another order


@pytest.mark.parametrize("act", sorted(ACTS))
def test_act_backward_in_half_precision(act):
    gen = _gen(6)
    shape, view = (3, 5, 7, 7), (-1, 1, 1)
    grad, pre = torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half()
    pre[torch.rand(shape, generator=gen) < 0.2] = 0.0
    slope = None if act == "relu" else (torch.rand(5, generator=gen) - 0.3).half()
    scale = (torch.rand(5, generator=gen) + 0.5).half()
    g64 = grad.double()
    negative = torch.zeros_like(g64) if slope is None else g64 * slope.double().view(view)
    want = (torch.where(pre.double() > 0, g64, negative) * scale.double().view(view)).half()
    got = act_backward(grad, pre, act, slope, scale)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, **TOL[torch.float16])


def test_act_backward_rejects_missing_slope():
    with pytest.raises(ValueError, match="slope"):
        act_backward(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), "prelu")


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("affine", ["none", "shift", "scale+shift"])
@pytest.mark.parametrize("nhwc", [False, True])
def test_bias_act_equals_torch(act, affine, nhwc):
    """a = act(scale * x + shift) per channel, in place or not; the pre-activation when asked."""
    gen = _gen(7)
    shape = (3, 5, 7, 9)
    x = torch.randn(shape, generator=gen)
    x[torch.rand(shape, generator=gen) < 0.2] = 0.0
    scale = torch.rand(5, generator=gen) + 0.5 if affine == "scale+shift" else None
    shift = torch.randn(5, generator=gen) if affine != "none" else None
    slope = None if act == "relu" else torch.rand(5, generator=gen) - 0.3  # negative slopes too
    view = (-1, 1, 1)
    pre = x * (scale.view(view) if scale is not None else 1) + (shift.view(view) if shift is not None else 0)
    want = F.relu(pre) if slope is None else torch.where(pre > 0, pre, pre * slope.view(view))
    given = _nhwc(x) if nhwc else x.clone()
    a, got_pre = bias_act(given, act, slope, scale, shift, save_pre=True)
    assert a is not given and is_nhwc(a) == nhwc and is_nhwc(got_pre) == nhwc
    torch.testing.assert_close(a, want, **TOL[torch.float32])
    torch.testing.assert_close(got_pre, pre, **TOL[torch.float32])
    a, none = bias_act(given, act, slope, scale, shift, inplace=True)
    assert a is given and none is None
    torch.testing.assert_close(given, want, **TOL[torch.float32])


def test_bias_act_in_half_precision_and_bad_input():
    gen = _gen(8)
    x = torch.randn(2, 4, 5, 5, generator=gen).half()
    shift = torch.randn(4, generator=gen).half()
    want = F.relu(x.double() + shift.double().view(-1, 1, 1)).half()
    torch.testing.assert_close(bias_act(x, "relu", shift=shift)[0], want, **TOL[torch.float16])
    with pytest.raises(ValueError, match="slope"):
        bias_act(x, "prelu")
    with pytest.raises(ValueError, match="shift"):
        bias_act(x, "relu", shift=shift[:3])


HEAD_CONV_CASES = [(2, 5, 7, 9, 3, 3), (3, 33, 6, 5, 1, 1), (1, 20, 5, 5, 4, 5), (2, 70, 4, 6, 16, 3)]


def _head_conv_case(case, seed=9):
    batch, channels, height, width, out_channels, k = case
    gen = _gen(seed)
    a = torch.randn(batch, channels, height, width, generator=gen)
    weight = torch.randn(out_channels, channels, k, k, generator=gen) / (channels * k * k) ** 0.5
    return a, weight, torch.randn(out_channels, generator=gen)


@pytest.mark.parametrize("case", HEAD_CONV_CASES)
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("nhwc", [False, True])
def test_head_conv_equals_conv_head_and_l1_sign(case, head, nhwc):
    """y = head(conv(a) + b) against float64; the step's sign against autograd, ties (y == x~) give 0."""
    a, weight, bias = _head_conv_case(case)
    given = _nhwc(a) if nhwc else a
    want = HEADS[head](F.conv2d(a.double(), weight.double(), bias.double(), padding=case[-1] // 2)).float()
    y = head_conv(given, weight, bias, head)
    assert y.is_contiguous()
    torch.testing.assert_close(y, want, rtol=2e-6, atol=2e-6)
    target = y.clone()  # the kernel's own targets: exact ties on odd rows
    target[:, :, ::2] = HEADS[head](torch.randn(target[:, :, ::2].shape, generator=_gen(10)))
    loss = torch.zeros(case[0])
    grad = head_conv(given, weight, bias, head, target, loss)
    pre = F.conv2d(a, weight, bias, padding=case[-1] // 2).requires_grad_(True)
    (autograd,) = torch.autograd.grad((HEADS[head](pre) - target).abs().sum(), pre)
    ties = torch.zeros_like(y, dtype=torch.bool)
    ties[:, :, 1::2] = True
    assert (grad[ties] == 0).all(), "y == x~ must give sign 0"
    clear = ~ties & ((want - target).abs() > 1e-5)  # away from ties the signs cannot differ
    torch.testing.assert_close(grad[clear], autograd[clear], **TOL[torch.float32])
    torch.testing.assert_close(loss, (y - target).abs().flatten(1).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", HEAD_CONV_CASES)
@pytest.mark.parametrize("act", [None, *sorted(ACTS)])
@pytest.mark.parametrize("nhwc", [False, True])
def test_head_conv_backward_equals_autograd(case, act, nhwc):
    """conv^T(g) times act'(pre) and scale, against autograd in float64; laid out like pre."""
    a, weight, _ = _head_conv_case(case)
    gen = _gen(11)
    batch, channels, height, width, out_channels, k = case
    pre = torch.randn(a.shape, generator=gen)
    pre[torch.rand(a.shape, generator=gen) < 0.2] = 0.0
    slope = torch.rand(channels, generator=gen) - 0.3 if act in ("leaky_relu", "prelu") else None
    scale = torch.rand(channels, generator=gen) + 0.5
    grad = torch.randn(batch, out_channels, height, width, generator=gen)
    x = pre.double().requires_grad_(True)
    view = (-1, 1, 1)
    hidden = x if act is None else torch.where(x > 0, x, x * (slope.double().view(view) if slope is not None else 0))
    out = F.conv2d(hidden, weight.double(), padding=k // 2)
    (want,) = torch.autograd.grad(out, x, grad.double())
    want = (want * scale.double().view(view)).float()
    got = head_conv_backward(grad, weight, (_nhwc(pre) if nhwc else pre) if act else None, act, slope, scale)
    assert is_nhwc(got) == (nhwc and act is not None)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_head_conv_with_64_bit_offsets(monkeypatch):
    """The 64-bit offsets of tensors past 2**31 elements, taken here on a small one: same results."""
    a, weight, bias = _head_conv_case(HEAD_CONV_CASES[0])
    target = torch.tanh(torch.randn(2, 3, 7, 9, generator=_gen(13)))
    pre = _nhwc(torch.randn(a.shape, generator=_gen(14)))
    want = (head_conv(a, weight, bias, "tanh", target), head_conv_backward(target, weight, pre, "relu"))
    monkeypatch.setattr(head_conv_module, "INT32_MAX", 0)
    got = (head_conv(a, weight, bias, "tanh", target), head_conv_backward(target, weight, pre, "relu"))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_head_conv_in_half_precision():
    """fp16 in, fp32 inside: one rounding from float64 (the sign's factor head'(y) is of the rounded y)."""
    a, weight, bias = _head_conv_case(HEAD_CONV_CASES[0])
    a, weight, bias = a.half(), weight.half(), bias.half()
    want = torch.tanh(F.conv2d(a.double(), weight.double(), bias.double(), padding=1)).half()
    y = head_conv(a, weight, bias, "tanh")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, want, **TOL[torch.float16])
    grad = torch.randn(y.shape, generator=_gen(12)).half()
    want = F.conv_transpose2d(grad.double(), weight.double(), padding=1).half()
    torch.testing.assert_close(head_conv_backward(grad, weight), want, **TOL[torch.float16])


def test_head_conv_rejects_bad_input():
    a, weight, bias = _head_conv_case(HEAD_CONV_CASES[0])
    with pytest.raises(ValueError, match="output channels"):
        head_conv(a, torch.zeros(17, 5, 3, 3), None)
    with pytest.raises(ValueError, match="odd kernel"):
        head_conv(a, torch.zeros(3, 5, 2, 2), None)
    with pytest.raises(ValueError, match="head"):
        head_conv(a, weight, bias, "relu")
    with pytest.raises(ValueError, match="target"):
        head_conv(a, weight, bias, "tanh", target=torch.zeros(1))
    with pytest.raises(ValueError, match="share a dtype"):
        head_conv(a, weight.half(), bias)
    with pytest.raises(ValueError, match="saved pre-activation"):
        head_conv_backward(torch.zeros(2, 3, 7, 9), weight, None, "relu")
    with pytest.raises(ValueError, match="slope"):
        head_conv_backward(torch.zeros(2, 3, 7, 9), weight, a, "prelu")


def _step_case(batch: int, dim: int, seed: int):
    gen = _gen(seed)
    anchor = torch.randn(batch, dim, generator=gen)
    z = anchor + 0.04 * (2 * torch.rand(batch, dim, generator=gen) - 1)
    return z, anchor, gen


def _reference_step(z, grad, anchor, cfg: ProtectConfig, normalize: bool):
    z_next = project(z + cfg.alpha * step_direction(grad, cfg.norm), z, anchor, cfg)
    return F.normalize(z_next, dim=1) if normalize else z_next


STEP_CASES = [(norm, constraint, normalize) for norm in ("linf", "l2") for constraint in ("ball", "per_step")
              for normalize in (False, True)]


@pytest.mark.parametrize("norm,constraint,normalize", STEP_CASES)
def test_sign_step_equals_reference_ops(norm, constraint, normalize):
    z, anchor, gen = _step_case(5, 37, 2)
    grad = torch.randn(5, 37, generator=gen)
    grad[torch.rand(5, 37, generator=gen) < 0.2] = 0.0  # zero gradient: no step on that coordinate
    grad[3] = 0.0  # and a whole row
    cfg = ProtectConfig(eps=0.05, alpha=0.02, norm=norm, constraint=constraint)
    want = _reference_step(z, grad, anchor, cfg, normalize)
    got = sign_step_project(z.clone(), grad, anchor, cfg.alpha, cfg.eps, norm, constraint, normalize)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    if constraint == "ball" and not normalize:
        dist = (got - anchor).abs().amax(1) if norm == "linf" else (got - anchor).norm(dim=1)
        assert (dist <= cfg.eps * (1 + 1e-6)).all(), dist


@pytest.mark.parametrize("batch,parts,dim,norm", [(6, 6, 37, "l2"), (1, 40, 600, "linf"), (3, 40, 600, "l2")])
def test_sign_step_adds_partial_sums(batch, parts, dim, norm):
    """(P, B, D) partials (split-K): the step of their total. Six parts fit one group of loads; forty
    over 1024-wide rows take several groups, the last one ragged (at B=1, 16 per group)."""
    z, anchor, gen = _step_case(batch, dim, 8)
    partials = torch.randn(parts, batch, dim, generator=gen)
    cfg = ProtectConfig(eps=0.05, alpha=0.02, norm=norm)
    want = _reference_step(z, partials.double().sum(0).float(), anchor, cfg, True)
    got = sign_step_project(z.clone(), partials, anchor, cfg.alpha, cfg.eps, norm, "ball", True)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    block_p = sign_step.blocks(dim, z.device, batch, parts)[1]
    assert block_p >= parts - 1 if parts == 6 else (block_p < parts - 1 and (parts - 1) % block_p)
    assert batch > 1 or block_p == 16
    with pytest.raises(ValueError, match="shape"):
        sign_step_project(z.clone(), partials[:, :, :5], anchor, cfg.alpha, cfg.eps)


@pytest.mark.parametrize("norm,constraint,normalize", STEP_CASES)
@pytest.mark.parametrize("batch,split_k", [(5, 1), (5, 3), (40, 1), (40, 4)])
def test_linear_step_equals_matmul_then_step(norm, constraint, normalize, batch, split_k):
    z, anchor, gen = _step_case(batch, 37, 3)
    grad_h = torch.randn(batch, 201, generator=gen)
    grad_h[1] = 0.0  # a zero row: g = 0, no step
    weight = torch.randn(201, 37, generator=gen)
    grad = (grad_h.double() @ weight.double()).float()
    cfg = ProtectConfig(eps=0.05, alpha=0.02, norm=norm, constraint=constraint)
    want = _reference_step(z, grad, anchor, cfg, normalize)
    got = linear_sign_step(grad_h, weight, z.clone(), anchor, cfg.alpha, cfg.eps, norm, constraint, normalize,
                           split_k=split_k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act,scaled,channels,inner", [("relu", False, 96, 1), ("leaky_relu", True, 8, 12),
                                                        ("prelu", False, 8, 1), ("prelu", True, 8, 1)])
@pytest.mark.parametrize("batch,split_k,dim", [(5, 1, 37), (5, 3, 37), (3, 1, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_step_runs_the_stem_activation_backward_equal_to_the_bit(act, scaled, channels, inner, batch, split_k,
                                                                          dim, dtype):
    """grad_h at the output of the activation after the Linear, with what it saved: the same z, to
    the bit, as act_backward first and then the step, fused (split or not) and on the wide rows'
    cuBLAS path (D > MAX_FUSED_DIM); value k's channel is (k // inner) % C: a flat feature (C = N),
    an NCHW image (C * inner = N) or an NHWC one (inner 1, C divides N)."""
    z, anchor, gen = _step_case(batch, dim, 17)
    grad_h = torch.randn(batch, 96, generator=gen).to(dtype)
    pre = torch.randn(batch, 96, generator=gen).to(dtype)
    pre[:, ::7] = 0.0  # the boundary: no gradient through relu
    weight = (torch.randn(96, dim, generator=gen) / 10).to(dtype)
    slope = (torch.rand(channels, generator=gen) - 0.3).to(dtype) if act != "relu" else None
    scale = (torch.rand(channels, generator=gen) + 0.5).to(dtype) if scaled else None

    def as_image(flat):  # value k of a row in channel (k // inner) % C, channels on dim 1
        if inner == 1:
            return flat.view(batch, -1, 1, channels).permute(0, 3, 1, 2)
        return flat.view(batch, channels, inner)

    through = act_backward(as_image(grad_h), as_image(pre), act, slope, scale)
    through = through.permute(0, 2, 3, 1).reshape(batch, -1) if inner == 1 else through.reshape(batch, -1)
    want = linear_sign_step(through.contiguous(), weight, z.clone(), anchor, 0.02, 0.05, split_k=split_k)
    got = linear_sign_step(grad_h, weight, z.clone(), anchor, 0.02, 0.05, split_k=split_k, act=act, pre=pre,
                           slope=slope, scale=scale, channels=channels, inner=inner)
    assert torch.equal(got, want)
    plain = linear_sign_step(grad_h, weight, z.clone(), anchor, 0.02, 0.05, split_k=split_k)
    assert not torch.equal(plain, want), "the activation must matter for the check to mean something"
    with pytest.raises(ValueError, match="channels x inner"):
        linear_sign_step(grad_h, weight, z.clone(), anchor, 0.02, 0.05, act=act, pre=pre, slope=slope, channels=5,
                         inner=inner)
    with pytest.raises(ValueError, match="give act"):
        linear_sign_step(grad_h, weight, z.clone(), anchor, 0.02, 0.05, pre=pre)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_step_in_half_precision(norm):
    """fp16 g_h and W, fp32 accumulation and step: equals the float64 matmul's step but for
    entries whose gradient is within fp32 rounding of zero (none expected at this size)."""
    z, anchor, gen = _step_case(20, 37, 7)
    grad_h = torch.randn(20, 201, generator=gen).half()
    weight = torch.randn(201, 37, generator=gen).half()
    cfg = ProtectConfig(eps=0.05, alpha=0.02, norm=norm)
    want = _reference_step(z, (grad_h.double() @ weight.double()).float(), anchor, cfg, False)
    got = linear_sign_step(grad_h, weight, z.clone(), anchor, cfg.alpha, cfg.eps, norm, "ball", False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_step_wider_than_the_fused_tile_takes_matmul_then_step(norm, monkeypatch):
    """Rows wider than MAX_FUSED_DIM (they would spill the accumulator) give the same step."""
    import advface_engine.kernels.linear_step as linear_step

    monkeypatch.setattr(linear_step, "MAX_FUSED_DIM", 32)  # a 37-wide row is "wide": small under the interpreter
    z, anchor, gen = _step_case(3, 37, 4)
    grad_h = torch.randn(3, 50, generator=gen)
    weight = torch.randn(50, 37, generator=gen)
    cfg = ProtectConfig(eps=0.05, alpha=0.02, norm=norm)
    want = _reference_step(z, (grad_h.double() @ weight.double()).float(), anchor, cfg, True)
    calls = []
    monkeypatch.setattr(linear_step, "_linear_step_kernel", calls)  # must not be launched
    got = linear_sign_step(grad_h, weight, z.clone(), anchor, cfg.alpha, cfg.eps, norm, "ball", True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,split_k,wide", [(5, 1, False), (5, 3, False), (5, 1, True)],
                         ids=["fused", "split-K", "wide"])
def test_step_writes_z_in_the_decoders_dtype(batch, split_k, wide, monkeypatch):
    """z_low: the new z cast to fp16, exactly torch's cast, from the fused epilogue, the split-K finisher
    and the wide rows' step kernel; z itself as without it; z_low untouched where not given."""
    import advface_engine.kernels.linear_step as linear_step

    if wide:
        monkeypatch.setattr(linear_step, "MAX_FUSED_DIM", 32)
    z, anchor, gen = _step_case(batch, 37, 5)
    grad_h = torch.randn(batch, 201, generator=gen)
    weight = torch.randn(201, 37, generator=gen)
    want = linear_sign_step(grad_h, weight, z.clone(), anchor, 0.02, 0.05, split_k=split_k)
    low = torch.full_like(z, float("nan"), dtype=torch.float16)
    got = linear_sign_step(grad_h, weight, z.clone(), anchor, 0.02, 0.05, split_k=split_k, z_low=low)
    assert torch.equal(got, want) and torch.equal(low, want.half())
    low = torch.full_like(z, float("nan"), dtype=torch.float16)
    got = sign_step_project(z.clone(), torch.randn(batch, 37, generator=gen), anchor, 0.02, 0.05, normalize=True,
                            z_low=low)
    assert torch.equal(low, got.half())
    with pytest.raises(ValueError, match="z_low"):
        sign_step_project(z.clone(), grad_h[:, :37], anchor, 0.02, 0.05, z_low=low[:, :5])


def test_linear_step_rejects_bad_input():
    z = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight"):
        linear_sign_step(torch.zeros(2, 4), torch.zeros(5, 8), z, z, 0.1, 0.1)
    with pytest.raises(ValueError, match="float32"):
        linear_sign_step(torch.zeros(2, 4), torch.zeros(4, 8), z.double(), z.double(), 0.1, 0.1)
