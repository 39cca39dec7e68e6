"""Evaluation: 10-fold protocol, restricted .bin reader, quality metrics, baselines, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import os
import pickle

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
from advface_engine.evaluation.datasets import load_bin_payload
from advface_engine.evaluation.verification import fold_accuracies

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
    config = ProtectConfig(eps=0.03, alpha=0.01, steps=3, normalize=False)
    from advface_engine.backends.reference import shadow_targets

    _, anchor = shadow_targets(features, shadow, encoder, config)
    out = random_baseline(features, shadow, encoder, config, seed=3)
    np.testing.assert_allclose((out - anchor).abs().numpy(), 0.03, rtol=1e-5)
    assert not torch.equal(out, random_baseline(features, shadow, encoder, config, seed=4))
    normalised = random_baseline(features, shadow, encoder, config.replace(normalize=True), seed=3)
    np.testing.assert_allclose(normalised.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_dp_baseline_noise_matches_its_budget():
    z = torch.zeros(400, 128)
    noise = dp_baseline(z, eps=0.03, normalize=False, seed=0)
    b = dp_scale(0.03)
    assert noise.abs().mean().item() == pytest.approx(b, rel=0.03)  # E|Laplace(0, b)| = b
    assert noise.pow(2).mean().sqrt().item() == pytest.approx(0.03, rel=0.03)  # RMS sqrt(2) b = eps
    assert dp_epsilon(0.03, 128) == pytest.approx(2 * math.sqrt(128) / b)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    from advface_engine.cli import main

    out = tmp_path_factory.mktemp("eval")
    code = main(["eval", "--scale", "tiny", "--output", str(out), "--no-progress", "--eps", "0.1", "--alpha", "0.03"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_eval_writes_json_report_grids_and_curve(tiny_eval):
    out, results = tiny_eval
    report = (out / "report.md").read_text()
    assert "synthetic" in report and "| AdvFace |" in report
    for name in ("privacy_utility.png", "grid_dcgan.png", "grid_upconv.png"):
        assert (out / name).stat().st_size > 0
    assert results["label"] == "synthetic" and results["config"]["eps"] == 0.1
    assert results["cross_family_attackers"] == ["upconv"]
    assert set(results["transfer"]) == {"dcgan", "upconv"} and set(results["transfer"]["upconv"]) == {"dcgan", "upconv"}
    assert {p["method"] for p in results["sweep"]} == {"advface", "random", "dp"}


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
