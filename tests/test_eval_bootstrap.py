"""The evaluation's intervals and choices: the paired bootstrap, the resampled 10-fold protocol, the figures
over seeds, the sweep grid, the Pareto front and the recommendation rule. No training: seconds."""

from __future__ import annotations

import types

import numpy as np
import pytest

from advface_engine import ProtectConfig
from advface_engine.evaluation.benchmark import (
    SWEEPS,
    Measurement,
    fold_labels,
    loss_interval,
    pareto_front,
    recommend,
    settings_for,
    success_interval,
    sweep_grid,
    verification_figures,
)
from advface_engine.evaluation.bootstrap import bootstrap_interval, resample_counts
from advface_engine.evaluation.verification import fold_accuracies, resampled_accuracy, ten_fold_accuracy


def test_resample_counts_draw_within_each_stratum():
    strata = np.repeat([0, 1, 2], [5, 7, 3])
    counts = resample_counts(strata, 50, seed=3)
    assert counts.shape == (50, 15) and counts.min() >= 0
    for label, size in ((0, 5), (1, 7), (2, 3)):
        assert (counts[:, strata == label].sum(1) == size).all()  # each fold keeps its size
    assert np.array_equal(counts, resample_counts(strata, 50, seed=3))
    assert not np.array_equal(counts, resample_counts(strata, 50, seed=4))
    assert len({tuple(row) for row in counts}) > 40  # resamples differ


@pytest.mark.parametrize("ties", [False, True])
def test_resampled_accuracy_is_the_ten_fold_protocol_on_the_resample(ties):
    """Each row equals fold_accuracies run on the pair list the counts describe (folds kept in place)."""
    rng = np.random.default_rng(0)
    for trial in range(12):
        n = int(rng.integers(20, 200))
        issame = rng.random(n) < 0.5
        scores = rng.normal(np.where(issame, 1.0, 0.0), 1.0)
        if ties:
            scores = np.round(scores, 1)
        folds = fold_labels(n)
        counts = resample_counts(folds, 10, seed=trial)
        fast = resampled_accuracy(scores, issame, counts)
        for row, value in zip(counts, fast, strict=True):
            index = np.concatenate([np.repeat(np.flatnonzero(folds == f), row[folds == f]) for f in range(10)])
            assert value == fold_accuracies(scores[index], issame[index])[0].mean()
        assert resampled_accuracy(scores, issame, np.ones(n, int))[0] == ten_fold_accuracy(scores, issame)[0]


