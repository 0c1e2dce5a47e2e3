"""Choose the novelty term on the fit pool's own leave-shift-out split (never on evaluation files).

For one data folder (acac or ethanol, as in ``uq_quality.py``) the fit pool
is split by what it contains: the in-distribution part (acac: the fit half of
test_MD_300K; ethanol: the fit half of test_MD) fits a PROBE head exactly as
``fit_probe`` does (with the 200 epochs and patience 25 these results ran with); the pool's shifted part (acac: train_600K; ethanol: the
methanol frames of train_eth_meth) plays the unseen shift. For each novelty
variant the verdict's threshold is certified on the in-distribution
calibration split (Learn-then-Test, eligibility = inside that variant's
support), then applied to the shifted part::

    python -m benchmarks.novelty_variants --data ../shared/data/acac \\
        --models benchmarks/results/uq-acac/models --out benchmarks/results/novelty-acac

Variants (all per element, structure novelty = the largest atom novelty, unit
and support radius from 5-fold out-of-fold distances as in
:func:`probe_ase.fitting.novelty.fit_novelty`):

* ``gmm<k>``: Mahalanobis distance to the nearest of ``k`` Gaussian components;
* ``layers``: one Gaussian per tapped interaction layer, the largest of the
  per-layer scaled distances;
* ``knn<k>``: Euclidean distance to the ``k``-th nearest fit atom in
  per-element standardised features;

each with support radius at quantile ``q`` of the held-out fit structures'
novelty (``q`` = 1: the farthest one).

Novelty in the probability (``NoveltyConfig(logit_weight=...)``, ``FitOptions(weight_folds=...)``):
the head is fitted with the novelty weight on the logit fitted on cross-fitted
out-of-fold logits (the default), with it fitted on the validation split alone
(``weight_folds=0``), and without it, (a) on the
in-distribution part (calibration-split and shifted-part AUROC / Spearman,
and each one's operating point on the shift) and (b) on the whole fit pool as
``uq_quality.py``'s original protocol fits it (calibration-split AUROC /
Spearman). Both read only the fit pool. The ensemble's thresholds (mean and
max force std, energy std; 5 members) are certified the same way on the
in-distribution part (40 % fixes the grid, 60 % calibrates). Writes
``results.json`` and ``results.md`` into ``--out``; units: eV/Å, eV.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks import uq_quality as uq
from benchmarks.environment import environment

from benchmarks.common import LEGACY_OPTIONS, clean, find_members, fit, fmt, load_splits, make_calc, write_json

from probe_ase.evaluation import metrics
from probe_ase.taps import find_tap
from probe_ase.fitting.certify import certify
from probe_ase.fitting.data import featurize
from probe_ase.exceptions import LabelError
from probe_ase.fileio import atomic_write
from probe_ase.fitting.train import TrainConfig
from probe_ase.fitting.split import split_indices
from probe_ase.model.graph import radius_graph
from probe_ase.model.novelty import NoveltyConfig, structure_novelty
from probe_ase.verdict import judge
from probe_ase.fitting.novelty import fit_novelty

#: (name, criterion, absolute tolerance in eV/Å or eV, or quantile of the in-distribution errors), as in uq_quality
LABELS = [("force_rmse 0.1 eV/Å", "force_rmse", 0.1, None), ("energy 43 meV", "energy", 0.043, None),
          ("force_rmse q0.8", "force_rmse", None, 0.8), ("energy q0.8", "energy", None, 0.8)]
QUANTILES = (1.0, 0.99, 0.95, 0.9, 0.8)


def rows_of(ptr, structures):
    return np.concatenate([np.arange(ptr[k], ptr[k + 1]) for k in structures])


def sub_ptr(ptr, structures):
    return np.cumsum([0] + [ptr[k + 1] - ptr[k] for k in structures])


class Knn:
    """k-th nearest fit atom of the same element, per-element standardised features (raw distance)."""

    def __init__(self, k: int):
        self.k = k

    def fit(self, x, z):
        from sklearn.neighbors import NearestNeighbors

        self.models = {}
        for e in np.unique(z):
            xe = x[z == e]
            mean, std = xe.mean(0), xe.std(0) + 1e-8
            self.models[e] = (mean, std, NearestNeighbors(n_neighbors=self.k).fit((xe - mean) / std))
        return self

    def distances(self, x, z):
        d = np.full(len(x), np.inf)
        for e, (mean, std, nn) in self.models.items():
            m = z == e
            if m.any():
                d[m] = nn.kneighbors((x[m] - mean) / std)[0][:, -1]
        return d


class Layers:
    """One Gaussian per element and tapped layer; the largest of the per-layer distances, each in its median unit."""

    def __init__(self, widths):
        self.bounds = np.cumsum([0] + list(widths))

    def fit(self, x, z):
        self.parts = []
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            stats = {}
            for e in np.unique(z):
                xe = x[z == e, a:b]
                mean, cov = xe.mean(0), np.cov(xe, rowvar=False) + 1e-3 * np.diag(xe.var(0) + 1e-8)
                stats[e] = (mean, np.linalg.cholesky(np.linalg.inv(cov)))
            d = self._raw(stats, x[:, a:b], z)
            scale = {e: np.median(d[z == e]) for e in stats}
            self.parts.append((a, b, stats, scale))
        return self

    @staticmethod
    def _raw(stats, x, z):
        d = np.full(len(x), np.inf)
        for e, (mean, chol) in stats.items():
            m = z == e
            if m.any():
                d[m] = np.linalg.norm((x[m] - mean) @ chol, axis=1)
        return d

    def distances(self, x, z):
        out = np.zeros(len(x))
        for a, b, stats, scale in self.parts:
            d = self._raw(stats, x[:, a:b], z)
            out = np.maximum(out, d / np.array([scale.get(e, np.inf) for e in z]))
        return out


def oof_scaled(model_factory, x, z, ptr, fit_structures, folds=5, seed=0):
    """Out-of-fold scaled atom distances of the fit structures, and a scorer for new atoms (same scale, radius 1)."""
    fit_structures = np.asarray(fit_structures)
    fold_of = np.random.default_rng(seed).permutation(len(fit_structures)) % folds
    rows = [np.arange(ptr[k], ptr[k + 1]) for k in fit_structures]
    oof = np.empty(len(x))
    for f in range(folds):
        tr = np.concatenate([rows[i] for i in np.flatnonzero(fold_of != f)])
        te = np.concatenate([rows[i] for i in np.flatnonzero(fold_of == f)])
        oof[te] = model_factory().fit(x[tr], z[tr]).distances(x[te], z[te])
    all_rows = np.concatenate(rows)
    unit = {e: max(np.median(oof[all_rows][z[all_rows] == e]), 1e-12) for e in np.unique(z[all_rows])}
    per_structure = np.array([(oof[r] / np.array([unit[e] for e in z[r]])).max() for r in rows])
    final = model_factory().fit(x[all_rows], z[all_rows])

    def score(xs, zs, ptr_s):
        d = final.distances(xs, zs) / np.array([unit.get(e, np.inf) for e in zs])
        return np.array([d[ptr_s[k]:ptr_s[k + 1]].max() for k in range(len(ptr_s) - 1)])

    return per_structure, score


def ranking(p, bad, error):
    """AUROC (unreliable = positive) and Spearman ρ of 1 - p against the error."""
    return {"auroc": metrics.auroc(bad, 1 - p), "spearman": metrics.spearman(1 - p, error)}


def nov_of(probe, fs):
    """Structure novelty of a feature set under ``probe``'s novelty model (documented scale)."""
    with torch.no_grad():
        return structure_novelty(probe.novelty(fs.features, fs.numbers), fs.ptr)


