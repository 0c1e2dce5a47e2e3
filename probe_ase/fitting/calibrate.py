"""Calibration: the score formula's numbers (novelty weight, temperatures) and the atoms' operating threshold."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from probe_ase.evaluation import metrics
from probe_ase.fitting.novelty import fit_logit_weight
from probe_ase.model.calibration import Calibration
from probe_ase.model.head import structure_rows

if TYPE_CHECKING:
    from probe_ase.fitting.heldout import HeldOut
    from probe_ase.fitting.labels import Labels
    from probe_ase.model.head import HeadConfig
    from probe_ase.model.novelty import NoveltyConfig

#: temperature-scaled probabilities spread less than this over the calibration split carry no information
FLAT_SPREAD = 0.05


def fit_temperature(logits: np.ndarray, reliable: np.ndarray) -> float:
    """Temperature minimising the calibration split's negative log-likelihood.

    Targets use Platt's prior correction, ``(n+ + 1) / (n+ + 2)`` and
    ``1 / (n- + 2)`` instead of 1 and 0, so a perfectly separable calibration
    split yields confident but finite probabilities rather than T -> 0.
    Non-finite logits are left out (they give probability 0 at any temperature).
    """
    finite = np.isfinite(logits)  # -inf: infinite novelty (an element the density never saw), any temperature
    logits, labels = np.asarray(logits, dtype=float)[finite], np.asarray(reliable, dtype=bool)[finite]
    n_pos, n_neg = labels.sum(), (~labels).sum()
    y = np.where(labels, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, z) - y * z))

    return float(math.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def empirical_threshold(p: np.ndarray, reliable: np.ndarray, target_risk: float) -> float:
    """Loosest threshold t whose accepted set ``p >= t`` has empirical risk <= ``target_risk``.

    Just above 1 (accept nothing) when no threshold reaches it. Not a
    certificate: used for atoms, which are not independent draws.
    """
    order = np.argsort(-p, kind="stable")
    risk = np.cumsum(~reliable[order]) / np.arange(1, len(p) + 1)
    ok = np.flatnonzero(risk <= target_risk)
    return float(p[order][ok[-1]]) if ok.size else float(np.nextafter(1.0, 2.0))


def calibrate_atoms(
    z: np.ndarray, reliable: np.ndarray, error: np.ndarray, novelty: np.ndarray, importance: np.ndarray,
    ptr: np.ndarray, target_risk: float,
) -> tuple[float, dict]:
    """The atoms' operating threshold and their calibration report.

    ``z`` are temperature-scaled atom logits of the calibration atoms,
    ``reliable`` their labels, ``error`` their force-error norms (eV/Å),
    ``novelty`` their atom novelty, ``importance`` the head's importances,
    ``ptr`` the calibration structures' atom offsets. The threshold is
    :func:`empirical_threshold` over atoms inside the support (novelty <= 1).
    """
    p = 1 / (1 + np.exp(-z))
    inside = novelty <= 1
    p_star = empirical_threshold(p[inside], reliable[inside], target_risk)
    accepted = (p >= p_star) & inside
    # does the head's importance point at the worst atoms? Spearman within each structure that has a bad atom
    within = [metrics.spearman(importance[a:b], error[a:b]) for a, b in zip(ptr[:-1], ptr[1:])
              if (~reliable[a:b]).any() and b - a > 2]
    report = {
        "n_atoms": int(len(p)), "fraction_reliable": float(reliable.mean()),
        "auroc": metrics.auroc(~reliable, 1 - p), "spearman": metrics.spearman(1 - p, error),
        "ece": metrics.expected_calibration_error(p, reliable.astype(int)),
        "p_star": p_star, "coverage_at_p_star": float(accepted.mean()),
        "risk_at_p_star": float(np.mean(~reliable[accepted])) if accepted.any() else float("nan"),
        "importance_spearman": float(np.nanmean(within)) if within else float("nan"),
    }
    return p_star, report




def calibrate(held: HeldOut, labels: Labels, config: HeadConfig, novelty: NoveltyConfig, ptr: np.ndarray
              ) -> tuple[Calibration, np.ndarray, np.ndarray]:
    """Fit the score formula on held-out scores; return it and the grid's and calibration's penalised logits.

    The novelty weight is fitted on the held-out logits of ``held.weight_inputs`` (one coefficient shared by the
    main label and the auxiliary quantile labels), the temperature on the calibration structures' penalised
    logits, the atom temperature (heads with a per-atom logit) on their atoms.
    """
    weight = 0.0
    if held.weight_inputs is not None:
        z_held, penalty_held, structures = held.weight_inputs
        levels = np.quantile(labels.errors[held.fit_set], config.aux_quantiles)
        weight = fit_logit_weight(z_held, penalty_held, np.column_stack(
            [labels.y[structures] == 1, *(labels.errors[structures] <= level for level in levels)]))
    calibration = Calibration(novelty_weight=weight)
    z_grid = calibration.logit(torch.from_numpy(held.z_grid[:, 0]), torch.from_numpy(held.penalty_grid)).numpy()
    z_cal = calibration.logit(torch.from_numpy(held.z_cal[:, 0]), torch.from_numpy(held.penalty_cal)).numpy()
    calibration = replace(calibration, temperature=fit_temperature(z_cal, labels.y[held.cal]))
    if labels.atom_y is not None:
        atoms = labels.atom_y[structure_rows(ptr, held.cal)]
        calibration = replace(calibration, atom_temperature=fit_temperature(held.z_atom_cal, atoms))
    return calibration, z_grid, z_cal
