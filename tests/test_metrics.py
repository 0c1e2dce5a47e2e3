"""Reliability metrics (:mod:`probe_ase.evaluation.metrics`) on hand-computed cases and against scikit-learn and SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from probe_ase.evaluation import metrics

# Five structures, given out of order, with a tie at p = 0.7.
P5 = np.array([0.4, 0.9, 0.2, 0.7, 0.7])
R5 = np.array([1, 1, 0, 0, 1])
# Sorted by decreasing p: 0.9 (good), 0.7 (bad), 0.7 (good), 0.4 (good), 0.2 (bad).
# The tie is accepted together, so the curve has 4 points:
#   p >= 0.9: accept 1, bad 0 -> coverage 1/5 = 0.2, risk 0/1 = 0
#   p >= 0.7: accept 3, bad 1 -> coverage 3/5 = 0.6, risk 1/3
#   p >= 0.4: accept 4, bad 1 -> coverage 4/5 = 0.8, risk 1/4 = 0.25
#   p >= 0.2: accept 5, bad 2 -> coverage 5/5 = 1.0, risk 2/5 = 0.4
COV5 = [0.2, 0.6, 0.8, 1.0]
RISK5 = [0.0, 1 / 3, 0.25, 0.4]
THR5 = [0.9, 0.7, 0.4, 0.2]
# AURC = sum(width * risk) = 0.2*0 + 0.4*(1/3) + 0.2*0.25 + 0.2*0.4
#      = 0 + 0.133333 + 0.05 + 0.08 = 0.263333...
AURC5 = 0.2 * 0 + 0.4 * (1 / 3) + 0.2 * 0.25 + 0.2 * 0.4


def _random_case(seed: int, n: int = 200):
    rng = np.random.default_rng(seed)
    unreliable = rng.random(n) < 0.3
    score = rng.normal(size=n) + unreliable  # informative but imperfect
    score[:20] = np.round(score[:20], 1)  # some ties
    return unreliable, score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn(seed):
    unreliable, score = _random_case(seed)
    assert metrics.auroc(unreliable, score) == pytest.approx(roc_auc_score(unreliable, score), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auprc_matches_sklearn(seed):
    unreliable, score = _random_case(seed)
    assert metrics.auprc(unreliable, score) == pytest.approx(average_precision_score(unreliable, score), abs=1e-12)


def test_auroc_auprc_hand_case():
    # unreliable is the positive class. Pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    unreliable = np.array([0, 0, 1, 1])
    score = np.array([0.1, 0.4, 0.35, 0.8])
    assert metrics.auroc(unreliable, score) == pytest.approx(0.75)
    # ranked: 0.8 pos (precision 1), 0.4 neg, 0.35 pos (precision 2/3) -> AP = (1 + 2/3)/2
    assert metrics.auprc(unreliable, score) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.auroc(unreliable, -score) == pytest.approx(0.25)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], [True, True]])
def test_ranking_metrics_nan_for_single_class(labels):
    score = np.linspace(0, 1, len(labels))
    assert math.isnan(metrics.auroc(labels, score))
    assert math.isnan(metrics.auprc(labels, score))


@pytest.mark.parametrize("seed", [0, 1])
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    error = rng.gamma(2.0, 1.0, size=100)
    score = error + rng.normal(scale=2.0, size=100)
    score[:10] = 0.5  # ties
    assert metrics.spearman(score, error) == pytest.approx(spearmanr(score, error).statistic, abs=1e-12)


def test_spearman_hand_case_and_constant():
    # error ranks [1,2,4,3] vs score ranks [1,2,3,4]: sum d^2 = 2 -> 1 - 6*2/(4*(16-1)) = 0.8
    assert metrics.spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 40, 30])) == pytest.approx(0.8)
    assert math.isnan(metrics.spearman(np.ones(4), np.array([1.0, 2.0, 3.0, 4.0])))
    assert math.isnan(metrics.spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4)))


def test_risk_coverage_hand_case_with_tie():
    coverage, risk, thresholds = metrics.risk_coverage(P5, R5)
    np.testing.assert_allclose(coverage, COV5)
    np.testing.assert_allclose(risk, RISK5)
    np.testing.assert_allclose(thresholds, THR5)


def test_risk_coverage_tie_order_does_not_matter():
    # swap which of the tied 0.7 structures is reliable: same curve
    coverage, risk, _ = metrics.risk_coverage(P5, np.array([1, 1, 0, 1, 0]))
    np.testing.assert_allclose(coverage, COV5)
    np.testing.assert_allclose(risk, RISK5)


def test_aurc_hand_case():
    assert metrics.aurc(P5, R5) == pytest.approx(AURC5)
    assert metrics.aurc(P5, R5) == pytest.approx(0.2633333333333333)
    # a perfect ranking of these labels: bad ones last -> 0.2*0+0.2*0+0.2*0+0.2*(1/4)+0.2*(2/5) = 0.13
    assert metrics.aurc(np.array([0.5, 0.9, 0.1, 0.2, 0.8]), R5) == pytest.approx(0.13)


@pytest.mark.parametrize(
    "coverage, expected",
    [
        (0.2, 0.0),
        (0.4, 1 / 3),  # 2 of 5 falls inside the tie: the whole tie (3 of 5) is accepted
        (0.6, 1 / 3),
        (0.61, 0.25),
        (0.8, 0.25),
        (1.0, 0.4),
        (0.05, 0.0),
    ],
)
def test_risk_at_coverage_hand_case(coverage, expected):
    assert metrics.risk_at_coverage(P5, R5, coverage) == pytest.approx(expected)


def test_expected_calibration_error_hand_case():
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.85])
    y = np.array([0, 1, 0, 1, 1])
    # bin 0: {0.05}      weight 1/5, |0.05 - 0|   = 0.05  -> 0.010
    # bin 1: {0.15,0.12} weight 2/5, |0.135 - 0.5| = 0.365 -> 0.146
    # bin 8: {0.85}      weight 1/5, |0.85 - 1|   = 0.15  -> 0.030
    # bin 9: {0.95}      weight 1/5, |0.95 - 1|   = 0.05  -> 0.010
    # total 0.196
    assert metrics.expected_calibration_error(p, y) == pytest.approx(0.196)
    # p = 1.0 belongs to the last bin: {1.0, 0.9} mean 0.95 vs accuracy 0.5 -> 0.45
    assert metrics.expected_calibration_error(np.array([1.0, 0.9]), np.array([0, 1])) == pytest.approx(0.45)
    # two bins: [0,0.5) holds {0.2, 0.4} mean 0.3 vs 0.5 -> 0.5*0.2; [0.5,1] holds {0.6,0.8} mean 0.7 vs 1 -> 0.5*0.3
    assert metrics.expected_calibration_error(
        np.array([0.2, 0.4, 0.6, 0.8]), np.array([0, 1, 1, 1]), bins=2
    ) == pytest.approx(0.25)


def test_brier_hand_case():
    # ((1-0.8)^2 + (0-0.3)^2) / 2 = (0.04 + 0.09) / 2 = 0.065
    assert metrics.brier(np.array([0.8, 0.3]), np.array([1, 0])) == pytest.approx(0.065)
    assert metrics.brier(np.array([1.0, 0.0]), np.array([True, False])) == pytest.approx(0.0)
    assert metrics.brier(np.array([0.0, 1.0]), np.array([1, 0])) == pytest.approx(1.0)


def test_oracle_aurc_on_five_points():
    from probe_ase.evaluation.metrics import oracle_aurc

    # the oracle accepts the three reliable structures first: risks 0, 0, 0, 1/4, 2/5 at coverage
    # 0.2 .. 1.0, each step 0.2 wide: AURC = 0.2 * (1/4 + 2/5) = 0.13
    assert oracle_aurc(np.array([1, 0, 1, 1, 0])) == pytest.approx(0.13)


def test_summary_is_consistent_with_the_single_metrics():
    from probe_ase.evaluation import metrics

    rng = np.random.default_rng(0)
    error = rng.exponential(size=200)
    reliable = error < 1.0
    p = np.clip(1.2 - error / 2 + rng.normal(scale=0.1, size=200), 0, 1)
    s = metrics.summary(p, reliable, error, p_star=0.7)
    assert s["auroc"] == pytest.approx(metrics.auroc(~reliable, 1 - p))
    assert s["excess_aurc"] == pytest.approx(metrics.aurc(p, reliable) - metrics.oracle_aurc(reliable))
    assert s["excess_aurc"] > 0
    assert s["coverage_at_p_star"] == pytest.approx(np.mean(p >= 0.7))
    assert s["risk_at_p_star"] == pytest.approx(np.mean(~reliable[p >= 0.7]))