#: how the novelty weight on the logit is fitted: out-of-fold (default), validation split only, not at all
#: (fit options, NoveltyConfig knobs beyond FitOptions) of each
WEIGHTINGS = {"with": (LEGACY_OPTIONS, {}), "validation": (replace(LEGACY_OPTIONS, weight_folds=0), {}),
              "without": (LEGACY_OPTIONS, {"logit_weight": False})}


def verdict(probe, p, novelty):
    """The verdict at ``probe``'s p* on reliabilities ``p`` and structure novelties ``novelty``."""
    return judge(p, novelty, probe.p_star).reliable


def whole_pool_ranking(calc, pool, crit, threshold, quantile, target_risk, delta, cache):
    """The original protocol's fit (whole pool), for each of :data:`WEIGHTINGS`: calibration-split ranking."""
    out = {}
    for tag, (options, novelty) in WEIGHTINGS.items():
        try:
            probe = fit(calc, pool, options, novelty=novelty, criterion=crit, tolerance=threshold, quantile=quantile,
                        target_risk=target_risk, delta=delta, cache_dir=cache, progress=False)
        except LabelError as exc:
            return {"skipped": str(exc)}
        with find_tap(calc) as tap:
            fs = featurize(tap, pool, cache_dir=cache, progress=False)
        err = fs.error(crit)
        labels = (err <= probe.meta.tau).astype(np.int64)
        cal = split_indices(labels, TrainConfig())[2]
        frames = [pool[k] for k in cal]
        rows = torch.as_tensor(rows_of(fs.ptr, cal))
        p = probe.predict(fs.features[rows], fs.numbers[rows], sub_ptr(fs.ptr, cal),
                          [radius_graph(a, probe.meta.config.cutoff) for a in frames]).reliability
        out[tag] = {**ranking(p, labels[cal] == 0, err[cal]), "weight": probe.meta.calibration.novelty_weight}
    return out


