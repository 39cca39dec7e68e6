"""The fused backend against the reference backend, on every decoder family (fp32, Triton interpreter on CPU).

Criteria (issue 3): per-step sign agreement of g >= 99.9%; final |z_fused - z_ref| <= 2 alpha on
>= 99.9% of entries; the ball constraint holds exactly. GPU-only checks are marked ``gpu``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cxx, tiny_models
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import advface_engine as afe
import advface_engine.backends as backends
import advface_engine.backends.fused as fused_module
import advface_engine.backends.graphs as graphs_module
import advface_engine.backends.plan as plan_module
from advface_engine.backends import UnsupportedModelError
from advface_engine.backends.fused import CompiledEncoder, EagerGraph, FusedBackend
from advface_engine.backends.modules import autocast_copy, fold_encoder_batchnorm, weights_key
from advface_engine.backends.reference import (
    ReferenceBackend,
    guard_frame,
    project,
    shadow_targets,
    step_direction,
)
from advface_engine.kernels import is_nhwc
from advface_engine.models import build_model
from advface_engine.protect import frozen

pytestmark = pytest.mark.interpreter  # gpu-marked tests excepted (conftest)

# assert_close tolerances by what is compared (as test_kernels.py's TOL): each pair used here is named once
TOL = {
    "exact": dict(rtol=0, atol=0),  # the same computation, to the bit
    "fp32": dict(rtol=1e-5, atol=1e-6),  # one fp32 computation against another way to the same values
    "fp32 sums": dict(rtol=1e-5, atol=1e-5),  # fp32 sums added in another order (NHWC, a compiled encoder)
    "fp32 gradient": dict(rtol=1e-4, atol=1e-5),  # a gradient through the whole decoder against autograd's
    "fp32 loss": dict(rtol=1e-4, atol=1e-4),  # per-sample L1 sums over a whole image
    "half": dict(rtol=2e-2, atol=2e-2),  # an fp16/bf16 anchor against fp32
    "bf16 loss": dict(rtol=1e-2, atol=1e-3),  # per-sample L1 sums in a bf16 decoder
    "float64": dict(rtol=1e-12, atol=1e-12),  # float64 both ways: rounding only
    "float64 folded": dict(rtol=1e-10, atol=1e-10),  # float64, a BatchNorm folded into the layer before
}

VARIANTS = [
    ("dcgan", {}),
    ("dcgan", {"act": "leaky_relu", "head": "sigmoid"}),
    ("dcgan", {"act": "prelu", "head": "identity"}),
    ("nbnet", {}),
    ("nbnet", {"act": "prelu"}),
    ("upconv", {"mode": "nearest"}),
    ("upconv", {"mode": "bilinear", "act": "relu"}),
]
# the paper's anchor E(S(z)) (the encoder's part of the fused backend runs) and the default guard: with these
# random models it holds nearly every row on its cap, where a rotation spreads one flipped sign over the row
CFG = afe.ProtectConfig(eps=0.05, alpha=0.01, steps=5, anchor="shadow", random_start=False)
UNGUARDED = CFG.replace(min_cosine=None)  # for entry-by-entry precision checks of the steps themselves


def _ids(variant):
    family, kwargs = variant
    return "-".join([family] + [str(v) for v in kwargs.values()])


def shadow_variant(family: str, seed: int = 0, **kwargs) -> nn.Module:
    """A tiny shadow decoder with non-trivial BatchNorm (weights, bias, statistics) and PReLU slopes."""
    torch.manual_seed(seed)
    shadow = build_model(family, feature_dim=16, size=16, width=4, **kwargs)
    for m in shadow.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.05, 0.4)
    return shadow.eval()


def features(batch: int = 16, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed)), dim=1)


def agreement(z_fused: torch.Tensor, z_ref: torch.Tensor, alpha: float) -> float:
    """Fraction of entries with |z_fused - z_ref| <= 2 alpha."""
    return ((z_fused - z_ref).abs() <= 2 * alpha).float().mean().item()


def reference_gradient(shadow: nn.Module, z_t: torch.Tensor, x_shadow: torch.Tensor) -> torch.Tensor:
    z_t = z_t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((shadow(z_t) - x_shadow).abs().sum(), z_t)
    return grad


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradient_signs_agree_at_every_step(variant, channels_last):
    """Along the reference trajectory, the fused g_t has the reference's signs (>= 99.9% per step)."""
    shadow, encoder = shadow_variant(variant[0], **variant[1]), tiny_models()[1]
    z = features(8)
    with frozen(shadow, encoder):
        backend = FusedBackend(shadow, encoder, CFG, channels_last=channels_last)
        (x_ref,), anchor = shadow_targets(z, shadow, encoder, CFG)
        x_fused, _ = backend.targets(z)
        assert is_nhwc(backend.plan.hidden(z, keep=False)[0]) == channels_last  # the layout asked for ran
        z_t, report = anchor.clone(), []
        for _ in range(CFG.steps):
            g_ref = reference_gradient(shadow, z_t, x_ref)
            g_fused = backend.gradient(z_t, x_fused)
            report.append(((g_fused.sign() == g_ref.sign()).float().mean().item(),
                           ((g_fused - g_ref).norm() / g_ref.norm()).item()))
            z_t = project(z_t + CFG.alpha * step_direction(g_ref, "linf"), z_t, anchor, CFG)
    assert all(signs >= 0.999 and rel_err < 1e-3 for signs, rel_err in report), report


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_equals_reference_on_every_family(variant, channels_last):
    shadow, encoder = shadow_variant(variant[0], **variant[1]), tiny_models()[1]
    z = features(8)
    got = afe.Protector(shadow, encoder, CFG, backend="fused", backend_options={"channels_last": channels_last})(z)
    want = afe.protect(z, shadow, encoder, CFG, backend="reference")
    assert got.shape == z.shape and got.dtype == z.dtype
    assert agreement(got, want, CFG.alpha) >= 0.999, (got - want).abs().max()
    # the steps moved z: the comparison is not between two unchanged anchors
    assert (want - afe.protect(z, shadow, encoder, CFG.replace(steps=0))).abs().max() > CFG.alpha


