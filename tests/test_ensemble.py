"""Shadow ensembles: the step ascends the sum of every shadow's objective (ALGORITHM.md, "Shadow ensembles"),
in the reference path, the fused backend, the Protector, the gallery job and the command line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fitting_models, tiny_models
from test_reference import cap
from torch import nn

import advface_engine as afe
from advface_engine.cli import main
from advface_engine.ensemble import ShadowEnsemble, as_shadow, members
from advface_engine.errors import ModelMismatchError
from advface_engine.gallery import protect_gallery

D = 16


def unit_rows(n: int, seed: int = 3, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, dtype=dtype, generator=torch.Generator().manual_seed(seed)), dim=1)


def three_shadows(dtype=torch.float64) -> tuple[list[nn.Module], nn.Module]:
    """Shadows of three families and one encoder (random, tiny)."""
    shadows = [tiny_models(family, seed=k, dtype=dtype)[0] for k, family in enumerate(("dcgan", "nbnet", "upconv"))]
    return shadows, tiny_models(dtype=dtype)[1]


def ensemble_equations(z, shadows, E, eps, alpha, steps, anchor, ensemble_anchor, start, min_cosine):
    """The ensemble written out row by row in float64: x~_k = S_k(z), the anchor E(x~_1) or the mean direction
    of the normalised E(x~_k) at their mean norm, and steps on the sign of d/dz sum_k ||S_k(z_t) - x~_k||_1."""
    out = []
    for i, row in enumerate(z):
        row = row[None]
        targets = [S(row).detach() for S in shadows]
        if anchor == "original":
            z0 = row.clone()
        elif ensemble_anchor == "first":
            z0 = E(targets[0]).detach()
        else:
            feats = [E(x).detach() for x in targets]
            direction = sum(f / f.norm() for f in feats) / len(feats)
            z0 = direction / direction.norm() * sum(f.norm() for f in feats) / len(feats)
        z0 = cap(z0 / z0.norm(), row, min_cosine)
        zt = z0.clone() if start is None else cap(z0 + start[i], row, min_cosine)
        for _ in range(steps):
            delta = torch.zeros_like(zt, requires_grad=True)
            loss = sum((S(zt + delta) - x).abs().sum() for S, x in zip(shadows, targets))
            (g,) = torch.autograd.grad(loss, delta)
            zt = cap(z0 + torch.clamp(zt + alpha * torch.sign(g) - z0, -eps, eps), row, min_cosine).detach()
        out.append(zt / zt.norm())
    return torch.cat(out)


@pytest.mark.parametrize("anchor,ensemble_anchor,random_start", [("shadow", "first", False),
                                                                 ("shadow", "mean", False),
                                                                 ("shadow", "mean", True),
                                                                 ("original", "first", True)])
@pytest.mark.parametrize("min_cosine", [None, 0.875])
def test_reference_ensemble_equals_equations_float64(anchor, ensemble_anchor, random_start, min_cosine):
    shadows, E = three_shadows()
    z = unit_rows(4)
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.02, steps=4, anchor=anchor, ensemble_anchor=ensemble_anchor,
                            random_start=random_start, min_cosine=min_cosine)
    got = afe.protect(z, shadows, E, cfg)
    start = None
    if random_start:  # the start's noise is drawn from (seed, row bytes), whatever the shadows
        start = afe.protect(z, shadows[0], E, cfg.replace(anchor="original", steps=0, normalize=False,
                                                          min_cosine=None)) - z
    want = ensemble_equations(z, shadows, E, 0.05, 0.02, 4, anchor, ensemble_anchor, start, min_cosine)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_a_list_of_one_is_that_shadow_and_the_ensemble_differs_from_its_first(models, features):
    shadow, encoder = models
    cfg = afe.ProtectConfig(steps=3)
    one = afe.protect(features, shadow, encoder, cfg)
    for given in ([shadow], (shadow,), nn.ModuleList([shadow])):
        assert torch.equal(afe.protect(features, given, encoder, cfg), one)
    assert as_shadow([shadow]) is shadow and members(shadow) == [shadow]
    other = tiny_models("upconv", seed=5)[0]
    both = afe.protect(features, [shadow, other], encoder, cfg)
    assert not torch.equal(both, one)
    assert F.cosine_similarity(both, features).min() >= cfg.min_cosine - 1e-6  # the guard holds as for one


def test_the_ensemble_fools_each_of_its_shadows():
    """Each shadow's reconstruction error rises under the ensemble's protection; a shadow left out of a single
    shadow's protection rises less than when it is in the ensemble (the reason for ensembles)."""
    shadows, E = three_shadows(torch.float32)
    z = unit_rows(64, seed=11, dtype=torch.float32)
    cfg = afe.ProtectConfig(eps=0.1, alpha=0.025, steps=10, min_cosine=None)

    def l1(S, z_adv):
        with torch.no_grad():
            return (S(z_adv) - S(z)).abs().flatten(1).sum(1).mean().item()

    together = afe.protect(z, shadows, E, cfg)
    alone = afe.protect(z, shadows[0], E, cfg)
    noise = afe.protect(z, shadows[0], E, cfg.replace(steps=0))  # the random start alone
    for S in shadows:
        assert l1(S, together) > l1(S, noise)
    for S in shadows[1:]:
        assert l1(S, together) > l1(S, alone)


