"""Evaluation: 10-fold protocol, restricted .bin reader, quality metrics, baselines, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import types

import numpy as np
import pytest
import torch

from advface_engine import ProtectConfig
from advface_engine.evaluation import (
    best_threshold,
    dp_baseline,
    dp_epsilon,
    folder_set,
    l1,
    pairs_from_labels,
    psnr,
    random_baseline,
    read_bin,
    ssim,
    synthetic_set,
    ten_fold_accuracy,
    to_bin,
    write_bin,
)
from advface_engine.evaluation.baselines import dp_scale
from advface_engine.evaluation.benchmark import Measurement, gallery_loss_interval
from advface_engine.evaluation.bootstrap import resample_counts
from advface_engine.evaluation.datasets import load_bin_payload
from advface_engine.evaluation.verification import (
    SCORE_BINS,
    best_balanced_accuracy,
    fold_accuracies,
    gallery_accuracy,
    gallery_histograms,
    resampled_gallery_accuracy,
)

# ---------------------------------------------------------------- 10-fold protocol


def test_best_threshold_hand_computed():
    # sorted: 0.1 F, 0.3 T, 0.5 F, 0.7 T; thresholds 0.2 and 0.6 both get 3 of 4 right, the lower one wins
    threshold, accuracy = best_threshold([0.1, 0.5, 0.3, 0.7], [False, False, True, True])
    assert threshold == pytest.approx(0.2) and accuracy == 0.75
    threshold, accuracy = best_threshold([0.1, 0.2, 0.3, 0.4], [False, False, True, True])
    assert threshold == pytest.approx(0.25) and accuracy == 1.0


def test_ten_fold_hand_computed():
    # 10 contiguous folds of one (positive, negative) pair each; fold 3's positive scores below every negative.
    scores = np.tile([0.9, 0.1], 10)
    issame = np.tile([True, False], 10)
    scores[6] = 0.05
    # Folds != 3 train on 0.05 T, 9 x 0.1 F, 8 x 0.9 T: best threshold 0.5 (17/18), test 2/2 right.
    # Fold 3 trains on separable data: threshold 0.5; its positive 0.05 is rejected: 1/2 right.
    accuracies, thresholds = fold_accuracies(scores, issame)
    assert accuracies.tolist() == [1, 1, 1, 0.5, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(thresholds, 0.5)
    mean, std, threshold = ten_fold_accuracy(scores, issame)
    assert mean == pytest.approx(0.95) and std == pytest.approx(0.15) and threshold == pytest.approx(0.5)


def test_gallery_accuracy_is_the_best_balanced_accuracy_over_every_ordered_pair():
    g = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(12), 4)
    centres = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    clean = torch.nn.functional.normalize(centres[labels] + 0.6 * torch.randn(48, 8, generator=g), dim=1)
    stored = torch.nn.functional.normalize(clean + 0.3 * torch.randn(48, 8, generator=g), dim=1)
    # brute force: every ordered pair i != j, every threshold between sorted scores
    scores = (stored.double() @ clean.double().T).numpy()
    off = ~np.eye(48, dtype=bool)
    s, same = scores[off], (labels[:, None] == labels[None, :])[off]
    best = max(((s[same] >= t).mean() + (s[~same] < t).mean()) / 2 for t in np.concatenate([s, [2.0]]))
    got = gallery_accuracy(stored, clean, labels, block=7)  # blocks that do not divide the rows
    assert abs(got - best) < 2e-3 and 0.6 < got < 1
    assert gallery_accuracy(clean, clean, labels) > got  # the noise costs accuracy
    assert gallery_accuracy(clean, clean, np.arange(48) % 2) < 0.6  # labels that mean nothing: near chance
    with pytest.raises(ValueError, match="two images of one identity"):
        gallery_accuracy(clean, clean, np.arange(48))
    with pytest.raises(ValueError, match="same N images"):
        gallery_accuracy(clean, clean[:5], labels)


def _weighted_gallery_accuracy(stored, clean, labels, weights) -> float:
    """Brute force: every ordered pair i != j weighted by its probe identity's weight, every threshold."""
    scores = (stored.double() @ clean.double().T).numpy()
    off = ~np.eye(len(labels), dtype=bool)
    s, same = scores[off], (labels[:, None] == labels[None, :])[off]
    w = np.broadcast_to(weights[labels][:, None], scores.shape)[off]
    return max(((w * (s >= t))[same].sum() / w[same].sum() + (w * (s < t))[~same].sum() / w[~same].sum()) / 2
               for t in np.concatenate([s, [2.0]]))


