"""The utility guard (ProtectConfig.min_cosine): every output row keeps cos(z_adv, z) >= min_cosine,
on the reference and the fused backend, for every setting, with a shadow that fits the encoder and
one that does not."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import fitting_models, tiny_models

import advface_engine as afe
from advface_engine.backends.reference import guard, guard_frame

PAPER = afe.ProtectConfig(anchor="shadow", random_start=False)  # E(S(z)), Eq. 5: where a shadow that does not fit shows
SETTINGS = [dict(norm=n, constraint=c, anchor=a, normalize=z, random_start=a == "original")
            for n, c, a, z in itertools.product(("linf", "l2"), ("ball", "per_step"), ("shadow", "original"),
                                                (True, False))]


def _ids(settings: dict) -> str:
    return "-".join(str(v) for k, v in settings.items() if k != "random_start")


def cosines(z_adv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(z_adv.double(), z.double(), dim=1)


def features(batch: int = 12, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return scale * F.normalize(torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_fitting_models_fit_and_random_ones_do_not():
    """The two pairs the guard is tested on: anchors mostly inside a 0.8 cap, and mostly outside."""
    z = features(64)
    fit = cosines(afe.protect(z, *fitting_models(), PAPER.replace(steps=0, min_cosine=None)), z)
    unfit = cosines(afe.protect(z, *tiny_models(), PAPER.replace(steps=0, min_cosine=None)), z)
    assert fit.median() > 0.9 and unfit.median() < 0.5, (fit.median(), unfit.median())


@pytest.mark.parametrize("pair", ["fitting", "random"])
@pytest.mark.parametrize("settings", SETTINGS, ids=_ids)
def test_guard_holds_on_every_row_reference(settings, pair):
    shadow, encoder = fitting_models() if pair == "fitting" else tiny_models()
    z = features(scale=1.0 if settings["normalize"] else 3.0)
    cfg = afe.ProtectConfig(eps=0.1, alpha=0.03, steps=4, min_cosine=None, **settings)
    free = cosines(afe.protect(z, shadow, encoder, cfg), z)
    tight = free.median().item()  # half the rows of an unguarded run fall below it: the guard is not vacuous
    for c in (0.8, tight, -0.2):
        for steps in (0, 4):
            got = afe.protect(z, shadow, encoder, cfg.replace(steps=steps, min_cosine=c))
            assert (cosines(got, z) >= c - 1e-6).all(), (c, steps, cosines(got, z).min())


def test_guard_leaves_rows_inside_the_cap_as_they_are():
    """A cap that no row leaves changes nothing, to the bit; one that some rows leave changes those only."""
    shadow, encoder = fitting_models()
    z = features(32)
    free = afe.protect(z, shadow, encoder, afe.ProtectConfig(steps=3, min_cosine=None))
    assert torch.equal(afe.protect(z, shadow, encoder, afe.ProtectConfig(steps=3, min_cosine=-0.999)), free)
    anchor_cos = cosines(afe.protect(z, shadow, encoder, PAPER.replace(steps=0, min_cosine=None)), z)
    c = anchor_cos.median().item()
    guarded = afe.protect(z, shadow, encoder, PAPER.replace(steps=0, min_cosine=c))
    steps0 = afe.protect(z, shadow, encoder, PAPER.replace(steps=0, min_cosine=None))
    inside = anchor_cos >= c
    assert torch.equal(guarded[inside], steps0[inside]) and not torch.equal(guarded[~inside], steps0[~inside])
    torch.testing.assert_close(cosines(guarded[~inside], z[~inside]), torch.full_like(anchor_cos[~inside], c),
                               rtol=0, atol=1e-6)


def test_guard_is_the_nearest_point_of_the_cap_with_the_same_norm():
    """Rotated in the plane of u and z to the cap's edge, the norm kept: the distance to u is the
    smallest over random points of the cap's edge with u's norm."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    u = -z + 0.5 * torch.randn(1, 16, generator=gen, dtype=torch.float64)
    out = guard(u, guard_frame(z), 0.6)
    assert cosines(out, z).item() == pytest.approx(0.6, abs=1e-12)
    assert out.norm().item() == pytest.approx(u.norm().item(), rel=1e-12)
    z_hat = F.normalize(z, dim=1)
    across = torch.randn(2000, 16, generator=gen, dtype=torch.float64)
    across = F.normalize(across - (across @ z_hat.T) * z_hat, dim=1)  # random directions orthogonal to z
    edge = u.norm() * (0.6 * z_hat + 0.8 * across)
    assert (out - u).norm() <= (edge - u).norm(dim=1).min()


