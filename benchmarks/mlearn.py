"""PROBE on pretrained universal potentials against the disagreement of other pretrained models, on DFT crystals.

    python -m benchmarks.mlearn --data ../shared/data/mlearn
        [--backbones chgnet-0.3.0 7net-0 7net-l3i5] [--companions chgnet-0.2.0 7net-0_22may2024]
        [--target-risk 0.1] [--reps 1000] [--out benchmarks/results/mlearn]

The cells: every frame of ``Si`` and ``Li`` (train and test) and of ``Cu``
and ``Ni`` (test only), VASP PBE, each tagged by ``config_type`` (AIMD-NVT,
Elastic, Vacancy, Surface). Each pretrained model (scored backbones and
companions, all loaded offline by name) runs once over every cell
(``featurize``: its forces, per-atom force-error norms ``|ΔF_i|`` in eV/Å and
tapped features, cached under ``OUT/cache``); every head is fitted on the fit
cells' share of that pass (``fit_spec(..., features=...)``), so no model runs twice. Energies are not compared (VASP's total energies
differ from a universal potential's by an offset per element).

Two protocols, each fitting PROBE on a fit pool and scoring the rest:

* ``random``: half of each element's cells (seed 0) fit, half evaluate;
* ``shift``: fit on AIMD + elastic cells, evaluate on vacancies and surfaces.

Two label regimes: a cell is unreliable when its force RMSE (eV/Å, over all
components) exceeds 0.2 eV/Å (``absolute``), or the fit pool's 80th percentile
(``quantile``); an atom is unreliable when ``|ΔF_i|`` exceeds 0.2 eV/Å or the
fit pool atoms' 80th percentile, in the same regime. PROBE is
``fit_probe`` with its default options and these tolerances (an atom
tolerance too, so the head also gives per-atom reliability), ``target_risk``
0.1.

Methods, all predicting the scored backbone's own error: PROBE (1 - p), the
novelty score alone, the latent distance (largest over atoms of the distance of
an atom's standardised features to the nearest fit-pool atom of its element),
and for every other pretrained model (the heterogeneous foundation ensemble a
user can run) the per-atom force disagreement ``|F_b - F_c|`` (eV/Å), mean and
largest over the cell's atoms. Per element and pooled: AUROC, Spearman ρ
against the force RMSE, AURC; at the operating point for ``target_risk``
(PROBE: its own certified verdict; every other method: a threshold certified
the same way, Learn-then-Test, on its scores over the fit pool), the risk and
coverage on the evaluation cells; paired bootstrap intervals (stratified by
element) of PROBE's AUROC and ρ minus each method's. Per atom: AUROC of PROBE's
atom reliability and of each companion's per-atom disagreement.

Writes ``OUT/results.json``, ``OUT/results.md`` (every row) and
``OUT/auroc.png``; the fitted heads are kept under ``OUT/heads`` (a rerun
reuses them; ``--fit-only`` fits them without evaluating, e.g. one backbone
per process while other models still run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.io import read

from benchmarks.common import fmt, write_results
from benchmarks.environment import environment
from benchmarks.stats import bootstrap
from benchmarks.uq_quality import LatentDistance, ranking_p
from probe_ase import find_tap
from probe_ase.backbones import load_backbone
from probe_ase.evaluation import metrics
from probe_ase.fitting.certify import certify
from probe_ase.fitting.data import FeatureSet, featurize
from probe_ase.fitting.pipeline import fit_spec
from probe_ase.fitting.spec import FitOptions, FitSpec
from probe_ase.model.graph import HeadGraph
from probe_ase.model.probe import Probe

FILES = {"Si": ("train", "test"), "Li": ("train", "test"), "Cu": ("test",), "Ni": ("test",)}
FIT_TYPES, SHIFT_TYPES = ("AIMD-NVT", "Elastic"), ("Vacancy", "Surface")
ABSOLUTE = 0.2  # eV/Å: a cell's force RMSE and an atom's |ΔF_i|
QUANTILE = 0.8


def load_cells(data: Path, limit: int | None = None) -> tuple[list, np.ndarray, np.ndarray]:
    """Every cell (or every ``limit``-th of each file), its element and its config_type."""
    cells, element, kind = [], [], []
    for symbol, parts in FILES.items():
        for part in parts:
            for atoms in read(data / symbol / f"{part}.xyz", f"::{limit or 1}"):
                cells.append(atoms)
                element.append(symbol)
                kind.append(atoms.info["config_type"])
    return cells, np.array(element), np.array(kind)


def model_pass(name: str, cells: list, cache: Path) -> FeatureSet:
    """Model ``name``'s features, forces (eV/Å) and errors on every cell (one backbone pass, cached)."""
    start = time.perf_counter()
    with find_tap(load_backbone(name)) as tap:
        features = featurize(tap, cells, batch_size=4, cache_dir=cache, progress=False)  # CHGNet: ~4 GB at 8
    rmse = features.errors["force_rmse"]
    print(f"{name}: {len(cells)} cells in {time.perf_counter() - start:.0f} s (a cached pass: a few s); force RMSE "
          f"median {np.median(rmse):.3f} eV/Å", flush=True)
    return features