class ViewEncoder(nn.Module):
    """Flattens with ``.view``, as many encoders do: it needs a contiguous image."""

    def __init__(self, size: int = 16, dim: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * (size // 2) ** 2, dim)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("backend, options", [("reference", None), ("fused", {"channels_last": True})])
def test_an_encoder_that_flattens_with_view_gets_a_contiguous_image(backend, options):
    """The shadow runs channels_last (the CPU reference, the fused option); its image reaches E contiguous."""
    torch.manual_seed(0)
    protector = afe.Protector(shadow_variant("dcgan"), ViewEncoder().eval(), CFG, backend=backend,
                              backend_options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused backend says its encoder copy cannot run NHWC
        assert protector(features(4)).shape == (4, 16)


def test_channels_last_default_follows_the_dtype(models):
    """None (the default): NHWC for bf16 and fp16 (tensor cores), NCHW for fp32 and tf32; an explicit
    choice is kept. The option's type is checked where it is given."""
    shadow, encoder = shadow_variant("dcgan"), models[1]
    assert not FusedBackend(shadow, encoder, CFG).channels_last
    assert FusedBackend(shadow, encoder, CFG, dtype="fp16").channels_last
    assert not FusedBackend(shadow, encoder, CFG, dtype="fp16", channels_last=False).channels_last
    assert FusedBackend(shadow, encoder, CFG, channels_last=True).channels_last
    backends.check_fused_options({"channels_last": None})
    with pytest.raises(TypeError, match="channels_last"):
        backends.check_fused_options({"channels_last": "yes"})


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_channels_last_runs_an_nhwc_copy_of_the_encoder(dtype, models):
    """With channels_last the anchor comes from a channels_last copy of E (the same function up to
    rounding), rebuilt when E's weights change; an encoder that cannot take NHWC input (it flattens
    with .view) runs as it is."""
    shadow, encoder = shadow_variant("dcgan"), models[1]
    z = features(8)
    with frozen(shadow, encoder):
        nhwc = FusedBackend(shadow, encoder, CFG, dtype=dtype, channels_last=True, graphs=False)
        nchw = FusedBackend(shadow, encoder, CFG, dtype=dtype, channels_last=False, graphs=False)
        anchors = nhwc.targets(z)[1], nchw.targets(z)[1]
        copy, layout = nhwc._encoder_copy
        assert layout and copy is not encoder
        assert is_nhwc(next(p for p in copy.parameters() if p.dim() == 4))
        assert all(not is_nhwc(p) for p in encoder.parameters())  # the caller's encoder is left alone
        torch.testing.assert_close(anchors[0], anchors[1], **TOL["fp32" if dtype == "fp32" else "half"])
    with torch.no_grad():
        next(encoder.parameters()).mul_(0.5)
    with frozen(shadow, encoder):
        nhwc.run(z)
        assert nhwc._encoder_copy is not None and nhwc._encoder_copy[0] is not copy
    protector = afe.Protector(shadow_variant("dcgan"), ViewEncoder().eval(), CFG, backend="fused",
                              backend_options={"channels_last": True})
    with pytest.warns(UserWarning, match="encoder runs as it is"):
        assert protector(features(4)).shape == (4, 16)
    assert protector.backend._encoder_copy is None


class StridedEncoder(nn.Module):
    """Reads its input's memory in NCHW order (as_strided): NHWC input gives other features, no error."""

    def __init__(self, size: int = 16, dim: int = 16):
        super().__init__()
        self.fc = nn.Linear(3 * size * size, dim)

    def forward(self, x):
        n = x[0].numel()
        return self.fc(torch.as_strided(x, (x.shape[0], n), (n, 1)))


class ScaledConv(nn.Conv2d):
    """A Conv2d subclass with its own use of the weight: autocast's casts cannot be assumed for it."""

    def forward(self, x):
        return self._conv_forward(x, self.weight * 2.0, self.bias)


@pytest.mark.parametrize("channels_last", [False, True])
def test_encoder_copy_stores_autocast_weights(channels_last, models):
    """fp16: E's copy has its BatchNorm2d folded (every one of MobileFaceNet's follows a convolution) and
    holds its convolution, Linear and PReLU weights in fp16 (what autocast casts at every call): the
    folded encoder's features to the bit in NCHW, E's within rounding; E is left alone."""
    shadow, encoder = shadow_variant("dcgan"), models[1]
    with frozen(shadow, encoder), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back
        backend = FusedBackend(shadow, encoder, CFG, dtype="fp16", channels_last=channels_last, graphs=False)
        (x_shadow,), anchor = backend.targets(features(4))
        copied, nhwc = backend._encoder_copy
        assert copied is not encoder and nhwc == channels_last
        layers = [m for m in copied.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.PReLU))]
        assert layers and all(p.dtype == torch.float16 for m in layers for p in m.parameters())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in copied.modules())  # the features' BatchNorm1d stays
        assert any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
        assert all(p.dtype == torch.float32 for p in encoder.parameters())
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            expected = F.normalize(encoder(x_shadow).float(), dim=1)
            folded = F.normalize(fold_encoder_batchnorm(encoder)(x_shadow).float(), dim=1)
        torch.testing.assert_close(anchor, expected, **TOL["half"])
        if not channels_last:
            assert torch.equal(anchor, folded)


class FoldCases(nn.Module):
    """Each case of fold_encoder_batchnorm: conv -> BN -> BN (both fold), BN -> conv (stays), a conv
    whose output is also used elsewhere (stays), a conv called twice (stays: shared weights), a conv
    whose weight is also read directly (stays), a Conv1d -> BatchNorm1d (folds), Linear -> BatchNorm1d
    (stays: on a 3-D input BatchNorm1d normalises dim 1, not the Linear's outputs)."""

    def __init__(self):
        super().__init__()
        self.pre_bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)
        self.bn, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.residual, self.bn_residual = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.shared, self.bn_shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.read, self.bn_read = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv1d, self.bn1d = nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.fc, self.bn_fc = nn.Linear(64, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        x = self.bn2(self.bn(self.conv(self.pre_bn(x))))
        y = self.residual(x)
        x = self.bn_residual(y) + y
        x = self.bn_shared(self.shared(x)) + self.shared(x)
        x = self.bn_read(self.read(x)) + F.conv2d(x, self.read.weight)
        x = self.bn1d(self.conv1d(x.flatten(2)))  # (B, 8, 64)
        return self.bn_fc(self.fc(x))  # BatchNorm1d over dim 1 (8), which the Linear's 8 outputs are not


def test_fold_encoder_batchnorm_folds_only_a_layers_sole_use():
    torch.manual_seed(0)
    encoder = FoldCases().double()
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    encoder.eval()
    folded = fold_encoder_batchnorm(encoder)
    calls = [n.target for n in folded.graph.nodes if n.op == "call_module"]
    assert not {"bn", "bn2", "bn1d"} & set(calls)
    assert {"pre_bn", "bn_residual", "bn_shared", "bn_read", "bn_fc"} <= set(calls) and calls.count("shared") == 2
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), encoder(x), **TOL["float64 folded"])
        assert not torch.equal(folded.conv.weight, encoder.conv.weight)  # E itself is left alone
    assert fold_encoder_batchnorm(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))) is None
    handle = encoder.register_forward_pre_hook(lambda module, args: (args[0] * 2 - 1,))  # a trace would drop it
    assert fold_encoder_batchnorm(encoder) is None
    handle.remove()
    assert fold_encoder_batchnorm(torch.jit.script(encoder)) is None  # TorchScript: torch.fx cannot trace it
    assert fold_encoder_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()) is None


class ConvBatchNormEncoder(nn.Module):
    """Conv -> BatchNorm -> Linear: a foldable pair, for encoders whose forward a trace cannot keep."""

    def __init__(self, size: int = 16, dim: int = 16):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * size * size, dim)


class UntraceableEncoder(ConvBatchNormEncoder):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.sum() > 1e9:
            x = x / 2
        return self.fc(x.flatten(1))


class OwnPrecisionBatchNormEncoder(ConvBatchNormEncoder):
    """Its convolution (followed by a BatchNorm) in fp32 with autocast off: a trace keeps no autocast."""

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):  # a literal device type, as encoders written for one have
            x = self.bn(self.conv(x.float()))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("make, why", [(OwnPrecisionBatchNormEncoder, "the traced copy runs layers in other"),
                                       (UntraceableEncoder, "TraceError")], ids=["own-autocast", "untraceable"])
def test_encoder_a_trace_would_change_keeps_its_batchnorm(make, why):
    """E that torch.fx cannot trace, or whose fp32 layers a folded copy would run in fp16 (the trace
    loses E's own autocast): said in the warning; E's anchor to the bit (its copy with fp16 weights
    where that is exact), BatchNorm not folded."""
    torch.manual_seed(0)
    shadow, encoder = shadow_variant("dcgan"), make().eval()
    with frozen(shadow, encoder):
        backend = FusedBackend(shadow, encoder, CFG, dtype="fp16", channels_last=False, graphs=False)
        with pytest.warns(UserWarning, match=f"left out: with its BatchNorm folded: {why}"):
            (x_shadow,), anchor = backend.targets(features(4))
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            assert torch.equal(anchor, F.normalize(encoder(x_shadow).float(), dim=1))
        assert backend._encoder_copy is None or isinstance(backend._encoder_copy[0].bn, nn.BatchNorm2d)


def test_autocast_copy_casts_only_what_autocast_casts():
    """Exact layer types and non-float64 weights; no copy where nothing would be cast."""
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledConv(4, 4, 3), nn.Conv2d(4, 4, 1).double(), nn.PReLU())
    assert autocast_copy(nn.Flatten(), torch.float16) is None
    assert autocast_copy(nn.Sequential(nn.BatchNorm2d(3)), torch.float16) is None
    assert autocast_copy(nn.Sequential(nn.Conv2d(3, 4, 3).half()), torch.float16) is None
    copied = autocast_copy(encoder, torch.bfloat16)
    assert [m.weight.dtype for m in copied] == [torch.bfloat16, torch.float32, torch.float64, torch.bfloat16]
    assert encoder[0].weight.dtype == torch.float32


