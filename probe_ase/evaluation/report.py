"""The evaluation report: figures (ROC, risk-coverage, scatter, reliability diagram, importance maps,
per-atom ROC) and ``report.md``, each written atomically. :mod:`probe_ase.evaluation.evaluate` computes what they show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms

from probe_ase.evaluation import metrics
from probe_ase.fileio import atomic_write
from probe_ase.fitting.labels import UNITS


def atom_roc(curves: dict[str, np.ndarray], unreliable: np.ndarray, atom_tau: float, out: Path) -> str:
    """ROC of per-atom scores against ``|ΔF_i| > atom_tau``; returns the file name."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.subplots()
    if unreliable.any() and not unreliable.all():
        for label, score in curves.items():
            fpr, tpr, _ = roc_curve(unreliable, score)
            ax.plot(fpr, tpr, label=f"{label} (AUROC {metrics.auroc(unreliable, score):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="random")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate (unreliable atoms caught)",
           title=f"Per-atom ROC, |ΔF_i| > {atom_tau:.3g} eV/Å")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "atom_roc.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return "atom_roc.png"


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


def importance_png(frame: Atoms, index: int, out: Path) -> str:
    """The structure seen along z, atoms coloured by PROBE importance."""
    from ase.visualize.plot import plot_atoms
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch

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


def fallback_note(results: dict) -> str:
    """How p* was chosen when the target risk could not be certified (empty when it was)."""
    if results["certified_risk"] <= results["target_risk"]:
        return ""
    if results.get("fallback") == "target":
        return (f"; the target could not be certified: p* is the loosest threshold certified at "
                f"{results['certified_risk']:.1%} whose calibration risk is at most the target (fallback 'target')")
    return (f"; the target could not be certified: p* is the strictest threshold certified at "
            f"{results['certified_risk']:.1%} (fallback 'strictest')")


def markdown(results: dict, figures: list[str], n_frames: int) -> str:
    """The text of ``report.md``: headline, a metric table over the methods, the per-atom section, figures."""
    keys = ["auroc", "auprc", "spearman", "aurc", "excess_aurc", "risk_at_50", "risk_at_80", "risk_at_90",
            "ece", "brier", "coverage_at_p_star", "risk_at_p_star", "out_of_support", "verdict_coverage",
            "verdict_risk"]
    methods = [m for m in results if isinstance(results[m], dict) and m not in ("atoms", "force_error")]
    lines = [
        "# probe-ase evaluation", "",
        f"{n_frames} structures; criterion `{results['criterion']}`, tolerance tau = {results['tau']:.4g} "
        f"{results['unit']}; operating threshold p* = {results['p_star']:.3f}, certified at risk "
        f"{results['certified_risk']:.1%} (target {results['target_risk']:.1%}) with probability >= "
        f"{1 - results['delta']:.0%} for structures like the calibration ones"
        f"{' (cross-fitted calibration: approximately)' if results.get('calibration') == 'crossfit' else ''}"
        f"{fallback_note(results)}; "
        f"{results['probe']['fraction_unreliable']:.1%} of structures are unreliable. Positive class: "
        "unreliable; ranking score 1 - p for PROBE, the disagreement for the ensemble. The verdict rows "
        "count structures accepted by p >= p* *and* novelty <= 1 (inside the support).", "",
        "| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods),
    ]
    for key in keys:
        row = [results[m].get(key) for m in methods]
        lines.append(f"| {key} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in row) + " |")
    lines += force_error_markdown(results.get("force_error"))
    lines += atom_markdown(results.get("atoms"))
    lines += ["", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(lines)


def force_error_markdown(agreement: dict | None) -> list[str]:
    """Lines of the report's predicted-force-error section (none for heads without the atom-error regression)."""
    if not agreement:
        return []
    rows = [("Spearman vs the true error", "spearman"), ("fraction of true errors above the prediction",
                                                        "fraction_above"), ("median true / predicted", "median_ratio")]
    return ["", "## Predicted force errors", "",
            "The head's `force_error` (force RMSE, eV/Å) and `atom_force_error` (abs(ΔF_i), eV/Å) against the "
            "true errors: median-like estimates, so about half of the true errors lie above them.", "",
            "| metric | structures: force_error | atoms: atom_force_error |", "|---|---|---|",
            *[f"| {name} | {agreement['structures'][key]:.3f} | {agreement['atoms'][key]:.3f} |" for name, key in rows]]


def atom_markdown(atoms: dict | None) -> list[str]:
    """Lines of the report's per-atom section (none without per-atom results)."""
    if not atoms:
        return []
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["", "## Per-atom", ""]
    if "auroc" in atoms:
        ens = atoms.get("ensemble", {})
        lines += [f"{atoms['n_atoms']} atoms; unreliable: |ΔF_i| > {atoms['atom_tau']:.3g} eV/Å "
                  f"({atoms['fraction_unreliable']:.1%} of atoms); atom p* = {atoms['atom_p_star']:.3f} "
                  "(empirical on the calibration atoms, not certified).", "",
                  "| metric | PROBE atom_reliability | ensemble atom force std |", "|---|---|---|",
                  f"| AUROC | {fmt(atoms['auroc'])} | {fmt(ens.get('auroc'))} |",
                  f"| Spearman vs abs(ΔF_i) | {fmt(atoms['spearman'])} | {fmt(ens.get('spearman'))} |",
                  f"| coverage at atom p* | {fmt(atoms['coverage_at_p_star'])} | — |",
                  f"| risk at atom p* | {fmt(atoms['risk_at_p_star'])} | — |", ""]
    lines += [f"Does the attention importance point at the worst atoms? Over {atoms['n_unreliable_structures']} "
              f"unreliable structures: mean Spearman of importance vs abs(ΔF_i) {fmt(atoms['importance_spearman'])}; "
              f"the most important atom is among the three worst in {fmt(atoms['importance_top_is_top3_worst'])} "
              "of them."]
    return lines
