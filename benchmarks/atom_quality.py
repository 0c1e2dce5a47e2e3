"""Per-atom reliability on real DFT data: PROBE's atom_reliability vs the ensemble's per-atom force std.

Same data, splits and backbones as ``uq_quality.py`` (acac or ethanol, member 0
deployed, 5 members for the ensemble; the backbones are read from ``--models``
or trained there)::

    python -m benchmarks.atom_quality --data ../shared/data/acac \\
        --models benchmarks/results/uq-acac/models --out benchmarks/results/atoms-acac

For each backbone and atom-label regime (fixed before any run: top 10 % of the
fit pool's atoms unreliable, ``atom_quantile=0.9``; and an absolute
``atom_tolerance=0.15`` eV/Å), PROBE is fitted on member 0 over the fit pool
(structure criterion force RMSE at 0.1 eV/Å, default head, 200 epochs and
patience 25, the training these results ran with) and every atom of
every evaluation file is scored. Per file and pooled: per-atom AUROC (positive:
|ΔF_i| above the atom tolerance) and Spearman against |ΔF_i| for
``1 - atom_reliability`` and for the ensemble's per-atom force standard
deviation (norm over components of the std over members, eV/Å); coverage and
risk at the head's atom p*; and whether the attention importance points at the
worst atoms (mean within-structure Spearman of importance vs |ΔF_i| over the
structures whose force RMSE exceeds 0.1 eV/Å, and the share of them whose most
important atom is among the three worst). Heads that regress atom errors (the
default for this force criterion) also give their predicted ``atom_force_error``
(|ΔF_i|, eV/Å) and ``force_error`` (force RMSE, eV/Å): Spearman against the
true errors beside the ensemble's per-atom std and its mean over atoms, AUROC
at the atom tolerance, how often the truth exceeds the prediction and the
median ratio. Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

warnings.filterwarnings("ignore")

from benchmarks.environment import environment, file_digest
from benchmarks.common import LEGACY_OPTIONS, load_splits, make_calc, train_mace, train_spk, write_json

from probe_ase import fit_probe

from probe_ase.evaluation import metrics
from probe_ase.fitting.data import reference_forces
from probe_ase.evaluation.evaluate import ensemble_scores
from probe_ase.exceptions import LabelError
from probe_ase.fileio import atomic_write
from probe_ase.fitting.labels import atom_errors
from probe_ase.scoring import score_frames
from probe_ase.taps import find_tap

REGIMES = {"top 10 % of fit atoms (atom_quantile 0.9)": {"atom_quantile": 0.9},
           "absolute 0.15 eV/Å": {"atom_tolerance": 0.15},
           "default head, no atom labels (importance only)": {}}
STRUCTURE_TAU = 0.1  # eV/Å, force RMSE


def ensemble_atom_std(kind: str, paths: list[Path], frames: list, cache: Path, key: str) -> np.ndarray:
    """Per-atom force std over members (eV/Å), all atoms of ``frames`` concatenated; cached."""
    path = cache / f"atom_std_{kind}_{key}.npy"
    if path.exists():
        return np.load(path)
    if kind == "mace":
        _, std = ensemble_scores(make_calc("mace", paths), frames)
    else:
        forces = []
        for p in paths:
            with find_tap(make_calc(kind, p)) as tap:
                forces.append(np.concatenate([np.asarray(x.forces) for x in tap.predict(frames, batch_size=32)]))
        std = np.linalg.norm(np.stack(forces).std(axis=0), axis=1)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, std)
    return std


def file_row(scored: list, frames: list, std: np.ndarray | None, atom_tau: float | None,
             atom_p_star: float | None) -> dict:
    """Per-atom metrics of one file (see the module docstring)."""
    error = np.concatenate([atom_errors(s.arrays["mlip_forces"], reference_forces(f)) for s, f in zip(scored, frames)])
    importance = np.concatenate([s.arrays["atom_importance"] for s in scored])
    ptr = np.cumsum([0] + [len(f) for f in frames])
    within, top = [], []
    for k, (s, f) in enumerate(zip(scored, frames)):
        a, b = ptr[k], ptr[k + 1]
        if np.sqrt(np.mean((s.arrays["mlip_forces"] - reference_forces(f)) ** 2)) > STRUCTURE_TAU:
            within.append(metrics.spearman(importance[a:b], error[a:b]))
            top.append(int(np.argmax(importance[a:b])) in np.argsort(-error[a:b])[:3])
    row = {"n_atoms": int(len(error)), "n_unreliable_structures": len(within),
           "importance_spearman": float(np.nanmean(within)) if within else float("nan"),
           "importance_top_in_top3_worst": float(np.mean(top)) if top else float("nan")}
    if std is not None:
        row["ensemble_spearman"] = metrics.spearman(std, error)
    if "atom_force_error" in scored[0].arrays:  # the head's predicted |ΔF_i| (eV/Å), and the force RMSE from it
        predicted = np.concatenate([s.arrays["atom_force_error"] for s in scored])
        rmse = np.array([np.sqrt(np.mean((s.arrays["mlip_forces"] - reference_forces(f)) ** 2))
                         for s, f in zip(scored, frames)])
        row |= {"predicted_spearman": metrics.spearman(predicted, error),
                "predicted_fraction_above": float(np.mean(error > predicted)),
                "predicted_median_ratio": float(np.median(error / predicted)),
                "structure_predicted_spearman": metrics.spearman(np.array([s.info["force_error"] for s in scored]),
                                                                 rmse)}
        if std is not None:
            mean_std = np.array([std[ptr[k]:ptr[k + 1]].mean() for k in range(len(frames))])
            row["structure_ensemble_spearman"] = metrics.spearman(mean_std, rmse)
        if atom_tau is not None:
            row["predicted_auroc"] = metrics.auroc(error > atom_tau, predicted)
    if atom_tau is None:  # a head without the per-atom logit: the importance and predicted-error checks only
        return row
    p = np.concatenate([s.arrays["atom_reliability"] for s in scored])
    bad = error > atom_tau
    accepted = p >= atom_p_star
    row |= {"fraction_unreliable": float(bad.mean()),
            "probe_auroc": metrics.auroc(bad, 1 - p), "probe_spearman": metrics.spearman(1 - p, error),
            "coverage_at_atom_p_star": float(accepted.mean()),
            "risk_at_atom_p_star": float(bad[accepted].mean()) if accepted.any() else float("nan")}
    if std is not None:
        row["ensemble_auroc"] = metrics.auroc(bad, std)
    return row


def run_backbone(kind: str, paths: list[Path], pool: list, evals: dict, cache: Path) -> dict:
    calc0 = make_calc(kind, paths[0])
    out: dict = {}
    stds = {name: ensemble_atom_std(kind, paths, frames, cache, name.replace(" ", "_")) if len(paths) > 1 else None
            for name, frames in tqdm(evals.items(), desc="ensemble", unit="file")}
    for regime, labels in REGIMES.items():
        t0 = time.perf_counter()
        try:
            probe = fit_probe(calc0, pool, criterion="force_rmse", tolerance=STRUCTURE_TAU, cache_dir=cache,
                              progress=False, options=LEGACY_OPTIONS, **labels)
        except LabelError as err:
            out[regime] = {"error": str(err)}
            continue
        m = probe.meta
        rows, pooled = {}, {"scored": [], "frames": [], "std": []}
        with find_tap(calc0, m.layers) as tap:
            for name, frames in evals.items():
                scored = list(score_frames(probe, tap, frames))
                rows[name] = file_row(scored, frames, stds[name], m.atom_tau, m.atom_p_star)
                pooled["scored"] += scored
                pooled["frames"] += frames
                if stds[name] is not None:
                    pooled["std"].append(stds[name])
        std = np.concatenate(pooled["std"]) if pooled["std"] else None
        rows["pooled"] = file_row(pooled["scored"], pooled["frames"], std, m.atom_tau, m.atom_p_star)
        out[regime] = {"atom_tau": m.atom_tau, "atom_p_star": m.atom_p_star, "calibration": m.report.get("atoms"),
                       "fit_seconds": time.perf_counter() - t0, "files": rows}
        print(f"  {kind} {regime}: pooled", {k: round(v, 3) for k, v in rows["pooled"].items() if "auroc" in k
                                              or "importance" in k})
    return out


def markdown(res: dict) -> str:
    def f(v):
        return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"

    lines = [f"# Per-atom reliability: {res['dataset']}", "", f"Command: `{res['command']}`", "",
             "Positive class: atoms whose force-error norm |ΔF_i| of member 0 exceeds the atom tolerance. "
             f"PROBE scores `1 - atom_reliability`; the ensemble its per-atom force std over {res['members']} members "
             "(— with one member: no ensemble). "
             "Importance: within-structure Spearman of attention importance vs |ΔF_i| over structures with force "
             f"RMSE > {STRUCTURE_TAU} eV/Å, and how often the most important atom is among the three worst. "
             "Every row measured; none dropped.", ""]
    if "provenance" in res:  # a file that joins backbones from two runs says which is which
        lines += [f"Provenance: {res['provenance']}", ""]
    for kind, regimes in res["backbones"].items():
        for regime, entry in regimes.items():
            lines += [f"## {kind}, {regime}", ""]
            if "error" in entry:
                lines += [f"Not fittable: {entry['error']}", ""]
                continue
            cal = entry["calibration"]
            if cal is None:
                lines += ["| file | importance Spearman | top-importance in 3 worst (n) |", "|---|---|---|"]
                lines += [f"| {name} | {f(r['importance_spearman'])} | {f(r['importance_top_in_top3_worst'])} "
                          f"({r['n_unreliable_structures']}) |" for name, r in entry["files"].items()]
                lines.append("")
                if "predicted_spearman" in entry["files"]["pooled"]:
                    lines += predicted_table(entry["files"], f)
                continue
            lines += [f"Atom tolerance {entry['atom_tau']:.3f} eV/Å, atom p* {entry['atom_p_star']:.3f} (empirical); "
                      f"calibration atoms AUROC {cal['auroc']:.3f}.", "",
                      "| file | atoms | unreliable | AUROC PROBE | AUROC ensemble | Spearman PROBE | Spearman ensemble "
                      "| coverage / risk at atom p* | importance Spearman | top-importance in 3 worst (n) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for name, r in entry["files"].items():
                lines.append(f"| {name} | {r['n_atoms']} | {r['fraction_unreliable']:.1%} | {f(r['probe_auroc'])} | "
                             f"{f(r.get('ensemble_auroc'))} | {f(r['probe_spearman'])} | {f(r.get('ensemble_spearman'))} "
                             f"| {f(r['coverage_at_atom_p_star'])} / {f(r['risk_at_atom_p_star'])} | "
                             f"{f(r['importance_spearman'])} | {f(r['importance_top_in_top3_worst'])} "
                             f"({r['n_unreliable_structures']}) |")
            lines.append("")
            if "predicted_spearman" in entry["files"]["pooled"]:
                lines += predicted_table(entry["files"], f)
    return "\n".join(lines)


def predicted_table(files: dict, f) -> list[str]:
    """Rows comparing the head's predicted force errors (``atom_force_error``, ``force_error``) with the ensemble."""
    lines = ["Predicted force errors (`atom_force_error` |ΔF_i| and `force_error` force RMSE, eV/Å) against the "
             "ensemble's per-atom force std and its mean over atoms (Spearman vs the true errors; AUROC for the "
             "atom tolerance; how often the true |ΔF_i| exceeds the prediction, and the median true / predicted):", "",
             "| file | atoms: Spearman predicted | Spearman ensemble | AUROC predicted | AUROC ensemble "
             "| true > predicted | median true / predicted | structures: Spearman predicted | Spearman ensemble |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in files.items():
        lines.append(f"| {name} | {f(r['predicted_spearman'])} | {f(r.get('ensemble_spearman'))} | "
                     f"{f(r.get('predicted_auroc'))} | {f(r.get('ensemble_auroc'))} | {f(r['predicted_fraction_above'])} "
                     f"| {f(r['predicted_median_ratio'])} | {f(r['structure_predicted_spearman'])} | "
                     f"{f(r.get('structure_ensemble_spearman'))} |")
    return lines + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder (../shared/data/...)")
    ap.add_argument("--models", required=True, type=Path, help="backbone folder (as uq_quality.py --models)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--backbones", nargs="+", default=["mace"], choices=["mace", "painn"])
    ap.add_argument("--members", type=int, default=5, help="ensemble members (trained when missing)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    name, train, pool, _, evals, e0s = load_splits(args.data.resolve(), quick=False)
    evals = {k: v for k, v in evals.items() if all(reference_forces(a) is not None for a in v)}
    res = {"dataset": name, "command": " ".join(["atom_quality.py"] + (argv or sys.argv[1:])), "members": args.members,
           "environment": environment(), "backbones": {}}
    for kind in args.backbones:
        paths = [train_mace(train, e0s, args.models, 16, 1, 20, seed, False) if kind == "mace"
                 else train_spk(train, e0s, args.models, "painn", 32, 25, seed, False) for seed in range(args.members)]
        res["environment"]["models"].update({Path(m).name: file_digest(m) for m in paths})
        res["backbones"][kind] = run_backbone(kind, paths, pool, evals, args.out / "cache")
        res["wall_seconds"] = time.perf_counter() - start
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", res, indent=2)
        atomic_write(args.out / "results.md", lambda tmp: tmp.write_text(markdown(res)))
    print(f"wrote {args.out / 'results.md'} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