def outcome(accept, bad):
    good = ~bad
    return {"n": int(len(accept)), "accepted": int(accept.sum()), "coverage": float(accept.mean()),
            "risk": float(bad[accept].mean()) if accept.any() else float("nan"),
            "coverage_of_reliable": float(accept[good].mean()) if good.any() else float("nan")}


def study(data: Path, models: Path, cache: Path, target_risk: float, delta: float) -> dict:
    name, train, pool, pool_in, evals, e0s = load_splits(data, False)
    shift = pool[len(pool_in):]
    paths = find_members(models, seeds="[0-4]", count=5)
    calc0 = make_calc("mace", paths[0])
    with find_tap(calc0) as tap:
        fs_in = featurize(tap, pool_in, cache_dir=cache, progress=False)
        fs_sh = featurize(tap, shift, cache_dir=cache, progress=False)
        widths = [tap.layer_width(layer) for layer in tap.layers]
    ens_file = cache / f"ensemble-{name}.npz"
    if ens_file.exists():
        ens = dict(np.load(ens_file))
    else:
        a, b = uq.ensemble_disagreement("mace", paths, pool_in), uq.ensemble_disagreement("mace", paths, shift)
        keys = ("ens_force_std", "ens_force_max_std", "ens_energy_std")
        ens = {**{f"in/{k}": a[k] for k in keys}, **{f"shift/{k}": b[k] for k in keys}}
        np.savez(ens_file, **ens)
    x_in, z_in = fs_in.features.double().numpy(), fs_in.numbers.numpy()
    x_sh, z_sh = fs_sh.features.double().numpy(), fs_sh.numbers.numpy()
    out = {"dataset": name, "environment": environment(paths), "n_in": len(pool_in), "n_shift": len(shift), "labels": {}}
    for label, crit, threshold, quantile in LABELS:
        err_in, err_sh = fs_in.error(crit), fs_sh.error(crit)
        if not (np.isfinite(err_in).all() and np.isfinite(err_sh).all()):
            continue
        t0 = time.perf_counter()
        try:
            probe = fit(calc0, pool_in, LEGACY_OPTIONS, criterion=crit, tolerance=threshold, quantile=quantile,
                        target_risk=target_risk, delta=delta, cache_dir=cache, progress=False)
        except LabelError as exc:  # e.g. acac energy: the 300 K frames are all within 43 meV
            out["labels"][label] = {"skipped": str(exc)}
            print(f"{name} {label}: skipped ({exc})", flush=True)
            continue
        tau = probe.meta.tau
        labels = (err_in <= tau).astype(np.int64)
        tr, val, cal = split_indices(labels, TrainConfig())
        cutoff = probe.meta.config.cutoff
        p_in = probe.predict(fs_in.features, fs_in.numbers, fs_in.ptr, [radius_graph(a, cutoff) for a in pool_in]).reliability
        p_sh = probe.predict(fs_sh.features, fs_sh.numbers, fs_sh.ptr, [radius_graph(a, cutoff) for a in shift]).reliability
        bad_in, bad_sh = err_in > tau, err_sh > tau
        fit_s = np.concatenate([tr, val])
        variants = {}
        for k in (1, 2, 4, 8):
            variants[f"gmm{k}"] = ("gmm", k)
        variants["layers"] = ("layers", widths)
        for k in (1, 5):
            variants[f"knn{k}"] = ("knn", k)
        rows = {}
        cal_ptr, sh_ptr = sub_ptr(fs_in.ptr, cal), fs_sh.ptr
        for vname, (kind, arg) in variants.items():
            if kind == "gmm":
                model, held = fit_novelty(fs_in, fit_s, probe.meta.elements, NoveltyConfig(components=arg))
                radius = float(model.radius)
                held = structure_novelty(held, sub_ptr(fs_in.ptr, fit_s)) * radius  # unit scale: 1 = largest held out
                with torch.no_grad():
                    nov_cal = structure_novelty(model(fs_in.features[torch.as_tensor(rows_of(fs_in.ptr, cal))],
                                                      fs_in.numbers[torch.as_tensor(rows_of(fs_in.ptr, cal))]), cal_ptr) * radius
                    nov_sh = structure_novelty(model(fs_sh.features, fs_sh.numbers), sh_ptr) * radius
            else:
                factory = (lambda a=arg: Knn(a)) if kind == "knn" else (lambda a=arg: Layers(a))
                held, score = oof_scaled(factory, x_in, z_in, fs_in.ptr, fit_s)
                nov_cal = score(x_in[rows_of(fs_in.ptr, cal)], z_in[rows_of(fs_in.ptr, cal)], cal_ptr)
                nov_sh = score(x_sh, z_sh, sh_ptr)
            held_val = held[len(tr):]
            for q in QUANTILES:
                r = float(np.quantile(held, q))
                cert = certify(p_in[cal], bad_in[cal], p_in[val], target_risk, delta,
                               cal_eligible=nov_cal <= r, val_eligible=held_val <= r)
                acc_sh = (p_sh >= cert.threshold) & (nov_sh <= r)
                acc_cal = (p_in[cal] >= cert.threshold) & (nov_cal <= r)
                rows[f"{vname} q={q}"] = {"certified_risk": cert.risk, "shift": outcome(acc_sh, bad_sh),
                                          "in_cal": outcome(acc_cal, bad_in[cal]),
                                          "shift_out_of_support": float(np.mean(nov_sh > r)),
                                          "auroc_shift": metrics.auroc(~bad_sh, -nov_sh)}
        rows["p only"] = {"certified_risk": probe.meta.certified_risk,
                          "shift": outcome(p_sh >= probe.p_star, bad_sh),
                          "in_cal": outcome(p_in[cal] >= probe.p_star, bad_in[cal])}
        rows["verdict"] = {"certified_risk": probe.meta.certified_risk,
                           "shift": outcome(verdict(probe, p_sh, nov_of(probe, fs_sh)), bad_sh),
                           "in_cal": outcome(verdict(probe, p_in[cal], nov_of(probe, fs_in)[cal]), bad_in[cal])}
        weight = {"with": {"weight": probe.meta.calibration.novelty_weight, "cal": ranking(p_in[cal], bad_in[cal], err_in[cal]),
                           "shift": ranking(p_sh, bad_sh, err_sh)}}
        for tag, what in (("validation", "validation-split novelty weight"), ("without", "no novelty weight")):
            options, novelty = WEIGHTINGS[tag]
            other = fit(calc0, pool_in, options, novelty=novelty, criterion=crit, tolerance=threshold,
                        quantile=quantile, target_risk=target_risk, delta=delta, cache_dir=cache, progress=False)
            q_in, q_sh = (other.predict(fs.features, fs.numbers, fs.ptr,
                                        [radius_graph(a, cutoff) for a in frames]).reliability
                          for fs, frames in ((fs_in, pool_in), (fs_sh, shift)))
            rows[f"p only, {what}"] = {"certified_risk": other.meta.certified_risk,
                                       "shift": outcome(q_sh >= other.p_star, bad_sh),
                                       "in_cal": outcome(q_in[cal] >= other.p_star, bad_in[cal])}
            rows[f"verdict, {what}"] = {"certified_risk": other.meta.certified_risk,
                                        "shift": outcome(verdict(other, q_sh, nov_of(other, fs_sh)), bad_sh),
                                        "in_cal": outcome(verdict(other, q_in[cal], nov_of(other, fs_in)[cal]),
                                                          bad_in[cal])}
            weight[tag] = {"weight": other.meta.calibration.novelty_weight, "cal": ranking(q_in[cal], bad_in[cal], err_in[cal]),
                           "shift": ranking(q_sh, bad_sh, err_sh)}
        grid_part = np.random.default_rng(0).uniform(size=len(pool_in)) < 0.4
        for m in ("ens_force_std", "ens_force_max_std", "ens_energy_std"):
            s_in, s_sh = -ens[f"in/{m}"], -ens[f"shift/{m}"]
            cert = certify(s_in[~grid_part], bad_in[~grid_part], s_in[grid_part], target_risk, delta)
            rows[m] = {"certified_risk": cert.risk, "shift": outcome(s_sh >= cert.threshold, bad_sh),
                       "in_cal": outcome(s_in[~grid_part] >= cert.threshold, bad_in[~grid_part])}
        out["labels"][label] = {"tau": tau, "p_star": probe.p_star, "shift_fraction_bad": float(bad_sh.mean()),
                               "seconds": time.perf_counter() - t0, "rows": rows, "logit_weight": weight,
                               "logit_weight_whole_pool": whole_pool_ranking(calc0, pool, crit, threshold, quantile,
                                                                            target_risk, delta, cache)}
        print(table(name, label, out["labels"][label]), flush=True)
    return out


