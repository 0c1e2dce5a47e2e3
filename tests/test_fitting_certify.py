"""Certified thresholds (:mod:`probe_ase.fitting.certify`): the Learn-then-Test guarantee, checked by simulation, its
edge cases, and the fallback rules of a fit whose data cannot certify the target."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import binom

from probe_ase.fitting.certify import (certify, fallback_ladder, fixed_sequence, frames_needed, min_accepted, p_value,
                               threshold_grid)
from probe_ase import FitOptions, fit_probe
from probe_ase.exceptions import InputError


def draw(rng, n, floor=0.0):
    """Scores uniform on (0, 1); P(unreliable | s) = floor + (1 - s)^2 / 2, so risk(t) = floor + (1 - t)^2 / 6 above t."""
    scores = rng.uniform(size=n)
    return scores, rng.uniform(size=n) < floor + 0.5 * (1 - scores) ** 2


def true_risk(t, floor=0.0):
    return floor + (1 - min(max(t, 0.0), 1.0)) ** 2 / 6


def test_guarantee_holds_by_simulation_and_the_empirical_cut_breaks_it():
    """Over many calibration draws, the true risk at the certified threshold exceeds the target in <= delta of them.

    The same simulation catches the old empirical cut (loosest threshold whose
    calibration risk is <= target), which breaks the target far more often: the
    check can fail.
    """
    rng = np.random.default_rng(0)
    alpha, delta, draws = 0.05, 0.1, 200
    certified_fail = certified = empirical_fail = 0
    for _ in range(draws):
        scores, bad = draw(rng, 250)
        val, _ = draw(rng, 150)
        cert = certify(scores, bad, val, alpha, delta)
        if cert.certified:
            certified += 1
            certified_fail += true_risk(cert.threshold) > alpha
        order = np.argsort(-scores)
        risk = np.cumsum(bad[order]) / np.arange(1, len(order) + 1)
        k = np.flatnonzero(risk <= alpha)[-1]
        empirical_fail += true_risk(scores[order][k]) > alpha
    assert certified >= draws // 4  # the procedure has power here (the best coverage is 55 %)
    assert certified_fail / draws <= delta
    assert empirical_fail / draws > 3 * delta


def test_fallback_risk_holds_by_simulation_and_an_empirical_fallback_breaks_it():
    """Where the 5 % target is out of reach (every threshold's risk is >= 15 %), the risk reported instead holds.

    Over many calibration draws, the true risk at the returned threshold
    exceeds the risk it is reported certified at in <= delta of them (the
    fallback rungs share delta). An empirical fallback (the lowest rung some
    threshold accepting >= 10 structures meets on the calibration split) breaks
    it far more often: the check can fail.
    """
    rng = np.random.default_rng(3)
    floor, delta, draws = 0.15, 0.1, 100
    fallback_fail = reported = empirical_fail = 0
    for _ in range(draws):
        scores, bad = draw(rng, 100, floor)
        val, _ = draw(rng, 60, floor)
        cert = certify(scores, bad, val, 0.05, delta)
        assert not cert.certified
        if cert.risk < 1:
            reported += 1
            fallback_fail += true_risk(cert.threshold, floor) > cert.risk
        order = np.argsort(-scores)
        risk = (np.cumsum(bad[order]) / np.arange(1, len(order) + 1))[9:]
        alpha = next(a for a in fallback_ladder(0.05) if (risk <= a).any())
        k = 9 + np.flatnonzero(risk <= alpha)[-1]
        empirical_fail += true_risk(scores[order][k], floor) > alpha
    assert reported >= draws * 0.9  # the fallback says something in almost every draw
    assert fallback_fail / draws <= delta
    assert empirical_fail / draws > 3 * delta


def test_fallback_is_the_strictest_threshold_tested_at_its_risk():
    """A fallback accepts no more than the first threshold of its rung, though looser ones are certified too."""
    rng = np.random.default_rng(4)
    scores, bad = draw(rng, 400, floor=0.15)
    val, _ = draw(rng, 240, floor=0.15)
    cert = certify(scores, bad, val, 0.05, 0.1)
    level = 0.1 / len(fallback_ladder(0.05))
    grid = threshold_grid(val, np.ones(len(val), dtype=bool), len(scores), cert.risk, level)
    loosest = fixed_sequence(scores, bad, np.ones(len(scores), dtype=bool), grid, cert.risk, level)
    assert not cert.certified and cert.threshold == grid[0]
    assert loosest > 0 and cert.n_accepted < int((scores >= grid[loosest]).sum())


def test_target_fallback_keeps_its_certified_risk_and_spends_it_on_coverage():
    """fallback="target": same certified risk, the loosest threshold of the rung's certified prefix whose calibration
    risk is <= the target; it accepts at least what the strictest does, its true risk stays within the certified one
    in >= 1 - delta of the draws, and where the target's coverage is out of the strictest's reach it covers more."""
    rng = np.random.default_rng(5)
    floor, delta, draws = 0.03, 0.1, 60
    level = delta / len(fallback_ladder(0.05))
    fails = fell = 0
    gain = []
    for _ in range(draws):
        scores, bad = draw(rng, 250, floor)
        val, _ = draw(rng, 180, floor)
        strict, aim = (certify(scores, bad, val, 0.05, delta, fallback=rule) for rule in ("strictest", "target"))
        assert (aim.certified, aim.risk) == (strict.certified, strict.risk)
        if strict.certified or strict.risk >= 1:
            assert aim.threshold == strict.threshold
            continue
        fell += 1
        grid = threshold_grid(val, np.ones(len(val), dtype=bool), len(scores), aim.risk, level)
        loosest = fixed_sequence(scores, bad, np.ones(len(scores), dtype=bool), grid, aim.risk, level)
        assert grid[loosest] <= aim.threshold <= strict.threshold and aim.n_accepted >= strict.n_accepted
        if aim.threshold < strict.threshold:
            assert aim.n_errors <= 0.05 * aim.n_accepted
        fails += true_risk(aim.threshold, floor) > aim.risk
        gain.append(strict.threshold - aim.threshold)  # true coverage gained (scores uniform on (0, 1))
    assert fell >= draws // 2 and fails / draws <= delta
    assert np.mean(gain) > 0.05


def test_what_data_can_certify():
    # DESIGN.md §8: alpha = delta = 0.05
    assert min_accepted(0.05, 0.05) == 59
    assert p_value(0, 59, 0.05) <= 0.05 < p_value(0, 58, 0.05)
    assert p_value(4, 200, 0.05) <= 0.05 < p_value(5, 200, 0.05)
    assert p_value(38, 1000, 0.05) <= 0.05 < p_value(39, 1000, 0.05)
    assert p_value(0, 0, 0.05) == 1.0


def test_small_calibration_split_falls_back_to_a_certified_larger_risk():
    rng = np.random.default_rng(1)
    scores = rng.uniform(size=28)
    bad = scores < 0.2  # perfectly ranked, 20 % unreliable
    cert = certify(scores, bad, rng.uniform(size=21), 0.05, 0.1)
    assert not cert.certified and cert.risk > 0.05
    # what it does certify is true: the accepted set holds few enough errors for its own risk
    # the fallback rungs share delta 0.1 (Bonferroni)
    assert p_value(cert.n_errors, cert.n_accepted, cert.risk) <= 0.1 / len(fallback_ladder(0.05))
    assert cert.n_accepted == int((scores >= cert.threshold).sum())
    assert cert.frames_needed is not None and cert.frames_needed > 28
    # with twice that many frames of the same kind (the estimate assumes the exact count), it is certified
    more = rng.uniform(size=2 * cert.frames_needed)
    assert certify(more, more < 0.2, rng.uniform(size=100), 0.05, 0.1).certified


def test_fallback_ladder():
    ladder = fallback_ladder(0.05)
    assert len(ladder) == 13 and ladder[0] == pytest.approx(0.0625) and ladder[-1] < 1 <= ladder[-1] * 1.25
    assert fallback_ladder(0.9) == []


def test_nothing_certifiable_accepts_nothing():
    rng = np.random.default_rng(2)
    scores = rng.uniform(size=50)
    cert = certify(scores, np.ones(50, dtype=bool), rng.uniform(size=30), 0.05, 0.1)
    assert cert.threshold == math.inf and cert.risk == 1.0 and cert.n_accepted == 0
    assert frames_needed(scores, np.ones(50, dtype=bool), np.ones(50, dtype=bool), 0.05, 0.1) is None


def test_ineligible_structures_are_never_accepted():
    rng = np.random.default_rng(3)
    scores = rng.uniform(size=400)
    bad = rng.uniform(size=400) < 0.5 * (1 - scores) ** 2
    eligible = rng.uniform(size=400) < 0.7
    cert = certify(scores, bad, rng.uniform(size=200), 0.1, 0.1, cal_eligible=eligible,
                   val_eligible=rng.uniform(size=200) < 0.7)
    assert cert.certified
    accepted = eligible & (scores >= cert.threshold)
    assert cert.n_accepted == accepted.sum() and cert.n_errors == bad[accepted].sum()
    assert binom.cdf(cert.n_errors, cert.n_accepted, 0.1) <= 0.1


@pytest.mark.parametrize("risk, delta", [(0.0, 0.1), (1.0, 0.1), (0.05, 0.0), (0.05, 1.5)])
def test_bad_levels_are_input_errors(risk, delta):
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        certify(np.ones(3), np.zeros(3, dtype=bool), np.ones(3), risk, delta)


def test_the_evaluation_report_says_how_a_fallback_p_star_was_chosen():
    """evaluate's report.md names the fallback rule only when the target was not certified."""
    from probe_ase.evaluation.report import fallback_note

    base = {"target_risk": 0.05, "certified_risk": 0.153}
    assert "strictest threshold certified at 15.3%" in fallback_note(base | {"fallback": "strictest"})
    assert "loosest threshold certified at 15.3% whose calibration risk is at most" in \
        fallback_note(base | {"fallback": "target"})
    assert fallback_note(base | {"certified_risk": 0.05, "fallback": "target"}) == ""


def test_fallback_target_spends_the_certified_risk_on_coverage(backbones, cu_data):
    """Where 5 % cannot be certified, fallback="target" keeps the head and the certified risk but lowers p* to the
    loosest threshold whose calibration risk is <= 5 %; the default's warning says what that would accept; refit
    keeps the rule."""
    from probe_ase.al.retrain import refit_spec

    # ~100 calibration structures: room between the two rules
    options = FitOptions(hidden=16, epochs=20, patience=5, calibration="crossfit", folds=2, weight_folds=0)
    kwargs = dict(criterion="force_rmse", quantile=0.7, cache_dir=False, progress=False)
    with pytest.warns(UserWarning, match="fallback='target' would accept") as caught:
        strict = fit_probe(backbones("mace"), cu_data["pool"], options=options, **kwargs)
    assert any("cannot be certified" in str(w.message) for w in caught)
    aim = fit_probe(backbones("mace"), cu_data["pool"], options=replace(options, fallback="target"), **kwargs)
    s, a = strict.report["certificate"], aim.report["certificate"]
    assert not s["certified"] and (s["fallback"], a["fallback"]) == ("strictest", "target")
    assert a["risk"] == s["risk"] and strict.meta.calibration == aim.meta.calibration
    assert aim.p_star < strict.p_star and a["n_accepted"] > s["n_accepted"]
    assert a["n_errors"] <= 0.05 * a["n_accepted"]
    assert refit_spec(aim.meta, head_epochs=5, seed=1).options.fallback == "target"
    assert refit_spec(strict.meta, head_epochs=5, seed=1).options.fallback == "strictest"