def protocols(element: np.ndarray, kind: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fit and evaluation cells of each protocol."""
    rng = np.random.default_rng(0)
    fit = np.zeros(len(element), bool)
    for symbol in FILES:
        idx = rng.permutation(np.flatnonzero(element == symbol))
        fit[idx[: len(idx) // 2]] = True
    shift_fit = np.isin(kind, FIT_TYPES)
    return {"random": (np.flatnonzero(fit), np.flatnonzero(~fit)),
            "shift": (np.flatnonzero(shift_fit), np.flatnonzero(np.isin(kind, SHIFT_TYPES)))}


def rows_of(ptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Atom rows of cells ``indices`` in arrays concatenated over all cells."""
    return np.concatenate([np.arange(ptr[k], ptr[k + 1]) for k in indices])


def latent_scores(own: FeatureSet, fit: np.ndarray, ev: np.ndarray, folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Latent distance of the evaluation cells to the fit cells, and of each fit cell to the other folds' cells
    (cross-fitted: a fit cell's own atoms would be at distance 0)."""
    def score(reference: np.ndarray, scored: np.ndarray) -> np.ndarray:
        rows = torch.from_numpy(rows_of(own.ptr, reference))
        part = own.subset(scored)
        return LatentDistance(own.features[rows], own.numbers[rows].numpy()).score(part.features,
                                                                                  part.numbers.numpy(), part.ptr)

    fold = np.random.default_rng(0).permutation(len(fit)) % folds
    fit_score = np.empty(len(fit))
    for f in range(folds):
        fit_score[fold == f] = score(fit[fold != f], fit[fold == f])
    return score(fit, ev), fit_score


def scores(backbone: str, passes: dict[str, FeatureSet], cells: list, fit: np.ndarray, ev: np.ndarray,
           probe) -> dict[str, dict]:
    """Every method's score (higher: less reliable) per evaluation and fit cell, and per evaluation atom."""
    own = passes[backbone]
    latent = dict(zip(("eval", "fit"), latent_scores(own, fit, ev)))
    out = {}
    for part, idx in (("eval", ev), ("fit", fit)):
        sub = own.subset(idx)
        sc = probe.predict(sub.features, sub.numbers, sub.ptr,
                           HeadGraph(probe.meta.config.cutoff).frames([cells[k] for k in idx]))
        cell = {"PROBE": 1 - sc.reliability, "novelty": sc.novelty, "latent distance": latent[part]}
        atom = {"PROBE": 1 - sc.atom_reliability} if len(sc.atom_reliability) else {}
        for other, theirs in passes.items():
            if other == backbone:
                continue
            gap = np.linalg.norm(sub.forces - theirs.subset(idx).forces, axis=1)
            cell[f"vs {other} (mean)"] = np.array([gap[sub.ptr[k]:sub.ptr[k + 1]].mean() for k in range(len(idx))])
            cell[f"vs {other} (max)"] = np.array([gap[sub.ptr[k]:sub.ptr[k + 1]].max() for k in range(len(idx))])
            atom[f"vs {other}"] = gap
        out[part] = {"cell": cell, "atom": atom, "verdict": probe.verdict(sc).reliable}
    return out


def evaluate(backbone: str, passes: dict, cells: list, element: np.ndarray, fit: np.ndarray, ev: np.ndarray, probe,
             target_risk: float, reps: int) -> dict:
    """Metrics per element and pooled, operating points and paired intervals of one fitted head."""
    own, tau, atom_tau = passes[backbone], probe.meta.tau, probe.meta.atom_tau
    s = scores(backbone, passes, cells, fit, ev, probe)
    rmse = own.errors["force_rmse"]
    err, bad, bad_fit = rmse[ev], rmse[ev] > tau, rmse[fit] > tau
    grid = np.random.default_rng(0).uniform(size=len(fit)) < 0.4
    accept = {"PROBE": s["eval"]["verdict"]}
    certified = {"PROBE": probe.meta.certified_risk}
    for m, fit_score in s["fit"]["cell"].items():
        if m == "PROBE":
            continue
        cert = certify(-fit_score[~grid], bad_fit[~grid], -fit_score[grid], target_risk, 0.1)
        accept[m], certified[m] = -s["eval"]["cell"][m] >= cert.threshold, cert.risk
    groups = {"pooled": np.ones(len(ev), bool), **{z: element[ev] == z for z in FILES if (element[ev] == z).any()}}
    table = {}
    for m, score in s["eval"]["cell"].items():
        row = {}
        for g, mask in groups.items():
            summary = metrics.summary(ranking_p(score[mask]), ~bad[mask], err[mask])
            a = accept[m][mask]
            row[g] = {k: summary[k] for k in ("n", "fraction_unreliable", "auroc", "spearman", "aurc")} | {
                "coverage": float(a.mean()), "risk": float(np.mean(bad[mask][a])) if a.any() else float("nan"),
                "coverage_of_reliable": float(a[~bad[mask]].mean()) if (~bad[mask]).any() else float("nan")}
        row["certified_risk"] = certified[m]
        if m != "PROBE":
            for name, stat in (("auroc", lambda i, sc=score: metrics.auroc(bad[i], s["eval"]["cell"]["PROBE"][i])
                                - metrics.auroc(bad[i], sc[i])),
                               ("spearman", lambda i, sc=score: metrics.spearman(s["eval"]["cell"]["PROBE"][i], err[i])
                                - metrics.spearman(sc[i], err[i]))):
                iv = bootstrap(stat, len(ev), strata=element[ev], reps=reps, seed=0)
                row[f"probe_minus_{name}"] = {"difference": iv.estimate, "low": iv.low, "high": iv.high}
        table[m] = row
    atom_err = own.atom_errors[rows_of(own.ptr, ev)]
    atoms = {m: metrics.auroc(atom_err > atom_tau, a) for m, a in s["eval"]["atom"].items()}
    return {"tau": tau, "atom_tau": atom_tau, "p_star": probe.p_star, "certified_risk": probe.meta.certified_risk,
            "n_fit": len(fit), "n_eval": len(ev), "methods": table, "atoms_auroc": atoms,
            "atoms_fraction_unreliable": float(np.mean(atom_err > atom_tau))}


def fit_head(backbone: str, frames: list, features: FeatureSet, spec: FitSpec, path: Path) -> Probe:
    """The head ``fit_spec`` fits on these frames' share of the backbone's pass (kept at ``path``.pt)."""
    path = path.parent / f"{path.name}.pt"  # not with_suffix: "chgnet-0.3.0" has a dot
    if path.exists():
        return Probe.load(path)
    with find_tap(load_backbone(backbone)) as tap:
        probe = fit_spec(tap, frames, spec, progress=False, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    probe.save(path)
    return probe


def summary(res: dict) -> list[str]:
    """One line per protocol, regime and backbone: PROBE against the best other model's disagreement."""
    lines = ["| protocol / labels / backbone | unreliable | PROBE AUROC / ρ | best disagreement: AUROC / ρ | "
             "PROBE − it, AUROC [95 %] | latent AUROC | novelty AUROC | PROBE verdict risk / coverage | "
             "disagreement risk / coverage |", "|---|---|---|---|---|---|---|---|---|"]
    for key, entry in res["rows"].items():
        methods = entry["methods"]
        best = max((m for m in methods if m.startswith("vs ")), key=lambda m: methods[m]["pooled"]["auroc"])
        p, b = methods["PROBE"]["pooled"], methods[best]["pooled"]
        d = methods[best]["probe_minus_auroc"]
        lines.append(f"| {key} | {p['fraction_unreliable']:.0%} of {p['n']} | {fmt(p['auroc'])} / {fmt(p['spearman'])} | "
                     f"{best[3:]}: {fmt(b['auroc'])} / {fmt(b['spearman'])} | {d['difference']:+.3f} "
                     f"[{d['low']:+.3f}, {d['high']:+.3f}] | {fmt(methods['latent distance']['pooled']['auroc'])} | "
                     f"{fmt(methods['novelty']['pooled']['auroc'])} | {fmt(p['risk'])} / {fmt(p['coverage'])} | "
                     f"{fmt(b['risk'])} / {fmt(b['coverage'])} |")
    return lines


def markdown(res: dict) -> str:
    """Every row: the summary, then per protocol, regime and backbone each method's pooled and per-element numbers."""
    lines = ["# PROBE on pretrained universal potentials (mlearn crystals, VASP PBE)\n",
             f"`{res['command']}`; commit {res['environment'].get('git_commit')}; target risk "
             f"{res['target_risk']}; unreliable: force RMSE above tau (eV/Å). Intervals: paired bootstrap "
             f"({res['reps']} resamples, stratified by element) of PROBE minus the method.\n", *summary(res)]
    for key, entry in res["rows"].items():
        protocol, regime, backbone = key.split("/")
        pooled = next(iter(entry["methods"].values()))["pooled"]
        lines += [f"\n## {protocol} / {regime} / {backbone}: tau {entry['tau']:.3f} eV/Å, {entry['n_fit']} fit cells, "
                  f"{entry['n_eval']} evaluated ({pooled['fraction_unreliable']:.0%} unreliable); PROBE p* "
                  f"{entry['p_star']:.3f} certified at risk {entry['certified_risk']:.3f}\n",
                  "| method | AUROC | PROBE − it [95 %] | ρ | PROBE − it [95 %] | AURC | risk | coverage | "
                  "coverage of reliable | per element AUROC |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m, row in entry["methods"].items():
            p = row["pooled"]
            diff = {k: (f"{row[k]['difference']:+.3f} [{row[k]['low']:+.3f}, {row[k]['high']:+.3f}]" if k in row
                        else "") for k in ("probe_minus_auroc", "probe_minus_spearman")}
            per = ", ".join(f"{g} {fmt(v['auroc'])}" for g, v in row.items() if g in FILES)
            lines.append(f"| {m} | {fmt(p['auroc'])} | {diff['probe_minus_auroc']} | {fmt(p['spearman'])} | "
                         f"{diff['probe_minus_spearman']} | {fmt(p['aurc'])} | {fmt(p['risk'])} | {fmt(p['coverage'])} | "
                         f"{fmt(p['coverage_of_reliable'])} | {per} |")
        atoms = ", ".join(f"{m} {fmt(v)}" for m, v in entry["atoms_auroc"].items())
        lines.append(f"\nPer atom (|ΔF_i| above {entry['atom_tau']:.3f} eV/Å, "
                     f"{entry['atoms_fraction_unreliable']:.0%} unreliable) AUROC: {atoms}\n")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Pooled AUROC of every method, one panel per protocol and regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k.rsplit("/", 1)[0] for k in res["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rows = {k.rsplit("/", 1)[1]: v for k, v in res["rows"].items() if k.startswith(key + "/")}
        for i, (backbone, entry) in enumerate(rows.items()):
            names = list(entry["methods"])
            values = [entry["methods"][m]["pooled"]["auroc"] for m in names]
            ax.barh(np.arange(len(names)) + 0.8 * i / len(rows), values, height=0.8 / len(rows), label=backbone)
            ax.set_yticks(np.arange(len(names)), names, fontsize=7)
        ax.axvline(0.5, color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("AUROC (force RMSE above tau)")
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Run every model over the cells, fit and score each backbone under each protocol and regime, write results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the mlearn folder (../shared/data/mlearn)")
    ap.add_argument("--backbones", nargs="+", default=["chgnet-0.3.0", "7net-0", "7net-l3i5"],
                    help="pretrained models PROBE is fitted on (each also a companion of the others)")
    ap.add_argument("--companions", nargs="*", default=["chgnet-0.2.0", "7net-0_22may2024"],
                    help="further pretrained models whose disagreement is a baseline")
    ap.add_argument("--target-risk", type=float, default=0.1, help="operating points' target risk (0-1)")
    ap.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--every", type=int, default=None, help="every n-th cell of each file only (a quick check)")
    ap.add_argument("--weight-folds", type=int, default=FitOptions().weight_folds,
                    help="FitOptions.weight_folds (default: the library's; 0: the novelty weight from the validation "
                         "split, about 5x cheaper a fit)")
    ap.add_argument("--fit-only", action="store_true",
                    help="only run the models and fit the heads (kept under OUT/heads); evaluate in a later run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mlearn"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cells, element, kind = load_cells(args.data, args.every)
    names = args.backbones if args.fit_only else [*args.backbones, *args.companions]
    passes = {name: model_pass(name, cells, args.out / "cache") for name in names}
    rows = {}
    for protocol, (fit, ev) in protocols(element, kind).items():
        for regime, labels in (("absolute", {"tolerance": ABSOLUTE, "atom_tolerance": ABSOLUTE}),
                               ("quantile", {"quantile": QUANTILE, "atom_quantile": QUANTILE})):
            for backbone in args.backbones:
                key = f"{protocol}/{regime}/{backbone}"
                spec = FitSpec(target_risk=args.target_risk, options=FitOptions(weight_folds=args.weight_folds), **labels)
                probe = fit_head(backbone, [cells[k] for k in fit], passes[backbone].subset(fit), spec,
                                 args.out / "heads" / key)
                if args.fit_only:
                    continue
                rows[key] = evaluate(backbone, passes, cells, element, fit, ev, probe, args.target_risk, args.reps)
                best = max((m for m in rows[key]["methods"] if m != "PROBE"),
                           key=lambda m: rows[key]["methods"][m]["pooled"]["auroc"])
                print(f"{key}: PROBE AUROC {rows[key]['methods']['PROBE']['pooled']['auroc']:.3f}, best other "
                      f"{best} {rows[key]['methods'][best]['pooled']['auroc']:.3f}", flush=True)
    if args.fit_only:
        return
    res = {"command": "python -m benchmarks.mlearn " + " ".join(sys.argv[1:] if argv is None else argv),
           "environment": environment(), "target_risk": args.target_risk, "reps": args.reps,
           "weight_folds": args.weight_folds,
           "model_force_rmse_median": {k: {z: float(np.median(v.errors["force_rmse"][element == z])) for z in FILES}
                                       for k, v in passes.items()}, "rows": rows}
    write_results(args.out, res, markdown, plot, "auroc.png")


if __name__ == "__main__":
    main()