def _noisy_gallery(identities: int = 12, per_identity: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    centres = torch.nn.functional.normalize(torch.randn(identities, 8, generator=g), dim=1)
    clean = torch.nn.functional.normalize(centres[labels] + 0.6 * torch.randn(len(labels), 8, generator=g), dim=1)
    stored = torch.nn.functional.normalize(clean + 0.3 * torch.randn(len(labels), 8, generator=g), dim=1)
    return labels, clean, stored


def test_gallery_histograms_count_every_ordered_pair_by_its_probe_identity():
    labels, clean, stored = _noisy_gallery()
    labels = labels * 3 + 5  # any integer names: identities in np.unique order
    genuine, impostor = gallery_histograms(stored, clean, labels, block=5)
    assert genuine.shape == impostor.shape == (12, SCORE_BINS)
    assert genuine.sum(1).tolist() == [4 * 3] * 12 and impostor.sum(1).tolist() == [4 * 44] * 12
    # the bins are the scores': identity 0's genuine scores land where they lie
    scores = (stored[:4].double() @ clean[:4].double().T).numpy()[~np.eye(4, dtype=bool)]
    index = np.round((scores + 1) / 2 * (SCORE_BINS - 1)).astype(int)
    assert genuine[0].nonzero().flatten().tolist() == sorted(set(index.tolist()))
    # batched accuracies are the one-by-one ones
    batch = best_balanced_accuracy(genuine[:3], impostor[:3])
    assert batch.tolist() == [float(best_balanced_accuracy(genuine[k], impostor[k])) for k in range(3)]


def test_resampled_gallery_accuracy_weights_each_identitys_probe_rows():
    labels, clean, stored = _noisy_gallery()
    histograms = gallery_histograms(stored, clean, labels)
    counts = np.ones((3, 12), dtype=np.int32)
    counts[1, :6] = 0  # half the identities left out
    counts[2] = np.random.default_rng(0).multinomial(12, np.full(12, 1 / 12))  # a bootstrap draw
    got = resampled_gallery_accuracy(histograms, counts, block=2)
    assert got[0] == pytest.approx(gallery_accuracy(stored, clean, labels), abs=1e-12)
    for r in (1, 2):
        assert abs(got[r] - _weighted_gallery_accuracy(stored, clean, labels, counts[r].astype(float))) < 2e-3
    assert len(set(np.round(got, 9))) == 3  # the draws move it
    with pytest.raises(ValueError, match="11 columns for 12 identities"):
        resampled_gallery_accuracy(histograms, counts[:, :11])


def test_gallery_loss_interval_over_identities():
    """Two seeds: the estimate is the mean of their gallery-wide losses, the interval holds it, identical
    features give a zero-width interval at zero, and more noise gives a larger loss."""
    runs, noisy, same = [], [], []
    for seed in (0, 1):
        labels, clean, stored = _noisy_gallery(identities=30, seed=seed)
        counts = resample_counts(np.zeros(30), 200, seed=[seed, 2])
        histograms = gallery_histograms(clean, clean, labels)
        runs.append(types.SimpleNamespace(
            gallery_counts=counts, clean={"gallery": gallery_accuracy(clean, clean, labels)},
            clean_gallery_replicates=resampled_gallery_accuracy(histograms, counts)))
        for out, features in ((noisy, stored), (same, clean)):
            h = gallery_histograms(features, clean, labels)
            out.append(Measurement(np.zeros(1), np.zeros(1), float(best_balanced_accuracy(h[0].sum(0), h[1].sum(0))),
                                   resampled_gallery_accuracy(h, counts)))
    interval = gallery_loss_interval(runs, noisy)
    losses = [run.clean["gallery"] - m.gallery for run, m in zip(runs, noisy)]
    assert interval["estimate"] == pytest.approx(np.mean(losses)) and min(losses) > 0
    assert interval["low"] < interval["estimate"] < interval["high"] and interval["low"] > 0
    zero = gallery_loss_interval(runs, same)
    assert zero["estimate"] == zero["low"] == zero["high"] == 0.0


def test_ten_fold_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 10 pairs"):
        ten_fold_accuracy([0.1, 0.2], [True, False])
    with pytest.raises(ValueError, match="same length"):
        ten_fold_accuracy(np.zeros(20), np.zeros(19, bool))


def test_pairs_from_labels_folds_are_balanced_and_identity_disjoint():
    labels = np.repeat(np.arange(40), 3)
    left, right, issame = pairs_from_labels(labels, pairs_per_fold=6, folds=10, seed=1)
    assert len(issame) == 60
    fold_ids = []
    for fold in np.array_split(np.arange(60), 10):
        assert issame[fold].sum() == 3
        assert (labels[left[fold]] == labels[right[fold]]).tolist() == issame[fold].tolist()
        fold_ids.append(set(labels[left[fold]]) | set(labels[right[fold]]))
    assert all(not (a & b) for i, a in enumerate(fold_ids) for b in fold_ids[i + 1:])


def test_flip_embedding_is_mirror_invariant(models):
    from advface_engine.evaluation import embed

    _, encoder = models
    torch.manual_seed(0)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    z = embed(encoder, x, flip=True)
    flip_gap = (z - embed(encoder, x.flip(-1), flip=True)).abs().max()
    plain_gap = (embed(encoder, x) - embed(encoder, x.flip(-1))).abs().max()
    assert flip_gap < 1e-5 and plain_gap > 100 * flip_gap
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)


# ---------------------------------------------------------------- .bin format


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(([_Payload(marker)], []))
    assert b"system" in data  # the file really carries the call
    path = tmp_path / "evil.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="refused.*system"):
        read_bin(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload, message", [
    (([b"a", b"b"], [1]), "booleans, found int"),
    ((["a", "b"], [True]), "bytes, found str"),
    (({"images": []}, []), "two lists"),
    (([b"a"], [True]), "two images per pair"),
    ([b"a"], "pair"),
])
def test_restricted_unpickler_refuses_unexpected_types(payload, message):
    with pytest.raises(ValueError, match=message):
        load_bin_payload(pickle.dumps(payload))


def test_bin_round_trip(tmp_path):
    data = synthetic_set(20, 2, size=16, pairs_per_fold=2)
    path = tmp_path / "synthetic.bin"
    to_bin(data, path)
    loaded = read_bin(path)
    assert loaded.issame.tolist() == data.issame.tolist()
    assert loaded.left.tolist() == list(range(0, 40, 2)) and loaded.right.tolist() == list(range(1, 40, 2))
    original = torch.stack([data.images[torch.as_tensor(data.left)], data.images[torch.as_tensor(data.right)]], 1)
    assert torch.allclose(loaded.images, original.flatten(0, 1), atol=1 / 127.5 + 1e-6)
    with pytest.raises(ValueError, match="2 \\* 3"):
        write_bin(path, torch.zeros(5, 3, 8, 8), [True, False, True])


def test_folder_set_with_pair_file(tmp_path):
    from PIL import Image

    for person in ("ann", "bob"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (8, 8), (40 * k, 100, 200)).save(tmp_path / "faces" / person / f"{k}.png")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# gallery probe same\nann/0.png ann/1.png 1\nann/0.png bob/1.png 0\n")
    data = folder_set(tmp_path / "faces", size=8, pair_file=pairs)
    assert data.images.shape == (3, 3, 8, 8) and data.issame.tolist() == [True, False]
    assert data.left.tolist() == [0, 0] and sorted(data.right.tolist()) == [1, 2]
    pairs.write_text("ann/0.png ../pairs.txt 1\n")
    with pytest.raises(FileNotFoundError, match="not an image under"):
        folder_set(tmp_path / "faces", size=8, pair_file=pairs)


# ---------------------------------------------------------------- reconstruction quality


