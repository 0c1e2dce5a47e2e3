"""Evaluate a fitted head (and optionally an ensemble) on labelled structures.

:func:`evaluate` scores the frames in batches, compares PROBE's reliability
with the true errors under the head's criterion, computes ranking and
calibration metrics (see :func:`probe_ase.evaluation.metrics.summary`), and writes a
self-contained report folder (drawn and written by :mod:`probe_ase.evaluation.report`): ``report.md`` with tables and figures,
``metrics.json``, ``roc.png``, ``risk_coverage.png``, ``scatter.png``,
``reliability_diagram.png`` and ``importance_*.png`` (the least reliable
structures with atoms coloured by PROBE's importance).

With an ensemble (a MACE committee calculator), its disagreement (mean over
atoms of the per-atom force standard deviation, eV/Å, and the energy
standard deviation per atom, eV/atom) is evaluated on the same frames.

With reference forces and a head that regresses atom errors (the default for
force criteria), ``metrics.json`` ``"force_error"`` and the report's
"Predicted force errors" table say how well the predicted ``force_error``
(force RMSE, eV/Å) and ``atom_force_error`` (``|ΔF_i|``, eV/Å) match the true
ones: Spearman, how often the truth exceeds the prediction, and the median
ratio of truth to prediction.

With reference forces, the report also judges atoms (``metrics.json``
``"atoms"``, the "Per-atom" table and ``atom_roc.png``): for a head with a
per-atom logit, AUROC and Spearman of ``1 - atom_reliability`` against each
atom's force-error norm ``|ΔF_i|`` (unreliable: above the head's atom
tolerance), and coverage and risk at the atom p*; the ensemble's per-atom
force standard deviation on the same atoms; and, for every head, whether the
attention importance points at the worst atoms (Spearman of importance vs
``|ΔF_i|`` within each unreliable structure, averaged, and how often the most
important atom is among the three worst).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from probe_ase.evaluation import metrics
from probe_ase.evaluation.report import atom_roc, importance_png, markdown, plot_evaluation
from probe_ase.exceptions import MissingReferenceError
from probe_ase.fileio import atomic_write
from probe_ase.fitting.data import Frames, read_frames, reference_energy, reference_forces
from probe_ase.fitting.labels import UNITS, atom_errors, needs_forces, structure_error
from probe_ase.model.probe import Probe
from probe_ase.scoring import score_frames


def ensemble_scores(committee: BaseCalculator, frames: list[Atoms]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Disagreement of a MACE committee calculator per structure (higher = less reliable), and per atom.

    Returns ``({"ensemble_force_std": ..., "ensemble_energy_std": ...}, atom_force_std)``, the last the
    norm of each atom's force standard deviation over members (eV/Å), atoms of all frames concatenated.
    """
    force_std, energy_std, atom_std = [], [], []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = committee
        atoms.get_potential_energy()
        forces = committee.results["forces_comm"]  # (members, atoms, 3)
        atom_std.append(np.linalg.norm(forces.std(axis=0), axis=1))
        force_std.append(atom_std[-1].mean())
        energy_std.append(np.sqrt(committee.results["energy_var"]) / len(atoms))
    return ({"ensemble_force_std": np.array(force_std), "ensemble_energy_std": np.array(energy_std)},
            np.concatenate(atom_std))


def evaluate(
    probe: Probe,
    calc: BaseCalculator,
    frames: Frames,
    out_dir: str | os.PathLike,
    committee: BaseCalculator | None = None,
    n_importance: int = 3,
    batch_size: int = 32,
) -> dict:
    """Score labelled ``frames``, compute metrics, write the report; return the metrics."""
    frames = read_frames(frames)
    criterion, tau = probe.meta.criterion, probe.meta.tau
    for k, atoms in enumerate(frames):
        if reference_energy(atoms) is None or (needs_forces(criterion) and reference_forces(atoms) is None):
            raise MissingReferenceError(f"frame {k} lacks the reference data criterion {criterion!r} needs",
                                        index=k, criterion=criterion)
    with probe.tap_for(calc) as tap:
        probe.check_backbone(tap)
        scored = list(score_frames(probe, tap, frames, batch_size))
    p = np.array([s.info["reliability"] for s in scored])
    error = np.array([structure_error(criterion, s.info["mlip_energy"], reference_energy(f),
                                      s.arrays["mlip_forces"], reference_forces(f)) for s, f in zip(scored, frames)])
    reliable = error <= tau
    verdict = np.array([s.info["reliable"] for s in scored])
    m = probe.meta
    results = {"criterion": criterion, "unit": UNITS[criterion], "tau": tau, "p_star": probe.p_star,
               "target_risk": m.target_risk, "certified_risk": m.certified_risk, "delta": m.delta,
               "calibration": m.spec.options.calibration, "fallback": m.spec.options.fallback,
               "probe": metrics.summary(p, reliable, error, probe.p_star)}
    results["probe"] |= {  # the verdict: p >= p* and inside the novelty support
        "verdict_coverage": float(verdict.mean()),
        "verdict_risk": float(np.mean(~reliable[verdict])) if verdict.any() else float("nan"),
        "out_of_support": float(np.mean([s.info["reason"] == "out_of_support" for s in scored])),
    }
    curves = {"PROBE": 1 - p}
    atom_std = None if committee is None else committee_rows(committee, frames, reliable, error, curves, results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_evaluation(curves, p, error, reliable, tau, probe.p_star, criterion, out)
    if all(reference_forces(f) is not None for f in frames):
        atom_error = np.concatenate([atom_errors(s.arrays["mlip_forces"], reference_forces(f))
                                     for s, f in zip(scored, frames)])
        results["atoms"] = atom_metrics(probe, scored, atom_error, reliable, atom_std)
        if probe.head.atom_error:
            results["force_error"] = force_error_metrics(scored, frames, atom_error)
        if probe.meta.local:
            atom_curves = {"PROBE atoms": 1 - np.concatenate([s.arrays["atom_reliability"] for s in scored])}
            if atom_std is not None:
                atom_curves["ensemble atom force std"] = atom_std
            figures.append(atom_roc(atom_curves, atom_error > probe.meta.atom_tau, probe.meta.atom_tau, out))
    least = np.argsort(p)[:n_importance]
    figures += [importance_png(scored[k], k, out) for k in least]
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(markdown(results, figures, len(frames))))
    return results


