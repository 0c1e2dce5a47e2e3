"""Evaluate a fitted head (and optionally an ensemble) on labelled structures.

:func:`evaluate` scores the frames in batches, compares PROBE's reliability
with the true errors under the head's criterion, computes ranking and
calibration metrics (see :func:`probe_ase.metrics.summary`), and writes a
self-contained report folder: ``report.md`` with tables and figures,
``metrics.json``, ``roc.png``, ``risk_coverage.png``, ``scatter.png``,
``reliability_diagram.png`` and ``importance_*.png`` (the least reliable
structures with atoms coloured by PROBE's importance).

With an ensemble (a MACE committee calculator), its disagreement (mean over
atoms of the per-atom force standard deviation, eV/Å, and the energy
standard deviation per atom, eV/atom) is evaluated on the same frames.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from . import metrics
from .dataset import Frames, read_frames, reference_energy, reference_forces
from .exceptions import MissingReferenceError
from .fileio import atomic_write
from .headfile import Probe
from .labels import UNITS, needs_forces, structure_error
from .scoring import score_frames
from .taps import find_tap


def ensemble_scores(committee: BaseCalculator, frames: list[Atoms]) -> dict[str, np.ndarray]:
    """Disagreement of a MACE committee calculator per structure (higher = less reliable)."""
    force_std, energy_std = [], []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = committee
        atoms.get_potential_energy()
        forces = committee.results["forces_comm"]  # (members, atoms, 3)
        force_std.append(np.linalg.norm(forces.std(axis=0), axis=1).mean())
        energy_std.append(np.sqrt(committee.results["energy_var"]) / len(atoms))
    return {"ensemble_force_std": np.array(force_std), "ensemble_energy_std": np.array(energy_std)}


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
            raise MissingReferenceError(f"frame {k} lacks the reference data criterion {criterion!r} needs")
    with find_tap(calc, probe.meta.layers) as tap:
        probe.check_backbone(tap.kind, tap.fingerprint(), tap.feature_dim, tap.layers)
        scored = list(score_frames(probe, tap, frames, batch_size))
    p = np.array([s.info["reliability"] for s in scored])
    error = np.array([structure_error(criterion, s.info["mlip_energy"], reference_energy(f),
                                      s.arrays["mlip_forces"], reference_forces(f)) for s, f in zip(scored, frames)])
    reliable = error <= tau
    verdict = np.array([s.info["reliable"] for s in scored])
    m = probe.meta
    results = {"criterion": criterion, "unit": UNITS[criterion], "tau": tau, "p_star": probe.p_star,
               "target_risk": m.target_risk, "certified_risk": m.certified_risk, "delta": m.delta,
               "probe": metrics.summary(p, reliable, error, probe.p_star)}
    results["probe"] |= {  # the verdict: p >= p* and inside the novelty support
        "verdict_coverage": float(verdict.mean()),
        "verdict_risk": float(np.mean(~reliable[verdict])) if verdict.any() else float("nan"),
        "out_of_support": float(np.mean([s.info["reason"] == "out_of_support" for s in scored])),
    }
    curves = {"PROBE": 1 - p}
    if committee is not None:
        for name, score in ensemble_scores(committee, frames).items():
            curves[name] = score
            ranking = 1 - score / (score.max() or 1.0)  # a monotone map to [0, 1]: only ranking metrics count
            results[name] = {k: v for k, v in metrics.summary(ranking, reliable, error).items()
                             if k not in ("ece", "brier")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_evaluation(curves, p, error, reliable, tau, probe.p_star, criterion, out)
    least = np.argsort(p)[:n_importance]
    figures += [_importance_png(scored[k], k, out) for k in least]
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(_markdown(results, figures, len(frames))))
    return results


def plot_evaluation(curves, p, error, reliable, tau, p_star, criterion, out: Path) -> list[str]:
    """Write ROC, risk-coverage, probability-vs-error scatter and reliability-diagram PNGs into ``out``.

    ``curves`` maps method names to uncertainty scores (higher = less reliable);
    ``p`` is PROBE's reliability probability, ``error`` the true error (eV/Å for
    force criteria, eV or eV/atom for energy ones), ``reliable`` the labels
    ``error <= tau``. Returns the file names written.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    names = []

    def save(fig, name):
        fig.tight_layout()
        atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        names.append(name)

    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.subplots()
    for label, score in curves.items():
        if reliable.all() or not reliable.any():
            break
        fpr, tpr, _ = roc_curve(~reliable, score)
        ax.plot(fpr, tpr, label=f"{label} (AUROC {metrics.auroc(~reliable, score):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="random")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate (unreliable caught)", title="ROC")
    ax.legend(fontsize=7)
    save(fig, "roc.png")

    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.subplots()
    for label, score in list(curves.items()) + [("oracle", error)]:
        coverage, risk, _ = metrics.risk_coverage(-score, reliable)
        ax.plot(coverage, risk, label=label, ls="--" if label == "oracle" else "-")
    ax.axhline(np.mean(~reliable), color="k", ls=":", lw=1, label="random")
    ax.set(xlabel="coverage", ylabel="risk (fraction unreliable among accepted)", title="Risk-coverage")
    ax.legend(fontsize=7)
    save(fig, "risk_coverage.png")

    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.subplots()
    ax.scatter(error, p, s=10, c=np.where(reliable, "tab:blue", "tab:red"))
    ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:.3g} {UNITS[criterion]}")
    ax.axhline(p_star, color="grey", ls=":", lw=1, label=f"p* = {p_star:.2f}")
    ax.set(xlabel=f"true error, {criterion} ({UNITS[criterion]})", ylabel="PROBE reliability", xscale="log")
    ax.legend(fontsize=7)
    save(fig, "scatter.png")

    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.subplots()
    frac, mean_p = calibration_curve(reliable.astype(int), p, n_bins=10, strategy="uniform")
    ax.plot(mean_p, frac, "o-", label="PROBE")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    ax.set(xlabel="predicted reliability", ylabel="observed fraction reliable", title="Reliability diagram")
    ax.legend(fontsize=7)
    save(fig, "reliability_diagram.png")
    return names


