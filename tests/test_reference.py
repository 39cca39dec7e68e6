"""The reference backend against an independent float64 implementation of ALGORITHM.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_models
from torch import nn

import advface_engine as afe
from advface_engine.protect import _FROZEN, frozen


def cap(u, z, min_cosine):
    """The guard, written as a great-circle interpolation (slerp) from u toward z that stops where
    cos(u, z) = min_cosine, the norm of u kept."""
    if min_cosine is None:
        return u
    u_hat, z_hat = u / u.norm(), z / z.norm()
    phi = torch.arccos((u_hat * z_hat).sum().clamp(-1, 1))
    if torch.cos(phi) >= min_cosine:
        return u
    t = (phi - math.acos(min_cosine)) / phi  # the fraction of the way from u to z
    return u.norm() * (torch.sin((1 - t) * phi) * u_hat + torch.sin(t * phi) * z_hat) / torch.sin(phi)


def equations(z, S, E, eps, alpha, steps, norm="linf", constraint="ball", anchor="shadow", normalize=True,
              start=None, min_cosine=None):
    """ALGORITHM.md written again, row by row, in float64. ``start``: a given random start per row."""
    out = []
    for i, row in enumerate(z):
        row = row[None]
        x_shadow = S(row).detach()                                   # x~ = S(z)            (3)
        z0 = E(x_shadow).detach() if anchor == "shadow" else row.clone()  # z~ = E(x~)
        if normalize:
            z0 = z0 / z0.norm()
        z0 = cap(z0, row, min_cosine)                                # the guard
        zt = z0.clone() if start is None else cap(z0 + start[i], row, min_cosine)
        for _ in range(steps):
            delta = torch.zeros_like(zt, requires_grad=True)
            loss = (S(zt + delta) - x_shadow).abs().sum()             # ||S(z_t + d) - x~||_1 (4)
            (g,) = torch.autograd.grad(loss, delta)
            if norm == "linf":
                z_next = zt + alpha * torch.sign(g)                   # z_t + alpha sign(g)   (5)
            else:
                z_next = zt + alpha * g / g.norm() if g.norm() > 0 else zt
            center = z0 if constraint == "ball" else zt
            d = z_next - center
            if norm == "linf":
                d = torch.clamp(d, -eps, eps)
            elif d.norm() > eps:
                d = d * eps / d.norm()
            zt = cap(center + d, row, min_cosine).detach()
        if normalize:
            zt = zt / zt.norm()
        out.append(zt)
    return torch.cat(out)


@pytest.mark.parametrize("family", ["dcgan", "nbnet", "upconv"])
@pytest.mark.parametrize("norm,constraint,anchor", [("linf", "ball", "shadow"), ("l2", "ball", "original"),
                                                    ("linf", "per_step", "original"), ("l2", "per_step", "shadow")])
@pytest.mark.parametrize("min_cosine", [None, 0.3, 0.995])
def test_reference_equals_equations_float64(family, norm, constraint, anchor, min_cosine):
    S, E = tiny_models(family, dtype=torch.float64)
    z = F.normalize(torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), dim=1)
    eps, alpha = (0.05, 0.02) if norm == "linf" else (0.2, 0.08)
    # anchored at z itself, S(z_0) == x~ and the L1 gradient is exactly 0: only a random start moves
    random_start = anchor == "original"
    cfg = afe.ProtectConfig(eps=eps, alpha=alpha, steps=4, norm=norm, constraint=constraint, anchor=anchor,
                            random_start=random_start, min_cosine=min_cosine)
    got = afe.protect(z, shadow=S, encoder=E, config=cfg)
    start = None
    if random_start:
        start = afe.protect(z, S, E, cfg.replace(steps=0, normalize=False, min_cosine=None)) - z
    want = equations(z, S, E, eps, alpha, 4, norm, constraint, anchor, start=start, min_cosine=min_cosine)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, z)
    if min_cosine is not None:
        assert (F.cosine_similarity(got, z, dim=1) >= min_cosine - 1e-9).all()


def _trace(z, S, E, cfg):
    """z_t after each step, without the final normalisation, by running steps = 1..T."""
    return [afe.protect(z, S, E, cfg.replace(steps=t, normalize=False)) for t in range(1, cfg.steps + 1)]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ball_constraint_after_every_step(norm, features):
    S, E = tiny_models(dtype=torch.float64)
    z = features.double()
    eps = 0.03 if norm == "linf" else 0.1
    cfg = afe.ProtectConfig(eps=eps, alpha=eps / 2, steps=5, norm=norm, anchor="original", normalize=False,
                            random_start=True)
    for zt in _trace(z, S, E, cfg):
        dist = (zt - z).abs().amax(dim=1) if norm == "linf" else (zt - z).norm(dim=1)
        assert (dist <= eps + 1e-12).all(), dist
    # with alpha * steps > eps the budget is reached: the constraint is active, not vacuous
    assert (dist > eps * 0.99).any()


def test_steps_zero_returns_normalised_anchor(models, features):
    S, E = models
    cfg = afe.ProtectConfig(steps=0, min_cosine=None, anchor="shadow", random_start=False)  # guarded: test_guard.py
    got = afe.protect(features, S, E, cfg)
    want = F.normalize(E(S(features)), dim=1)
    torch.testing.assert_close(got, want)
    got = afe.protect(features, S, E, cfg.replace(anchor="original"))
    torch.testing.assert_close(got, features)


def test_normalize_off_keeps_raw_scale(models, features):
    S, E = models
    raw = features * 7.0
    out = afe.protect(raw, S, E, afe.ProtectConfig(anchor="original", normalize=False, eps=0.01, alpha=0.01, steps=2))
    assert (out - raw).abs().max() <= 0.01 + 1e-6
    assert not torch.allclose(out.norm(dim=1), torch.ones(len(out)))
    out = afe.protect(raw, S, E, afe.ProtectConfig(anchor="original", normalize=True, steps=2))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(out)))


def test_steps_move_the_feature_and_raise_reconstruction_error(models, features):
    S, E = models
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.01, steps=5, normalize=False, min_cosine=None, anchor="shadow",
                            random_start=False)
    anchor = E(S(features)).detach()
    x_shadow = S(features).detach()
    z_adv = afe.protect(features, S, E, cfg)
    before = (S(anchor) - x_shadow).abs().sum(dim=(1, 2, 3))
    after = (S(z_adv) - x_shadow).abs().sum(dim=(1, 2, 3))
    assert (after > before).all()


def test_random_start_is_seeded_in_ball_and_batch_independent(models, features):
    S, E = models
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.01, steps=0, anchor="original", normalize=False, random_start=True,
                            seed=7)
    a = afe.protect(features, S, E, cfg)
    assert ((a - features).abs() <= 0.05 + 1e-7).all() and not torch.allclose(a, features)
    torch.testing.assert_close(afe.protect(features, S, E, cfg), a)          # same seed, same start
    assert not torch.allclose(afe.protect(features, S, E, cfg.replace(seed=8)), a)
    torch.testing.assert_close(afe.protect(features[2:4], S, E, cfg), a[2:4])  # rows alone, same noise
    l2 = afe.protect(features, S, E, cfg.replace(norm="l2", eps=0.2))
    assert ((l2 - features).norm(dim=1) <= 0.2 + 1e-6).all()


@pytest.mark.parametrize("family", ["dcgan", "nbnet", "upconv"])
def test_batch_equals_rows_alone(family):
    S, E = tiny_models(family, dtype=torch.float64)
    z = F.normalize(torch.randn(5, 16, dtype=torch.float64), dim=1)
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.01, steps=3)
    batch = afe.protect(z, S, E, cfg)
    rows = torch.cat([afe.protect(z[i:i + 1], S, E, cfg) for i in range(len(z))])
    torch.testing.assert_close(batch, rows, rtol=1e-10, atol=1e-10)


def test_models_restored_and_no_weight_grads(models, features):
    S, E = models
    S.train()
    flags = [p.requires_grad for p in S.parameters()]
    afe.protect(features, S, E, afe.ProtectConfig(steps=2))
    assert S.training and not E.training
    assert [p.requires_grad for p in S.parameters()] == flags
    assert all(p.grad is None for p in list(S.parameters()) + list(E.parameters()))


def test_mixed_modes_and_grad_flags_restored_module_by_module(models, features):
    """A model partly in training mode, partly frozen, comes back exactly as it was."""
    S, E = models
    S.train()
    S[2].eval()  # one submodule (a BatchNorm) in eval mode inside a training model
    E.requires_grad_(False)
    last = list(E.parameters())[-1].requires_grad_(True)
    modes = [m.training for m in S.modules()] + [m.training for m in E.modules()]
    flags = [p.requires_grad for p in list(S.parameters()) + list(E.parameters())]
    protector = afe.Protector(S, E, afe.ProtectConfig(steps=2))

    def seen(module, args):
        assert not module.training and not any(p.requires_grad for p in module.parameters())

    hooks = [m.register_forward_pre_hook(seen) for m in (S, E)]
    protector(features)
    for hook in hooks:
        hook.remove()
    assert [m.training for m in S.modules()] + [m.training for m in E.modules()] == modes
    assert [p.requires_grad for p in list(S.parameters()) + list(E.parameters())] == flags and last.requires_grad


class ModeFlag(nn.Module):
    """Overrides train() to keep state in step with the mode (a cache used only in eval)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.use_cache = inner, False

    def forward(self, z):
        return self.inner(z)

    def train(self, mode: bool = True):
        super().train(mode)
        self.use_cache = not mode
        return self