def weight_table(name, crit, entry) -> str:
    """Ranking with and without the novelty weight on the logit (fit pool only)."""
    w, whole = entry["logit_weight"], entry["logit_weight_whole_pool"]
    tags = list(WEIGHTINGS)

    def cells(entries: dict, split: str | None) -> str:
        got = [entries[t] if split is None else entries[t][split] for t in tags]
        return " | ".join(" / ".join(fmt(g[m]) for g in got) for m in ("auroc", "spearman"))

    weights = " / ".join(f"{w[t]['weight']:.3g}" for t in tags[:2])
    lines = [f"\n#### {name}, {crit}: novelty in the probability (weight out-of-fold / validation {weights}, "
             "in-distribution fit)",
             "| fit | split | AUROC out-of-fold / validation / no weight | Spearman out-of-fold / validation / no weight |",
             "|---|---|---|---|"]
    for split in ("cal", "shift"):
        lines.append(f"| in-distribution part | {split} | {cells(w, split)} |")
    if "skipped" in whole:
        lines.append(f"| whole pool | cal | skipped: {whole['skipped']} | |")
    else:
        weights = " / ".join(f"{whole[t]['weight']:.3g}" for t in tags[:2])
        lines.append(f"| whole pool (weight {weights}) | cal | {cells(whole, None)} |")
    return "\n".join(lines)