def committee_rows(committee: BaseCalculator, frames: list[Atoms], reliable: np.ndarray, error: np.ndarray,
                   curves: dict, results: dict) -> np.ndarray:
    """Add the committee's scores to ``curves`` and their ranking metrics to ``results``; return its per-atom force
    std (eV/Å)."""
    structure_scores, atom_std = ensemble_scores(committee, frames)
    for name, score in structure_scores.items():
        curves[name] = score
        ranking = 1 - score / (score.max() or 1.0)  # a monotone map to [0, 1]: only ranking metrics count
        results[name] = {k: v for k, v in metrics.summary(ranking, reliable, error).items()
                         if k not in ("ece", "brier")}
    return atom_std


def atom_metrics(probe: Probe, scored: list[Atoms], atom_error: np.ndarray, reliable: np.ndarray,
                 atom_std: np.ndarray | None = None) -> dict:
    """Per-atom metrics (see the module docstring); ``atom_error`` is ``|ΔF_i|`` in eV/Å over all atoms."""
    ptr = np.cumsum([0] + [len(s) for s in scored])
    importance = np.concatenate([s.arrays["atom_importance"] for s in scored])
    within, top = [], []
    for k in np.flatnonzero(~reliable):
        a, b = ptr[k], ptr[k + 1]
        if b - a > 2:
            within.append(metrics.spearman(importance[a:b], atom_error[a:b]))
            top.append(int(np.argmax(importance[a:b])) in np.argsort(-atom_error[a:b])[:3])
    out: dict = {"n_atoms": int(len(atom_error)), "importance_spearman": float(np.nanmean(within)) if within else None,
                 "importance_top_is_top3_worst": float(np.mean(top)) if top else None,
                 "n_unreliable_structures": len(within)}
    if not probe.meta.local:
        return out
    m = probe.meta
    p_atom = np.concatenate([s.arrays["atom_reliability"] for s in scored])
    bad = atom_error > m.atom_tau
    accepted = p_atom >= m.atom_p_star
    out |= {"atom_tau": m.atom_tau, "atom_p_star": m.atom_p_star, "fraction_unreliable": float(bad.mean()),
            "auroc": metrics.auroc(bad, 1 - p_atom), "spearman": metrics.spearman(1 - p_atom, atom_error),
            "coverage_at_p_star": float(accepted.mean()),
            "risk_at_p_star": float(bad[accepted].mean()) if accepted.any() else None}
    if atom_std is not None:
        out["ensemble"] = {"auroc": metrics.auroc(bad, atom_std), "spearman": metrics.spearman(atom_std, atom_error)}
    return out


def force_error_metrics(scored: list[Atoms], frames: list[Atoms], atom_error: np.ndarray) -> dict:
    """How well the predicted force errors (eV/Å) match the true ones, per structure and per atom.

    Structures: the predicted ``force_error`` against the true force RMSE over
    components; atoms: ``atom_force_error`` against ``atom_error`` (``|ΔF_i|``,
    eV/Å, all atoms). Spearman ranks; ``fraction_above`` is how often the true
    error exceeds the prediction (about 0.5 for a median-like estimate),
    ``median_ratio`` the median of true / predicted.
    """
    predicted = np.array([s.info["force_error"] for s in scored])
    true = np.array([structure_error("force_rmse", 0.0, 0.0, s.arrays["mlip_forces"], reference_forces(f))
                     for s, f in zip(scored, frames)])
    atom_predicted = np.concatenate([s.arrays["atom_force_error"] for s in scored])

    def agreement(pred: np.ndarray, truth: np.ndarray) -> dict:
        return {"spearman": metrics.spearman(pred, truth), "fraction_above": float(np.mean(truth > pred)),
                "median_ratio": float(np.median(truth / pred))}

    return {"structures": agreement(predicted, true), "atoms": agreement(atom_predicted, atom_error)}