def test_overridden_train_runs_when_restored(models, features):
    """Restoring a training model goes through its train(), so state kept beside the mode follows."""
    S, E = models
    shadow = ModeFlag(S).train()
    protector = afe.Protector(shadow, E, afe.ProtectConfig(steps=1))
    protector(features)
    assert shadow.training and S.training and not shadow.use_cache


class RefusesEval(nn.Linear):
    def train(self, mode: bool = True):
        if not mode:
            raise RuntimeError("no eval mode here")
        return super().train(mode)


def test_failure_on_the_way_in_restores_what_was_entered(models):
    S, _ = models
    S.train()
    flags = [p.requires_grad for p in S.parameters()]
    with pytest.raises(RuntimeError, match="no eval mode"), frozen(S, RefusesEval(2, 2)):
        pass
    assert S.training and [p.requires_grad for p in S.parameters()] == flags
    assert not _FROZEN


def test_output_keeps_shape_dtype_device(models, features):
    S, E = models
    z16 = features.to(torch.float16)
    out = afe.Protector(shadow=S, encoder=E)(z16)
    assert out.shape == z16.shape and out.dtype == torch.float16 and out.device == z16.device
    assert afe.Protector(shadow=S, encoder=E)(features[:0]).shape == (0, 16)


def test_default_config_works_and_auto_is_reference_on_cpu(models, features):
    S, E = models
    p = afe.Protector(shadow=S, encoder=E, config=afe.ProtectConfig(), backend="auto")
    assert p.backend_name == "reference"
    out = p(features)
    assert torch.isfinite(out).all() and not torch.allclose(out, features)