class OwnPrecisionEncoder(nn.Module):
    """Runs its convolution in fp32 with autocast off, as some encoders do: fp16 weights break it."""

    def __init__(self, size: int = 16, dim: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * size * size, dim)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            x = self.conv(x.float())
        return self.fc(x.flatten(1))


class SpectralEncoder(nn.Module):
    """A conv under old-style spectral_norm: its weight is recomputed from cast parameters."""

    def __init__(self, size: int = 16, dim: int = 16):
        super().__init__()
        self.conv = nn.utils.spectral_norm(nn.Conv2d(3, 4, 3, padding=1))
        self.fc = nn.Linear(4 * size * size, dim)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("make,why", [(OwnPrecisionEncoder, "RuntimeError"), (SpectralEncoder, "features change")],
                         ids=["own-precision", "spectral-norm"])
def test_encoder_copy_with_cast_weights_only_where_exact(make, why, channels_last):
    """A copy with cast weights that fails or changes E's features is not used (with a warning);
    the NHWC copy of E itself still is where it gives E's features."""
    torch.manual_seed(0)
    shadow, encoder = shadow_variant("dcgan"), make().eval()
    z = features(4)
    with frozen(shadow, encoder):
        backend = FusedBackend(shadow, encoder, CFG, dtype="fp16", channels_last=channels_last, graphs=False)
        with pytest.warns(UserWarning, match=f"stored in fp16.*{why}"):
            anchor = backend.targets(z)[1]
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            expected = F.normalize(encoder(backend.targets(z)[0][0]).float(), dim=1)
        if channels_last:
            copied, nhwc = backend._encoder_copy
            assert nhwc and is_nhwc(copied.conv.weight) and copied.fc.weight.dtype == torch.float32
            torch.testing.assert_close(anchor, expected, **TOL["half"])
        else:
            assert backend._encoder_copy is None
            assert torch.equal(anchor, expected)


@needs_cxx
def test_compiled_encoder_gives_the_encoders_anchor(models):
    """compile_encoder: the anchor comes from E through torch.compile (inductor's CPU code here),
    within rounding of E's, at the first batch size and a later one (a recompile); the protection
    agrees with the uncompiled backend's. A later compile that fails: a warning, E uncompiled."""
    shadow, encoder = shadow_variant("dcgan"), models[1]
    z = features(4)
    with frozen(shadow, encoder), warnings.catch_warnings():
        warnings.filterwarnings("error", message="the encoder runs|torch.compile of the encoder")  # no fallback
        compiled = FusedBackend(shadow, encoder, CFG, compile_encoder=True, graphs=False)
        plain = FusedBackend(shadow, encoder, CFG, graphs=False)
        for rows in (z, z[:1]):
            torch.testing.assert_close(compiled.targets(rows)[1], plain.targets(rows)[1], **TOL["fp32 sums"])
        copy, _ = compiled._encoder_copy
        assert isinstance(copy, CompiledEncoder) and copy.failure is None
        assert agreement(compiled.run(z), plain.run(z), CFG.alpha) >= 0.999

    class Failing(nn.Module):
        def forward(self, x):
            raise torch._dynamo.exc.TorchDynamoException("recompile failed")

    copy.compiled = Failing()
    with frozen(shadow, encoder), pytest.warns(UserWarning, match="runs uncompiled .*recompile failed"):
        anchor = compiled.targets(z[:2])[1]
    assert torch.equal(anchor, plain.targets(z[:2])[1])  # E itself, from then on


@needs_cxx
def test_compile_past_the_recompile_limit_runs_the_encoder_uncompiled(models):
    """Past dynamo's recompile limit (here 1: the first batch size's compile, then no other) dynamo
    itself would run E uncompiled in silence: the backend says so and gives E's anchor."""
    class Fresh(type(models[1])):  # a code object of its own: dynamo's compiled entries are per code object
        def forward(self, x):
            return super().forward(x)

    shadow, encoder = shadow_variant("dcgan"), copy.deepcopy(models[1])
    encoder.__class__ = Fresh
    z = features(4)
    with frozen(shadow, encoder), torch._dynamo.config.patch(recompile_limit=1):
        compiled = FusedBackend(shadow, encoder, CFG, compile_encoder=True, graphs=False)
        plain = FusedBackend(shadow, encoder, CFG, graphs=False)
        compiled.targets(z)
        assert compiled._encoder_copy[0].failure is None
        with pytest.warns(UserWarning, match="runs uncompiled .*recompile limit .* = 1"):
            anchor = compiled.targets(z[:1])[1]
        assert torch.equal(anchor, plain.targets(z[:1])[1])


def test_compile_failure_runs_the_encoder_uncompiled(models, monkeypatch):
    """A torch.compile that fails (no compiler, an unsupported op) is said once; the rest is kept."""

    class Refusing(nn.Module):
        def forward(self, x):
            raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Refusing())
    shadow, encoder = shadow_variant("dcgan"), models[1]
    z = features(4)
    with frozen(shadow, encoder):
        backend = FusedBackend(shadow, encoder, CFG, dtype="fp16", compile_encoder=True, graphs=False)
        with pytest.warns(UserWarning, match="runs with BatchNorm folded, fp16 weights, NHWC layout; left out: "
                                             "through torch.compile: RuntimeError: no C[+][+] compiler"):
            backend.targets(z)
        copied, nhwc = backend._encoder_copy
        assert nhwc and not isinstance(copied, Refusing)
    with pytest.raises(TypeError, match="compile_encoder"):
        backends.check_fused_options({"compile_encoder": 1})


def test_encoder_copy_with_other_features_is_not_used():
    """An encoder that reads memory in NCHW order gives other features from NHWC input: the check on
    the first image catches it, E itself runs (with a warning) and the anchor is NCHW's."""
    shadow, encoder = shadow_variant("dcgan"), StridedEncoder().eval()
    z = features(4)
    with frozen(shadow, encoder):
        nchw = FusedBackend(shadow, encoder, CFG, channels_last=False, graphs=False)
        nhwc = FusedBackend(shadow, encoder, CFG, channels_last=True, graphs=False)
        with pytest.warns(UserWarning, match="in NHWC layout its features differ"):
            anchor = nhwc.targets(z)[1]
        assert nhwc._encoder_copy is None
        assert torch.equal(anchor, nchw.targets(z)[1])


class ConvGradLayouts(TorchDispatchMode):
    """Records whether each convolution comes out NHWC (forward, and the input gradients, which run
    as the adjoint convolution's forward)."""

    def __init__(self):
        super().__init__()
        self.nhwc, self.clones = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.convolution:
            self.nhwc.append(is_nhwc(out))
        self.clones += func.overloadpacket is torch.ops.aten.clone
        return out


@pytest.mark.parametrize("variant", [("dcgan", {}), ("nbnet", {}), ("upconv", {"mode": "bilinear"}),
                                     ("upconv", {"mode": "nearest"})], ids=_ids)