def _importance_png(frame: Atoms, index: int, out: Path) -> str:
    """The structure seen along z, atoms coloured by PROBE importance."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch
    from ase.visualize.plot import plot_atoms

    importance = frame.arrays["atom_importance"]
    from matplotlib import cm, colormaps, colors

    cmap = colormaps["viridis"]
    colours = [cmap(x) for x in importance / (importance.max() or 1.0)]
    fig = Figure(figsize=(4.2, 4.2))
    ax = fig.subplots()
    plot_atoms(frame, ax, colors=colours, radii=0.5)
    scale = cm.ScalarMappable(cmap=cmap, norm=colors.Normalize(0, float(importance.max())))
    fig.colorbar(scale, ax=ax, shrink=0.7, label="atom importance (sums to 1)")
    ax.set_axis_off()
    ax.set_title(f"frame {index}: reliability {frame.info['reliability']:.3f}\n"
                 "colour: PROBE atom importance (yellow = drives the verdict)", fontsize=8)
    name = f"importance_{index}.png"
    fig.tight_layout()
    atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return name


def _markdown(results: dict, figures: list[str], n_frames: int) -> str:
    keys = ["auroc", "auprc", "spearman", "aurc", "excess_aurc", "risk_at_50", "risk_at_80", "risk_at_90",
            "ece", "brier", "coverage_at_p_star", "risk_at_p_star", "out_of_support", "verdict_coverage",
            "verdict_risk"]
    methods = [m for m in results if isinstance(results[m], dict)]
    lines = [
        "# probe-ase evaluation", "",
        f"{n_frames} structures; criterion `{results['criterion']}`, tolerance tau = {results['tau']:.4g} "
        f"{results['unit']}; operating threshold p* = {results['p_star']:.3f}, certified at risk "
        f"{results['certified_risk']:.1%} (target {results['target_risk']:.1%}) with probability >= "
        f"{1 - results['delta']:.0%} for structures like the calibration ones; "
        f"{results['probe']['fraction_unreliable']:.1%} of structures are unreliable. Positive class: "
        "unreliable; ranking score 1 - p for PROBE, the disagreement for the ensemble. The verdict rows "
        "count structures accepted by p >= p* *and* novelty <= 1 (inside the support).", "",
        "| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods),
    ]
    for key in keys:
        row = [results[m].get(key) for m in methods]
        lines.append(f"| {key} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in row) + " |")
    lines += ["", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(lines)