def test_psnr_ssim_l1_on_known_images():
    black = -torch.ones(2, 3, 16, 16)  # 0 on the [0, 1] scale
    grey = torch.zeros(2, 3, 16, 16)  # 0.5
    assert l1(black, grey) == pytest.approx(1.0)
    assert psnr(black, grey) == pytest.approx(10 * math.log10(1 / 0.25))
    # constant images: SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) with C1 = (0.01 * 1)^2
    assert ssim(black, grey) == pytest.approx(1e-4 / (0.25 + 1e-4), rel=1e-6)
    torch.manual_seed(0)
    noisy = (grey + 0.1 * torch.randn_like(grey)).clamp(-1, 1)
    assert ssim(noisy, noisy) == pytest.approx(1.0) and psnr(noisy, noisy) == math.inf
    assert 0 < ssim(noisy, grey) < 1
    with pytest.raises(ValueError, match="same shape"):
        psnr(black, grey[:1])


# ---------------------------------------------------------------- baselines


def test_random_baseline_stays_in_budget(models, features):
    shadow, encoder = models
    config = ProtectConfig(eps=0.03, alpha=0.01, steps=3, normalize=False, min_cosine=None)
    from advface_engine.backends.reference import shadow_targets

    _, anchor = shadow_targets(features, shadow, encoder, config)
    out = random_baseline(features, shadow, encoder, config, seed=3)
    np.testing.assert_allclose((out - anchor).abs().numpy(), 0.03, rtol=1e-5)
    signs = torch.randint(0, 2, anchor.shape, generator=torch.Generator().manual_seed(3)).to(anchor) * 2 - 1
    assert torch.equal(out, anchor + 0.03 * signs)  # L-inf: the same bytes as before the L2 variant
    assert not torch.equal(out, random_baseline(features, shadow, encoder, config, seed=4))
    normalised = random_baseline(features, shadow, encoder, config.replace(normalize=True), seed=3)
    np.testing.assert_allclose(normalised.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_random_baseline_l2_step_has_l2_norm_eps(models, features):
    """With norm "l2" Random's step lies on AdvFace's L2 sphere of radius eps, not at an L-inf corner."""
    shadow, encoder = models
    config = ProtectConfig(eps=0.03, alpha=0.01, steps=3, norm="l2", normalize=False, min_cosine=None)
    from advface_engine.backends.reference import shadow_targets

    _, anchor = shadow_targets(features, shadow, encoder, config)
    step = random_baseline(features, shadow, encoder, config, seed=3) - anchor
    np.testing.assert_allclose(step.norm(dim=1).numpy(), 0.03, rtol=1e-5)
    assert step.abs().max() < 0.03  # not a sign step
    assert not torch.equal(step, random_baseline(features, shadow, encoder, config, seed=4) - anchor)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_dp_baseline_noise_matches_its_budget(norm):
    """Laplace noise with RMS eps per coordinate (L-inf) or RMS L2 norm eps (L2)."""
    z = torch.zeros(400, 128)
    noise = dp_baseline(z, eps=0.03, normalize=False, seed=0, norm=norm)
    b = dp_scale(0.03, 128, norm)
    assert b == pytest.approx(0.03 / math.sqrt(2 * 128 if norm == "l2" else 2))
    assert noise.abs().mean().item() == pytest.approx(b, rel=0.03)  # E|Laplace(0, b)| = b
    rms = noise.pow(2).sum(1).mean().sqrt() if norm == "l2" else noise.pow(2).mean().sqrt()
    assert rms.item() == pytest.approx(0.03, rel=0.03)
    assert dp_epsilon(0.03, 128, norm) == pytest.approx(2 * math.sqrt(128) / b)
    if norm == "linf":  # the default, as before
        assert torch.equal(noise, dp_baseline(z, eps=0.03, normalize=False, seed=0))


def test_run_passes_the_norm_and_guard_to_the_dp_baseline():
    from advface_engine.evaluation import benchmark

    run = benchmark.Run.__new__(benchmark.Run)
    run.s, run.z = benchmark.settings_for("tiny"), torch.randn(50, 64)
    config = ProtectConfig(norm="l2", normalize=False, min_cosine=0.9)
    expected = dp_baseline(run.z, config.eps, normalize=False, seed=run.s.seed, norm="l2", min_cosine=0.9)
    assert torch.equal(run.baseline("dp", config), expected)


@pytest.mark.parametrize("min_cosine", [0.8, 0.95])
def test_baselines_keep_the_guard(models, features, min_cosine):
    """At the same guard as AdvFace, Random and DP rows keep cos >= min_cosine with z (without it they do not)."""
    shadow, encoder = models
    config = ProtectConfig(eps=0.3, alpha=0.1, steps=3, min_cosine=min_cosine)
    for out, bare in ((random_baseline(features, shadow, encoder, config, seed=1),
                       random_baseline(features, shadow, encoder, config.replace(min_cosine=None), seed=1)),
                      (dp_baseline(features, 0.3, seed=1, min_cosine=min_cosine), dp_baseline(features, 0.3, seed=1))):
        cosine = torch.nn.functional.cosine_similarity(out, features, dim=1)
        assert (cosine >= min_cosine - 1e-5).all()
        assert (torch.nn.functional.cosine_similarity(bare, features, dim=1) < min_cosine).any()
        np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    from advface_engine.cli import main

    out = tmp_path_factory.mktemp("eval")
    # the paper's anchor E(S(z)): its mismatch scenario shows what the guard buys (anchored at z, little)
    code = main(["eval", "--scale", "tiny", "--output", str(out), "--no-progress", "--eps", "0.1", "--alpha", "0.03",
                 "--min-cosine", "0.5", "--anchor", "shadow", "--no-random-start"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_eval_writes_json_report_grids_and_curve(tiny_eval):
    out, results = tiny_eval
    report = (out / "report.md").read_text()
    assert "synthetic" in report and "| AdvFace |" in report
    for name in ("privacy_utility.png", "grid_dcgan.png", "grid_upconv.png", "grid_strong.png", "grid_adaptive.png"):
        assert (out / name).stat().st_size > 0
    from PIL import Image

    rows, size = results["settings"]["grid_rows"], results["settings"]["size"]
    scale = max(1, 96 // size)
    with Image.open(out / "grid_upconv.png") as grid:  # five columns under a band of titles
        assert grid.width == 5 * size * scale and grid.height > rows * size * scale
    assert results["label"] == "synthetic" and results["config"]["eps"] == 0.1
    assert results["config"]["min_cosine"] == 0.5
    assert results["cross_family_attackers"] == ["upconv"]
    assert results["attackers"] == ["dcgan", "upconv", "strong", "adaptive"]
    rows = results["transfer"]  # each family alone, then the shadow's family with the other: one ensemble
    assert [(r["shadows"], r["objective"]) for r in rows] == [(["dcgan"], "pixel"), (["upconv"], "pixel"),
                                                              (["dcgan", "upconv"], "pixel")]
    assert [r["unseen"] for r in rows] == [["upconv", "strong"], ["dcgan", "strong"], ["strong"]]
    assert all(set(r["success"]) == set(results["attackers"]) for r in rows)
    own = results["identity_inference"]["advface"]  # the config's own row: the main table's measurements
    assert rows[0]["success"] == {a: own[a]["success"] for a in results["attackers"]}
    assert rows[2]["unseen_max"] == rows[2]["success"]["strong"] == rows[2]["unseen_mean"]
    assert "| dcgan+upconv | pixel |" in report and "unseen mean [95% CI]" in report
    assert f"protects with one `dcgan` shadow and the `pixel` objective (row `dcgan`, pixel: unseen attackers " \
           f"{100 * rows[0]['unseen_mean']:.2f}%)" in report
    assert {p["method"] for p in results["sweep"]} == {"advface", "random", "dp"}
    cosine = results["anchor_only"]["cosine"]  # how near E(S(z)) is to z: docs/evaluation.md, shadow mismatch
    assert 0 < cosine < 1 and f"mean cos(E(S(z)), z) {cosine:.3f} before the guard" in report


def test_eval_reports_intervals_seeds_and_resolution(tiny_eval):
    out, results = tiny_eval
    report = (out / "report.md").read_text()
    assert results["seeds"] == [0] and results["data"]["pairs total"] == 400
    loss = results["verification"]["advface"]["offline"]["loss"]
    assert loss["low"] <= loss["estimate"] <= loss["high"] and loss["replicates"] == 200
    assert loss["estimate"] == pytest.approx(results["verification"]["clean"]["accuracy"]
                                             - results["verification"]["advface"]["offline"]["accuracy"])
    half = results["resolution"]["offline_loss_half_width_points"]
    assert half == pytest.approx(100 * loss["half_width"])
    assert f"known to +-{half:.2f} point" in report
    assert not results["resolution"]["supports_recommendation"]  # tiny: never
    assert "too small to support a recommendation" in report and "smoke test" in report
    for p in results["sweep"]:
        assert p["offline_loss"]["low"] <= p["offline_loss"]["high"]
    assert results["pareto"] and all(p["method"] == "advface" for p in results["pareto"])
    assert "Pareto front" in report and "| stronger attacker |" in report.replace("attacker | adaptive", "attacker |")
    gallery = results["verification"]["advface"]["gallery"]  # synthetic faces: identities known
    loss = gallery["loss"]
    assert loss["estimate"] == pytest.approx(results["verification"]["clean"]["gallery"] - gallery["accuracy"])
    assert loss["low"] <= loss["estimate"] <= loss["high"] and loss["replicates"] == 200
    assert f"AdvFace {100 * loss['estimate']:.2f} [{100 * loss['low']:.2f}, {100 * loss['high']:.2f}]" in report
    assert len(gallery["loss_per_seed"]) == 1 and "Gallery-wide offline loss" in report
    assert all(p["gallery_loss"] is not None for p in results["sweep"])


def test_the_sweep_holds_the_evaluated_config_as_measured_in_the_tables(tiny_eval):
    """The config's own sweep point (and the baselines at its eps) are the tables' figures, taken once."""
    _, results = tiny_eval
    cfg = results["config"]
    for method in ("advface", "random", "dp"):
        own = [p for p in results["sweep"] if p["method"] == method and p["eps"] == cfg["eps"]
               and p["min_cosine"] == cfg["min_cosine"]
               and (method != "advface" or (p["steps"], p["anchor"], p["alpha"]) ==
                    (cfg["steps"], cfg["anchor"], cfg["alpha"]))]
        assert len(own) == 1, (method, own)
        table = results["verification"][method]["offline"]
        assert own[0]["offline"] == table["accuracy"] and own[0]["offline_loss"] == table["loss"]
        assert own[0]["attack_success"] == results["identity_inference"][method]["cross_family_mean"]["success"]


def test_eval_measures_the_mismatched_shadow_with_and_without_the_guard(tiny_eval):
    out, results = tiny_eval
    m = results["mismatch"]
    assert m["min_cosine"] == 0.5 and set(m) >= {"guard", "no_guard", "fit"}
    assert m["fit"][0] < results["anchor_only"]["fit"][0]  # the mismatched shadow fits worse
    assert m["guard"]["offline"] > m["no_guard"]["offline"]  # what the guard buys
    assert "## Shadow mismatch" in (out / "report.md").read_text()


def test_protection_lowers_attack_success_with_real_training(tiny_eval):
    _, results = tiny_eval
    attack = results["identity_inference"]
    unprotected = attack["unprotected"]["cross_family_mean"]["success"]
    protected = attack["advface"]["cross_family_mean"]["success"]
    assert results["verification"]["clean"]["accuracy"] > 0.6  # the tiny encoder learned something
    assert protected < unprotected
    assert attack["advface"]["upconv"]["l1"] > attack["unprotected"]["upconv"]["l1"]


def test_eval_settings_from_json_file_and_flags(tmp_path):
    from advface_engine.cli import build_parser
    from advface_engine.evaluation.cli import settings_from_args

    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"scale": "tiny", "gallery_identities": 30, "protect": {"eps": 0.07, "steps": 4}}))
    args = build_parser().parse_args(["eval", "--config", str(path), "--steps", "6", "--sweep-eps", "0.01,0.2"])
    settings = settings_from_args(args)
    assert (settings.scale, settings.gallery_identities, settings.size) == ("tiny", 30, 32)
    assert settings.config().eps == 0.07 and settings.config().steps == 6
    assert settings.sweep_eps == (0.01, 0.2)
    default = settings_from_args(build_parser().parse_args(["eval"]))
    assert default.scale == "small" and default.config() == ProtectConfig()
    assert default.transfer and default.ensembles is None and default.transfer_objectives == ("pixel",)
    args = build_parser().parse_args(["eval", "--scale", "medium", "--transfer", "--ensembles",
                                      "dcgan+nbnet, dcgan+upconv+nbnet", "--transfer-objectives", "pixel,identity"])
    settings = settings_from_args(args)
    assert settings.transfer and settings.ensembles == (("dcgan", "nbnet"), ("dcgan", "upconv", "nbnet"))
    assert settings.transfer_objectives == ("pixel", "identity")
    assert not settings_from_args(build_parser().parse_args(["eval", "--scale", "medium"])).transfer


def test_min_cosine_none_turns_the_guard_off_in_eval(tmp_path):
    """--min-cosine none is a value (no guard), not "flag not given": it wins over a settings file."""
    from advface_engine.cli import build_parser
    from advface_engine.evaluation.cli import settings_from_args

    def config(*argv):
        return settings_from_args(build_parser().parse_args(["eval", *argv])).config()

    assert config("--min-cosine", "none").min_cosine is None
    assert config().min_cosine == ProtectConfig().min_cosine
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"scale": "tiny", "protect": {"min_cosine": 0.5, "normalize": False}}))
    assert config("--config", str(path)).min_cosine == 0.5 and not config("--config", str(path)).normalize
    assert config("--config", str(path), "--min-cosine", "none").min_cosine is None
    assert config("--config", str(path), "--min-cosine", "0.9").min_cosine == 0.9