def test_channels_last_backward_stays_nhwc(variant, monkeypatch):
    """Every convolution's input gradient and every activation backward in NHWC, with no copy at a
    step: 1x1 kernels (nbnet's transitions) and the bilinear backward's matmuls used to send them back
    to NCHW, the stem's image (the first Linear's output) was NCHW, converted at every step, and a
    LeakyReLU's one slope was expanded to a slope per channel, copied at every activation."""
    shadow, encoder = shadow_variant(variant[0], **variant[1]), tiny_models()[1]
    seen, act_backward = [], plan_module.act_backward

    def recording(grad, pre, *args, **kwargs):
        seen.append((is_nhwc(grad), is_nhwc(pre)))
        return act_backward(grad, pre, *args, **kwargs)

    monkeypatch.setattr(plan_module, "act_backward", recording)
    head_conv_backward = plan_module.head_conv_backward

    def recording_head(grad, weight, pre=None, *args, **kwargs):  # the last activation's backward runs in it
        out = head_conv_backward(grad, weight, pre, *args, **kwargs)
        seen.insert(0, (is_nhwc(out), pre is None or is_nhwc(pre)))
        return out

    monkeypatch.setattr(plan_module, "head_conv_backward", recording_head)
    with frozen(shadow, encoder):
        backend = FusedBackend(shadow, encoder, CFG, channels_last=True)
        z = features(4)
        x_shadow, _ = backend.targets(z)
        backend.gradient(z, x_shadow)  # the first call makes what later steps reuse (interpolation matrices)
        with ConvGradLayouts() as convs:
            backend.gradient(z, x_shadow)
    assert seen and all(grad and pre for grad, pre in seen), seen
    assert convs.nhwc and all(convs.nhwc), convs.nhwc
    # a DenseBlock's backward copies its gradient, each layer's channel slice and the input's; nothing else copies
    dense = sum(len(op.layers) + 2 for op in backend.plan.ops if isinstance(op, plan_module.Dense))
    assert convs.clones == dense


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", [("dcgan", {}), ("upconv", {"mode": "nearest"})], ids=_ids)
def test_half_precision_steps_read_z_without_a_cast(variant):
    """fp16: the step kernel writes z's fp16 copy, which the next step's decoder reads: no cast kernel
    at a step, and the same z to the bit as casting z at every step."""
    shadow, encoder = shadow_variant(variant[0], **variant[1]), tiny_models()[1]
    z = features(4)
    with frozen(shadow, encoder), torch.no_grad():
        backend = FusedBackend(shadow, encoder, CFG, dtype="fp16", graphs=False)
        got, _ = backend.protect(z, None)
        frame = guard_frame(z)
        x_shadow, anchor = backend.targets(z, frame)
        want, z_low = anchor.clone(), anchor.half()
        for t in range(CFG.steps):
            backend.step(want, anchor, x_shadow, last=t == CFG.steps - 1, frame=frame)  # casts z at every step
        with OpNames() as ops:
            backend.step(anchor.clone(), anchor, x_shadow, last=False, z_low=z_low, frame=frame)
    assert torch.equal(got, want)
    assert "_to_copy" not in ops.names, ops.names


def _batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.mark.parametrize("make", [
    lambda: shadow_variant("dcgan"), lambda: shadow_variant("nbnet"), lambda: shadow_variant("upconv"),
    lambda: nn.Sequential(nn.Linear(16, 64), nn.Unflatten(1, (4, -1, 4)), nn.BatchNorm2d(4), nn.ReLU()),
    lambda: nn.Sequential(nn.Linear(16, 32), nn.Flatten(), nn.BatchNorm1d(32), nn.ReLU()),
    lambda: nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.Unflatten(1, (4, 4, 4)), nn.BatchNorm2d(4)),
    lambda: nn.Sequential(nn.Linear(16, 64), nn.Unflatten(1, (4, 4, 4)), nn.ConvTranspose2d(4, 4, 4, 2, 1, groups=2),
                          nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)),
], ids=["dcgan", "nbnet", "upconv", "inferred-size", "flatten", "two-in-a-row", "grouped"])
def test_reference_and_plan_fold_the_same_batchnorms(make):
    """One rule (modules.batchnorm_site) says where a BatchNorm folds: the reference's copy of the decoder
    and the fused plan fold the same ones."""
    from advface_engine.backends.modules import fold_batchnorm

    shadow = make().eval()
    folded_by_reference = _batchnorms(shadow) - _batchnorms(fold_batchnorm(shadow))
    folded_by_plan = sum(getattr(op, "folded", False) for op in plan_module.build_plan(shadow).ops)
    assert folded_by_reference == folded_by_plan > 0


@pytest.mark.parametrize("shape", [(4, 4, 4), (4, -1, 4)], ids=["sizes", "inferred"])
def test_stem_image_in_nhwc_equals_nchw(shape):
    """channels_last reorders the first Linear's outputs so that its image is NHWC without a copy: the
    same decoder output and gradient as NCHW, also where the Unflatten infers a size (-1) and a
    BatchNorm after it folds into the Linear."""
    torch.manual_seed(0)
    shadow = nn.Sequential(nn.Linear(16, 64), nn.Unflatten(1, shape), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
                           nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.Tanh()).eval()
    shadow[2].running_mean.uniform_(-0.5, 0.5)
    z, target = features(3), torch.rand(3, 3, 4, 4) * 2 - 1
    plans = [plan_module.build_plan(shadow, channels_last=layout) for layout in (False, True)]
    assert plans[1].ops[1].nhwc and plans[0].first_linear.folded
    with torch.no_grad():
        for plan in plans:
            torch.testing.assert_close(plan.forward(z)[0], shadow(z), **TOL["fp32"])
        grads = [plan.l1_gradient(z, target)[0].reshape(3, -1) @ plan.first_linear.weight for plan in plans]
    torch.testing.assert_close(grads[1], grads[0], **TOL["fp32 sums"])
    shadow[1] = nn.Unflatten(1, (5, -1, 4))  # 64 outputs are not 5 * H * 4: named, not a shape error later
    with pytest.raises(backends.UnsupportedModelError, match=r"Unflatten.*after a Linear with 64 outputs"):
        plan_module.build_plan(shadow)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_fp16_decoder_stays_close_to_the_fp32_reference(variant):
    """Mixed precision (fp16 decoder and encoder, fp32 z, anchor and steps) under the interpreter.

    Rounding moves a few decoder-gradient signs, and a moved sign moves that entry by 2 alpha
    and may tip later steps; measured 99.1-99.8 % of entries within 2 alpha at B=64.
    """
    shadow, encoder = shadow_variant(variant[0], **variant[1]), tiny_models()[1]
    z = features(32)
    got = _run(FusedBackend(shadow, encoder, UNGUARDED, dtype="fp16", graphs=False), z)
    want = afe.protect(z, shadow, encoder, UNGUARDED, backend="reference")
    assert got.dtype == torch.float32
    assert agreement(got, want, CFG.alpha) >= 0.98, agreement(got, want, CFG.alpha)
    assert (want - afe.protect(z, shadow, encoder, UNGUARDED.replace(steps=0))).abs().max() > CFG.alpha


def _formula_kernels(monkeypatch, dtypes=("fp32", "fp16", "bf16")) -> None:
    """The fused backend with the kernels swapped for their PyTorch formulas (kernel_formulas.py)."""
    import kernel_formulas

    import advface_engine.backends.plan as plan_module

    monkeypatch.setattr(fused_module, "sign_step_project", kernel_formulas.sign_step_project)  # an ensemble's step
    for name in ("l1_sign_backward", "act_backward", "bias_act", "head_conv", "head_conv_backward", "sign_step_project",
                 "linear_sign_step"):  # DecoderPlan.step launches the step kernels
        monkeypatch.setattr(plan_module, name, getattr(kernel_formulas, name))
    monkeypatch.setattr(fused_module, "CPU_DTYPES", dtypes)


def test_formula_kernels_equal_the_triton_kernels(monkeypatch):
    """The stand-ins are faithful: in fp16, where the interpreter is right, both give the same z."""
    shadow, encoder = shadow_variant("nbnet", act="prelu"), tiny_models()[1]
    z = features(32)
    kernels = _run(FusedBackend(shadow, encoder, CFG, dtype="fp16"), z)
    _formula_kernels(monkeypatch)
    formulas = _run(FusedBackend(shadow, encoder, CFG, dtype="fp16"), z)
    assert agreement(kernels, formulas, CFG.alpha) >= 0.999


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_bf16_decoder_stays_close_to_the_fp32_reference(variant, monkeypatch):
    """Everything around the kernels in bfloat16 (plan, convolutions, autocast encoder, fp32 z and
    steps), with the kernels' formulas; bf16's 8-bit mantissa flips more signs than fp16's 11:
    measured 97.2-99.5 % of entries within 2 alpha at B=64. The bf16 kernels themselves are
    compiled and checked by test_kernels_aot.py; their numbers need a GPU (test_gpu_*)."""
    _formula_kernels(monkeypatch)
    shadow, encoder = shadow_variant(variant[0], **variant[1]), tiny_models()[1]
    z = features(32)
    backend = FusedBackend(shadow, encoder, UNGUARDED, dtype="bf16")
    assert backend.plan.dtype == torch.bfloat16
    got = _run(backend, z)
    want = afe.protect(z, shadow, encoder, UNGUARDED, backend="reference")
    assert got.dtype == torch.float32
    assert agreement(got, want, CFG.alpha) >= 0.95, agreement(got, want, CFG.alpha)