def test_guard_degenerate_rows():
    """A row pointing exactly away from z turns along e_k made orthogonal to z (k: z's smallest
    |coordinate|, the first on ties); a zero row is taken as norm 1."""
    z = torch.tensor([[3.0, -1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    z_hat, fallback = guard_frame(z)
    torch.testing.assert_close((fallback * z_hat).sum(1), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(fallback.norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert fallback[0].abs().argmax() == 1 and fallback[1].abs().argmax() == 0  # e_1 for row 0, e_0 on ties
    u = torch.stack([-2 * z[0], torch.zeros(4, dtype=torch.float64)])
    out = guard(u, (z_hat, fallback), 0.5)
    torch.testing.assert_close(cosines(out, z), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([2 * z[0].norm().item(), 1.0], dtype=torch.float64))
    torch.testing.assert_close(out[0], u[0].norm() * (0.5 * z_hat[0] + 0.75 ** 0.5 * fallback[0]))


@pytest.mark.parametrize("value, error", [(1.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                          (1.5, ValueError), ("0.8", TypeError), (True, TypeError)])
def test_bad_min_cosine_is_named(value, error):
    with pytest.raises(error, match="min_cosine"):
        afe.ProtectConfig(min_cosine=value)


def test_zero_rows_are_refused_by_the_api():
    shadow, encoder = tiny_models()
    z = features(4)
    z[2] = 0.0
    with pytest.raises(ValueError, match=r"all-zero rows \[2\]"):
        afe.protect(z, shadow, encoder)


# -- the fused backend (Triton interpreter on a CPU) ----------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("pair", ["fitting", "random"])
@pytest.mark.parametrize("settings", SETTINGS, ids=_ids)
def test_guard_holds_on_every_row_fused(settings, pair):
    shadow, encoder = (fitting_models() if pair == "fitting" else tiny_models())
    z = features(scale=1.0 if settings["normalize"] else 3.0)
    for c, steps in ((0.8, 0), (0.95, 3)):
        cfg = afe.ProtectConfig(eps=0.1, alpha=0.03, steps=steps, min_cosine=c, **settings)
        got = afe.protect(z, shadow, encoder, cfg, backend="fused")
        want = afe.protect(z, shadow, encoder, cfg, backend="reference")
        assert (cosines(got, z) >= c - 1e-6).all(), (c, steps, cosines(got, z).min())
        # rows as the reference's: a sign flipped by rounding moves a row's rotation a little
        assert (cosines(got, want) >= 0.99).all(), cosines(got, want).min()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_guard_holds_in_half_precision_and_on_the_graph_path(dtype, monkeypatch):
    """The fp16 decoder (fp32 steps and guard), and the graphed path (EagerGraph on a CPU) with padding."""
    from advface_engine.backends.fused import EagerGraph, FusedBackend
    from advface_engine.protect import frozen

    shadow, encoder = tiny_models()
    z = features(5)
    cfg = afe.ProtectConfig(eps=0.1, alpha=0.03, steps=3, min_cosine=0.9, random_start=True)
    backend = FusedBackend(shadow, encoder, cfg, dtype=dtype)
    backend.graph_type = EagerGraph
    with frozen(shadow, encoder), torch.enable_grad():
        got = backend.run(z)  # 5 rows padded to a graph of 8
    assert (cosines(got, z) >= 0.9 - 1e-6).all(), cosines(got, z)


@pytest.mark.interpreter
@pytest.mark.parametrize("batch, dim, split_k", [(5, 37, 1), (5, 37, 3), (40, 16, 4), (3, 1030, 1)])
def test_guard_in_the_step_kernels_equals_the_reference(batch, dim, split_k):
    """The kernels' epilogue (linear_step unsplit, its split-K finisher, wide rows through sign_step) against
    reference.guard, on rows inside and outside the cap, pointing away from z, zero, and with tied |z|."""
    from advface_engine.backends.reference import project, step_direction
    from advface_engine.kernels.linear_step import linear_sign_step

    gen = torch.Generator().manual_seed(dim)
    z = torch.randn(batch, dim, generator=gen)
    z[0] = 1.0  # every |coordinate| tied
    anchor = torch.randn(batch, dim, generator=gen)
    anchor[1] = -2 * z[1]
    anchor[2] = 0.0
    grad_h = torch.randn(batch, 24, generator=gen)
    grad_h[1:3] = 0.0  # no step: rows 1 and 2 reach the guard as they are (away from z, and zero)
    weight = torch.randn(24, dim, generator=gen)
    frame = guard_frame(z)
    for c in (0.7, -0.4):
        cfg = afe.ProtectConfig(eps=0.05, alpha=0.02, min_cosine=c)
        grad = (grad_h.double() @ weight.double()).float()
        want = guard(project(anchor + cfg.alpha * step_direction(grad, "linf"), anchor, anchor, cfg), frame, c)
        got = linear_sign_step(grad_h, weight, anchor.clone(), anchor, cfg.alpha, cfg.eps, split_k=split_k,
                               guard=(*frame, c))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (cosines(got, z) >= c - 1e-6).all()
    with pytest.raises(ValueError, match="guard"):
        linear_sign_step(grad_h, weight, anchor.clone(), anchor, 0.02, 0.05, guard=(frame[0], frame[1][:, :3], 0.5))


# -- per-row statistics and the shadow-fit preflight ----------------------------------------------


def test_stats_per_row():
    shadow, encoder = tiny_models()
    z = features(8)
    cfg = afe.ProtectConfig(eps=0.1, alpha=0.03, steps=3, min_cosine=0.5, anchor="shadow", random_start=False)
    plain = afe.protect(z, shadow, encoder, cfg)
    z_adv, stats = afe.protect(z, shadow, encoder, cfg, return_stats=True)
    assert torch.equal(z_adv, plain)  # the flag changes nothing of the result
    torch.testing.assert_close(stats.cosine, cosines(z_adv, z).float())
    anchor = afe.protect(z, shadow, encoder, cfg.replace(steps=0, min_cosine=None))
    torch.testing.assert_close(stats.anchor_cosine, cosines(anchor, z).float())
    assert torch.equal(stats.guard_active, (stats.anchor_cosine < 0.5) | (stats.cosine <= 0.5 + 1e-5))
    assert stats.guard_active.any()
    # the gain is the shadow's L1 from x~ at z_adv over that at the guarded anchor (steps 0's output)
    start = afe.protect(z, shadow, encoder, cfg.replace(steps=0))
    with torch.no_grad():
        x = shadow(z)
        want = (shadow(z_adv) - x).abs().flatten(1).sum(1) / (shadow(start) - x).abs().flatten(1).sum(1)
    torch.testing.assert_close(stats.l1_gain, want, rtol=1e-4, atol=1e-4)
    summary = stats.summary()
    assert summary["rows"] == 8 and summary["cosine"]["min"] >= 0.5 - 1e-6
    assert summary["cosine"]["min"] <= summary["cosine"]["median"] <= summary["cosine"]["max"]
    assert stats[2:4].cosine.shape == (2,)
    # anchored at z itself the start reconstructs x~ exactly: no gain to speak of
    _, original = afe.protect(z, shadow, encoder, cfg.replace(anchor="original", random_start=True),
                              return_stats=True)
    assert torch.isnan(original.l1_gain).all() and (original.anchor_cosine > 0.9999).all()


def test_stats_and_check_fit_run_the_folded_shadow():
    """Protector.stats and check_fit run S as the reference runs it (BatchNorm folded: cheaper), with the figures
    of the shadow itself to rounding, rebuilt when the shadow's weights change."""
    from advface_engine.stats import fit_report, protection_stats

    shadow, encoder = tiny_models()
    z = features(16)
    cfg = afe.ProtectConfig(eps=0.1, alpha=0.03, steps=3, min_cosine=0.5, anchor="shadow", random_start=False)
    p = afe.Protector(shadow, encoder, cfg)
    z_adv = p(z)
    ran = []
    hooks = [m.register_forward_hook(lambda m, args, out: ran.append(len(args[0]))) for m in shadow.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    assert hooks
    got, fit = p.stats(z, z_adv), p.check_fit(z)
    assert len(z) not in ran  # the shadow's own BatchNorm layers ran on the model check's probe only
    with torch.no_grad():
        want = protection_stats(z, z_adv, shadow, encoder, cfg)
        want_fit = fit_report(z, shadow, encoder, cfg)
    for name in ("anchor_cosine", "cosine", "l1_gain"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4)
    assert fit.median == pytest.approx(want_fit.median, abs=1e-5)
    with torch.no_grad():
        shadow[0].weight.mul_(1.5)
    moved = p.stats(z, z_adv).l1_gain
    with torch.no_grad():
        torch.testing.assert_close(moved, protection_stats(z, z_adv, shadow, encoder, cfg).l1_gain,
                                   rtol=1e-4, atol=1e-4)
    assert not torch.allclose(moved, got.l1_gain)


def test_check_fit_tells_a_fitting_shadow_from_a_random_one():
    z = features(300)
    fit = afe.Protector(*fitting_models()).check_fit(z)
    unfit = afe.Protector(*tiny_models()).check_fit(z)
    assert fit.rows == 256 and fit.fits() and not unfit.fits()
    assert "the shadow fits" in fit.message()
    # what a poor fit costs depends on the anchor; the figure and the remedy are named either way
    assert unfit.anchor == "original" and f"{unfit.median:.3f}" in unfit.message()
    assert "protect little" in unfit.message() and "train-shadow" in unfit.message()
    at_shadow = afe.Protector(*tiny_models(), afe.ProtectConfig(anchor="shadow")).check_fit(z)
    assert at_shadow.median == unfit.median and not at_shadow.fits()
    assert "recognition suffers" in at_shadow.message() and "--anchor original" in at_shadow.message()
    # the sample is seeded: the same rows each time, other rows for another seed
    assert afe.Protector(*tiny_models()).check_fit(z).median == unfit.median
    assert afe.Protector(*tiny_models()).check_fit(z, seed=1).median != unfit.median
    with pytest.raises(ValueError, match="at least one"):
        afe.Protector(*tiny_models()).check_fit(z[:0])


# -- the gallery job's preflight and summary ------------------------------------------------------


def _gallery(tmp_path, rows: int = 300):
    import numpy as np

    path = tmp_path / "gallery.npy"
    np.save(path, features(rows, seed=5).numpy())
    return path


def test_gallery_job_refuses_a_shadow_that_does_not_fit(tmp_path, capsys):
    """A random shadow: exit 2 before anything is written, the message names the figure and the remedies;
    --force runs it, and the summary shows what it did."""
    from advface_engine.cli import main

    src = _gallery(tmp_path)
    shadow, encoder = tiny_models()
    afe.save_model(shadow, tmp_path / "shadow.safetensors")
    afe.save_model(encoder, tmp_path / "encoder.safetensors")
    args = ["protect-gallery", "--input", str(src), "--output", str(tmp_path / "out.npy"), "--shadow",
            str(tmp_path / "shadow.safetensors"), "--encoder", str(tmp_path / "encoder.safetensors"), "--steps", "1",
            "--device", "cpu", "--no-progress"]
    before = sorted(p.name for p in tmp_path.iterdir())
    for anchor, cost in (("original", "protect little"), ("shadow", "recognition suffers")):  # either anchor
        assert main([*args, "--anchor", anchor]) == 2
        err = capsys.readouterr().err
        assert "the shadow does not fit" in err and "median cos(E(S(z)), z) = " in err and "--force" in err, err
        assert cost in err and "train-shadow" in err and "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no job folder
    assert main([*args, "--min-anchor-cosine", "-1"]) == 0  # a threshold it passes
    out = capsys.readouterr().out  # anchored at z (the default): no anchor cosine to report, it is 1
    assert "guard held" in out and "anchor cosine" not in out
    assert main([*args, "--output", str(tmp_path / "forced.npy"), "--force", "--anchor", "shadow"]) == 0
    out = capsys.readouterr().out
    guard = afe.ProtectConfig().min_cosine
    assert f"cos(feature, protected feature): min {guard:.3f}" in out and "shadow fit (preflight, 256 rows)" in out
    assert "sample of 256 protected rows: guard held" in out and "anchor cosine median" in out


def test_gallery_job_runs_a_fitting_shadow_and_reports_its_figures(tmp_path):
    import numpy as np

    from advface_engine.gallery import protect_gallery
    from advface_engine.gallery.job import STATS_ROWS
    from advface_engine.stats import sample_rows

    src = _gallery(tmp_path)
    shadow, encoder = fitting_models()
    cfg = afe.ProtectConfig(steps=2)
    result = protect_gallery(src, tmp_path / "out.npy", shadow, encoder, cfg, batch_size=64, chunk_rows=128,
                             device="cpu", progress=False)
    fit, sample = result.stats["fit"], result.stats["sample"]
    assert fit["rows"] == 128 and fit["anchor_cosine"]["median"] > 0.9  # a sample of the first chunk
    z, out = np.load(src).astype(np.float64), np.load(tmp_path / "out.npy").astype(np.float64)
    cos = (z * out).sum(1) / np.linalg.norm(z, axis=1) / np.linalg.norm(out, axis=1)
    assert result.cosine["min"] == pytest.approx(cos.min(), abs=1e-12) and cos.min() >= cfg.min_cosine - 1e-6
    assert result.cosine["median"] == pytest.approx(np.median(cos), abs=3e-4)  # a histogram bin (1e-4) away
    picked = sample_rows(300, STATS_ROWS)  # a seeded sample of the 300 rows
    assert sample["rows"] == len(picked) == 256 and 0 <= sample["guard_active"] < 1
    want = afe.protect(torch.from_numpy(np.load(src)[picked]), shadow, encoder, cfg, return_stats=True)[1].summary()
    assert sample["anchor_cosine"]["median"] == pytest.approx(want["anchor_cosine"]["median"], abs=1e-6)
    with pytest.raises(ValueError, match="min_anchor_cosine"):
        protect_gallery(src, tmp_path / "x.npy", shadow, encoder, cfg, device="cpu", min_anchor_cosine=2.0)