def test_an_ensemble_runs_each_shadow_folded(models, features):
    """The reference runs every shadow of an ensemble as it runs one: BatchNorm folded, NHWC on a CPU."""
    shadow, encoder = models
    protector = afe.Protector([shadow, tiny_models("upconv", seed=4)[0]], encoder, afe.ProtectConfig(steps=1))
    protector(features)
    run = protector.backend.step_shadow()
    assert isinstance(run, ShadowEnsemble) and not protector.shadow.training
    assert all(not any(isinstance(m, nn.BatchNorm2d) for m in one.modules()) for one in run)
    single = afe.Protector(shadow, encoder, afe.ProtectConfig(steps=1))
    single(features)
    assert [type(m) for m in run[0].modules()] == [type(m) for m in single.backend.step_shadow().modules()]


def test_shadow_ensemble_is_not_a_decoder():
    shadows, _ = three_shadows(torch.float32)
    ensemble = as_shadow(shadows)
    assert isinstance(ensemble, ShadowEnsemble) and members(ensemble) == shadows
    with pytest.raises(TypeError, match="not one decoder"):
        ensemble(torch.zeros(1, D))


def test_bad_ensembles_are_refused_naming_the_shadow(models, features):
    shadow, encoder = models
    with pytest.raises(ValueError, match="shadow list is empty"):
        afe.Protector([], encoder)
    with pytest.raises(TypeError, match="shadow 2 of 2 is a str"):
        afe.Protector([shadow, "other.safetensors"], encoder)
    with pytest.raises(ValueError, match="listed twice"):
        afe.Protector([shadow, shadow], encoder)
    wide = tiny_models(feature_dim=32, seed=1)[0]
    with pytest.raises(ModelMismatchError, match="shadow 2 of 2 does not take features of dim 16"):
        afe.protect(features, [shadow, wide], encoder)
    with pytest.raises(ModelMismatchError, match=r"shadow 3 of 3 must output \(B, 3, H, W\) images, got \(1, 16\)"):
        afe.protect(features, [shadow, tiny_models("upconv")[0], nn.Linear(D, D)], encoder)
    with pytest.raises(ModelMismatchError, match="shadow 2 of 2 is torch.float64"):
        afe.protect(features, [shadow, copy.deepcopy(shadow).double()], encoder)


def test_check_fit_reports_the_worst_shadow_of_an_ensemble():
    shadow, encoder = fitting_models()
    near = copy.deepcopy(shadow)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(0.01 * torch.randn_like(p))
    z = unit_rows(64, dtype=torch.float32)
    fit = afe.Protector([shadow, near], encoder).check_fit(z)
    assert fit.fits() and fit.shadows == 2 and "worst of the ensemble" in fit.message()
    stranger = tiny_models("upconv", seed=9)[0]
    report = afe.Protector([shadow, stranger], encoder).check_fit(z)
    alone = afe.Protector(stranger, encoder).check_fit(z)
    assert not report.fits() and (report.shadows, report.shadow) == (2, 1)
    assert report.anchor_cosine == alone.anchor_cosine
    assert report.message().startswith("shadow 2 of 2 does not fit")