CONFIGS = [
    dict(norm="l2", eps=0.2, alpha=0.08),
    dict(constraint="per_step"),
    dict(norm="l2", constraint="per_step", eps=0.2, alpha=0.08),
    dict(anchor="original", random_start=True, seed=3),
    dict(norm="l2", random_start=True, eps=0.2, alpha=0.08, normalize=False),
    dict(steps=0),
    dict(steps=1),
    dict(min_cosine=None),
    dict(min_cosine=0.3, norm="l2", eps=0.2, alpha=0.08),
    dict(min_cosine=0.95, anchor="original", random_start=True, seed=3),
]


@pytest.mark.parametrize("changes", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_equals_reference_for_each_setting(changes, models):
    shadow, encoder = models
    cfg = CFG.replace(**changes)
    z = features()
    got = afe.protect(z, shadow, encoder, cfg, backend="fused")
    want = afe.protect(z, shadow, encoder, cfg, backend="reference")
    assert agreement(got, want, cfg.alpha) >= 0.999, (got - want).abs().max()


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.1)])
def test_ball_constraint_holds(norm, eps, models):
    shadow, encoder = models
    cfg = afe.ProtectConfig(eps=eps, alpha=eps / 2, steps=5, norm=norm, anchor="original", normalize=False,
                            random_start=True)
    z = features()
    got = afe.protect(z, shadow, encoder, cfg, backend="fused")
    dist = (got - z).abs().amax(dim=1) if norm == "linf" else (got - z).norm(dim=1)
    assert (dist <= eps * (1 + 1e-6)).all(), dist
    assert (dist > 0.99 * eps).any(), "the budget must be reached for the check to mean something"


@pytest.mark.parametrize("kwargs", [dict(scale_factor=2), dict(scale_factor=(2, 3), align_corners=True),
                                    dict(scale_factor=1.5), dict(size=(7, 10))], ids=str)
def test_bilinear_backward_as_matmuls_equals_autograd(kwargs):
    """The plan's bilinear backward (interpolation matrices, repeatable on a GPU) is PyTorch's, in float64."""
    upsample = plan_module.Upsample(nn.Upsample(mode="bilinear", **kwargs))
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    y, in_shape = upsample.forward(x)
    grad = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(upsample.backward(grad, in_shape), want, **TOL["float64"])


def test_decoder_without_first_linear_uses_standalone_step():
    torch.manual_seed(4)
    shadow = nn.Sequential(
        nn.Unflatten(1, (16, 1, 1)), nn.ConvTranspose2d(16, 8, 4, 1, 0), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
        nn.Upsample(scale_factor=4), nn.Conv2d(8, 3, 3, 1, 1), nn.Tanh(),
    ).eval()
    shadow[2].running_var.uniform_(0.5, 1.5)
    encoder = tiny_models()[1]
    backend = FusedBackend(shadow, encoder, CFG)
    assert backend.plan.first_linear is None
    z = features()
    got = afe.Protector(shadow, encoder, CFG, backend="fused")(z)
    want = afe.protect(z, shadow, encoder, CFG)
    assert agreement(got, want, CFG.alpha) >= 0.999, (got - want).abs().max()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_convolution_input_gradients_of_unusual_shapes(channels_last):
    """Input gradients run as the adjoint convolution's forward: stride, padding 0, dilation, groups,
    output padding (one at or past the stride, which PyTorch allows below the dilation, would give the
    adjoint extra rows), and a last convolution the fused head does not take (padding 0)."""
    torch.manual_seed(5)
    shadow = nn.Sequential(
        nn.Linear(16, 4 * 6 * 6), nn.Unflatten(1, (4, 6, 6)), nn.ReLU(),
        nn.ConvTranspose2d(4, 6, 3, stride=1, padding=1, output_padding=1, dilation=2), nn.ReLU(),
        nn.ConvTranspose2d(6, 6, 4, stride=2, padding=1, output_padding=1, groups=2), nn.LeakyReLU(0.1),
        nn.Conv2d(6, 4, 3, stride=2, padding=0, dilation=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=1, padding=2, dilation=2, groups=2), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=0), nn.Tanh(),
    ).eval()
    backend = FusedBackend(shadow, tiny_models()[1], CFG, channels_last=channels_last)
    assert backend.plan.head_conv is None  # padding 0: cuDNN and the l1_sign kernel
    z = features(4)
    x_shadow = shadow(torch.randn(4, 16)).detach()
    want = reference_gradient(shadow, z, x_shadow)
    got = backend.gradient(z, [x_shadow])
    torch.testing.assert_close(got, want, **TOL["fp32 gradient"])


def test_generic_backward_equals_l1_gradient_with_a_fused_head(models):
    """DecoderPlan.forward + the L1 sign + DecoderPlan.backward (the general path) equals l1_gradient,
    the fused head conv's path: the head conv's backward carries the activation before it, once."""
    backend = FusedBackend(shadow_variant("dcgan"), models[1], CFG)
    plan, z = backend.plan, features(4)
    assert plan.head_conv is not None and plan.head_conv.act is not None
    x_shadow = plan.forward(features(4, seed=2), keep=False)[0]
    y, saved = plan.forward(z)
    general = plan.backward(plan_module.l1_sign_backward(y, x_shadow, plan.head), saved)
    torch.testing.assert_close(general, plan.l1_gradient(z, x_shadow)[0], **TOL["fp32"])


@pytest.mark.parametrize("family", ["dcgan", "upconv"])
def test_stem_activation_backward_runs_in_the_step_kernel(monkeypatch, family, models):
    """The activation right after the first Linear (and its folded BatchNorm) has its backward run by
    the step kernel on the gradient it loads: a step runs act_backward for every activation but that
    one and the one before the head (in head_conv_backward), with the reference's signs."""
    backend = FusedBackend(shadow_variant(family), models[1], CFG)
    plan = backend.plan
    acts = [op for op in plan.ops if isinstance(op, plan_module.Act)]
    assert plan.stem_act is acts[0] and plan.head_conv.act is acts[-1]
    calls = collections.Counter()
    kernel = plan_module.act_backward
    monkeypatch.setattr(plan_module, "act_backward", lambda *a, **kw: calls.update(["call"]) or kernel(*a, **kw))
    z, x_shadow = features(4), plan.forward(features(4, seed=2), keep=False)[0]
    got = backend.gradient(z, [x_shadow])  # materialised: the stem's backward by act_backward
    assert calls["call"] == len(acts) - 1
    torch.testing.assert_close(got, reference_gradient(backend.shadow, z, x_shadow), **TOL["fp32 gradient"])
    calls.clear()
    z_t = z.clone()
    backend.step(z_t, z.clone(), [x_shadow], last=False)
    assert calls["call"] == len(acts) - 2
    want = z + CFG.alpha * torch.sign(reference_gradient(backend.shadow, z, x_shadow))
    assert agreement(z_t, want, CFG.alpha / 2) == 1.0  # every sign as the reference's


def test_unsupported_module_is_named_and_auto_falls_back(monkeypatch, models):
    shadow = nn.Sequential(nn.Linear(16, 3 * 16 * 16), nn.Unflatten(1, (3, 16, 16)), nn.ELU(), nn.Tanh())
    encoder = models[1]
    with pytest.raises(UnsupportedModelError, match="ELU"):
        FusedBackend(shadow, encoder, CFG)
    monkeypatch.setattr(backends, "_device_of", lambda module: torch.device("cuda"))  # as if on a GPU
    with pytest.warns(UserWarning, match="ELU"):
        backend = backends.make_backend("auto", shadow, encoder, CFG)
    assert isinstance(backend, ReferenceBackend)


