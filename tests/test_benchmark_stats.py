"""The benchmarks' statistics (``benchmarks/stats.py``): paired, stratified percentile bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.stats import bootstrap
from probe_ase.evaluation import metrics


def test_bootstrap_interval_of_a_paired_auroc_difference():
    rng = np.random.default_rng(1)
    unreliable = rng.random(600) < 0.3
    noise = rng.normal(size=600)
    sharp, blunt = unreliable * 2.0 + noise, unreliable * 0.5 + noise  # same noise: a paired comparison
    diff = lambda idx: metrics.auroc(unreliable[idx], sharp[idx]) - metrics.auroc(unreliable[idx], blunt[idx])  # noqa: E731
    iv = bootstrap(diff, 600, reps=300)
    assert iv.estimate == pytest.approx(diff(np.arange(600)))
    assert 0 < iv.low < iv.estimate < iv.high and iv.share_below_zero == 0
    # the same score twice: every resample differs by exactly 0
    same = bootstrap(lambda idx: metrics.auroc(unreliable[idx], sharp[idx]) * 0, 600, reps=50)
    assert same.low == same.high == 0
    # strata keep each file's size: a statistic reading the mix sees no variation
    strata = np.repeat([0, 1, 2], 200)
    share = bootstrap(lambda idx: np.mean(strata[idx] == 2), 600, strata=strata, reps=50)
    assert share.low == share.high == pytest.approx(1 / 3)
    free = bootstrap(lambda idx: np.mean(strata[idx] == 2), 600, reps=50)
    assert free.high - free.low > 0.01
    # resamples with one class only (NaN) are dropped, not propagated
    rare = np.zeros(600, bool)
    rare[0] = True
    kept = bootstrap(lambda idx: metrics.auroc(rare[idx], sharp[idx]), 600, reps=50).replicates
    assert np.isfinite(kept).all() and 0 < len(kept) < 50  # about 37 % of resamples miss the one positive


def test_bootstrap_interval_hand_case_and_share_below_zero():
    """A statistic that is the resample's mean of [-1, 1]: the interval and the share below zero follow the
    resamples exactly; the same seed gives the same resamples."""
    values = np.array([-1.0, 1.0])
    iv = bootstrap(lambda idx: values[idx].mean(), 2, reps=400, level=0.5, seed=3)
    # two draws from {-1, 1}: mean -1, 0 or 1 with probability 1/4, 1/2, 1/4
    assert iv.estimate == 0.0 and iv.level == 0.5 and len(iv.replicates) == 400
    assert set(np.unique(iv.replicates)) == {-1.0, 0.0, 1.0}
    assert iv.share_below_zero == pytest.approx(np.mean(iv.replicates < 0)) == pytest.approx(0.25, abs=0.06)
    assert (iv.low, iv.high) == tuple(np.quantile(iv.replicates, [0.25, 0.75]))
    again = bootstrap(lambda idx: values[idx].mean(), 2, reps=400, level=0.5, seed=3)
    np.testing.assert_array_equal(again.replicates, iv.replicates)
    # nothing finite: the interval and the share are NaN, not an error
    empty = bootstrap(lambda idx: float("nan"), 5, reps=10)
    assert len(empty.replicates) == 0 and np.isnan([empty.low, empty.high, empty.share_below_zero]).all()


@pytest.mark.parametrize("kwargs", [dict(level=95), dict(level=0.0), dict(reps=0), dict(n=0)])
def test_bootstrap_refuses_bad_settings_naming_them(kwargs):
    call = dict(n=10, reps=2000, level=0.95) | kwargs
    with pytest.raises(ValueError, match=rf"got {call['level']}, {call['reps']}, {call['n']}\)"):
        bootstrap(len, **call)


def _run(score: np.ndarray, error: np.ndarray, file_of: np.ndarray) -> tuple[dict, dict]:
    """A minimal uq_quality run (results and per-frame arrays) with one MACE row scored by ``score``."""
    key, bad = "absolute/force_rmse", error > 0.1
    summary = {"PROBE": {"auroc": metrics.auroc(bad, score), "spearman": metrics.spearman(score, error),
                         "coverage_at_p_star": 0.5, "risk_at_p_star": 0.02}}
    row = {"tau": 0.1, "pooled_files": ["md", "shift"], "ood_files": ["shift"], "pooled": summary,
           "ood_pooled": summary}
    results = {"dataset": "toy", "backbones": {"mace": {"regimes": {"absolute": {"force_rmse": row}}}}}
    arrays = {"mace": {"files": np.array(["md", "shift"]), "file_of": file_of, f"{key}/error": error,
                       f"{key}/score/PROBE": score}}
    return results, arrays


def test_paired_change_flags_a_row_only_when_the_after_run_is_worse_beyond_its_interval():
    from benchmarks.paired_change import change_rows

    rng = np.random.default_rng(2)
    error, file_of, noise = rng.gamma(2.0, 0.05, 500), np.repeat([0, 1], 250), rng.normal(size=500)
    sharp, blunt = (error > 0.1) * 2.0 + noise, (error > 0.1) * 0.3 + noise
    better = change_rows(_run(blunt, error, file_of), _run(sharp, error, file_of), reps=200)[0]
    assert better["pooled_auroc"]["difference"] > 0 and better["pooled_auroc"]["low"] > 0
    assert not better["pooled_auroc"]["worse"] and not better["ood_auroc"]["worse"]
    worse = change_rows(_run(sharp, error, file_of), _run(blunt, error, file_of), reps=200)[0]
    assert worse["pooled_auroc"]["worse"] and worse["pooled_auroc"]["high"] < 0
    same = change_rows(_run(sharp, error, file_of), _run(sharp, error, file_of), reps=50)[0]
    assert same["pooled_spearman"]["low"] == same["pooled_spearman"]["high"] == 0 and not same["pooled_auroc"]["worse"]
    with pytest.raises(ValueError, match="same members"):  # other member-0 errors: not a paired comparison
        change_rows(_run(sharp, error, file_of), _run(sharp, error * 1.1, file_of), reps=10)


def test_paired_change_averages_seed_pairs_so_one_fit_does_not_decide():
    """With two fits per side, a row is worse only when the seeds' mean difference is: one worse seed that another
    seed offsets leaves the row level; each seed's values are kept, and unpaired runs are refused."""
    from benchmarks.paired_change import change_rows

    rng = np.random.default_rng(3)
    error, file_of, noise = rng.gamma(2.0, 0.05, 500), np.repeat([0, 1], 250), rng.normal(size=500)
    sharp, middle, blunt = ((error > 0.1) * w + noise for w in (2.0, 1.0, 0.3))
    mixed = change_rows([_run(middle, error, file_of), _run(blunt, error, file_of)],
                        [_run(blunt, error, file_of), _run(middle, error, file_of)], reps=200)[0]
    assert mixed["seeds"] == 2 and abs(mixed["pooled_auroc"]["difference"]) < 1e-12
    assert not mixed["pooled_auroc"]["worse"] and mixed["pooled_auroc"]["low"] <= 0 <= mixed["pooled_auroc"]["high"]
    assert mixed["pooled_auroc"]["frames_low"] == mixed["pooled_auroc"]["frames_high"] == 0  # frames alone: no spread
    assert mixed["pooled_auroc"]["per_seed"]["before"][0] == metrics.auroc(error > 0.1, middle)
    one = change_rows(_run(middle, error, file_of), _run(blunt, error, file_of), reps=200)[0]
    assert one["pooled_auroc"]["worse"]  # the same first pair alone: worse
    both = change_rows([_run(sharp, error, file_of)] * 2, [_run(blunt, error, file_of)] * 2, reps=200)[0]
    assert both["pooled_auroc"]["worse"]
    with pytest.raises(ValueError, match="pair the runs"):
        change_rows([_run(sharp, error, file_of)] * 2, [_run(blunt, error, file_of)], reps=10)


def test_bootstrap_over_seeds_resamples_the_seeds_too():
    """Two seeds whose paired statistic is -1 and +1 on every sample: estimate 0, interval [-1, 1] (the seeds'
    spread); one seed is the plain bootstrap."""
    from benchmarks.stats import bootstrap_seeds

    two = bootstrap_seeds([lambda idx: -1.0, lambda idx: 1.0], 20, reps=400)
    assert two.estimate == 0 and two.low == -1 and two.high == 1 and set(two.replicates) == {-1.0, 0.0, 1.0}
    one = bootstrap_seeds([lambda idx: float(np.mean(idx))], 20, reps=100, seed=4)
    plain = bootstrap(lambda idx: float(np.mean(idx)), 20, reps=100, seed=4)
    assert (one.estimate, one.low, one.high) == (plain.estimate, plain.low, plain.high)
