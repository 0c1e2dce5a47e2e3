"""Calibration (:mod:`probe_ase.fitting.calibrate`): the temperature of the score formula and the atoms' empirical
operating threshold, on simulated logits and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probe_ase.fitting.calibrate import calibrate_atoms, empirical_threshold, fit_temperature


def _logistic_data(seed: int, n: int = 4000):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=n)
    reliable = rng.random(n) < 1 / (1 + np.exp(-z))  # z are calibrated logits
    return z, reliable


def test_fit_temperature_over_confident():
    z, reliable = _logistic_data(0)
    t = fit_temperature(3.0 * z, reliable)  # logits 3x too large -> T near 3
    assert 2.5 < t < 3.5


def test_fit_temperature_under_confident_and_calibrated():
    z, reliable = _logistic_data(1)
    assert 0.4 < fit_temperature(0.5 * z, reliable) < 0.6
    assert 0.85 < fit_temperature(z, reliable) < 1.15


def test_fit_temperature_leaves_out_infinitely_novel_structures():
    """A -inf logit (an element the novelty density never saw) must not drag the temperature to its bound."""
    z, reliable = _logistic_data(2, n=400)
    t = fit_temperature(z, reliable)
    assert fit_temperature(np.append(z, -np.inf), np.append(reliable, True)) == pytest.approx(t)


def test_fit_temperature_finite_on_separable_data():
    logits = np.array([-5.0, -4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    t = fit_temperature(logits, logits > 0)
    assert math.isfinite(t)
    # an interior optimum, well away from the search bounds exp(-4)..exp(4)
    assert math.exp(-4) * 2 < t < math.exp(4) / 2
    # Platt targets 6/7 and 1/7: the calibrated extremes are confident but not certain
    p = 1 / (1 + np.exp(-logits / t))
    assert 0.857 < p.max() < 0.99 and 0.01 < p.min() < 0.143


# Five atoms, given out of order: p = 0.9 (good), 0.8 (bad), 0.7 (good), 0.6 (good), 0.5 (bad). Accepting the top k
# gives risks 0, 1/2, 1/3, 1/4, 2/5.
P_ATOMS = np.array([0.6, 0.9, 0.5, 0.7, 0.8])
GOOD_ATOMS = np.array([True, True, False, True, False])


@pytest.mark.parametrize("target, expected", [(0.0, 0.9), (0.3, 0.6), (0.34, 0.6), (0.25, 0.6), (0.2, 0.9),
                                              (0.4, 0.5), (1.0, 0.5)])
def test_empirical_threshold_hand_case(target, expected):
    """The loosest threshold whose accepted atoms' risk is at most the target (not the first one that breaks it:
    at 0.3 the risk passes 1/2 on the way to 1/4)."""
    assert empirical_threshold(P_ATOMS, GOOD_ATOMS, target) == expected


def test_empirical_threshold_that_no_cut_reaches_accepts_nothing():
    p, good = np.array([0.9, 0.8, 0.7]), np.array([False, True, True])  # the most confident atom is wrong
    threshold = empirical_threshold(p, good, 0.1)  # risks 1, 1/2, 1/3
    assert threshold > 1.0 and threshold == np.nextafter(1.0, 2.0) and not (np.append(p, 1.0) >= threshold).any()


def test_calibrate_atoms_hand_case():
    """Atoms outside the support (novelty > 1) neither set the threshold nor are accepted."""
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    good = np.array([True, False, True, True, False])
    novelty = np.array([0.5, 0.5, 2.0, 0.5, 0.5])  # the third atom, reliable at p 0.7, is out of support
    error = np.array([0.1, 0.5, 0.05, 0.2, 0.6])  # eV/Å
    importance = np.array([0.1, 0.3, 0.05, 0.15, 0.4])  # ranks the atoms as their errors do
    p_star, report = calibrate_atoms(np.log(p / (1 - p)), good, error, novelty, importance, np.array([0, 5]), 0.35)
    # inside: p 0.9 (good), 0.8 (bad), 0.6 (good), 0.5 (bad): risks 0, 1/2, 1/3, 1/2 -> loosest <= 0.35 is 0.6
    assert p_star == pytest.approx(0.6)
    assert report["p_star"] == p_star and report["n_atoms"] == 5 and report["fraction_reliable"] == pytest.approx(0.6)
    # accepted: 0.9, 0.8, 0.6 (0.7 is out of support): coverage 3/5, one bad among them
    assert report["coverage_at_p_star"] == pytest.approx(0.6) and report["risk_at_p_star"] == pytest.approx(1 / 3)
    # unreliable scored by 1 - p: bad (0.2, 0.5) against good (0.1, 0.3, 0.4): 4 of 6 pairs ranked right
    assert report["auroc"] == pytest.approx(4 / 6)
    assert report["importance_spearman"] == pytest.approx(1.0)