def test_eval_sweep_flags_and_named_sweep():
    from advface_engine.cli import build_parser
    from advface_engine.evaluation.benchmark import SWEEPS
    from advface_engine.evaluation.cli import settings_from_args

    def settings(*argv):
        return settings_from_args(build_parser().parse_args(["eval", "--scale", "tiny", *argv]))

    s = settings("--sweep-min-cosine", "0.9,none", "--sweep-anchor", "shadow,original", "--sweep-identity-weight",
                 "0,1", "--num-seeds", "3", "--replicates", "50")
    assert s.sweep_min_cosine == (0.9, None) and s.sweep_anchor == ("shadow", "original")
    assert s.sweep_identity_weight == (0.0, 1.0) and s.num_seeds == 3 and s.seeds() == [0, 1, 2]
    assert s.replicates == 50
    named = settings("--sweep", "defaults", "--sweep-eps", "0.4")
    assert named.sweep_eps == (0.4,) and named.sweep_min_cosine == SWEEPS["defaults"]["sweep_min_cosine"]
    with pytest.raises(ValueError, match="unknown sweep 'nope'"):
        settings("--sweep", "nope")
    with pytest.raises(ValueError, match="unknown anchor 'middle'"):
        settings("--sweep-anchor", "middle")
    assert settings_from_args(build_parser().parse_args(["eval", "--scale", "medium"])).seeds() == [0, 1, 2]