def test_protector_fused_defaults_and_loss_record(models):
    shadow, encoder = models
    z = features(6)
    protector = afe.Protector(shadow, encoder, CFG, backend="fused")
    assert protector.backend_name == "fused"
    assert protector(z).shape == z.shape
    backend = FusedBackend(shadow, encoder, UNGUARDED, record_loss=True)
    with frozen(shadow, encoder):
        backend.run(z)
        (x_shadow,), anchor = shadow_targets(z, shadow, encoder, UNGUARDED)
        first = (shadow(anchor) - x_shadow).abs().flatten(1).sum(1)
    assert backend.losses.shape == (CFG.steps, 6)
    torch.testing.assert_close(backend.losses[0], first, **TOL["fp32 loss"])
    assert (backend.losses[-1] > backend.losses[0]).all(), "the steps must raise the reconstruction error"


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_an_enclosing_autocast_changes_nothing(backend, models):
    """A caller inside torch.autocast (say, its own bf16 inference) gets the precision the backend
    was asked for: autocast would feed the fused kernels bf16 activations (refused) and silently
    lower the reference's convolutions."""
    shadow, encoder = models
    z = features(6)
    protector = afe.Protector(shadow, encoder, CFG, backend=backend)
    want = protector(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = protector(z)
    torch.testing.assert_close(got, want, **TOL["exact"])


def test_plan_follows_shadow_weights_changed_in_place(models):
    shadow, encoder = shadow_variant("dcgan"), models[1]
    protector = afe.Protector(shadow, encoder, CFG, backend="fused")
    z = features(8)
    before = protector(z)
    with torch.no_grad():
        shadow[0].weight.mul_(-1.0)  # e.g. the shadow trained further after the Protector was built
    got = protector(z)
    want = afe.protect(z, shadow, encoder, CFG)
    assert agreement(got, want, CFG.alpha) >= 0.999, (got - want).abs().max()
    assert agreement(before, want, CFG.alpha) < 0.999, "the change must matter for the check to mean something"


def test_graph_sizes_padding_noise_and_eviction(monkeypatch, models):
    """What surrounds the capture, on a CPU: EagerGraph keeps CudaGraph's contract (static buffers,
    replay recomputes into them) so batch sizes, padding and eviction run for real here."""
    shadow, encoder = shadow_variant("dcgan"), models[1]
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.01, steps=3, random_start=True)  # noise is padded too
    graphed = FusedBackend(shadow, encoder, cfg, graphs=True, record_loss=True)
    graphed.graph_type = EagerGraph
    eager = FusedBackend(shadow, encoder, cfg, graphs=False, record_loss=True)
    z = features(8)

    def both(rows):
        got, want = _run(graphed, rows), _run(eager, rows)
        assert agreement(got, want, cfg.alpha) >= 0.999
        torch.testing.assert_close(graphed.losses, eager.losses, **TOL["fp32 loss"])
        assert graphed.losses.shape == (cfg.steps, rows.shape[0])
        return got

    full = both(z)
    assert list(graphed._graphs) == [8]
    short = both(z[3:8])  # 5 rows replay the 8-row capture, padded with copies of a real row
    assert list(graphed._graphs) == [8]
    assert agreement(short, full[3:8], cfg.alpha) >= 0.999
    both(z[:3])  # graph_size(3) == 4: a capture of its own
    assert list(graphed._graphs) == [8, 4]
    monkeypatch.setattr(graphs_module, "MAX_GRAPHS", 2)
    both(z[:1])
    assert list(graphed._graphs) == [4, 1], "the oldest capture goes first"
    with torch.no_grad():
        shadow[0].weight.mul_(-1.0)
    both(z[:2])  # new weights: plan rebuilt, captures dropped
    assert list(graphed._graphs) == [2]


def test_replay_comes_before_the_weights_check_when_it_reads_only_its_own_memory(monkeypatch, models):
    """A replay reads the plan and the encoder's copy, never the caller's tensors (fp16 here: E's copy
    has its own weights), so the call replays first and checks the weights while the GPU works; a
    change found then drops that result and runs again. E itself in the graph (fp32: no copy) or a
    copy that shares E's memory: the check comes first, as a freed weight must not be read."""
    shadow, encoder = shadow_variant("dcgan"), models[1]
    calls: list[str] = []
    key = fused_module.weights_key
    monkeypatch.setattr(fused_module, "weights_key", lambda *m: calls.append("key") or key(*m))

    class Recorded(EagerGraph):
        def replay(self):
            calls.append("replay")
            super().replay()

    def order(backend, z):
        _run(backend, z)  # the first call captures
        calls.clear()
        got = _run(backend, z)
        return calls.copy(), got

    z = features(4)
    fp16 = FusedBackend(shadow, encoder, CFG, dtype="fp16")
    fp16.graph_type = Recorded
    seen, before = order(fp16, z)
    assert seen == ["replay", "key"] and fp16._own_memory
    with torch.no_grad():
        shadow[0].weight.mul_(-1.0)
    calls.clear()
    got = _run(fp16, z)
    # replayed, the change found, the plan rebuilt (its key), captured and replayed
    assert calls == ["replay", "key", "key", "replay"], calls
    want = _run(FusedBackend(shadow, encoder, CFG, dtype="fp16", graphs=False), z)
    assert torch.equal(got, want) and not torch.equal(before, want)

    fp32 = FusedBackend(shadow, encoder, CFG)
    fp32.graph_type = Recorded
    assert order(fp32, z)[0] == ["key", "replay"] and fp32._own_memory is False
    shared = FusedBackend(shadow, encoder, CFG, dtype="fp16")
    shared.graph_type = Recorded
    _run(shared, z)
    shared._encoder_copy, shared._own_memory = (copy.copy(encoder), True), None  # a copy holding E's tensors
    assert order(shared, z)[0] == ["key", "replay"]
    no_encoder = FusedBackend(shadow, encoder, dataclasses.replace(CFG, anchor="original"))  # E is not run at all
    no_encoder.graph_type = Recorded
    assert order(no_encoder, z)[0] == ["replay", "key"]


def test_protector_replays_without_freezing_the_models(monkeypatch, models):
    """A Protector whose backend can replay first (fp16: the encoder runs as the backend's copy) does
    not freeze the models for later calls of a captured size, so their walks are not in the way; a
    model its owner left in train mode stays so, with the result frozen would give, and changed
    weights still send the call down the frozen path. fp32 (E itself in the graph) always freezes."""
    shadow, encoder = shadow_variant("dcgan"), models[1]
    protect_module = sys.modules["advface_engine.protect"]  # (the package's name protect is the function)
    entered = []
    real = protect_module.frozen
    monkeypatch.setattr(protect_module, "frozen", lambda *m: entered.append(m) or real(*m))
    z = features(4)
    protector = afe.Protector(shadow, encoder, CFG, backend="fused", backend_options={"dtype": "fp16"})
    protector.backend.graph_type = EagerGraph
    first = protector(z)  # checks the models and captures, frozen
    assert len(entered) == 1
    shadow.train()
    again = protector(z)
    assert len(entered) == 1 and torch.equal(again, first) and shadow.training
    with torch.no_grad():
        for param in shadow.parameters():
            param.mul_(-1.0)
    got = protector(z)
    assert len(entered) == 2 and shadow.training  # the change found after the replay: run again, frozen
    want = afe.Protector(shadow, encoder, CFG, backend="fused", backend_options={"dtype": "fp16"})(z)
    assert torch.equal(got, want) and not torch.equal(got, first)
    shadow.eval()
    fp32 = afe.Protector(shadow, encoder, CFG, backend="fused")
    fp32.backend.graph_type = EagerGraph
    entered.clear()
    fp32(z), fp32(z)
    assert len(entered) == 2