@pytest.mark.parametrize("kwargs", [dict(eps=0), dict(eps=-1), dict(alpha=0), dict(eps=float("nan")),
                                    dict(steps=-1), dict(steps=2.5), dict(norm="l1"), dict(constraint="box"),
                                    dict(anchor="probe"), dict(seed=1.5), dict(seed=-1), dict(eps=1e300),
                                    dict(random_start="no"), dict(normalize="false"), dict(normalize=1)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        afe.ProtectConfig(**kwargs)


def test_config_takes_numpy_scalars_as_plain_numbers():
    np = pytest.importorskip("numpy")
    cfg = afe.ProtectConfig(eps=np.float32(0.25), alpha=np.float64(0.125), steps=np.int64(3), seed=np.int32(2))
    assert cfg.to_dict() == afe.ProtectConfig(eps=0.25, alpha=0.125, steps=3, seed=2).to_dict()
    assert all(type(v) in (float, int, str, bool) for v in cfg.to_dict().values())
    with pytest.raises(TypeError, match="mapping"):
        afe.ProtectConfig.from_dict(None)


def test_grad_modes_of_the_caller_do_not_matter(models, features):
    """A backend is usually called under no_grad or inference_mode; the steps need d/dz all the same."""
    S, E = models
    protector = afe.Protector(S, E, afe.ProtectConfig(steps=3))
    expected = protector(features)
    with torch.no_grad():
        assert torch.equal(protector(features), expected)
    with torch.inference_mode():
        z = features.clone()  # an inference tensor
        assert torch.equal(protector(z), expected)


def test_concurrent_calls_equal_serial_and_leave_models_as_they_were(features):
    """Threads calling one Protector, and a second Protector on the same models: results as serial,
    models in train mode with trainable weights afterwards, BatchNorm statistics untouched."""
    import threading

    S, E = tiny_models()
    S.train(), E.train()
    before = {k: v.clone() for k, v in list(S.state_dict().items()) + list(E.state_dict().items())}
    cfg = afe.ProtectConfig(steps=3)
    first, second = afe.Protector(S, E, cfg), afe.Protector(S, E, cfg)
    expected = first(features)
    results, errors = [], []

    def work(protector):
        try:
            for _ in range(4):
                results.append(protector(features))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(p,)) for p in (first, first, second, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 16
    assert all(torch.equal(r, expected) for r in results)
    assert S.training and E.training and all(p.requires_grad for p in list(S.parameters()) + list(E.parameters()))
    after = dict(list(S.state_dict().items()) + list(E.state_dict().items()))
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_bfloat16_models_with_random_start(models, features):
    S, E = (m.to(torch.bfloat16) for m in models)
    cfg = afe.ProtectConfig(steps=2, random_start=True)
    out = afe.protect(features, S, E, cfg)
    assert out.dtype == features.dtype and torch.isfinite(out).all()
    assert torch.equal(out, afe.protect(features, S, E, cfg))  # seeded from the rows' bfloat16 bytes


def test_encoder_in_another_dtype_than_the_shadow(models, features):
    S, E = models
    cfg = afe.ProtectConfig(steps=3)
    mixed = afe.protect(features, S, E.to(torch.float64), cfg)
    torch.testing.assert_close(mixed, afe.protect(features, S, E.to(torch.float32), cfg), atol=2 * cfg.alpha, rtol=0)
    with pytest.raises(ValueError, match="one device"):
        afe.protect(features, S, E.to("meta"))


def test_protector_options_and_config_are_checked(models, features):
    S, E = models
    with pytest.raises(ValueError, match="unknown fused backend options"):
        afe.Protector(S, E, backend="auto", backend_options={"dtpye": "bf16"})
    # values too, on a CPU where "auto" builds the reference: a mistake would surface only on a GPU
    for options, error in [({"channels_last": "yes"}, "channels_last must be True, False or None, got 'yes'"),
                           ({"graphs": 1}, "graphs must be True or False"),
                           ({"record_loss": None}, "record_loss must be True or False"),
                           ({"dtype": "fp64"}, r"dtype must be one of \['bf16', 'fp16', 'fp32', 'tf32'\]"),
                           ({"split_k": 0}, "split_k must be None or an int >= 1")]:
        with pytest.raises((TypeError, ValueError), match=error):
            afe.Protector(S, E, backend="auto", backend_options=options)
    afe.Protector(S, E, backend="auto", backend_options={"dtype": "bf16", "channels_last": True, "split_k": None})
    protector = afe.Protector(S, E, afe.ProtectConfig(steps=3))
    with pytest.raises(AttributeError):
        protector.config = afe.ProtectConfig(steps=0)  # the backend was built for the first config
    with pytest.raises(ValueError, match="shadow decoder"):
        protector(torch.zeros(0, 7))  # an empty batch of the wrong dim is still the wrong dim


def test_fused_options_list_matches_the_backend():
    import inspect

    pytest.importorskip("triton")
    from advface_engine.backends import FUSED_OPTIONS
    from advface_engine.backends.fused import FusedBackend

    names = list(inspect.signature(FusedBackend.__init__).parameters)[4:]  # after self, shadow, encoder, config
    assert names[-1] == "keep_out"  # the basis, which make_backend passes to both backends: not an option
    assert names[:-1] == list(FUSED_OPTIONS)


def test_bad_features_name_rows(models, features):
    S, E = models
    z = features.clone()
    z[1, 3] = float("nan")
    z[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[1, 4\]"):
        afe.protect(z, S, E)
    with pytest.raises(ValueError, match="shape"):
        afe.protect(features[0], S, E)
    with pytest.raises(ValueError, match="floating"):
        afe.protect(torch.ones(2, 16, dtype=torch.int64), S, E)
    with pytest.raises(ValueError, match="backend"):
        afe.protect(features, S, E, backend="fast")


def test_dimension_mismatch_says_which(models, features):
    S, E = models
    with pytest.raises(ValueError, match="shadow decoder"):
        afe.protect(torch.randn(2, 12), S, E)
    E32 = afe.build_model("mobilefacenet", num_features=32, input_size=16, width=4).eval()
    with pytest.raises(ValueError, match="encoder outputs"):
        afe.protect(features, S, E32)
    E_big = afe.build_model("mobilefacenet", num_features=16, input_size=32, width=4).eval()
    with pytest.raises(ValueError, match="encoder"):
        afe.protect(features, S, E_big)


def test_reference_sees_weight_changes_after_it_was_built(features):
    S, E = tiny_models(dtype=torch.float64)
    z, cfg = features.double(), afe.ProtectConfig(eps=0.05, alpha=0.01, steps=3)
    p = afe.Protector(S, E, cfg, backend="reference")
    before = p(z)
    with torch.no_grad():
        S[0].weight.mul_(1.5)
    after = p(z)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, afe.protect(z, S, E, cfg))


def test_folded_decoder_is_the_same_function():
    from advface_engine.backends.modules import channels_last, fold_batchnorm

    for family in ("dcgan", "nbnet", "upconv"):
        S, _ = tiny_models(family)
        folded = channels_last(fold_batchnorm(S))
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) < \
            sum(isinstance(m, torch.nn.BatchNorm2d) for m in S.modules())
        z = torch.randn(3, 16)
        torch.testing.assert_close(folded(z), S(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["dcgan", "nbnet", "upconv"])
def test_inplace_activations_change_no_value(family):
    """The reference's step decoder, its activations in place, gives the same image and z-gradient to the bit
    as the same folded decoder without; every family has some in place."""
    import copy

    from advface_engine.backends.modules import channels_last, fold_batchnorm, inplace_activations

    S, _ = tiny_models(family)
    plain = channels_last(fold_batchnorm(S))
    fast = inplace_activations(copy.deepcopy(plain))
    assert sum(getattr(m, "inplace", False) for m in fast.modules()) >= 2
    assert not any(getattr(m, "inplace", False) for m in plain.modules())
    z = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    target = plain(z).detach() + 0.1
    grads = []
    for decoder in (plain, fast):
        z_t = z.clone().requires_grad_(True)
        x = decoder(z_t)
        grads.append((x, torch.autograd.grad((x - target).abs().sum(), z_t)[0]))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_inplace_activations_only_where_nothing_else_reads_the_input():
    """In place after a Linear, convolution or BatchNorm (through Identity, reshapes, nested Sequentials); not
    after a layer whose backward reads its output (Sigmoid), not on the Sequential's own input, not inside a
    Sequential with a forward of its own (it may reuse any output), not a LeakyReLU of negative slope, not
    where a forward hook may keep the tensor."""
    from advface_engine.backends.modules import inplace_activations

    class Residual(nn.Sequential):
        def forward(self, x):
            h = self[0](x)
            return self[1](h) + h

    kept = []
    hooked = nn.Linear(4, 8)
    hooked.register_forward_hook(lambda m, args, out: kept.append(out))  # a hook that keeps the layer's output
    kept_input = []
    pre_hooked = nn.ReLU()
    pre_hooked.register_forward_pre_hook(lambda m, args: kept_input.append(args[0]))  # keeps the ReLU's input
    cases = [
        (nn.Sequential(nn.Linear(4, 8), nn.Identity(), nn.ReLU()), True),
        (nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Unflatten(1, (2, 2, 2)), nn.Identity()), nn.ReLU()), True),
        (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8).eval(), nn.LeakyReLU(0.2)), True),
        (nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.ReLU()), False),
        (nn.Sequential(nn.Identity(), nn.ReLU(), nn.Linear(4, 8)), False),
        (nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(-0.5)), False),
        (Residual(nn.Linear(4, 4), nn.ReLU()), False),
        (nn.Sequential(hooked, nn.ReLU()), False),
        (nn.Sequential(nn.Linear(4, 8), pre_hooked), False),
    ]
    z = torch.randn(3, 4)
    for model, expected in cases:
        want = model(z)
        z_t = z.clone().requires_grad_(True)
        want_grad = torch.autograd.grad(model(z_t).sum(), z_t)[0]
        inplace_activations(model)
        acts = [m for m in model.modules() if isinstance(m, nn.ReLU | nn.LeakyReLU)]
        assert [a.inplace for a in acts] == [expected], model
        z_t = z.clone().requires_grad_(True)
        got = model(z_t)
        assert torch.equal(got, want)
        assert torch.equal(torch.autograd.grad(got.sum(), z_t)[0], want_grad)
    for held in (kept, kept_input):  # what each hook kept is what the Linear computed: not clamped
        assert all((k == held[0]).all() for k in held) and (held[0] < 0).any()


