"""Smoothing (ProtectConfig.smoothing): each step's gradient averaged over noisy copies of z_t, against the
equation written out in float64; its noise a function of (seed, row, step, copy); reference backend only."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from conftest import fitting_models, tiny_models

import advface_engine as afe
from advface_engine.backends import UnsupportedModelError, make_backend
from advface_engine.config_args import add_protect_args, config_from_args
from advface_engine.noise import copy_noise, row_keys


def smoothed_steps(z, shadow, encoder, cfg):
    """cfg.steps steps from z itself (anchor "original", no random start, no guard), row by row, float64: the
    gradient of each step the mean over copies z_t + s |z_t| / sqrt(D) n_tj of the objective's gradient."""
    out = []
    keys = row_keys(z, cfg.seed)
    for i, row in enumerate(z):
        row = row[None]
        x_shadow = shadow(row).detach()
        z_t = row.clone()
        for t in range(cfg.steps):
            grads = []
            for j in range(cfg.smoothing):
                noise = copy_noise((keys[0][i:i + 1], keys[1][i:i + 1]), z.shape[1], t * cfg.smoothing + j)
                copy = (z_t + cfg.smoothing_scale * z_t.norm() / z.shape[1] ** 0.5 * noise).requires_grad_(True)
                x_t = shadow(copy)
                loss = ((x_t - x_shadow).abs().sum() if cfg.objective == "pixel"
                        else (1 - F.cosine_similarity(encoder(x_t), row, dim=1)).sum())
                grads.append(torch.autograd.grad(loss, copy)[0])
            z_t = row + (z_t + cfg.alpha * (sum(grads) / len(grads)).sign() - row).clamp(-cfg.eps, cfg.eps)
        out.append(F.normalize(z_t, dim=1))
    return torch.cat(out)


@pytest.mark.parametrize("objective", ["pixel", "identity"])
def test_smoothed_steps_equal_their_equation_float64(objective):
    shadow, encoder = (m.double() for m in fitting_models())
    z = F.normalize(torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), dim=1)
    cfg = afe.ProtectConfig(eps=0.1, alpha=0.03, steps=2, objective=objective, smoothing=3, smoothing_scale=0.5,
                            min_cosine=None, anchor="original", random_start=False, seed=5)
    got = afe.protect(z, shadow, encoder, cfg)
    torch.testing.assert_close(got, smoothed_steps(z, shadow, encoder, cfg), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, afe.protect(z, shadow, encoder, cfg.replace(smoothing=0)))  # it does something


def test_smoothing_without_noise_is_the_plain_gradient():
    shadow, encoder = fitting_models()
    z = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    cfg = afe.ProtectConfig(objective="identity")
    assert torch.equal(afe.protect(z, shadow, encoder, cfg.replace(smoothing=2, smoothing_scale=0.0)),
                       afe.protect(z, shadow, encoder, cfg))


def test_smoothed_rows_do_not_depend_on_their_batch_and_keep_the_guard():
    shadow, encoder = fitting_models()
    z = F.normalize(torch.randn(12, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    cfg = afe.ProtectConfig(objective="identity", smoothing=2)
    whole = afe.protect(z, shadow, encoder, cfg)
    torch.testing.assert_close(afe.protect(z[3:7], shadow, encoder, cfg), whole[3:7], rtol=0, atol=1e-6)
    torch.testing.assert_close(afe.protect(z.flip(0), shadow, encoder, cfg), whole.flip(0), rtol=0, atol=1e-6)
    assert torch.equal(afe.protect(z, shadow, encoder, cfg), whole)  # the same again
    assert not torch.equal(afe.protect(z, shadow, encoder, cfg.replace(seed=1)), whole)  # the seed draws the noise
    assert (F.cosine_similarity(whole.double(), z.double(), dim=1) >= cfg.min_cosine - 1e-6).all()


def test_copy_noise_is_standard_normal_and_new_for_every_copy():
    z = F.normalize(torch.randn(4000, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    keys = row_keys(z, 7)
    first, second = copy_noise(keys, 32, 0), copy_noise(keys, 32, 1)
    for draws in (first, second):
        assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01
        assert abs((draws ** 4).mean() - 3) < 0.1  # normal, not uniform (1.8)
    assert abs((first * second).mean()) < 0.01  # copies uncorrelated
    assert abs((first[:, 0] * first[:, 1]).mean()) < 0.03  # coordinates uncorrelated
    sub = (keys[0][100:110], keys[1][100:110])
    assert torch.equal(copy_noise(sub, 32, 1), second[100:110])  # a function of the row's keys


@pytest.mark.parametrize("kwargs, error", [(dict(smoothing=-1), ValueError), (dict(smoothing=1.5), ValueError),
                                           (dict(smoothing=True), ValueError), (dict(smoothing=10**6), ValueError),
                                           (dict(smoothing_scale=-0.1), ValueError),
                                           (dict(smoothing_scale=float("nan")), ValueError),
                                           (dict(smoothing_scale="0.5"), TypeError)])
def test_bad_smoothing_settings_are_named(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        afe.ProtectConfig(**kwargs)


def test_smoothing_flags():
    parser = argparse.ArgumentParser()
    add_protect_args(parser)
    cfg = config_from_args(parser.parse_args(["--smoothing", "4", "--smoothing-scale", "0.3"]))
    assert (cfg.smoothing, cfg.smoothing_scale) == (4, 0.3)
    with pytest.raises(ValueError, match="^--smoothing-scale must be"):
        config_from_args(parser.parse_args(["--smoothing", "2", "--smoothing-scale", "-1"]))
    with pytest.raises(ValueError, match="^--smoothing-scale 0.3 takes effect only with --smoothing M"):
        config_from_args(parser.parse_args(["--smoothing-scale", "0.3"]))  # silently ignored otherwise


def test_eval_refuses_a_smoothing_scale_without_smoothing(tmp_path, capsys):
    from advface_engine.cli import main

    assert main(["eval", "--scale", "tiny", "--smoothing-scale", "0.3", "--output", str(tmp_path / "e")]) == 2
    assert "--smoothing-scale 0.3 takes effect only with --smoothing M" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before anything is written


@pytest.mark.interpreter
def test_fused_backend_says_it_takes_the_plain_gradient():
    shadow, encoder = tiny_models()
    with pytest.raises(UnsupportedModelError, match="smoothing=2"):
        make_backend("fused", shadow, encoder, afe.ProtectConfig(smoothing=2))