def test_weights_key_sees_every_change():
    """The rebuild trigger: in-place edits, replacement (even by a view of the same storage), new
    submodules, dtype moves and mode flips change it; a forward and requires_grad do not."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    key = weights_key(model)
    model(torch.randn(3, 4))
    model.requires_grad_(False)
    assert weights_key(model) == key
    for edit in (lambda: model[0].weight.add_(1.0),
                 lambda: setattr(model[0], "weight", nn.Parameter(model[0].weight.detach().t())),
                 lambda: model[1].running_var.mul_(2.0),
                 lambda: model.append(nn.ReLU()),
                 lambda: model.double(),
                 lambda: model[1].train()):
        before = weights_key(model)
        with torch.no_grad():
            edit()
        assert weights_key(model) != before


def test_a_failed_capture_falls_back_to_eager_runs(models):
    """A capture that raises (say, an encoder waiting for the host) warns with its cause, drops every
    capture and runs eagerly from then on, with the same result."""

    class Failing(EagerGraph):
        def capture(self, protect, stream=None, pool=None):
            try:
                raise ValueError("the encoder synchronised")
            except ValueError:
                raise RuntimeError("operation failed during capture") from None

    shadow, encoder = models
    graphed = FusedBackend(shadow, encoder, CFG, graphs=True)
    graphed.graph_type = EagerGraph
    z = features(8)
    _run(graphed, z[:2])
    graphed.graph_type = Failing
    with pytest.warns(UserWarning, match="capture failed .*operation failed during capture"):
        got = _run(graphed, z)
    assert not graphed.graphs and not graphed._graphs
    assert agreement(got, _run(FusedBackend(shadow, encoder, CFG, graphs=False), z), CFG.alpha) == 1.0
    _run(graphed, z)  # eager now: no capture attempted
    assert not graphed._graphs


def test_graph_size_depends_on_the_batch_alone():
    """A batch runs at one padded size whatever ran before (a resumed job recomputes its last, short
    chunk at the size the first run used); small batches pad at most 2x, large ones < 64 rows."""
    sizes = [fused_module.graph_size(b) for b in range(1, 5000)]
    assert sizes[:9] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert all(b <= s <= 2 * b and (b <= 64 or s - b < 64) for b, s in enumerate(sizes, 1))
    assert sorted(set(sizes)) == sorted(set(sizes[:64])) + list(range(128, 5000 + 64, 64))


def test_tf32_switch_keeps_settings_readable_and_restores_them_exactly():
    """Per-operation precision set by a caller (torch >= 2.9) comes back exactly; inside, the legacy
    getters (which torch.compile reads) answer instead of refusing an inconsistent state."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        pytest.skip("this torch has no per-operation fp32_precision settings")
    knobs = [matmul, cudnn, cudnn.conv, cudnn.rnn]
    before = [k.fp32_precision for k in knobs]
    try:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "ieee", "tf32"  # conv and rnn differ
        state = [k.fp32_precision for k in knobs]
        for enabled in (False, True):
            with fused_module._tf32(enabled):
                assert cudnn.allow_tf32 is enabled and matmul.allow_tf32 is enabled
            assert [k.fp32_precision for k in knobs] == state
    finally:
        for knob, value in zip(knobs, before, strict=True):
            knob.fp32_precision = value


def test_empty_batch_on_the_graphed_path(models):
    backend = FusedBackend(*models, CFG, graphs=True)
    backend.graph_type = EagerGraph
    out = _run(backend, features(1)[:0])
    assert out.shape == (0, 16) and not backend._graphs


# ops that wait for the GPU (a value or a data-dependent shape on the host): they break capture
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "allclose", "unique",
               "_unique2", "unique_consecutive", "repeat_interleave"}


class HostSyncs(TorchDispatchMode):
    """Records every op that would make the host wait for a CUDA device, whatever the device here."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING_OPS:
            self.found.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["dcgan", "nbnet", "upconv"])
def test_captured_loop_never_waits_for_the_host(family, models):
    """What a CUDA graph captures (targets, anchor, every step, loss record) has no host sync, on
    either backend's loop; the detector is live: it sees an .item()."""
    shadow, encoder = shadow_variant(family), models[1]
    z = features(4)
    fused = FusedBackend(shadow, encoder, CFG, record_loss=True)
    with frozen(shadow, encoder), torch.no_grad():
        fused.protect(z, None)  # first run outside: plan caches, as the warm-up before a capture
        with HostSyncs() as syncs:
            fused.protect(z, torch.zeros_like(z))
            fused.protect(z, None)
        assert syncs.found == []
    with frozen(shadow, encoder), HostSyncs() as syncs:
        ReferenceBackend(shadow, encoder, CFG).run(z)
    assert syncs.found == []
    with HostSyncs() as syncs:
        z.sum().item()
    assert syncs.found == ["_local_scalar_dense"]


def test_clear_errors_on_cpu(monkeypatch, models):
    shadow, encoder = models
    with pytest.raises(ValueError, match="bf16"):
        FusedBackend(shadow, encoder, CFG, dtype="bf16")
    with pytest.raises(ValueError, match="bf16"):  # options reach the backend through the Protector
        afe.Protector(shadow, encoder, CFG, backend="fused", backend_options={"dtype": "bf16"})
    with pytest.raises(ValueError, match="only the option dtype"):
        afe.Protector(shadow, encoder, CFG, backend="reference", backend_options={"graphs": False})
    with pytest.raises(ValueError, match="reference backend dtype"):
        afe.Protector(shadow, encoder, CFG, backend="reference", backend_options={"dtype": "fp16"})
    with pytest.raises(ValueError, match="dtype"):
        FusedBackend(shadow, encoder, CFG, dtype="int8")
    monkeypatch.setattr(fused_module, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="CUDA GPU and the shadow is on cpu"):
        FusedBackend(shadow, encoder, CFG)


# -- GPU only: mixed precision, CUDA graphs, padding ---------------------------------------------


def _gpu_models(family: str = "dcgan", **kwargs):
    shadow, encoder = shadow_variant(family, **kwargs), tiny_models()[1]
    return shadow.cuda(), encoder.cuda()


GPU_VARIANTS = [("dcgan", {}), ("nbnet", {}), ("upconv", {}), ("upconv", {"mode": "bilinear"})]


def _run(backend, z):
    with frozen(backend.shadow, backend.encoder):
        return backend.run(z)


def _reference_fp32(shadow, encoder, z, cfg=UNGUARDED):
    with fused_module._tf32(False):  # the reference in IEEE fp32 (cuDNN allows TF32 by default)
        return afe.protect(z, shadow, encoder, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", GPU_VARIANTS, ids=_ids)
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_fp32_equals_reference(variant, graphs):
    shadow, encoder = _gpu_models(variant[0], **variant[1])
    z = features(64).cuda()  # 1024 entries: 99.9% leaves room for one late sign flip (2 alpha / ||z||)
    backend = FusedBackend(shadow, encoder, UNGUARDED, graphs=graphs)
    got = _run(backend, z)
    assert backend.graphs == graphs, "the capture fell back to eager"
    assert agreement(got, _reference_fp32(shadow, encoder, z), CFG.alpha) >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "tf32"])
def test_gpu_reduced_precision_close_to_reference(dtype):
    shadow, encoder = _gpu_models()
    z = features(64).cuda()
    got = _run(FusedBackend(shadow, encoder, UNGUARDED, dtype=dtype), z)
    assert got.dtype == torch.float32
    # calibrated on the CPU with the same tiny models (fp16 99.1-99.8 %, bf16 97.2-99.5 %)
    assert agreement(got, _reference_fp32(shadow, encoder, z), CFG.alpha) >= (0.95 if dtype == "bf16" else 0.98)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_channels_last_close_to_reference(dtype):
    """NHWC convolutions (channels_last): fp32 as exact as NCHW, bf16 within bf16's tolerance; captured."""
    shadow, encoder = _gpu_models("nbnet")  # dense blocks: channel slices of NHWC gradients
    z = features(64).cuda()
    backend = FusedBackend(shadow, encoder, UNGUARDED, dtype=dtype, channels_last=True, graphs=True)
    got = _run(backend, z)
    assert backend.graphs and is_nhwc(backend.plan.hidden(z, keep=False)[0])
    assert backend._encoder_copy[1]  # the anchor came from the encoder's channels_last copy
    assert agreement(got, _reference_fp32(shadow, encoder, z), CFG.alpha) >= (0.95 if dtype == "bf16" else 0.999)