def test_a_global_hook_added_later_turns_in_place_activations_off():
    """A forward hook registered for every module after the reference's copy was built: the copy is built
    again without in-place activations, so what the hook keeps is what the layers computed."""
    from advface_engine.backends.reference import FasterShadow

    torch.manual_seed(0)
    shadow = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    faster = FasterShadow(shadow)
    assert faster()[1].inplace
    kept = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: kept.append(out) if isinstance(m, nn.Linear) and out.shape[1] == 8 else None)
    z = torch.randn(16, 4)
    try:
        built = faster()
        assert not built[1].inplace
        out = built(z)
    finally:
        handle.remove()
    assert (kept[0] < 0).any() and torch.allclose(out, shadow(z), atol=1e-6)
    assert faster()[1].inplace  # the hook gone, in place again


@pytest.mark.parametrize("family", ["dcgan", "nbnet", "upconv"])
def test_bf16_decoder_option_stays_close_to_fp32(family):
    """backend_options={"dtype": "bf16"}: the decoder in bfloat16, z and the steps in float32; bf16's 8-bit
    mantissa flips some gradient signs, so the results agree with fp32's within bf16's tolerance (most entries
    within 2 alpha), the guard holds exactly, and the caller's shadow stays float32."""
    S, E = tiny_models(family)
    z = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    for cfg, least in ((afe.ProtectConfig(steps=5, min_cosine=None), 0.95), (afe.ProtectConfig(steps=5), 0.9)):
        want = afe.protect(z, S, E, cfg)
        low = afe.Protector(S, E, cfg, backend="reference", backend_options={"dtype": "bf16"})
        got = low(z)
        assert got.dtype == torch.float32 and low.backend.dtype == "bf16"
        assert ((got - want).abs() <= 2 * cfg.alpha).float().mean() >= least
        assert not torch.equal(got, want)  # it did run in bfloat16
        if cfg.min_cosine is not None:
            assert (F.cosine_similarity(got, z, dim=1) >= cfg.min_cosine - 1e-5).all()
    assert all(p.dtype == torch.float32 for p in S.parameters())
    ensemble = afe.Protector([S, tiny_models("upconv", seed=3)[0]], E, cfg, backend="reference",
                             backend_options={"dtype": "bf16"})
    assert ensemble(z).shape == z.shape


def test_auto_on_a_cpu_keeps_a_reference_dtype_and_says_when_it_cannot(models, features):
    """backend "auto" off the GPU: dtype bf16 reaches the reference backend; a fused-only dtype (fp16) is said
    to be dropped, not silently; the fused backend's other options are the fused backend's alone."""
    import warnings

    S, E = models
    assert afe.Protector(S, E, backend_options={"dtype": "bf16"}).backend.dtype == "bf16"
    with pytest.warns(UserWarning, match="decoder dtype 'fp16' is the fused backend's"):
        assert afe.Protector(S, E, backend_options={"dtype": "fp16"}).backend.dtype == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert afe.Protector(S, E, backend_options={"graphs": False}).backend.dtype == "fp32"