def test_eval_flag_spellings_match_the_other_commands(tmp_path, capsys):
    """--shadow-arch is a family, --shadow and --encoder are files; the old spellings still work, with a
    deprecation message."""
    from advface_engine.cli import build_parser
    from advface_engine.evaluation.cli import settings_from_args

    def settings(*argv):
        return settings_from_args(build_parser().parse_args(["eval", "--scale", "tiny", *argv]))

    s = settings("--shadow-arch", "upconv")
    assert s.shadow == "upconv" and s.shadow_checkpoint is None
    assert "deprecated" not in capsys.readouterr().err
    s = settings("--shadow", "upconv")  # the old meaning of --shadow: a family
    assert s.shadow == "upconv" and s.shadow_checkpoint is None
    assert "--shadow upconv (a family) is deprecated" in capsys.readouterr().err
    missing = str(tmp_path / "missing.safetensors")
    for old, new in (("--shadow-checkpoint", "--shadow"), ("--encoder-checkpoint", "--encoder")):
        for flag in (old, new):
            with pytest.raises(ValueError, match=f"{new}: no file at"):
                settings(flag, missing)
            assert ("is deprecated" in capsys.readouterr().err) == (flag == old)


def _bare_run(monkeypatch, **overrides):
    """A benchmark.Run with tiny random models and no training: train_decoder records its calls."""
    from conftest import tiny_models

    from advface_engine.evaluation import benchmark

    calls = []

    def record(decoder, encoder, images, **kwargs):
        calls.append({"decoder": decoder, "encoder": encoder, "images": images, **kwargs})
        return [0.0]

    monkeypatch.setattr(benchmark, "train_decoder", record)
    run = benchmark.Run.__new__(benchmark.Run)
    run.s = benchmark.settings_for("tiny", feature_dim=16, size=16, **overrides)
    run.progress, run.device, run.timings, run.training = False, torch.device("cpu"), {}, {}
    _, run.encoder = tiny_models()
    run.server_images, _ = benchmark.synthetic_faces(10, 2, 16, seed=0)
    run.attacker_images, _ = benchmark.synthetic_faces(6, 2, 16, seed=0, first_identity=benchmark.ATTACKER_FIRST)
    run._shadows, run._mismatch, run.attackers = {}, None, {}
    return run, calls


def test_attack_hits_reconstruct_each_stored_feature_once(models):
    """A feature attacked in several pairs is reconstructed once; the hits are those of one row per pair."""
    from advface_engine.evaluation.attack import attack_hits

    shadow, encoder = models  # any decoder serves as the attacker
    torch.manual_seed(0)
    stored = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    rows = torch.tensor([0, 2, 2, 1, 0])
    other, own = torch.randn(5, 16), torch.randn(5, 16)
    hits, hits_self, images = attack_hits(shadow, encoder, stored, other, own, 0.0, rows=rows)
    each, each_self, _ = attack_hits(shadow, encoder, stored[rows], other, own, 0.0)
    assert images.shape[0] == 3 and hits.tolist() == each.tolist() and hits_self.tolist() == each_self.tolist()
    assert 0 < hits.sum() < 5 or 0 < hits_self.sum() < 5  # the comparison is not vacuous
    with pytest.raises(ValueError, match="same number of rows"):
        attack_hits(shadow, encoder, stored, other[:4], own, 0.0, rows=rows)