def _fake_runs(clean_scores: list[np.ndarray], issame: np.ndarray, replicates: int = 300) -> list:
    """Stand-ins for benchmark.Run with what the interval functions read."""
    runs = []
    for k, scores in enumerate(clean_scores):
        accuracy, std, threshold = ten_fold_accuracy(scores, issame)
        runs.append(types.SimpleNamespace(
            clean_scores=scores, data=types.SimpleNamespace(issame=issame), positive=np.flatnonzero(issame),
            counts=resample_counts(fold_labels(len(issame)), replicates, seed=[k, 1]),
            clean={"accuracy": accuracy, "std": std, "threshold": threshold}))
        runs[-1].clean_replicates = lambda r=runs[-1]: resampled_accuracy(r.clean_scores, r.data.issame, r.counts)
    return runs


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = np.tile([True, False], n // 2)
    return np.where(issame, 0.8, 0.2) + rng.uniform(-0.1, 0.1, n), issame


def test_identical_features_give_a_zero_width_interval_at_zero():
    scores, issame = _separable(400, 0)
    noisy = scores + np.random.default_rng(1).normal(0, 0.3, 400)  # not separable: the threshold moves
    runs = _fake_runs([noisy], issame)
    interval = loss_interval(runs, [Measurement(noisy.copy(), noisy.copy())], "offline")
    assert interval["estimate"] == interval["low"] == interval["high"] == 0.0


def test_a_known_loss_lies_inside_its_interval_and_zero_outside():
    """Protection that turns 6% of the pairs (every 50th pair's positive side, spread over the folds) into
    errors costs exactly 6 points on separable scores; the interval holds 6, not 0."""
    scores, issame = _separable(2000, 0)
    protected = scores.copy()
    broken = np.flatnonzero(issame)[::8][:120]
    protected[broken] = 0.0  # a same-person pair scored far below every different-person pair
    runs = _fake_runs([scores], issame)
    interval = loss_interval(runs, [Measurement(protected, protected)], "offline")
    assert interval["estimate"] == pytest.approx(0.06)
    assert interval["low"] < 0.06 < interval["high"] and interval["low"] > 0.03
    assert interval["high"] - interval["low"] < 0.05


def test_figures_over_seeds_are_means_of_the_seeds():
    runs, measured = [], []
    for seed, drop in ((0, 40), (1, 80)):
        scores, issame = _separable(1000, seed)
        protected = scores.copy()
        protected[np.flatnonzero(issame)[::5][:drop]] = 0.0
        runs += _fake_runs([scores], issame)
        measured.append(Measurement(protected, scores.copy()))
    for k, run in enumerate(runs):  # the stand-ins drew the same resamples: give each seed its own
        run.counts = resample_counts(fold_labels(1000), 300, seed=[k, 1])
    figures = verification_figures(runs, measured)
    assert figures["offline"]["loss_per_seed"] == pytest.approx([0.04, 0.08])
    assert figures["offline"]["loss"]["estimate"] == pytest.approx(0.06)
    assert figures["offline"]["accuracy"] == pytest.approx(0.94)
    assert figures["online"]["loss"]["estimate"] == pytest.approx(0.0)
    hits = [np.arange(500) % 4 == 0, np.arange(500) % 2 == 0]  # 25% and 50%
    success = success_interval(runs, hits)
    assert success["estimate"] == pytest.approx(0.375) and success["low"] < 0.375 < success["high"]


def test_the_interval_covers_a_known_rate_about_95_times_in_100():
    """Percentile intervals of a Bernoulli rate: coverage near 95% (not 50%, not 100%)."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        hits = rng.random(400) < 0.3
        counts = resample_counts(np.zeros(400, int), 400, seed=trial)
        interval = bootstrap_interval(lambda k, w, h=hits: (w * h).sum(1) / w.sum(1), [counts])
        covered += interval["low"] <= 0.3 <= interval["high"]
    assert 0.89 <= covered / 200 <= 0.99


def _point(loss, low, high, attack, eps=0.1, steps=10, method="advface", anchor="shadow", weight=0.0,
           objective="pixel"):
    return {"method": method, "eps": eps, "steps": steps, "attack_success": attack, "anchor": anchor,
            "objective": objective, "shadow_identity_weight": weight,
            "offline_loss": {"estimate": loss, "low": low, "high": high}}


def test_recommend_takes_the_lowest_attack_whose_interval_ends_within_the_bound():
    points = [_point(0.001, -0.002, 0.004, 0.30), _point(0.003, 0.001, 0.0049, 0.20, eps=0.2),
              _point(0.004, 0.002, 0.0051, 0.10, eps=0.3),  # the estimate fits, its interval does not
              _point(0.0, -0.001, 0.001, 0.05, method="random"), _point(0.0, 0.0, 0.0, 0.01, steps=0),
              _point(0.002, 0.0, 0.003, 0.15, anchor="original"), _point(0.002, 0.0, 0.003, 0.16, weight=1.0)]
    rec = recommend(points, 0.5, anchor="shadow", shadow_identity_weight=0.0)
    assert (rec["point"]["anchor"], rec["point"]["attack_success"]) == ("original", 0.15)
    assert (rec["same_anchor"]["eps"], rec["same_anchor"]["attack_success"]) == (0.2, 0.20)
    assert recommend(points[2:5], 0.5)["point"] is None
    points.append(_point(0.002, 0.0, 0.003, 0.12, objective="identity"))
    rec = recommend(points, 0.5, anchor="shadow", shadow_identity_weight=0.0, objective="pixel")
    assert rec["point"]["objective"] == "identity" and rec["same_anchor"]["attack_success"] == 0.20
    rec = recommend(points, 0.5, anchor="shadow", shadow_identity_weight=0.0, objective="identity")
    assert rec["same_anchor"]["attack_success"] == 0.12


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [_point(0.01, 0, 0, 0.30), _point(0.02, 0, 0, 0.10), _point(0.02, 0, 0, 0.20),
              _point(0.03, 0, 0, 0.10), _point(0.00, 0, 0, 0.50), _point(0.0, 0, 0, 0.0, method="dp")]
    front = pareto_front(points)
    assert [(p["offline_loss"]["estimate"], p["attack_success"]) for p in front] == [(0.0, 0.5), (0.01, 0.3),
                                                                                      (0.02, 0.1)]


def test_sweep_grid_is_the_product_of_its_axes_with_the_config_on_each():
    s = settings_for("tiny", sweep_eps=(0.1, 0.3), sweep_steps=(5,), sweep_min_cosine=(0.9, None),
                     sweep_anchor=("original",), sweep_identity_weight=(1.0,))
    config = ProtectConfig(eps=0.2, alpha=0.05, steps=10, min_cosine=0.8, anchor="shadow", random_start=False)
    grid = sweep_grid(s, config)
    advface = [(c.eps, c.steps, c.min_cosine, c.anchor, w) for m, c, w in grid if m == "advface"]
    assert len(advface) == 3 * 2 * 3 * 2 * 2 == len(set(advface))
    assert {a[0] for a in advface} == {0.1, 0.2, 0.3} and {a[2] for a in advface} == {0.8, 0.9, None}
    assert {a[3] for a in advface} == {"shadow", "original"} and {a[4] for a in advface} == {0.0, 1.0}
    for method, cfg, _ in grid:
        assert cfg.alpha == pytest.approx(cfg.eps / 4)
        if method == "advface":
            assert cfg.random_start == (cfg.anchor == "original")
    baselines = [(m, c.eps, c.min_cosine) for m, c, _ in grid if m != "advface"]
    assert baselines == [(m, e, 0.8) for m in ("random", "dp") for e in (0.1, 0.2, 0.3)]


def test_further_sweep_grids_join_the_main_one_each_point_once():
    s = settings_for("tiny", sweep_eps=(0.1,), sweep_min_cosine=(0.9,),
                     sweep_grids=[{"sweep_identity_weight": [1.0], "sweep_min_cosine": [0.9, None]},
                                  {"sweep_steps": [5]}])
    config = ProtectConfig(eps=0.2, alpha=0.05, steps=10, min_cosine=0.8, anchor="shadow", random_start=False)
    advface = [(c.eps, c.steps, c.min_cosine, w) for m, c, w in sweep_grid(s, config) if m == "advface"]
    main = {(e, 10, c, 0.0) for e in (0.1, 0.2) for c in (0.8, 0.9)}
    weighted = {(0.2, 10, c, w) for c in (0.8, 0.9, None) for w in (0.0, 1.0)}
    steps = {(0.2, t, 0.8, 0.0) for t in (5, 10)}
    assert sorted(advface, key=str) == sorted(main | weighted | steps, key=str)  # each point once
    assert [w for *_, w in advface] == sorted(w for *_, w in advface)  # one shadow after the other
    with pytest.raises(ValueError, match="sweep_grids: unknown axes \\['eps'\\]"):
        settings_for("tiny", sweep_grids=[{"eps": [0.1]}])
    with pytest.raises(ValueError, match="unknown anchor 'middle'"):
        settings_for("tiny", sweep_grids=[{"sweep_anchor": ["middle"]}])


def test_sweep_objective_axis_and_the_named_objective_sweep():
    s = settings_for("tiny", sweep_eps=(0.1,), sweep_min_cosine=(0.9,), sweep_objective=("identity",),
                     sweep_grids=[{"sweep_objective": ["pixel+identity"], "sweep_anchor": ["original"]}])
    config = ProtectConfig(eps=0.2, alpha=0.05, steps=10, min_cosine=0.8, anchor="shadow", random_start=False)
    advface = [(c.eps, c.min_cosine, c.anchor, c.objective) for m, c, _ in sweep_grid(s, config) if m == "advface"]
    main = {(e, c, "shadow", o) for e in (0.1, 0.2) for c in (0.8, 0.9) for o in ("pixel", "identity")}
    both = {(0.2, 0.8, a, o) for a in ("shadow", "original") for o in ("pixel", "pixel+identity")}
    assert sorted(advface, key=str) == sorted(main | both, key=str)
    with pytest.raises(ValueError, match="unknown objective 'lpips'"):
        settings_for("tiny", sweep_objective=("lpips",))
    named = settings_for("tiny", **SWEEPS["objective"])
    objectives = {c.objective for m, c, _ in sweep_grid(named, config) if m == "advface"}
    assert objectives == {"pixel", "identity", "pixel+identity"}
