"""The objective each step ascends (ProtectConfig.objective): the pixel error of Eq. 4, the identity
distance 1 - cos(E(S(z_t)), z), or both; reference backend only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fitting_models, tiny_models
from torch import nn

import advface_engine as afe
from advface_engine.backends import UnsupportedModelError, make_backend


def identity_distance(shadow, encoder, z_t, z):
    with torch.no_grad():
        return 1 - F.cosine_similarity(encoder(shadow(z_t)), z, dim=1)


def one_step(z, shadow, encoder, cfg):
    """One sign step of the objective written again, row by row, float64, from the normalised anchor."""
    out = []
    for row in z:
        row = row[None]
        x_shadow = shadow(row).detach()
        anchor = F.normalize(encoder(x_shadow).detach(), dim=1)
        z_t = anchor.clone().requires_grad_(True)
        x_t = shadow(z_t)
        away = 1 - F.cosine_similarity(encoder(x_t), row, dim=1)
        pixel = (x_t - x_shadow).abs()
        loss = {"identity": away.sum(), "pixel": pixel.sum(),
                "pixel+identity": pixel.mean() + cfg.identity_weight * away.sum()}[cfg.objective]
        (g,) = torch.autograd.grad(loss, z_t)
        step = (anchor + cfg.alpha * g.sign() - anchor).clamp(-cfg.eps, cfg.eps)
        out.append(F.normalize(anchor + step, dim=1))
    return torch.cat(out)


@pytest.mark.parametrize("objective", ["pixel", "identity", "pixel+identity"])
def test_objectives_equal_their_equations_float64(objective):
    shadow, encoder = (m.double() for m in fitting_models())
    z = F.normalize(torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=1)
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.02, steps=1, objective=objective, identity_weight=3.0, min_cosine=None,
                            anchor="shadow", random_start=False)
    torch.testing.assert_close(afe.protect(z, shadow, encoder, cfg), one_step(z, shadow, encoder, cfg),
                               rtol=1e-9, atol=1e-9)


def test_identity_objective_moves_the_reconstruction_away_from_the_person():
    """Ascending the identity distance raises it further than ascending the pixel error does."""
    shadow, encoder = fitting_models()
    z = F.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(4)), dim=1)
    cfg = afe.ProtectConfig(eps=0.2, alpha=0.05, steps=10, min_cosine=0.8)
    start = identity_distance(shadow, encoder, afe.protect(z, shadow, encoder, cfg.replace(steps=0)), z)
    pixel = identity_distance(shadow, encoder, afe.protect(z, shadow, encoder, cfg), z)
    identity = identity_distance(shadow, encoder, afe.protect(z, shadow, encoder, cfg.replace(objective="identity")),
                                 z)
    assert (identity > start).all() and identity.mean() > pixel.mean(), (start.mean(), pixel.mean(), identity.mean())
    # and the guard holds all the same
    guarded = afe.protect(z, shadow, encoder, cfg.replace(objective="identity"))
    assert (F.cosine_similarity(guarded.double(), z.double(), dim=1) >= 0.8 - 1e-6).all()


class DetachedEncoder(nn.Module):
    """Features without a gradient, as an ONNX session gives them."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(x).detach()


def test_identity_objective_needs_a_differentiable_encoder():
    shadow, encoder = tiny_models()
    z = F.normalize(torch.randn(3, 16), dim=1)
    with pytest.raises(ValueError, match="objective 'identity'.*DetachedEncoder"):
        afe.protect(z, shadow, DetachedEncoder(encoder), afe.ProtectConfig(objective="identity"))
    afe.protect(z, shadow, DetachedEncoder(encoder), afe.ProtectConfig(objective="pixel"))  # pixel needs none


@pytest.mark.interpreter
def test_fused_backend_says_it_steps_on_pixels_only():
    shadow, encoder = tiny_models()
    with pytest.raises(UnsupportedModelError, match="objective='identity'"):
        make_backend("fused", shadow, encoder, afe.ProtectConfig(objective="identity"))


@pytest.mark.parametrize("kwargs, error", [(dict(objective="l2"), ValueError), (dict(identity_weight=-1.0), ValueError),
                                           (dict(identity_weight=float("inf")), ValueError),
                                           (dict(identity_weight=True), TypeError)])
def test_bad_objective_settings_are_named(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        afe.ProtectConfig(**kwargs)