def test_adaptive_attacker_trains_on_features_it_protected_itself(monkeypatch):
    from advface_engine import Protector
    from advface_engine.evaluation.attack import ProtectedEncoder

    run, calls = _bare_run(monkeypatch, shadow_identity_weight=0.5)
    config = ProtectConfig(eps=0.1, alpha=0.03, steps=3, min_cosine=0.5)
    run.train_adaptive(config)
    shadow_call, attacker_call = calls
    assert shadow_call["images"] is run.attacker_images and shadow_call["encoder"] is run.encoder  # its own data
    assert shadow_call["identity_weight"] == 0.5 and shadow_call["decoder"].arch == "dcgan"  # the server's recipe
    assert attacker_call["images"] is run.attacker_images and attacker_call["identity_weight"] == 0.0
    assert attacker_call["decoder"].arch == run.s.adaptive_family
    assert run.attackers["adaptive"] is attacker_call["decoder"]
    view = attacker_call["encoder"]
    assert isinstance(view, ProtectedEncoder) and view.shadow is shadow_call["decoder"]
    x = run.attacker_images[:4]
    clean = torch.nn.functional.normalize(run.encoder(x), dim=1).detach()
    protected = view(x)
    assert torch.allclose(protected, Protector(shadow_call["decoder"], run.encoder, config, backend="reference")(clean),
                          atol=1e-6)
    assert not torch.allclose(protected, clean, atol=1e-3)  # it trains on protected features, not clean ones


@pytest.mark.parametrize("keep_out", [4, "auto"])
def test_the_adaptive_attacker_keeps_out_its_own_faces_principal_directions(monkeypatch, keep_out):
    from advface_engine import principal_directions
    from advface_engine.evaluation.verification import embed

    run, calls = _bare_run(monkeypatch, keep_out=keep_out)
    run.train_adaptive(ProtectConfig(steps=2))
    view = calls[1]["encoder"]
    own = principal_directions(embed(run.encoder, run.attacker_images), None if keep_out == "auto" else keep_out)
    assert torch.equal(view.protector.keep_out, own)  # its basis, from the faces it has, not the gallery's


def test_mismatch_shadow_trains_on_other_faces(monkeypatch):
    from advface_engine.evaluation import benchmark

    run, calls = _bare_run(monkeypatch, mismatch_identities=5, mismatch_per_identity=2)
    shadow = run.mismatch_shadow()
    assert run.mismatch_shadow() is shadow and len(calls) == 1  # trained once
    images = calls[0]["images"]
    assert images.shape == (10, 3, 16, 16) and calls[0]["decoder"].arch == run.s.shadow
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # grey
    same_seed, _ = benchmark.synthetic_faces(5, 2, 16, seed=run.s.seed, first_identity=benchmark.MISMATCH_FIRST)
    assert not torch.allclose(images, same_seed.mean(1, keepdim=True).expand_as(same_seed), atol=0.05)  # another seed
    assert calls[0]["seed"] not in (run.s.seed + 1, run.s.seed + 2)


def test_stronger_attacker_is_wider_longer_and_no_shadow_family(monkeypatch):
    import dataclasses

    from advface_engine.evaluation.attack import ResidualUpDecoder
    from advface_engine.evaluation.benchmark import settings_for
    from advface_engine.models import DECODERS

    run, calls = _bare_run(monkeypatch)
    run.s = dataclasses.replace(run.s, strong_epochs=None)  # the default: 1.5 times the families' epochs
    run._strong()
    (call,) = calls
    assert isinstance(call["decoder"], ResidualUpDecoder) and call["epochs"] == 8  # tiny: 5
    assert call["decoder"].arch_kwargs["width"] == 2 * run.s.decoder_width and call["images"] is run.attacker_images
    assert call["decoder"](torch.zeros(2, 16)).shape == (2, 3, 16, 16)
    assert "residual_up" not in DECODERS
    with pytest.raises(ValueError, match="unknown decoder family 'residual_up'"):
        settings_for("tiny", shadow="residual_up")


def test_shadow_identity_weight_reaches_shadows_only(monkeypatch):
    """--shadow-identity-weight trains the server's shadows with the identity term; attackers keep Eq. 1."""
    from advface_engine.cli import build_parser
    from advface_engine.evaluation import benchmark
    from advface_engine.evaluation.cli import settings_from_args

    settings = settings_from_args(build_parser().parse_args(["eval", "--scale", "tiny",
                                                             "--shadow-identity-weight", "1.5"]))
    assert settings.shadow_identity_weight == 1.5
    weights = {}

    def record(*args, identity_weight, seed, **kwargs):
        weights[seed] = identity_weight
        return [0.0]

    monkeypatch.setattr(benchmark, "train_decoder", record)
    run = benchmark.Run.__new__(benchmark.Run)
    run.s, run.progress, run.device, run.encoder = settings, False, torch.device("cpu"), None
    run.timings, run.training = {}, {}
    run._decoder("dcgan", "shadow", torch.zeros(1, 3, 32, 32))
    run._decoder("dcgan", "attacker", torch.zeros(1, 3, 32, 32))
    assert weights == {settings.seed + 1: 1.5, settings.seed + 2: 0.0}


def test_an_ensemble_that_repeats_a_family_trains_it_again_with_another_seed(monkeypatch):
    """dcgan+dcgan+upconv: the first dcgan is the server's shadow itself, the second another one trained with
    seed + 21; each is trained once and kept."""
    from advface_engine.evaluation import benchmark

    settings = benchmark.settings_for("tiny", ensembles=[["dcgan", "dcgan", "upconv"]])
    seeds = {}

    def record(decoder, *args, seed, **kwargs):
        seeds[id(decoder)] = seed
        return [0.0]

    given = []

    class Recording:  # the Protector, recording the shadows it is given
        def __init__(self, shadow, encoder, config, backend, keep_out=None):
            given.append(shadow)

        def __call__(self, z):
            return z

    monkeypatch.setattr(benchmark, "train_decoder", record)
    monkeypatch.setattr(benchmark, "Protector", Recording)
    run = benchmark.Run.__new__(benchmark.Run)
    run.s, run.progress, run.device, run.encoder = settings, False, torch.device("cpu"), None
    run.timings, run.training, run._shadows = {}, {}, {}
    run.server_images, run.z, run.keep_out = torch.zeros(1, 3, 32, 32), torch.zeros(2, settings.feature_dim), None
    run.protect(settings.config(), ["dcgan", "dcgan", "upconv"])
    (shadows,) = given
    assert [seeds[id(m)] for m in shadows] == [1, 21, 1]
    assert shadows[0] is run.shadow("dcgan") and shadows[1] is run.shadow("dcgan", copy=1)
    assert shadows[2] is run.shadow("upconv") and len(seeds) == 3  # nothing trained twice
    assert "train shadow dcgan #2" in run.timings
    assert benchmark.shadow_sets(settings)[-1] == ("dcgan", "dcgan", "upconv")