@pytest.mark.gpu
def test_gpu_compiled_encoder_is_captured():
    """compile_encoder on a GPU: compiled before each capture (warm-up), replayed in the graph."""
    shadow, encoder = _gpu_models()
    z = features(64).cuda()
    backend = FusedBackend(shadow, encoder, UNGUARDED, dtype="bf16", compile_encoder=True, graphs=True)
    for rows in (z, z[:8]):  # the second size recompiles in its capture's first warm-up
        got = _run(backend, rows)
        assert backend.graphs, "the capture fell back to eager"
        assert agreement(got, _reference_fp32(shadow, encoder, rows), CFG.alpha) >= 0.95
    copy, _ = backend._encoder_copy
    assert isinstance(copy, CompiledEncoder) and copy.failure is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_guard_holds_in_the_captured_graph(dtype):
    """The utility guard in the step kernels' epilogue on a GPU, captured: every row on or inside its cap,
    and each row close to the reference's (a flipped sign moves a row along the cap's edge)."""
    shadow, encoder = _gpu_models()
    z = features(64).cuda()
    cfg = CFG.replace(min_cosine=0.9, steps=10)
    backend = FusedBackend(shadow, encoder, cfg, dtype=dtype, graphs=True)
    got = _run(backend, z)
    assert backend.graphs, "the capture fell back to eager"
    assert (F.cosine_similarity(got.double(), z.double(), dim=1) >= 0.9 - 1e-6).all()
    want = _reference_fp32(shadow, encoder, z, cfg)
    assert F.cosine_similarity(got, want, dim=1).min() >= 0.98


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager_and_pads_last_batch():
    from advface_engine.gallery.job import deterministic_cudnn

    shadow, encoder = _gpu_models()
    z = features(8).cuda()
    graphed = FusedBackend(shadow, encoder, UNGUARDED, graphs=True)
    eager = FusedBackend(shadow, encoder, UNGUARDED, graphs=False)
    with deterministic_cudnn():  # captured with cuDNN's deterministic algorithms: replays are bit-exact
        full = _run(graphed, z)
        short = _run(graphed, z[:5])  # 5 rows replay the 8-row graph, padded
    assert graphed.graphs and list(graphed._graphs) == [8]
    assert torch.equal(short, full[:5]), "rows are independent: padding must not change the real rows"
    graphed._graphs.clear()  # the rest under PyTorch's default settings
    full = _run(graphed, z)
    assert agreement(full, _run(eager, z), UNGUARDED.alpha) >= 0.999
    short = _run(graphed, z[:5])
    assert agreement(short, _run(eager, z[:5]), UNGUARDED.alpha) >= 0.999
    # a second size shares the first's memory pool: alternating replays must not disturb each other
    for rows in (z[:3], z, z[:3], z):
        assert agreement(_run(graphed, rows), _run(eager, rows), UNGUARDED.alpha) >= 0.999
    assert list(graphed._graphs) == [8, 4]


@pytest.mark.gpu
def test_gpu_bf16_graph_with_noise_and_losses_equals_eager():
    """The benchmark's headline provider (bf16, captured) with a random start and recorded losses,
    on a full and a padded batch."""
    shadow, encoder = _gpu_models()
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.01, steps=3, random_start=True)
    graphed = FusedBackend(shadow, encoder, cfg, dtype="bf16", graphs=True, record_loss=True)
    eager = FusedBackend(shadow, encoder, cfg, dtype="bf16", graphs=False, record_loss=True)
    z = features(8).cuda()
    for rows in (z, z[3:8]):
        got = _run(graphed, rows)
        assert graphed.graphs and list(graphed._graphs) == [8]
        assert graphed.losses.shape == (cfg.steps, rows.shape[0])
        # eager on the batch as the graph ran it (padded with copies of a row): the same shapes, so the
        # same split-K and cuDNN choices; bf16 rounding may still flip a sign or so
        padded = torch.cat([rows, rows[:1].expand(8 - len(rows), -1)])
        want, n = _run(eager, padded)[:len(rows)], len(rows)
        assert ((got - want).abs() > 2 * cfg.alpha).sum() <= 1
        torch.testing.assert_close(graphed.losses, eager.losses[:, :n], **TOL["bf16 loss"])


@pytest.mark.gpu
def test_gpu_replay_first_still_follows_weights_changed_between_calls():
    """bf16: the graph reads only the backend's copies, so a call replays before checking the weights;
    a change to the shadow or to the encoder is still found, and the call answers with the new weights."""
    shadow, encoder = _gpu_models()
    z = features(8).cuda()
    graphed = FusedBackend(shadow, encoder, UNGUARDED, dtype="bf16", graphs=True)
    _run(graphed, z)  # captures
    before = _run(graphed, z)  # replays first
    assert graphed._own_memory
    for model in (shadow, encoder):
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(-1.0)
        got = _run(graphed, z)
        want = _run(FusedBackend(shadow, encoder, UNGUARDED, dtype="bf16", graphs=False), z)
        assert graphed.graphs and agreement(got, want, UNGUARDED.alpha) >= 0.99  # bf16: a sign flip or so
        assert agreement(before, want, UNGUARDED.alpha) < 0.9, "the change must matter"
        before = got


@pytest.mark.gpu
def test_gpu_protector_replays_without_freezing():
    """bf16 on a GPU: a Protector's later calls take the backend's replay without the models frozen."""
    shadow, encoder = _gpu_models()
    z = features(8).cuda()
    protector = afe.Protector(shadow, encoder, UNGUARDED, backend="fused", backend_options={"dtype": "bf16"})
    first = protector(z)
    assert protector.backend.graphs and protector.backend.run_replay(z) is not None
    assert agreement(protector(z), first, UNGUARDED.alpha) >= 0.99


class HostSyncingEncoder(nn.Module):
    """An encoder that waits for the GPU in its forward (as an ONNX session does): it cannot be captured."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        self.last_max = float(out.abs().max())
        return out


@pytest.mark.gpu
def test_gpu_uncapturable_encoder_runs_eagerly_and_leaves_cuda_usable():
    shadow, encoder = _gpu_models()
    z = features(8).cuda()
    graphed = FusedBackend(shadow, HostSyncingEncoder(encoder), UNGUARDED, graphs=True)
    with pytest.warns(UserWarning, match="capture failed"):
        got = _run(graphed, z)
    assert not graphed.graphs and not graphed._graphs
    assert agreement(got, _run(FusedBackend(shadow, encoder, UNGUARDED, graphs=False), z), UNGUARDED.alpha) >= 0.999
    torch.cuda.empty_cache()  # the allocator is not left mid-capture
    other = FusedBackend(shadow, encoder, UNGUARDED, graphs=True)
    _run(other, z)
    assert list(other._graphs) == [8]


@pytest.mark.gpu
def test_gpu_split_k_equals_single_pass():
    shadow, encoder = _gpu_models()
    z = features(4).cuda()
    one = _run(FusedBackend(shadow, encoder, UNGUARDED, graphs=False, split_k=1), z)
    four = _run(FusedBackend(shadow, encoder, UNGUARDED, graphs=False, split_k=4), z)
    assert agreement(one, four, UNGUARDED.alpha) >= 0.999


@pytest.mark.gpu
def test_gpu_runs_are_bit_identical():
    """No atomics in the step kernels and deterministic cuDNN: a recomputed batch equals the first run."""
    from advface_engine.gallery.job import deterministic_cudnn

    z = features(4).cuda()
    # nbnet: dense blocks; bilinear upconv: PyTorch's own CUDA backward of it adds with atomics
    for shadow, encoder in (_gpu_models("nbnet"), _gpu_models("upconv", mode="bilinear")):
        with deterministic_cudnn():
            runs = [_run(FusedBackend(shadow, encoder, CFG, graphs=graphs, split_k=5), z)
                    for graphs in (False, True, True)]
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
