"""Metrics of a reliability score against errors and labels.

Convention: the *positive* class is "unreliable", scored by ``1 - p`` where
``p`` is the probability of being reliable. Ranking metrics come from
scikit-learn and SciPy; risk-coverage follows selective classification
(accept the structures with the highest ``p``; risk = fraction of accepted
structures that are unreliable).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score


def auroc(unreliable: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve for detecting unreliable structures (NaN if one class)."""
    unreliable = np.asarray(unreliable, dtype=bool)
    if unreliable.all() or not unreliable.any():
        return float("nan")
    return float(roc_auc_score(unreliable, score))


def auprc(unreliable: np.ndarray, score: np.ndarray) -> float:
    """Average precision for detecting unreliable structures (NaN if one class)."""
    unreliable = np.asarray(unreliable, dtype=bool)
    if unreliable.all() or not unreliable.any():
        return float("nan")
    return float(average_precision_score(unreliable, score))


def spearman(score: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation between a score and the continuous error."""
    if np.ptp(score) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(spearmanr(score, error).statistic)


def risk_coverage(p: np.ndarray, reliable: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selective-classification curve accepting structures in decreasing ``p``.

    Returns ``(coverage, risk, thresholds)``: accepting every structure with
    ``p >= thresholds[k]`` covers ``coverage[k]`` of them, of which ``risk[k]``
    are unreliable. Ties in ``p`` are accepted together.
    """
    p = np.asarray(p, dtype=float)
    bad = 1 - np.asarray(reliable, dtype=float)
    order = np.argsort(-p, kind="stable")
    p_sorted, bad_sorted = p[order], bad[order]
    last_of_tie = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    accepted = np.arange(1, len(p) + 1)[last_of_tie]
    errors = np.cumsum(bad_sorted)[last_of_tie]
    return accepted / len(p), errors / accepted, p_sorted[last_of_tie]


def aurc(p: np.ndarray, reliable: np.ndarray) -> float:
    """Area under the risk-coverage curve (lower is better)."""
    coverage, risk, _ = risk_coverage(p, reliable)
    widths = np.diff(np.r_[0.0, coverage])
    return float(np.sum(widths * risk))


def risk_at_coverage(p: np.ndarray, reliable: np.ndarray, coverage: float) -> float:
    """Risk when accepting the ``coverage`` fraction (0-1) of structures with highest ``p``."""
    cov, risk, _ = risk_coverage(p, reliable)
    return float(risk[np.searchsorted(cov, coverage - 1e-12)])


def expected_calibration_error(p: np.ndarray, reliable: np.ndarray, bins: int = 10) -> float:
    """ECE of ``p`` with equal-width bins."""
    p, y = np.asarray(p, dtype=float), np.asarray(reliable, dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(p[mask].mean() - y[mask].mean())
    return float(total)


def brier(p: np.ndarray, reliable: np.ndarray) -> float:
    """Brier score of ``p`` against reliable labels."""
    return float(brier_score_loss(np.asarray(reliable, dtype=int), p))


def oracle_aurc(reliable: np.ndarray) -> float:
    """AURC of a perfect ranking (every reliable structure accepted first)."""
    reliable = np.asarray(reliable, dtype=float)
    order = np.argsort(-reliable, kind="stable")
    return aurc(np.linspace(1, 0, len(reliable))[np.argsort(order)], reliable)


def summary(p: np.ndarray, reliable: np.ndarray, error: np.ndarray, p_star: float | None = None) -> dict[str, float]:
    """Every ranking and calibration metric of a reliability ``p`` (0-1) at once.

    Scores for ranking are ``1 - p`` (positive class: unreliable). ECE and
    Brier assume ``p`` is a probability; for raw scores (an ensemble's
    disagreement) map them to [0, 1] first or ignore those two entries.
    """
    reliable = np.asarray(reliable, dtype=bool)
    out = {
        "n": len(p), "fraction_unreliable": float(np.mean(~reliable)),
        "auroc": auroc(~reliable, 1 - p), "auprc": auprc(~reliable, 1 - p),
        "spearman": spearman(1 - p, error), "aurc": aurc(p, reliable),
        "excess_aurc": aurc(p, reliable) - oracle_aurc(reliable),
        "risk_at_50": risk_at_coverage(p, reliable, 0.5), "risk_at_80": risk_at_coverage(p, reliable, 0.8),
        "risk_at_90": risk_at_coverage(p, reliable, 0.9),
        "ece": expected_calibration_error(p, reliable), "brier": brier(p, reliable),
    }
    if p_star is not None:
        accepted = p >= p_star
        out["coverage_at_p_star"] = float(accepted.mean())
        out["risk_at_p_star"] = float(np.mean(~reliable[accepted])) if accepted.any() else float("nan")
    return out
