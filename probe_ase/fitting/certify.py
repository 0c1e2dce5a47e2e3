"""Certified operating thresholds: what "target risk 5 %" can promise.

Selective classification accepts a structure when its score clears a
threshold; the *risk* is the fraction of accepted structures that are
unreliable. An empirical cut on a small calibration split promises nothing,
so the threshold is chosen with Learn-then-Test (Angelopoulos et al.,
arXiv:2110.01052) and fixed-sequence testing:

1. A grid of thresholds is fixed *before* the calibration split is looked at
   (from the validation split's scores and eligibility), ordered strict to loose, starting at
   the first threshold expected to accept at least :func:`min_accepted`
   calibration structures (fewer can never reject the null).
2. For each threshold in turn, the null "risk among accepted > alpha" is
   tested with the exact binomial p-value ``P(Bin(n, alpha) <= errors)``
   over the ``n`` accepted calibration structures.
3. The walk stops at the first p-value above ``delta``; the loosest threshold
   rejected before that is returned.
4. When no threshold is certified at the target, rungs of higher risk are
   tried, sharing ``delta``, and a threshold of the first rung certified is
   returned with that risk (:func:`certify`): by default its strictest; with
   ``fallback="target"``, the loosest one whose calibration risk is at most
   the target.

Guarantee: with probability at least ``1 - delta`` over the calibration
draw, the returned threshold has risk <= alpha on structures exchangeable
with the calibration ones. It says nothing about structures from elsewhere:
that is what the novelty term (:mod:`probe_ase.model.novelty`) guards.

What data can certify (alpha = delta = 0.05): 59 accepted with 0 errors,
about 200 with 4, 1 000 with 38; :func:`frames_needed` estimates how many
calibration structures a target needs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy.stats import binom

from probe_ase.exceptions import InputError

if TYPE_CHECKING:
    from probe_ase.fitting.heldout import HeldOut
    from probe_ase.fitting.spec import FitSpec
    from probe_ase.model.calibration import Calibration

#: grid points of the fixed sequence (quantiles of the validation scores)
GRID_POINTS = 400
#: the first threshold tested is expected to accept this many times :func:`min_accepted` structures
START_MARGIN = 2
#: which threshold of a fallback rung :func:`certify` returns
Fallback = Literal["strictest", "target"]
FALLBACKS: tuple[Fallback, ...] = ("strictest", "target")


@dataclass(frozen=True)
class Certificate:
    """A threshold on a score and what it certifies.

    Attributes:
        threshold: accept structures whose score is >= this (the score ``certify`` was given: in
            :func:`~probe_ase.fitting.pipeline.fit_probe`, the head's novelty-penalised logit before temperature scaling).
        target_risk: the risk alpha the caller asked for (fraction 0-1).
        delta: allowed probability that the guarantee fails (0-1).
        certified: whether ``threshold`` is certified at ``target_risk``.
        risk: the risk the threshold *is* certified at (``target_risk`` when
            certified, else the best certifiable risk on a ladder above it;
            1.0 when nothing is).
        n_accepted, n_errors: calibration structures accepted at the
            threshold, and how many of them were unreliable.
        coverage: fraction of calibration structures accepted.
        frames_needed: estimated calibration structures needed to certify
            ``target_risk`` (None when certified, or when more data of the
            same kind would not help).
    """

    threshold: float
    target_risk: float
    delta: float
    certified: bool
    risk: float
    n_accepted: int
    n_errors: int
    coverage: float
    frames_needed: int | None


def min_accepted(alpha: float, delta: float) -> int:
    """Fewest accepted structures (all reliable) that can certify risk ``alpha`` at level ``delta``."""
    return math.ceil(math.log(delta) / math.log(1 - alpha))


def p_value(n_errors: int, n_accepted: int, alpha: float) -> float:
    """Exact binomial p-value of the null "risk > alpha" given ``n_errors`` among ``n_accepted``."""
    return 1.0 if n_accepted == 0 else float(binom.cdf(n_errors, n_accepted, alpha))


def threshold_grid(
    val_scores: np.ndarray, val_eligible: np.ndarray, n_cal: int, alpha: float, delta: float
) -> np.ndarray:
    """Thresholds, strict to loose, fixed from the validation split alone.

    Quantiles of the eligible validation scores, from the one expected to
    accept 2 x :func:`min_accepted` of ``n_cal`` calibration structures
    (given the validation split's eligible fraction; the margin keeps the
    first test from failing on a chance shortfall) down to the loosest score.
    """
    val_eligible = np.asarray(val_eligible, dtype=bool)
    val_scores = np.asarray(val_scores, dtype=float)[val_eligible]
    if len(val_scores) == 0:
        return np.array([np.inf])
    start = min(1.0, START_MARGIN * min_accepted(alpha, delta) / max(n_cal * val_eligible.mean(), 1))
    levels = np.linspace(1 - start, 0.0, GRID_POINTS)
    return np.unique(np.quantile(val_scores, levels))[::-1]


def fixed_sequence(
    scores: np.ndarray, bad: np.ndarray, eligible: np.ndarray, grid: np.ndarray, alpha: float, delta: float
) -> int | None:
    """Index into ``grid`` of the loosest threshold certified at ``alpha`` (None if none).

    A calibration structure is accepted at threshold ``t`` when it is
    ``eligible`` (e.g. inside the novelty support) and its score is >= ``t``.
    """
    found = None
    for j, t in enumerate(grid):
        accepted = eligible & (scores >= t)
        if p_value(int(bad[accepted].sum()), int(accepted.sum()), alpha) > delta:
            break
        found = j
    return found


def frames_needed(scores: np.ndarray, bad: np.ndarray, eligible: np.ndarray, alpha: float, delta: float) -> int | None:
    """Calibration structures needed to certify ``alpha``, from this split's own risk-coverage curve.

    For each threshold whose empirical risk r is below ``alpha``, the accepted
    count n with ``P(Bin(n, alpha) <= r n) <= delta`` (at least the grid's
    first test, :data:`START_MARGIN` x :func:`min_accepted`) divided by its
    coverage; the smallest over thresholds. None if the empirical risk is never below
    ``alpha`` (more data of the same kind would not certify it).
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    ok, wrong = np.asarray(eligible)[order], np.asarray(bad)[order]
    n_acc, n_err = np.cumsum(ok), np.cumsum(ok & wrong)
    best = None
    for k in np.flatnonzero(ok):
        rate, coverage = n_err[k] / n_acc[k], n_acc[k] / len(order)
        if n_acc[k] < 10 or rate >= alpha:  # under 10 accepted the rate says nothing
            continue
        n = _accepted_needed(rate, alpha, delta)
        if n is not None:
            total = math.ceil(max(n, START_MARGIN * min_accepted(alpha, delta)) / coverage)
            best = total if best is None else min(best, total)
    return best


def _accepted_needed(rate: float, alpha: float, delta: float, most: int = 10**6) -> int | None:
    """Smallest n with ``P(Bin(n, alpha) <= floor(rate n)) <= delta`` (doubling, then bisection)."""
    def ok(n: int) -> bool:
        return binom.cdf(math.floor(rate * n), n, alpha) <= delta

    hi = min_accepted(alpha, delta)
    while not ok(hi):
        hi *= 2
        if hi > most:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def aim_at_target(scores: np.ndarray, bad: np.ndarray, eligible: np.ndarray, grid: np.ndarray, last: int,
                  target: float) -> int:
    """Index of the loosest of ``grid[:last + 1]`` whose calibration risk is <= ``target`` (0 if none)."""
    best = 0
    for j in range(last + 1):
        accepted = eligible & (scores >= grid[j])
        if accepted.any() and bad[accepted].mean() <= target:
            best = j
    return best


def fallback_ladder(target_risk: float, step: float = 1.25) -> list[float]:
    """Risks tried, in order, when ``target_risk`` cannot be certified: x ``step`` per rung, below 1."""
    ladder, alpha = [], target_risk * step
    while alpha < 1:
        ladder.append(alpha)
        alpha *= step
    return ladder


def certify(
    cal_scores: np.ndarray,
    cal_bad: np.ndarray,
    val_scores: np.ndarray,
    target_risk: float,
    delta: float = 0.1,
    cal_eligible: np.ndarray | None = None,
    val_eligible: np.ndarray | None = None,
    fallback: Fallback = "strictest",
) -> Certificate:
    """Choose a threshold on a score (higher = more reliable) certified at ``target_risk``.

    Args:
        cal_scores, cal_bad: calibration scores and whether each structure is
            unreliable (error above tolerance).
        val_scores: validation scores, used only to fix the grid.
        target_risk: risk alpha to certify (0-1).
        delta: the guarantee may fail with probability at most this (0-1).
        cal_eligible, val_eligible: structures that may be accepted at all (default
            all); the others count as rejected at every threshold.
        fallback: which certified threshold a fallback returns (:data:`FALLBACKS`, below).

    When ``target_risk`` cannot be certified, the lowest risk on a ladder
    above it (x 1.25 per rung, :func:`fallback_ladder`) that the data certify
    is found and returned with ``certified=False``; ``risk`` says what it
    certifies. Every threshold of that rung's certified prefix holds it, so
    which one is a choice of what to spend: ``"strictest"`` (default) the
    first of the fixed sequence (it accepts about :data:`START_MARGIN` x
    :func:`min_accepted` calibration structures, a count, so a smaller share
    of a larger calibration set); ``"target"`` the loosest of the prefix whose
    calibration risk is at most ``target_risk`` (more coverage, a smaller
    margin under shift). The loosest of the prefix would accept structures up
    to a risk the caller did not ask for, and is never returned.
    The fallback rungs share ``delta`` (Bonferroni: each is tested at ``delta``
    divided by their number), so a reported fallback risk is wrong with
    probability at most ``delta`` as well. When no rung below risk 1 is
    certified, the threshold is +inf: nothing is accepted.
    """
    if not 0 < target_risk < 1 or not 0 < delta < 1:
        raise InputError(f"target_risk and delta must lie strictly between 0 and 1, got {target_risk} and {delta}",
                         target_risk=target_risk, delta=delta)
    check_fallback(fallback)
    scores, bad = np.asarray(cal_scores, dtype=float), np.asarray(cal_bad, dtype=bool)
    eligible = np.ones(len(scores), dtype=bool) if cal_eligible is None else np.asarray(cal_eligible, dtype=bool)
    val_ok = np.ones(len(val_scores), dtype=bool) if val_eligible is None else np.asarray(val_eligible, dtype=bool)
    fallbacks = fallback_ladder(target_risk)
    rungs = [(target_risk, delta)] + [(alpha, delta / len(fallbacks)) for alpha in fallbacks]
    for alpha, level in rungs:
        grid = threshold_grid(val_scores, val_ok, len(scores), alpha, level)
        j = fixed_sequence(scores, bad, eligible, grid, alpha, level)
        if j is not None:
            certified = alpha == target_risk
            if not certified:
                j = 0 if fallback == "strictest" else aim_at_target(scores, bad, eligible, grid, j, target_risk)
            accepted = eligible & (scores >= grid[j])
            needed = None if certified else frames_needed(scores, bad, eligible, target_risk, delta)
            return Certificate(float(grid[j]), target_risk, delta, certified, alpha, int(accepted.sum()),
                               int(bad[accepted].sum()), float(accepted.mean()), needed)
    return Certificate(math.inf, target_risk, delta, False, 1.0, 0, 0, 0.0,
                       frames_needed(scores, bad, eligible, target_risk, delta))


def check_fallback(fallback: str) -> None:
    """Raise :class:`InputError` unless ``fallback`` is one of :data:`FALLBACKS`."""
    if fallback not in FALLBACKS:
        raise InputError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}", fallback=fallback)