def test_report_says_what_a_repeated_family_is():
    """The transfer table names a repeated family's rows `dcgan+dcgan`; the report says they are other seeds."""
    from advface_engine.evaluation.report import transfer_lines

    figure = {"estimate": 0.1, "low": 0.05, "high": 0.15}

    def row(shadows):
        return {"shadows": shadows, "objective": "pixel", "success": {"upconv": 0.5}, "unseen_mean": 0.5,
                "unseen_interval": figure, "unseen_max": 0.5, "offline_loss": figure}

    results = {"settings": {"shadow": "dcgan"},
               "config": {"eps": 0.1, "min_cosine": 0.875, "anchor": "original", "ensemble_anchor": "first",
                          "objective": "pixel"},
               "identity_inference": {"unprotected": {"upconv": {"success": 0.9}}},
               "transfer": [row(["dcgan"]), row(["dcgan", "upconv"])]}
    note = "A family named k times is k shadows of it"
    assert not any(note in line for line in transfer_lines(results, ["upconv"], {"upconv": "upconv"}))
    results["transfer"].append(row(["dcgan", "dcgan"]))
    lines = transfer_lines(results, ["upconv"], {"upconv": "upconv"})
    assert any(line.startswith("| dcgan+dcgan | pixel |") for line in lines)
    assert any(note in line and "seed + 1 + 20 j" in line for line in lines)


def test_eval_rejects_bad_settings(tmp_path):
    from advface_engine.evaluation.benchmark import load_settings, settings_for

    with pytest.raises(ValueError, match="unknown evaluation settings"):
        settings_for("tiny", learning_rate=1)
    with pytest.raises(ValueError, match="scale"):
        settings_for("huge")
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"scale": "tiny", "protect": {"eps": -1}}))
    with pytest.raises(ValueError, match="eps"):
        load_settings(path)


# ---------------------------------------------------------------- checks before any training


@pytest.mark.parametrize("overrides, message", [
    (dict(bin="{missing}"), "--bin: no file at"),
    (dict(folder="{missing}"), "--folder: no folder at"),
    (dict(folder="{folder}", pairs="{missing}"), "--pairs: no file at"),
    (dict(encoder_checkpoint="{missing}"), "--encoder: no file at"),
    (dict(shadow_checkpoint="{missing}"), "--shadow: no file at"),
    (dict(pairs="{file}"), "--pairs .* give --folder"),
    (dict(bin="{file}", folder="{folder}"), "--bin or --folder, not both"),
    (dict(device="tpu"), "--device: unknown device 'tpu'"),
])
def test_eval_checks_inputs_before_training(tmp_path, overrides, message):
    from advface_engine.evaluation.benchmark import settings_for

    (tmp_path / "faces").mkdir()
    (tmp_path / "pairs.txt").write_text("")
    paths = dict(missing=tmp_path / "missing", folder=tmp_path / "faces", file=tmp_path / "pairs.txt")
    with pytest.raises(ValueError, match=message):
        settings_for("tiny", **{k: v.format(**paths) for k, v in overrides.items()})


def test_eval_refuses_cuda_without_cuda_in_one_line(tmp_path, monkeypatch, capsys):
    from advface_engine.cli import main
    from advface_engine.evaluation import benchmark

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(benchmark, "Run", lambda *a, **k: pytest.fail("trained before checking the device"))
    assert main(["eval", "--scale", "tiny", "--device", "cuda", "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_eval_output_must_be_a_folder_before_the_run(tmp_path, monkeypatch, capsys):
    from advface_engine.cli import main
    from advface_engine.evaluation import benchmark

    output = tmp_path / "results"
    output.write_text("not a folder")
    monkeypatch.setattr(benchmark, "Run", lambda *a, **k: pytest.fail("ran before checking the output folder"))
    assert main(["eval", "--scale", "tiny", "-o", str(output), "--no-progress"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert output.read_text() == "not a folder"


@pytest.mark.parametrize("data, message", [
    ({"protect": "x"}, "'protect' must be an object, got 'x'"),
    ({"sweep_eps": 0.05}, "'sweep_eps' must be a list of numbers, got 0.05"),
    ({"families": "dcgan,nbnet"}, "'families' must be a list of strings, got 'dcgan,nbnet'"),
    ({"size": "big"}, "'size' must be an integer, got 'big'"),
    ({"flip": "yes"}, "'flip' must be true or false, got 'yes'"),
    ({"batch_size": 1.5}, "'batch_size' must be an integer or null, got 1.5"),
    ({"sweep_steps": [1, True]}, "'sweep_steps' must be a list of integers"),
    ({"bin": 3}, "'bin' must be a string or null, got 3"),
    ({"scale": ["tiny"]}, "scale must be one of"),
    ({"protect": {"eps": "x"}}, "protect: eps must be a number"),
    ({"ensembles": "dcgan+nbnet"}, "'ensembles' must be a list of lists of strings or null, got 'dcgan+nbnet'"),
    ({"ensembles": [["dcgan"]]}, "ensembles: 'dcgan' is not two or more decoder families"),
    ({"ensembles": [["dcgan", "vae"]]}, "ensembles: 'dcgan+vae' is not two or more decoder families"),
    ({"transfer_objectives": ["pix"]}, "transfer_objectives: unknown objective 'pix'"),
])
def test_eval_settings_file_is_type_checked(tmp_path, data, message):
    from advface_engine.evaluation.benchmark import load_settings

    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"scale": "tiny", **data}))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_settings(path)


def test_eval_settings_file_accepts_json_types(tmp_path):
    from advface_engine.evaluation.benchmark import load_settings

    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"scale": "tiny", "sweep_eps": [1, 0.5], "shadow_identity_weight": 1,
                                "families": ["dcgan", "nbnet"], "batch_size": None,
                                "ensembles": [["nbnet", "dcgan"]], "transfer_objectives": ["identity"]}))
    settings = load_settings(path)
    assert settings.ensembles == (("nbnet", "dcgan"),) and settings.transfer_objectives == ("identity",)
    assert settings.sweep_eps == (1.0, 0.5) and isinstance(settings.sweep_eps[0], float)
    assert settings.shadow_identity_weight == 1.0 and settings.families == ("dcgan", "nbnet")
    assert settings.batch_size == 32  # null keeps the preset's value


@pytest.mark.parametrize("flag, value, message", [
    ("--sweep-eps", "abc", "expected comma-separated numbers, got 'abc'"),
    ("--sweep-steps", "1.5", "expected comma-separated integers, got '1.5'"),
    ("--families", ",", "expected comma-separated names, got ','"),
])
def test_eval_list_flags_say_what_they_expect(capsys, flag, value, message):
    from advface_engine.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", flag, value])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints


def _checkpoint(path, arch, **kwargs):
    from advface_engine.models import build_model, save_model

    save_model(build_model(arch, **kwargs), path)
    return str(path)


def test_encoder_checkpoint_sets_feature_dim_and_size(tmp_path):
    from safetensors.torch import save_file

    from advface_engine.evaluation.benchmark import settings_for
    from advface_engine.models.io import FORMAT

    encoder = _checkpoint(tmp_path / "e.safetensors", "mobilefacenet", num_features=32, input_size=16, width=4)
    s = settings_for("tiny", encoder_checkpoint=encoder)
    assert (s.feature_dim, s.size, s.encoder_arch, s.encoder_width) == (32, 16, "mobilefacenet", 4)
    header_only = tmp_path / "iresnet.safetensors"  # no kwargs recorded: the architecture's defaults
    save_file({"x": torch.zeros(1)}, str(header_only), metadata={"format": FORMAT, "arch": "iresnet50",
                                                                 "kwargs": "{}", "extra": "{}"})
    s = settings_for("tiny", encoder_checkpoint=str(header_only))
    assert (s.feature_dim, s.size, s.encoder_arch) == (512, 112, "iresnet50")
    decoder = _checkpoint(tmp_path / "d.safetensors", "dcgan", feature_dim=32, size=16, width=4)
    with pytest.raises(ValueError, match="'dcgan' model, not an encoder"):
        settings_for("tiny", encoder_checkpoint=decoder)


def test_shadow_checkpoint_must_fit_the_shadow_family_and_encoder(tmp_path):
    from advface_engine.evaluation.benchmark import settings_for

    encoder = _checkpoint(tmp_path / "e.safetensors", "mobilefacenet", num_features=32, input_size=16, width=4)
    fits = _checkpoint(tmp_path / "fits.safetensors", "dcgan", feature_dim=32, size=16, width=4)
    assert settings_for("tiny", encoder_checkpoint=encoder, shadow_checkpoint=fits).shadow_checkpoint == fits
    upconv = _checkpoint(tmp_path / "upconv.safetensors", "upconv", feature_dim=32, size=16, width=4)
    with pytest.raises(ValueError, match="'upconv' decoder, but the shadow family is 'dcgan': pass --shadow-arch "
                                         "upconv"):
        settings_for("tiny", encoder_checkpoint=encoder, shadow_checkpoint=upconv)
    assert settings_for("tiny", encoder_checkpoint=encoder, shadow_checkpoint=upconv, shadow="upconv")
    wide = _checkpoint(tmp_path / "wide.safetensors", "dcgan", feature_dim=64, size=16, width=4)
    with pytest.raises(ValueError, match="feature_dim 64, size 16, but the encoder has feature_dim 32, size 16"):
        settings_for("tiny", encoder_checkpoint=encoder, shadow_checkpoint=wide)
    with pytest.raises(ValueError, match="'mobilefacenet' model, not a decoder"):
        settings_for("tiny", encoder_checkpoint=encoder, shadow_checkpoint=encoder)


# ---------------------------------------------------------------- report


def test_report_says_flip_and_states_the_l2_baselines(tiny_eval):
    import copy

    from advface_engine.evaluation.report import markdown

    out, results = tiny_eval
    assert "embeddings without flip augmentation" in (out / "report.md").read_text()
    assert results["dp"]["norm"] == "linf" and results["dp"]["laplace_scale"] == pytest.approx(dp_scale(0.1, 64))
    l2 = copy.deepcopy(results)
    l2["settings"]["flip"], l2["config"]["norm"] = True, "l2"
    text = markdown(l2, {}, "curve.png")
    assert "flip-augmented embeddings (--flip)" in text
    assert "b = eps/sqrt(2D)" in text and "noise RMS L2 norm = eps" in text and "random unit direction" in text
    assert "noisy copies" not in text
    l2["config"].update(smoothing=4, smoothing_scale=0.6)
    assert "averaged over 4 noisy copies (scale 0.6)" in markdown(l2, {}, "curve.png")


def test_report_removes_stale_grids_only(tiny_eval, tmp_path):
    from advface_engine.evaluation.report import write_report

    _, results = tiny_eval
    for name in ("grid_nbnet.png", "grid_dcgan.png", "grid_notes.txt", "mygrid_x.png"):
        (tmp_path / name).write_bytes(b"old")
    images = torch.zeros(2, 3, 8, 8)
    artifacts = {"originals": images, "grids": {"dcgan": {m: images for m in ("unprotected", "advface", "random",
                                                                              "dp")}}}
    write_report({**results, "artifacts": artifacts}, tmp_path)
    assert not (tmp_path / "grid_nbnet.png").exists()
    assert (tmp_path / "grid_dcgan.png").read_bytes() != b"old"
    assert (tmp_path / "grid_notes.txt").exists() and (tmp_path / "mygrid_x.png").exists()


def test_curve_draws_one_curve_per_guard_and_the_guard_curve(tiny_eval, tmp_path, monkeypatch):
    import matplotlib.figure

    from advface_engine.evaluation.report import save_curve

    _, results = tiny_eval
    advface = [p for p in results["sweep"] if p["method"] == "advface"]
    other_steps = [{**p, "steps": 2} for p in advface]  # not the config's steps: dots, not curves
    drawn = {}

    def savefig(fig, path, **kwargs):
        ax = fig.axes[0]
        drawn.update(labels=ax.get_legend_handles_labels()[1], notes=[t.get_text() for t in ax.texts])
        open(path, "wb").close()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    save_curve(tmp_path / "curve.png", {**results, "sweep": results["sweep"] + other_steps})
    labels = drawn["labels"]
    assert [n for n in labels if n.startswith("AdvFace, guard")] == [  # the config's 0.5 and tiny's 0.8, none
        "AdvFace, guard 0.5, T=10", "AdvFace, guard 0.8, T=10", "AdvFace, guard none, T=10"]
    assert "AdvFace over the guard min_cosine (eps 0.1)" in labels  # the guard as a curve
    assert "AdvFace, other swept steps / anchor / objective / shadow" in labels
    assert {"c 0.5", "c none"} <= set(drawn["notes"]) and "eps 0.03" in drawn["notes"]