def test_protection_stats_sum_the_shadows(models, features):
    shadow, encoder = models
    other = tiny_models("nbnet", seed=2)[0]
    cfg = afe.ProtectConfig(anchor="shadow", random_start=False, min_cosine=None, steps=3)
    z_adv, stats = afe.protect(features, [shadow, other], encoder, cfg, return_stats=True)
    with torch.no_grad():
        anchor = F.normalize(encoder(shadow(features)), dim=1)
        before = sum((S(anchor) - S(features)).abs().flatten(1).sum(1) for S in (shadow, other))
        after = sum((S(z_adv) - S(features)).abs().flatten(1).sum(1) for S in (shadow, other))
    torch.testing.assert_close(stats.l1_gain, after / before, rtol=1e-5, atol=1e-6)


# -- the fused backend (Triton's interpreter on a CPU) --------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("ensemble_anchor", ["first", "mean"])
def test_fused_ensemble_equals_the_reference(ensemble_anchor):
    from test_fused import agreement, shadow_variant

    from advface_engine.backends.fused import FusedBackend
    from advface_engine.backends.reference import ReferenceBackend, guard, guard_frame, shadow_targets
    from advface_engine.protect import frozen

    shadows = [shadow_variant("dcgan"), shadow_variant("upconv", seed=1, mode="nearest"), shadow_variant("nbnet")]
    encoder = tiny_models()[1]
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.01, steps=5, anchor="shadow", random_start=False,
                            ensemble_anchor=ensemble_anchor)
    z = F.normalize(torch.randn(8, D, generator=torch.Generator().manual_seed(1)), dim=1)
    ensemble = as_shadow(shadows)
    with frozen(ensemble, encoder), torch.enable_grad():
        fused = FusedBackend(ensemble, encoder, cfg, graphs=False, record_loss=True)
        assert len(fused.plans) == 3
        x_fused, anchor = fused.targets(z)
        x_ref, anchor_ref = shadow_targets(z, ensemble, encoder, cfg)
        torch.testing.assert_close(anchor, anchor_ref, rtol=1e-5, atol=1e-6)
        z_t = anchor.clone().requires_grad_(True)
        loss = sum((S(z_t) - x).abs().sum() for S, x in zip(shadows, x_ref))
        (want,) = torch.autograd.grad(loss, z_t)
        got = fused.gradient(anchor, x_fused)
        assert (got.sign() == want.sign()).float().mean() >= 0.999
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
        out = fused.run(z)
        ref = ReferenceBackend(ensemble, encoder, cfg).run(z)
    assert agreement(out, ref, cfg.alpha) >= 0.99
    with torch.no_grad():  # the recorded loss of the first step is the sum over the shadows at the anchor
        start = guard(anchor, guard_frame(z), cfg.min_cosine)
        first = sum((S(start) - S(z)).abs().flatten(1).sum(1) for S in shadows)
    torch.testing.assert_close(fused.losses[0], first, rtol=1e-4, atol=1e-3)


@pytest.mark.interpreter
def test_fused_names_the_shadow_it_cannot_plan(models):
    from advface_engine.backends.fused import FusedBackend
    from advface_engine.errors import UnsupportedModelError

    class Odd(nn.Module):  # no Linear/Conv structure the plan knows
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, z):
            return (z * self.w).reshape(-1, 1, 4, 4).expand(-1, 3, 4, 4)

    with pytest.raises(UnsupportedModelError, match="shadow 2 of 2"):
        FusedBackend(as_shadow([models[0], Odd()]), models[1], afe.ProtectConfig(), graphs=False)


# -- the gallery job and the command line ---------------------------------------------------------------------


def _files(tmp_path, n=96):
    """A gallery, two shadows that fit a linear encoder (a.safetensors, b.safetensors) and one that does not."""
    shadow, encoder = fitting_models()
    near = copy.deepcopy(shadow)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for name, module in (("a", shadow), ("b", near), ("random", tiny_models("upconv", seed=9)[0])):
        afe.save_model(module, tmp_path / f"{name}.safetensors")
    rows = F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(4)), dim=1).numpy()
    np.save(tmp_path / "gallery.npy", rows)
    return rows, (shadow, near), encoder


