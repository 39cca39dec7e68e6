"""keep_out: the steps kept out of the top principal directions of clean features (principal_directions),
against the equation written out in float64; its basis checked; the fused backend against the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fitting_models, tiny_models

import advface_engine as afe
from advface_engine.backends import make_backend
from advface_engine.noise import ball_noise
from advface_engine.principal import AUTO_SHARE, Moments


def unit_rows(n: int, d: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(seed)), dim=1)


def clustered_rows(n: int = 200, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Unit rows with most of their variance in a few directions, as an encoder's features have."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3, 0.1, d)
    return F.normalize(torch.randn(n, d, generator=g) * scales + 0.5, dim=1)


def kept_steps(z, shadow, encoder, cfg, basis):
    """The protection row by row in float64 with the basis kept out: anchor z, an optional random start,
    then steps z_t + alpha sign(g) into the eps-ball around z, the change's part along B taken out, and the
    guard's rotation toward z onto cos = min_cosine (the identity objective: its gradient at z is not 0)."""

    def constrain(u, row):
        u = row + (u - row) - ((u - row) @ basis.T) @ basis
        z_hat = row / row.norm()
        along = (u * z_hat).sum()
        if along >= cfg.min_cosine * u.norm():
            return u
        across = u - along * z_hat
        c = cfg.min_cosine
        return u.norm() * (c * z_hat + (1 - c * c) ** 0.5 * across / across.norm())

    out = []
    for row in z:
        row = row[None]
        z_t = row.clone()
        if cfg.random_start:
            z_t = constrain(row + ball_noise(row, cfg.seed, cfg.eps, cfg.norm), row)
        for _ in range(cfg.steps):
            z_t = z_t.detach().requires_grad_(True)
            away = 1 - F.cosine_similarity(encoder(shadow(z_t)), row, dim=1).sum()
            step = z_t + cfg.alpha * torch.autograd.grad(away, z_t)[0].sign()
            z_t = constrain(row + (step - row).clamp(-cfg.eps, cfg.eps), row).detach()
        out.append(F.normalize(z_t, dim=1))
    return torch.cat(out)


def test_principal_directions_span_the_top_components():
    z = clustered_rows()
    basis = afe.principal_directions(z, 4)
    assert basis.shape == (4, 16) and basis.dtype == torch.float32
    torch.testing.assert_close(basis @ basis.T, torch.eye(4), rtol=0, atol=1e-6)
    _, _, vt = np.linalg.svd(z.double().numpy() - z.double().numpy().mean(0))
    want = vt[:4].T @ vt[:4]  # the projector onto the top-4 span, whatever the signs
    np.testing.assert_allclose((basis.T @ basis).double().numpy(), want, atol=1e-6)
    top = basis.abs().argmax(dim=1, keepdim=True)
    assert (basis.gather(1, top) > 0).all()  # each row signed by its largest coordinate
    assert torch.equal(afe.principal_directions(z.numpy(), 4), basis)  # NumPy in, the same basis


def test_variance_share_tells_a_basis_of_these_features_from_another():
    from advface_engine.principal import variance_share

    z = clustered_rows()
    own = variance_share(afe.principal_directions(z, 4), z)
    other = variance_share(afe.principal_directions(clustered_rows(seed=1).flip(1), 4), z)
    eigen = np.linalg.eigvalsh(np.cov(z.double().numpy().T, bias=True))[::-1]
    assert own == pytest.approx(eigen[:4].sum() / eigen.sum(), rel=1e-6)  # the top 4 eigenvalues' share
    assert other < own / 2
    moments = Moments(16)
    for part in z.split(64):  # chunk by chunk, as a gallery is read
        moments.add(part)
    assert moments.variance_share(4) == pytest.approx(own, rel=1e-6)
    assert moments.variance_share(8) > moments.variance_share(4)
    held = np.cumsum(eigen) / eigen.sum()  # the fewest directions holding a share: the first k where it is reached
    for share in (0.5, 0.8, 0.9, 0.99):
        k = moments.directions_for(share)
        assert held[k - 1] >= share - 1e-9 and (k == 1 or held[k - 2] < share), (share, k)
    assert moments.directions_for(0.999999999) == 15  # at most D - 1
    with pytest.raises(ValueError, match="share must be in"):
        moments.directions_for(1.0)