def table(name, crit, entry) -> str:
    lines = [f"\n### {name}, {crit} (tau {entry['tau']:.4g}), shift {entry['shift_fraction_bad']:.0%} bad",
             "| variant | certified risk | shift coverage | shift risk | shift cov. of reliable | shift AUROC | "
             "in-dist cal coverage | in-dist cal risk |", "|---|---|---|---|---|---|---|---|"]
    for v, r in entry["rows"].items():
        s, c = r["shift"], r["in_cal"]
        lines.append(f"| {v} | {r['certified_risk']:.3f} | {s['coverage']:.2f} ({s['accepted']}) | "
                     f"{fmt(s['risk'])} | {fmt(s['coverage_of_reliable'], 2)} | {fmt(r.get('auroc_shift'))} | "
                     f"{c['coverage']:.2f} | {fmt(c['risk'])} |")
    return "\n".join(lines) + "\n" + weight_table(name, crit, entry)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder of shared/data")
    ap.add_argument("--models", required=True, type=Path, help="folder with uq_quality.py's 5 MACE members")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--target-risk", type=float, default=0.05, help="target risk, fraction 0-1 (default 0.05)")
    ap.add_argument("--delta", type=float, default=0.1, help="certificate failure probability (default 0.1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    cache.mkdir(exist_ok=True)
    res = study(args.data.resolve(), args.models.resolve(), cache, args.target_risk, args.delta)
    res["command"] = " ".join(["novelty_variants.py"] + (argv or sys.argv[1:]))
    write_json(args.out / "results.json", clean(res))
    md = "\n".join(table(res["dataset"], c, e) if "rows" in e else f"\n### {res['dataset']}, {c}: skipped: {e['skipped']}"
                   for c, e in res["labels"].items())
    atomic_write(args.out / "results.md", lambda tmp: tmp.write_text(f"# Novelty variants, {res['dataset']}\n\n"
                                                                       f"`{res['command']}`\n{md}\n"))


if __name__ == "__main__":
    main()