def test_gallery_job_with_an_ensemble_equals_the_protector_and_fingerprints_each_shadow(tmp_path):
    rows, shadows, encoder = _files(tmp_path)
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    cfg = afe.ProtectConfig(steps=2)
    kw = dict(batch_size=32, device="cpu", progress=False)
    result = protect_gallery(tmp_path / "gallery.npy", tmp_path / "out.npy", paths, encoder, cfg, **kw)
    want = afe.Protector(list(shadows), encoder, cfg, backend="reference")(torch.from_numpy(rows)).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)
    assert result.stats["fit"]["shadows"] == 2
    made = json.loads((tmp_path / "out.npy.provenance.json").read_text())
    assert isinstance(made["shadow"], list) and len(made["shadow"]) == 2 and made["shadow"][0] != made["shadow"][1]
    one = protect_gallery(tmp_path / "gallery.npy", tmp_path / "one.npy", paths[0], encoder, cfg, **kw)
    assert not np.array_equal(np.load(tmp_path / "one.npy"), want) and one.stats["fit"]["shadows"] == 1
    assert isinstance(json.loads((tmp_path / "one.npy.provenance.json").read_text())["shadow"], str)
    # each shadow's weights, in the order given: a job resumed with other shadows, or these in another order,
    # has another fingerprint and is refused rather than mixed
    from advface_engine.models.io import load_model, model_checksum

    assert made["shadow"] == [model_checksum(load_model(path)) for path in paths]


def test_gallery_job_refuses_bad_ensembles_writing_nothing(tmp_path):
    _, _, encoder = _files(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    src, dst = tmp_path / "gallery.npy", tmp_path / "out.npy"
    with pytest.raises(ValueError, match="shadow list is empty"):
        protect_gallery(src, dst, [], encoder, progress=False, device="cpu")
    with pytest.raises(TypeError, match="checkpoint path or a torch.nn.Module, got int"):
        protect_gallery(src, dst, [tmp_path / "a.safetensors", 3], encoder, progress=False, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        protect_gallery(src, dst, [tmp_path / "a.safetensors", tmp_path / "missing.safetensors"], encoder,
                        progress=False, device="cpu")
    with pytest.raises(ValueError, match="shadow 2 of 2 does not fit"):
        protect_gallery(src, dst, [tmp_path / "a.safetensors", tmp_path / "random.safetensors"], encoder,
                        progress=False, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_takes_several_shadows(tmp_path, capsys):
    """--shadow twice: the job protects with both (equal to the Protector's ensemble) and says which fits worst."""
    rows = F.normalize(torch.randn(40, D, generator=torch.Generator().manual_seed(4)), dim=1).numpy()
    np.save(tmp_path / "gallery.npy", rows)
    (a, encoder), b = tiny_models(), tiny_models("upconv", seed=2)[0]
    for name, module in (("a", a), ("b", b), ("encoder", encoder)):
        afe.save_model(module, tmp_path / f"{name}.safetensors")
    args = ["protect", "--input", str(tmp_path / "gallery.npy"), "--output", str(tmp_path / "out.npy"),
            "--shadow", str(tmp_path / "a.safetensors"), "--shadow", str(tmp_path / "b.safetensors"),
            "--encoder", str(tmp_path / "encoder.safetensors"), "--device", "cpu", "--no-progress", "--steps", "2"]
    assert main(args) == 2  # random shadows: the preflight refuses, naming the worse one
    assert "of 2 does not fit" in capsys.readouterr().err and not (tmp_path / "out.npy").exists()
    assert main([*args, "--force", "--ensemble-anchor", "mean", "--anchor", "shadow"]) == 0
    out = capsys.readouterr().out
    assert "shadow fit (preflight, 40 rows)" in out and "of the worst of 2, shadow" in out
    cfg = afe.ProtectConfig(steps=2, ensemble_anchor="mean", anchor="shadow")
    want = afe.Protector([a, b], encoder, cfg, backend="reference")(torch.from_numpy(rows)).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)