@pytest.mark.parametrize("features, k, match", [
    (clustered_rows(), 0, "k must be an integer in"), (clustered_rows(), 16, "k must be an integer in"),
    (clustered_rows(), True, "k must be"), (clustered_rows(), 2.0, "k must be"),
    (clustered_rows()[0], 2, r"\(N, D\) matrix"), (clustered_rows()[:3], 3, "more than 3 feature rows"),
    (torch.full((20, 16), float("nan")), 2, "NaN or Inf")])
def test_principal_directions_refuse_bad_input(features, k, match):
    with pytest.raises(ValueError, match=match):
        afe.principal_directions(features, k)


@pytest.mark.parametrize("random_start", [False, True])
def test_kept_steps_equal_their_equation_float64(random_start):
    shadow, encoder = (m.double() for m in fitting_models())
    z = unit_rows(5, dtype=torch.float64, seed=3)
    basis = afe.principal_directions(clustered_rows(), 5).double()
    cfg = afe.ProtectConfig(eps=0.1, alpha=0.03, steps=3, objective="identity", min_cosine=0.9,
                            anchor="original", random_start=random_start, seed=5)
    got = afe.protect(z, shadow, encoder, cfg, keep_out=basis)
    torch.testing.assert_close(got, kept_steps(z, shadow, encoder, cfg, basis), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, afe.protect(z, shadow, encoder, cfg))  # it does something


def test_without_the_guard_the_change_is_orthogonal_to_the_basis():
    shadow, encoder = tiny_models()
    z = unit_rows(12, seed=1)
    basis = afe.principal_directions(clustered_rows(), 6)
    cfg = afe.ProtectConfig(min_cosine=None, normalize=False)
    kept = afe.protect(z, shadow, encoder, cfg, keep_out=basis)
    plain = afe.protect(z, shadow, encoder, cfg)
    assert ((kept - z) @ basis.T).abs().max() < 1e-6
    assert ((plain - z) @ basis.T).abs().max() > 0.05  # the plain steps do move along it
    assert ((kept - z).norm(dim=1) > 0.05).all()  # and the kept ones still move


def test_kept_rows_do_not_depend_on_their_batch_and_keep_the_guard():
    shadow, encoder = fitting_models()
    z = unit_rows(12, seed=2)
    basis = afe.principal_directions(clustered_rows(), 4)
    cfg = afe.ProtectConfig(objective="identity", min_cosine=0.85)
    whole = afe.protect(z, shadow, encoder, cfg, keep_out=basis)
    torch.testing.assert_close(afe.protect(z[3:7], shadow, encoder, cfg, keep_out=basis), whole[3:7], rtol=0,
                               atol=1e-6)
    assert (F.cosine_similarity(whole.double(), z.double(), dim=1) >= cfg.min_cosine - 1e-6).all()
    protector = afe.Protector(shadow, encoder, cfg, keep_out=basis.numpy())  # a NumPy basis as well
    torch.testing.assert_close(protector(z), whole, rtol=0, atol=1e-6)
    assert torch.equal(afe.protect(z, shadow, encoder, cfg, keep_out=None), afe.protect(z, shadow, encoder, cfg))


@pytest.mark.parametrize("basis, match", [
    (torch.ones(2, 16), "orthonormal"), (torch.eye(16), "1 <= k < D"), (torch.zeros(0, 16), "1 <= k < D"),
    (torch.eye(16)[0], "1 <= k < D"), (torch.eye(16)[:2].long(), "floating-point"),
    (torch.full((2, 16), float("nan")), "finite")])
def test_bad_bases_are_named(basis, match):
    shadow, encoder = tiny_models()
    with pytest.raises(ValueError, match=match):
        afe.Protector(shadow, encoder, keep_out=basis)


def test_a_basis_of_other_features_is_refused_at_the_call():
    shadow, encoder = tiny_models()
    protector = afe.Protector(shadow, encoder, keep_out=torch.eye(8)[:2])
    with pytest.raises(ValueError, match="keep_out is a basis of 8-dim features and these features have 16"):
        protector(unit_rows(3))