def certify_threshold(z_cal: np.ndarray, z_grid: np.ndarray, y_cal: np.ndarray, held: HeldOut,
                      calibration: Calibration, spec: FitSpec) -> tuple[Certificate, float]:
    """Certify the verdict's threshold on held-out penalised logits; the certificate and p* (0-1).

    ``z_cal`` calibrate (labels ``y_cal``, 1 = reliable), ``z_grid`` fix the
    threshold grid; a structure is eligible inside the support (novelty <= 1).
    Where nothing is certified p* is just above 1, so the verdict accepts
    nothing; where the target cannot be certified, warns with what would.
    """
    fallback = spec.options.fallback
    check = dict(cal_eligible=held.novelty_cal <= 1, val_eligible=held.novelty_grid <= 1)
    cert = certify(z_cal, y_cal == 0, z_grid, spec.target_risk, spec.delta, fallback=fallback, **check)
    p_star = float(np.nextafter(1.0, 2.0)) if not np.isfinite(cert.threshold) else \
        float(calibration.probability(cert.threshold))
    if cert.certified:
        return cert, p_star
    inside, n_cal = int((held.novelty_cal <= 1).sum()), len(z_cal)
    if cert.frames_needed:
        more = f"about {cert.frames_needed} calibration structures (now {n_cal}) would certify it"
    elif inside < 10:
        more = (f"only {inside} calibration structures lie inside the novelty support, too few to say how many "
                "would certify it: fit on more structures")
    else:
        more = ("more data like this would not certify it (its empirical risk is never below the target): "
                "improve the backbone or the head, or raise target_risk")
    if fallback == "strictest" and np.isfinite(cert.threshold):
        aim = certify(z_cal, y_cal == 0, z_grid, spec.target_risk, spec.delta, fallback="target", **check)
        if aim.n_accepted > cert.n_accepted:
            more += (f"; p* accepts {cert.n_accepted} calibration structures, fallback='target' would accept "
                     f"{aim.n_accepted} at the same certified risk (calibration risk <= {spec.target_risk:.1%}, less "
                     "margin under shift)")
    warnings.warn(f"target risk {spec.target_risk:.1%} cannot be certified at delta {spec.delta} with {n_cal} "
                  f"calibration structures; p* = {p_star:.3f} is certified at risk {cert.risk:.1%} instead (the "
                  f"fallback risks share delta {spec.delta}, so this one too holds with probability >= "
                  f"{1 - spec.delta:g}); {more}", stacklevel=4)
    return cert, p_star