def test_other_backends_refuse_a_basis(monkeypatch):
    from advface_engine import backends
    from advface_engine.backends import ReferenceBackend, register

    monkeypatch.setattr(backends, "_REGISTERED", {})
    shadow, encoder = tiny_models()
    register("keep-out-test", lambda shadow, encoder, config, **options: ReferenceBackend(shadow, encoder, config))
    with pytest.raises(ValueError, match="backend 'keep-out-test' takes no keep_out basis"):
        make_backend("keep-out-test", shadow, encoder, afe.ProtectConfig(), keep_out=torch.eye(16)[:2])


# -- the fused backend (Triton's interpreter on a CPU; captured graphs on a GPU) ---------------------------------

FUSED_CFG = afe.ProtectConfig(eps=0.05, alpha=0.01, steps=5, anchor="shadow", random_start=False, min_cosine=0.8)


@pytest.mark.interpreter
@pytest.mark.parametrize("changes", [
    {}, dict(anchor="original", random_start=True, seed=3), dict(norm="l2", eps=0.2, alpha=0.08),
    dict(constraint="per_step"), dict(steps=0), dict(min_cosine=None)], ids=str)
def test_fused_keeps_out_as_the_reference_does(changes):
    from test_fused import agreement, shadow_variant

    shadow, encoder = shadow_variant("dcgan"), tiny_models()[1]
    cfg = FUSED_CFG.replace(**changes)
    z = unit_rows(16, seed=1)
    basis = afe.principal_directions(clustered_rows(), 6)
    got = afe.protect(z, shadow, encoder, cfg, backend="fused", keep_out=basis)
    want = afe.protect(z, shadow, encoder, cfg, backend="reference", keep_out=basis)
    assert agreement(got, want, cfg.alpha) >= 0.999, (got - want).abs().max()
    if cfg.min_cosine is not None:
        assert (F.cosine_similarity(got.double(), z.double(), dim=1) >= cfg.min_cosine - 1e-6).all()
    if cfg.steps:  # the basis changed the result: the comparison is not between two plain runs
        plain = afe.protect(z, shadow, encoder, cfg, backend="fused")
        assert (got - plain).abs().max() > cfg.alpha


@pytest.mark.interpreter
def test_fused_kept_change_is_orthogonal_to_the_basis_in_every_path():
    """Without the guard and the normalisation, the change from z has no part along B: one shadow (the fused
    matmul's step), an ensemble (the standalone step), an fp16 decoder (z_low rewritten after the kept step),
    and the graph's bookkeeping (EagerGraph) with a random start."""
    from test_fused import agreement, shadow_variant

    from advface_engine.backends.fused import EagerGraph, FusedBackend
    from advface_engine.ensemble import as_shadow
    from advface_engine.protect import frozen

    encoder = tiny_models()[1]
    z = unit_rows(8, seed=2)
    basis = afe.principal_directions(clustered_rows(), 4)
    cfg = FUSED_CFG.replace(min_cosine=None, normalize=False, anchor="original", random_start=True, seed=1)
    one, ensemble = shadow_variant("dcgan"), as_shadow([shadow_variant("dcgan"), shadow_variant("nbnet")])
    for shadow, options in ((one, {}), (ensemble, {}), (one, dict(dtype="fp16")), (one, dict(graphs=True))):
        backend = FusedBackend(shadow, encoder, cfg, keep_out=basis, **{"graphs": False, **options})
        backend.graph_type = EagerGraph
        with frozen(backend.shadow, encoder), torch.no_grad():
            got = backend.run(z)
        assert ((got - z) @ basis.T).abs().max() < 1e-5, options
        assert ((got - z).norm(dim=1) > 0.02).all()
        want = afe.protect(z, shadow, encoder, cfg, backend="reference", keep_out=basis)
        assert agreement(got, want, cfg.alpha) >= (0.98 if options.get("dtype") == "fp16" else 0.999), options


@pytest.mark.interpreter
def test_fused_refuses_a_basis_of_other_features_at_the_call():
    from test_fused import shadow_variant

    protector = afe.Protector(shadow_variant("dcgan"), tiny_models()[1], backend="fused", keep_out=torch.eye(8)[:2])
    with pytest.raises(ValueError, match="keep_out is a basis of 8-dim features and these features have 16"):
        protector(unit_rows(3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_kept_steps_in_the_captured_graph(dtype):
    """keep_out inside the CUDA graph: the guard holds, each row close to the reference's, and the change
    without the guard orthogonal to the basis."""
    from test_fused import _gpu_models

    from advface_engine.backends.fused import FusedBackend, _tf32
    from advface_engine.protect import frozen

    shadow, encoder = _gpu_models()
    z = unit_rows(64, seed=4).cuda()
    basis = afe.principal_directions(clustered_rows(), 6).cuda()
    for cfg in (FUSED_CFG.replace(steps=10), FUSED_CFG.replace(min_cosine=None, normalize=False)):
        backend = FusedBackend(shadow, encoder, cfg, dtype=dtype, graphs=True, keep_out=basis)
        with frozen(shadow, encoder):
            got = backend.run(z)
        assert backend.graphs, "the capture fell back to eager"
        if cfg.min_cosine is None:
            assert ((got - z) @ basis.T).abs().max() < 1e-4
        else:
            assert (F.cosine_similarity(got.double(), z.double(), dim=1) >= cfg.min_cosine - 1e-6).all()
        with _tf32(False):  # the reference in IEEE fp32 (cuDNN allows TF32 by default)
            want = afe.protect(z, shadow, encoder, cfg, backend="reference", keep_out=basis)
        assert F.cosine_similarity(got, want, dim=1).min() >= 0.98


@pytest.mark.parametrize("k", [-1, 64])
def test_eval_settings_refuse_a_keep_out_outside_the_feature_dim(k):
    from advface_engine.evaluation.benchmark import settings_for

    with pytest.raises(ValueError, match=r"keep_out must be 'auto' or in \[0, 63\]"):
        settings_for("tiny", keep_out=k)


@pytest.mark.parametrize("k", ["all", 1.5, True])
def test_eval_settings_refuse_a_keep_out_neither_count_nor_auto(k):
    from advface_engine.evaluation.benchmark import settings_for

    with pytest.raises(ValueError, match="keep_out"):
        settings_for("tiny", keep_out=k)


def test_eval_keeps_the_steps_out_and_says_so(tmp_path):
    from advface_engine.cli import main

    out = tmp_path / "e"
    assert main(["eval", "--scale", "tiny", "--keep-out", "auto", "--output", str(out), "--no-progress",
                 "--no-transfer", "--sweep-eps", "0.1", "--sweep-min-cosine", "0.85",
                 "--replicates", "50"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["keep_out"] == "auto"
    assert results["throughput"]["backend"] == "reference"
    (k,), (share,) = results["keep_out"]["directions"], results["keep_out"]["variance_share"]
    assert share >= AUTO_SHARE and 1 <= k < results["settings"]["feature_dim"]
    assert f"kept out of the top {k} principal directions of the clean gallery, per seed (as many as hold 90%" \
        in (out / "report.md").read_text()


def test_a_count_of_directions_is_reported_with_its_share():
    from advface_engine.evaluation.report import _kept_out

    assert _kept_out(16, {"directions": [16, 16], "variance_share": [0.8123, 0.8]}) == \
        "16 principal directions of the clean gallery (81.2% / 80.0% of its variance, per seed)"
    assert _kept_out(16, None) == "16 principal directions of the clean gallery"  # results of older versions


def test_auto_takes_the_fewest_directions_that_hold_the_share():
    z = clustered_rows(300, 16)
    moments = Moments(16)
    moments.add(z)
    k = moments.directions_for(AUTO_SHARE)
    assert moments.variance_share(k) >= AUTO_SHARE > moments.variance_share(k - 1)
    assert torch.equal(afe.principal_directions(z), moments.directions(k))  # k None: by the share


def test_moments_added_after_a_basis_give_the_basis_of_all_rows():
    """The decomposition is kept between calls and made again once more rows are added."""
    z = clustered_rows(300, 16)
    chunked = Moments(16)
    chunked.add(z[:40])
    first = chunked.directions(4)
    chunked.add(z[40:])
    whole = Moments(16)
    whole.add(z)
    assert torch.equal(chunked.directions(4), whole.directions(4)) and not torch.equal(first, whole.directions(4))
    assert chunked.directions_for(AUTO_SHARE) == whole.directions_for(AUTO_SHARE)
    assert chunked.variance_share(4) == pytest.approx(whole.variance_share(4), abs=1e-12)
