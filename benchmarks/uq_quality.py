"""UQ quality benchmark: PROBE vs ensemble disagreement vs latent distance on real DFT data.

Follows ``DESIGN.md`` §5 for one data folder (acac or ethanol from the
BOTNet-datasets collection, detected by the files present)::

    python -m benchmarks.uq_quality --data ../shared/data/acac --out benchmarks/results/uq-acac
    python -m benchmarks.uq_quality --data ../shared/data/acac --quick --out /tmp/uq-quick

Steps (units: eV, eV/Å, Å; tables print meV/atom and meV/Å):

1. **Backbones**, trained on the in-distribution training file only
   (acac ``train_300K.xyz``; ethanol ``train.xyz``), ``--members`` of each
   (seeds 0..N-1), cached under ``OUT/models`` (``--retrain`` forces):

   * MACE with mace-torch's own trainer (``mace_run_train`` in a subprocess,
     as :func:`probe_ase.al.retrain.run_mace_train` does), float32, 32 channels,
     max_L 1, 2 interactions, correlation 3, r_max 5 Å, E0s from
     ``isolated_atoms.xyz``, ``--epochs`` epochs (default 30); ``--quick``:
     8 channels, 3 epochs, 100 training frames.
   * SchNetPack PaiNN (``--spk-rep``), 32 features, 2 interactions, cutoff 5 Å,
     ``--spk-epochs`` epochs (default 25; quick: 8 features, 3 epochs),
     trained with schnetpack's own ``AtomisticTask`` and a pytorch-lightning
     ``Trainer`` (see :func:`train_spk`).

2. **Splits** (fixed seed 0 for the halves): acac fit pool = half of
   test_MD_300K + train_600K, evaluation = other half of test_MD_300K,
   test_MD_600K, test_H_transfer, test_dihedral; ethanol fit pool = half of
   test_MD + methanol frames of train_eth_meth, evaluation = other half of
   test_MD, methanol frames of test_eth_meth, test_H_removal, test_norm_mode_*.

3. **PROBE** (:func:`probe_ase.fit_probe` with its default ``FitOptions``:
   150 epochs, patience 20, seed 0; default head: auxiliary quantile
   targets 0.3/0.5/0.7/0.9, chosen on the fit pool's own splits (design
   decisions); ``--aux-quantiles`` / ``--no-atom-error`` change it, fitted through
   :func:`probe_ase.fitting.pipeline.fit_spec`) on member 0 over the fit pool, for
   two label regimes (absolute: force RMSE 0.1 eV/Å, |ΔE| 0.043 eV;
   quantile: top 20 % of the pool unreliable) and two criteria (``force_rmse``
   on files with reference forces, ``energy`` everywhere).

4. **Baselines on the same frames**, all predicting member 0's error (the
   deployed model): ensemble energy std per atom, mean and max per-atom force
   std (MACE: ``MACECalculator(model_paths=[...])`` committee results, as in
   :func:`probe_ase.evaluation.evaluate.ensemble_scores`; SchNetPack: the members' own
   batched predictions); latent distance (max over atoms of the Euclidean
   distance of the atom's standardised member-0 features to its nearest
   fit-pool atom of the same element, sklearn ``NearestNeighbors``); random
   (seeded uniform); oracle (the error itself).

5. **Metrics** per evaluation file and pooled (:func:`probe_ase.evaluation.metrics.summary`:
   AUROC, AUPRC, Spearman, AURC, excess AURC, risk at 50/80/90 % coverage;
   ECE and Brier for PROBE only), and cost per structure relative to one
   backbone call (single-structure calls, medians).

6. **Scaling**: PROBE (quantile regime) for MACE member-0-style backbones of three
   widths (4/8/16 channels, the main width's model reused), one row each (``--no-scaling`` skips).

Writes ``results.json``, ``results.md``, ``plots/<backbone>_<regime>_<criterion>/``
(ROC, risk-coverage, PROBE probability vs error, reliability diagram) and
``scores-<backbone>.npz`` (every method's per-frame score, member 0's errors
and each operating point's acceptance: what ``paired_bootstrap.py`` resamples)
into ``--out``, each file atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

os.environ.setdefault("PYTHONWARNINGS", "ignore")
import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.common import (clean, fit, fmt, has_forces, load_splits, make_calc, study_configs,  # noqa: E402
                               train_mace, train_spk, write_json)
from benchmarks.environment import environment, file_digest  # noqa: E402
from probe_ase import FitOptions  # noqa: E402
from probe_ase.evaluation import metrics  # noqa: E402
from probe_ase.evaluation.report import plot_evaluation  # noqa: E402
from probe_ase.exceptions import LabelError  # noqa: E402
from probe_ase.fileio import atomic_write  # noqa: E402
from probe_ase.fitting.data import featurize, reference_energy, reference_forces  # noqa: E402
from probe_ase.fitting.labels import structure_error  # noqa: E402
from probe_ase.model.graph import radius_graph  # noqa: E402
from probe_ase.model.head import HeadConfig  # noqa: E402
from probe_ase.taps import find_tap  # noqa: E402

REGIMES = {"absolute": {"force_rmse": 0.1, "energy": 0.043}, "quantile": 0.8}
CRITERIA = ("force_rmse", "energy")
METHODS_ORDER = ["PROBE", "ens_force_std", "ens_force_max_std", "ens_energy_std", "latent_distance", "random", "oracle"]


# --------------------------------------------------------------------------- scoring
def member_pass(calc, frames, batch_size=32, desc="backbone") -> tuple[np.ndarray, list, torch.Tensor, np.ndarray]:
    """One tapped pass: energies (eV), forces (eV/Å), features (all atoms), ptr."""
    with find_tap(calc) as tap:
        preds = list(tqdm(tap.predict(frames, batch_size=batch_size), total=len(frames), desc=desc, unit="frame", leave=False))
    energies = np.array([p.energy for p in preds])
    forces = [np.asarray(p.forces, float) for p in preds]
    feats = torch.cat([p.features for p in preds])
    ptr = np.cumsum([0] + [len(a) for a in frames])
    return energies, forces, feats, ptr


def errors_of(frames, energies, forces) -> dict[str, np.ndarray]:
    out = {}
    for c in CRITERIA:
        vals = []
        for a, e, f in zip(frames, energies, forces):
            ref_f = reference_forces(a)
            if c == "force_rmse" and ref_f is None:
                vals.append(np.nan)
            else:
                vals.append(structure_error(c, e, reference_energy(a), f, ref_f))
        out[c] = np.array(vals)
    return out


def ensemble_disagreement(kind, paths, frames, energies0=None) -> dict[str, np.ndarray]:
    """Energy std per atom (eV/atom), mean and max per-atom force std (eV/Å); also the committee mean."""
    if kind == "mace":
        committee = make_calc("mace", paths)
        e_all, f_all = [], []
        for atoms in tqdm(frames, desc="committee", unit="frame", leave=False):
            atoms = atoms.copy()
            atoms.calc = committee
            atoms.get_potential_energy()
            e_all.append(np.asarray(committee.results["energy_comm"]))
            f_all.append(np.asarray(committee.results["forces_comm"]))
    else:
        per_member = []
        for p in tqdm(paths, desc="members", unit="model", leave=False):
            e, f, _, _ = member_pass(make_calc(kind, p), frames, desc="member")
            per_member.append((e, f))
        e_all = [np.array([m[0][k] for m in per_member]) for k in range(len(frames))]
        f_all = [np.stack([m[1][k] for m in per_member]) for k in range(len(frames))]
    n = np.array([len(a) for a in frames])
    return {
        "ens_energy_std": np.array([e.std() for e in e_all]) / n,
        "ens_force_std": np.array([np.linalg.norm(f.std(axis=0), axis=1).mean() for f in f_all]),
        "ens_force_max_std": np.array([np.linalg.norm(f.std(axis=0), axis=1).max() for f in f_all]),
        "mean_energy": np.array([e.mean() for e in e_all]),
        "mean_forces": [f.mean(axis=0) for f in f_all],
    }


class LatentDistance:
    """Max over atoms of the distance to the nearest fit-pool atom of the same element (standardised features)."""

    def __init__(self, features: torch.Tensor, numbers: np.ndarray):
        from sklearn.neighbors import NearestNeighbors

        x = features.double().numpy()
        self.mean, self.std = x.mean(0), x.std(0) + 1e-8
        x = (x - self.mean) / self.std
        self.nn = {int(z): NearestNeighbors(n_neighbors=1).fit(x[numbers == z]) for z in np.unique(numbers)}

    def atom_distances(self, features: torch.Tensor, numbers: np.ndarray) -> np.ndarray:
        x = (features.double().numpy() - self.mean) / self.std
        d = np.full(len(x), np.inf)
        for z, nn in self.nn.items():
            mask = numbers == z
            if mask.any():
                d[mask] = nn.kneighbors(x[mask])[0][:, 0]
        return d

    def score(self, features, numbers, ptr) -> np.ndarray:
        d = self.atom_distances(features, numbers)
        return np.array([d[ptr[k]:ptr[k + 1]].max() for k in range(len(ptr) - 1)])


def ranking_p(score: np.ndarray) -> np.ndarray:
    """Monotone decreasing map of a nonnegative score to [0, 1] (ranking metrics only)."""
    score = np.asarray(score, float)
    top = np.nanmax(score) if np.isfinite(score).any() else 1.0
    return 1 - score / (top or 1.0)


def method_summary(name, p_or_score, reliable, error, p_star=None):
    if name == "PROBE":
        return metrics.summary(p_or_score, reliable, error, p_star)
    s = metrics.summary(ranking_p(p_or_score), reliable, error)
    return {k: v for k, v in s.items() if k not in ("ece", "brier")}


# --------------------------------------------------------------------------- cost
def time_cost(kind, member_paths, probe, latent, frames, n=30) -> dict[str, float]:
    """Median single-structure wall time (ms) of backbone, PROBE step, committee, latent; ratios to backbone."""
    from probe_ase import ProbeCalculator

    frames = frames[:n]
    bare = make_calc(kind, member_paths[0])
    wrapped = ProbeCalculator(make_calc(kind, member_paths[0]), probe)
    if kind == "mace":
        committees = [make_calc("mace", member_paths)]
    else:
        committees = [make_calc(kind, p) for p in member_paths]
    t = {"backbone": [], "probe": [], "ensemble": [], "latent_extra": [], "head_only": []}
    tap = find_tap(make_calc(kind, member_paths[0]))
    for atoms in tqdm(frames, desc="timing", unit="frame", leave=False):
        for key, calcs in (("backbone", [bare]), ("probe", [wrapped]), ("ensemble", committees)):
            t0 = time.perf_counter()
            for c in calcs:
                a = atoms.copy()
                a.calc = c
                a.get_forces()
            t[key].append(time.perf_counter() - t0)
        pred = next(tap.predict([atoms], batch_size=1))
        numbers = np.asarray(atoms.numbers)
        t0 = time.perf_counter()
        latent.score(pred.features, numbers, np.array([0, len(atoms)]))
        t["latent_extra"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        probe.predict(pred.features, torch.as_tensor(numbers), np.array([0, len(atoms)]),
                      [radius_graph(atoms, probe.meta.config.cutoff)])
        t["head_only"].append(time.perf_counter() - t0)
    tap.close()
    wrapped.close()
    med = {k: float(np.median(v[1:] if len(v) > 1 else v)) * 1e3 for k, v in t.items()}
    return {"ms": med, "relative": {
        "PROBE": med["probe"] / med["backbone"], "PROBE (head only, extra)": med["head_only"] / med["backbone"],
        "ensemble": med["ensemble"] / med["backbone"],
        "latent_distance": (med["backbone"] + med["latent_extra"]) / med["backbone"],
        "random": 1.0, "oracle": float("nan")}}


# --------------------------------------------------------------------------- main pieces
def probe_options(quick: bool, calibration: str = "split", fallback: str = "strictest", seed: int = 0) -> FitOptions:
    """PROBE's fit options: the defaults (150 epochs, patience 20, seed 0); ``--quick``: 40 epochs, patience 10."""
    return FitOptions(calibration=calibration, fallback=fallback, seed=seed,
                      **({"epochs": 40, "patience": 10} if quick else {}))


def fit_heads(calc, pool, quick, cache, criteria_ok, head: dict, calibration: str = "split",
              fallback: str = "strictest", seed: int = 0):
    """Fitted probes keyed by (regime, criterion); LabelError gives None with the reason.

    ``head``: HeadConfig knobs beyond FitOptions (``aux_quantiles``, ``atom_error``); at their defaults the fit is
    plain :func:`probe_ase.fit_probe`.
    """
    options = probe_options(quick, calibration, fallback, seed)
    probes = {}
    for regime, spec in REGIMES.items():
        for crit in CRITERIA:
            if crit not in criteria_ok:
                continue
            kw = {"tolerance": spec[crit]} if regime == "absolute" else {"quantile": spec}
            try:
                probes[(regime, crit)] = fit(calc, pool, options, head=head, criterion=crit, cache_dir=cache,
                                             progress=True, **kw)
            except LabelError as err:
                probes[(regime, crit)] = str(err)
                tqdm.write(f"  PROBE {regime}/{crit} skipped: {err}")
    return probes


def evaluate_backbone(kind, member_paths, pool, evals, quick, cache, out, head: dict, with_cost=True,
                      pool_in=None, target_risk=0.05, calibration="split", fallback="strictest",
                      arrays: dict[str, np.ndarray] | None = None, fit_seed: int = 0):
    """Every method's metrics on ``evals``; fills ``arrays`` (when given) with the per-frame scores behind them.

    ``arrays`` keys: ``files`` and ``file_of`` (each frame's file), then per
    ``<regime>/<criterion>``: ``error`` (member 0's, NaN where unlabelled),
    ``score/<method>`` (higher: less reliable; PROBE's is ``1 - p``) and,
    for both operating-point protocols, ``operating_point|leave_shift_out/
    accept/<method>`` (booleans).
    """
    calc0 = make_calc(kind, member_paths[0])
    criteria_ok = set(CRITERIA) if has_forces(pool) else {"energy"}
    t0 = time.perf_counter()
    probes = fit_heads(calc0, pool, quick, cache, criteria_ok, head, calibration, fallback, fit_seed)
    t_fit = time.perf_counter() - t0
    with find_tap(calc0) as tap:
        pool_fs = featurize(tap, pool, cache_dir=cache, progress=False)
    latent = LatentDistance(pool_fs.features, pool_fs.numbers.numpy())

    names = list(evals)
    frames = [a for n in names for a in evals[n]]
    file_of = np.concatenate([[i] * len(evals[n]) for i, n in enumerate(names)])
    energies, forces, feats, ptr = member_pass(calc0, frames, desc="member 0 on eval")
    numbers = np.concatenate([a.numbers for a in frames])
    err = errors_of(frames, energies, forces)
    scores = {"latent_distance": latent.score(feats, numbers, ptr),
              "random": np.random.default_rng(0).uniform(size=len(frames))}
    ens = ensemble_disagreement(kind, member_paths, frames) if len(member_paths) > 1 else None
    if ens:
        scores.update({k: ens[k] for k in ("ens_force_std", "ens_force_max_std", "ens_energy_std")})
    graphs: dict[float, list] = {}  # radius graphs by head cutoff (Å)
    if arrays is not None:
        arrays.update(files=np.array(names), file_of=file_of)

    # backbone errors per file (member 0 and ensemble mean)
    bb = {}
    for i, n in enumerate(names):
        idx = np.flatnonzero(file_of == i)
        row = {"frames": len(idx)}
        for label, e_pred, f_pred in [("member0", energies, forces)] + (
                [("ensemble_mean", ens["mean_energy"], ens["mean_forces"])] if ens else []):
            de = np.array([(e_pred[k] - reference_energy(frames[k])) / len(frames[k]) for k in idx])
            row[f"{label}_energy_rmse_meV_atom"] = float(np.sqrt(np.mean(de**2)) * 1e3)
            if has_forces(evals[n]):
                df = np.concatenate([(f_pred[k] - reference_forces(frames[k])).ravel() for k in idx])
                row[f"{label}_force_rmse_meV_A"] = float(np.sqrt(np.mean(df**2)) * 1e3)
        bb[n] = row

    results = {"backbone_errors": bb, "probe_fit_seconds": t_fit, "regimes": {}}
    for (regime, crit), probe in probes.items():
        entry = {"criterion": crit}
        if isinstance(probe, str):
            entry["skipped"] = probe
            results["regimes"].setdefault(regime, {})[crit] = entry
            continue
        cutoff = probe.meta.config.cutoff
        if cutoff not in graphs:
            graphs[cutoff] = [radius_graph(a, cutoff) for a in frames]
        scored = probe.predict(feats.to(probe.head.feature_mean.dtype), torch.as_tensor(numbers), ptr, graphs[cutoff])
        p = scored.reliability
        tau = probe.meta.tau
        entry.update(tau=tau, p_star=probe.p_star, fit_report=probe.meta.report, files={})
        usable = np.isfinite(err[crit])
        file_ids = [i for i, n in enumerate(names) if usable[file_of == i].all()]
        all_scores = {"PROBE": p, **scores, "oracle": err[crit]}
        if arrays is not None:
            arrays[f"{regime}/{crit}/error"] = err[crit]
            arrays.update({f"{regime}/{crit}/score/{m}": 1 - s if m == "PROBE" else s for m, s in all_scores.items()})
        for i in file_ids + [None]:
            mask = usable & ((file_of == i) if i is not None else np.isin(file_of, file_ids))
            e, rel = err[crit][mask], err[crit][mask] <= tau
            res = {m: method_summary(m, s[mask], rel, e, probe.p_star if m == "PROBE" else None)
                   for m, s in all_scores.items()}
            if i is None:
                entry["pooled"] = res
                entry["pooled_files"] = [names[j] for j in file_ids]
                curves = {"PROBE": 1 - p[mask], **{m: s[mask] for m, s in scores.items() if m != "random"}}
                plot_evaluation(curves, p[mask], e, rel, tau, probe.p_star, crit, out / "plots" / f"{kind}_{regime}_{crit}")
            else:
                entry["files"][names[i]] = res
        ood = [j for j in file_ids if "(half)" not in names[j]]  # every file but the in-distribution half
        if ood:
            mask = usable & np.isin(file_of, ood)
            e = err[crit][mask]
            entry["ood_pooled"] = {m: method_summary(m, s[mask], e <= tau, e, probe.p_star if m == "PROBE" else None)
                                   for m, s in all_scores.items()}
            entry["ood_files"] = [names[j] for j in ood]
        results["regimes"].setdefault(regime, {})[crit] = entry
    if pool_in is not None and ens:
        t0 = time.perf_counter()
        results["operating_point"] = operating_points(
            kind, member_paths, calc0, pool, probes, names, frames, file_of, err, scores, feats, numbers, ptr,
            quick, cache, head, target_risk, fallback=fallback, arrays=arrays, prefix="operating_point")
        lso_probes = fit_heads(calc0, pool_in, quick, cache, criteria_ok, head, calibration, fallback, fit_seed)
        shifted = [n for n in names if "(half)" not in n]
        results["leave_shift_out"] = operating_points(
            kind, member_paths, calc0, pool_in, lso_probes, names, frames, file_of, err, scores, feats, numbers, ptr,
            quick, cache, head, target_risk, only_files=shifted, fallback=fallback, arrays=arrays,
            prefix="leave_shift_out")
        results["operating_seconds"] = time.perf_counter() - t0
    if with_cost:
        probe = next((v for v in probes.values() if not isinstance(v, str)), None)
        if probe is not None:
            results["cost"] = time_cost(kind, member_paths, probe, latent, frames, n=15 if quick else 40)
    return results


def pool_scores(kind, member_paths, calc0, pool, cache):
    """Member-0 errors and every baseline's score on fit-pool frames (for choosing their thresholds).

    Latent distance is scored two-fold (each half against the other half's
    atoms): scoring pool frames against an index holding themselves gives 0.
    """
    with find_tap(calc0) as tap:
        fs = featurize(tap, pool, cache_dir=cache, progress=False)
    ens = ensemble_disagreement(kind, member_paths, pool)
    scores = {k: ens[k] for k in ("ens_force_std", "ens_force_max_std", "ens_energy_std")}
    halves = np.arange(len(pool)) % 2
    latent = np.empty(len(pool))
    numbers = fs.numbers.numpy()
    for h in (0, 1):
        idx_fit, idx_score = np.flatnonzero(halves != h), np.flatnonzero(halves == h)
        rows = lambda ids: np.concatenate([np.arange(fs.ptr[k], fs.ptr[k + 1]) for k in ids])  # noqa: E731
        model = LatentDistance(fs.features[rows(idx_fit)], numbers[rows(idx_fit)])
        sub_ptr = np.cumsum([0] + [fs.ptr[k + 1] - fs.ptr[k] for k in idx_score])
        latent[idx_score] = model.score(fs.features[rows(idx_score)], numbers[rows(idx_score)], sub_ptr)
    scores["latent_distance"] = latent
    return fs.errors, scores


def operating_points(kind, member_paths, calc0, pool, probes, names, frames, file_of, err, eval_scores, feats,
                     numbers, ptr, quick, cache, head, target_risk, delta=0.1, only_files=None, fallback="strictest",
                     arrays=None, prefix=""):
    """The number a user lives with: each method's threshold chosen on ``pool``, then coverage and risk per file.

    PROBE's threshold is its own certified p* (Learn-then-Test on its
    calibration split), once on the probability alone and once with the
    novelty support (the verdict). Each baseline's threshold is certified the
    same way (:func:`probe_ase.fitting.certify.certify`, target ``target_risk``,
    ``delta``, ``fallback``) on its scores over the pool: 40 % of the pool fixes the grid,
    60 % calibrates (the baselines need no training split, so they get more
    calibration frames than PROBE's 20 %). Each file also gets each score's
    AUROC (how well it ranks that file's frames, whatever the threshold).
    ``arrays`` (when given) gets each method's acceptance of every frame
    under ``<regime>/<criterion>/<prefix>/accept/<method>``.
    """
    from probe_ase.fitting.certify import certify

    pool_err, base_pool = pool_scores(kind, member_paths, calc0, pool, cache)
    rng = np.random.default_rng(0)
    grid_part = rng.uniform(size=len(pool)) < 0.4
    files = [i for i, n in enumerate(names) if only_files is None or n in only_files]
    out = {}
    for (regime, crit), probe in probes.items():
        if isinstance(probe, str):
            continue
        tau = probe.meta.tau
        bad_pool = pool_err[crit] > tau
        graphs = [radius_graph(a, probe.meta.config.cutoff) for a in frames]
        sc = probe.predict(feats.to(probe.head.feature_mean.dtype), torch.as_tensor(numbers), ptr, graphs)
        rank = {"PROBE (p only)": 1 - sc.reliability, **{m: eval_scores[m] for m in base_pool}}  # higher: less reliable
        accept = {"PROBE (p only)": sc.reliability >= probe.p_star,
                  "PROBE verdict (p and support)": probe.verdict(sc).reliable}
        certified = {"PROBE (p only)": probe.meta.certified_risk, "PROBE verdict (p and support)": probe.meta.certified_risk}
        for m, pool_score in base_pool.items():
            cert = certify(-pool_score[~grid_part], bad_pool[~grid_part], -pool_score[grid_part], target_risk, delta,
                           fallback=fallback)
            accept[m] = -eval_scores[m] >= cert.threshold
            certified[m] = cert.risk
        if arrays is not None:
            arrays.update({f"{regime}/{crit}/{prefix}/accept/{m}": a for m, a in accept.items()})
        entry = {"tau": tau, "target_risk": target_risk, "delta": delta, "certified_risk": certified,
                 "p_star": probe.p_star, "novelty_weight": probe.meta.calibration.novelty_weight, "files": {}}
        usable = np.isfinite(err[crit])
        for i in files + [None]:
            mask = usable & ((file_of == i) if i is not None else np.isin(file_of, files))
            if not mask.any():
                continue
            good = err[crit][mask] <= tau
            row = {}
            for m, acc in accept.items():
                a = acc[mask]
                row[m] = {"n": int(mask.sum()), "accepted": int(a.sum()), "coverage": float(a.mean()),
                          "risk": float(np.mean(~good[a])) if a.any() else float("nan"),
                          "coverage_of_reliable": float(a[good].mean()) if good.any() else float("nan")}
                if m in rank:  # how well the score ranks this file's frames, whatever the threshold
                    row[m]["auroc"] = metrics.auroc(~good, rank[m][mask])  # NaN: one class only
            entry["files"]["pooled" if i is None else names[i]] = row
        out[f"{regime}/{crit}"] = entry
    return out


def scaling_rows(train, e0s, pool, evals, models, quick, epochs, retrain, cache, main_path, main_channels, head):
    rows = []
    sizes = [4, 8, 16]
    for ch in tqdm(sizes, desc="scaling", unit="size"):
        path = main_path if ch == main_channels else train_mace(train, e0s, models, ch, 1, epochs, 0, retrain)
        res = evaluate_backbone("mace", [path], pool, evals, quick, cache, Path(cache).parent / "scaling" / f"c{ch}", head,
                                with_cost=False)
        calc = make_calc("mace", path)
        row = {"channels": ch, "max_L": 1, "params": int(sum(p.numel() for p in calc.models[0].parameters()))}
        force_rows = [v.get("member0_force_rmse_meV_A") for v in res["backbone_errors"].values()]
        row["force_rmse_meV_A_by_file"] = force_rows
        for crit in CRITERIA:
            e = res["regimes"].get("quantile", {}).get(crit, {})
            if "pooled" in e:
                row[f"{crit}_auroc"] = e["pooled"]["PROBE"]["auroc"]
                row[f"{crit}_spearman"] = e["pooled"]["PROBE"]["spearman"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report
def summary_table(res: dict) -> list[str]:
    """One row per backbone, regime and criterion: PROBE vs the best ensemble score vs latent distance."""
    lines = ["## Summary (pooled over the evaluation files; OOD = all but the in-distribution half)", "",
             "Ensemble: the best by pooled AUROC of its energy-std, force-std and max-force-std scores.", "",
             "| backbone | τ | criterion | PROBE AUROC / ρ | ensemble AUROC / ρ | latent AUROC / ρ | "
             "OOD: PROBE AUROC | OOD: ensemble AUROC |", "|---|---|---|---|---|---|---|---|"]
    for kind, r in res["backbones"].items():
        for regime, by_crit in r["regimes"].items():
            for crit, e in by_crit.items():
                if "pooled" not in e:
                    continue
                pooled, ood = e["pooled"], e.get("ood_pooled", {})
                ens = max((m for m in pooled if m.startswith("ens_")), key=lambda m: pooled[m]["auroc"] or 0, default=None)

                def pair(m):
                    return f"{fmt(pooled[m]['auroc'])} / {fmt(pooled[m]['spearman'])}" if m in pooled else "—"

                lines.append(f"| {kind} | {regime} | {crit} | {pair('PROBE')} | {pair(ens)} ({ens}) | "
                             f"{pair('latent_distance')} | {fmt(ood.get('PROBE', {}).get('auroc'))} | "
                             f"{fmt(ood.get(ens, {}).get('auroc'))} |")
    return lines + [""]


def operating_table(kind: str, label: str, entry: dict, title: str) -> list[str]:
    """One table: methods x files, each cell coverage / risk (accepted frames), at the certified thresholds."""
    files = list(entry["files"])
    lines = ["", f"### {kind} {label}: {title}", "",
             f"τ = {entry['tau']:.4g}; target risk {entry['target_risk']:.0%}, δ = {entry['delta']}; PROBE's novelty "
             f"weight {entry.get('novelty_weight', 0.0):.3g}. Cell: coverage / "
             "risk among accepted (accepted frames); the certified risk column is what each threshold's calibration "
             "certified (above the target when the data could not certify it).", "",
             "| method | certified risk | " + " | ".join(files) + " |", "|---|---|" + "---|" * len(files)]
    for m in next(iter(entry["files"].values())):
        cells = []
        for f in files:
            c = entry["files"][f][m]
            cells.append(f"{fmt(c['coverage'], 2)} / {fmt(c['risk'], 2)} ({c['accepted']})")
        lines.append(f"| {m} | {fmt(entry['certified_risk'][m], 3)} | " + " | ".join(cells) + " |")
    ranked = [m for m in next(iter(entry["files"].values())) if "auroc" in entry["files"][files[0]][m]]
    if ranked:
        lines += ["", "Ranking of each file's frames by the same scores, whatever the threshold (AUROC, unreliable = "
                  "positive; PROBE: 1 - p of this head; —: one class only):", "",
                  "| method | " + " | ".join(files) + " |", "|---|" + "---|" * len(files)]
        lines += [f"| {m} | " + " | ".join(fmt(entry["files"][f][m]["auroc"], 3) for f in files) + " |" for m in ranked]
    return lines


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"# UQ quality on {res['dataset']}", "",
             f"Command: `{s['command']}`  ", f"Wall time: {res['wall_seconds'] / 60:.1f} min on "
             f"{s['threads']} CPU threads. Data: BOTNet-datasets (Kovács, Batatia et al., arXiv:2205.06643).", "",
             f"Settings: {json.dumps({k: v for k, v in s.items() if k != 'command'})}", ""]
    if "provenance" in res:  # a file that joins backbones from two runs says which is which
        lines += [f"Provenance: {res['provenance']}", ""]
    if "environment" in res:  # runs before commit a11cce8 (2026-11-26) did not record it
        env = res["environment"]
        lines += [f"Environment: git {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, Python "
                  f"{env['python']}, " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v) + "; models "
                  "(SHA-256, first 16 hex digits): " + ", ".join(f"{k} {v}" for k, v in env["models"].items()), ""]
    keys = ["auroc", "auprc", "spearman", "aurc", "excess_aurc", "risk_at_50", "risk_at_80", "risk_at_90", "ece", "brier"]
    lines += summary_table(res)
    for kind, r in res["backbones"].items():
        lines += [f"## {kind}", "", "### Backbone test errors (member 0; ensemble mean)", "",
                  "| file | frames | E RMSE meV/atom | F RMSE meV/Å | ens. E RMSE | ens. F RMSE |", "|---|---|---|---|---|---|"]
        for n, row in r["backbone_errors"].items():
            lines.append(f"| {n} | {row['frames']} | {fmt(row.get('member0_energy_rmse_meV_atom'), 1)} | "
                         f"{fmt(row.get('member0_force_rmse_meV_A'), 1)} | {fmt(row.get('ensemble_mean_energy_rmse_meV_atom'), 1)} | "
                         f"{fmt(row.get('ensemble_mean_force_rmse_meV_A'), 1)} |")
        for regime, by_crit in r["regimes"].items():
            for crit, e in by_crit.items():
                lines += ["", f"### {regime} τ, criterion `{crit}`"]
                if "skipped" in e:
                    lines += ["", f"skipped: {e['skipped']}"]
                    continue
                unit = "eV/Å" if crit == "force_rmse" else "eV"
                lines += ["", f"τ = {e['tau']:.4g} {unit}; pooled over {', '.join(e['pooled_files'])} "
                          f"({e['pooled']['PROBE']['n']} frames, {e['pooled']['PROBE']['fraction_unreliable']:.0%} unreliable)", "",
                          "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
                for m in METHODS_ORDER:
                    if m in e["pooled"]:
                        lines.append(f"| {m} | " + " | ".join(fmt(e["pooled"][m].get(k)) for k in keys) + " |")
                files = list(e["files"])
                lines += ["", "Per file, AUROC / Spearman:", "", "| method | " + " | ".join(files) + " |",
                          "|---|" + "---|" * len(files)]
                for m in METHODS_ORDER:
                    if m in e["pooled"]:
                        lines.append(f"| {m} | " + " | ".join(
                            f"{fmt(e['files'][f][m]['auroc'], 2)} / {fmt(e['files'][f][m]['spearman'], 2)}" for f in files) + " |")
        if "cost" in r:
            c = r["cost"]
            lines += ["", "### Cost per structure (single-structure calls, median)", "",
                      f"backbone {c['ms']['backbone']:.1f} ms; PROBE step {c['ms']['probe']:.1f} ms "
                      f"(head alone {c['ms']['head_only']:.2f} ms); ensemble {c['ms']['ensemble']:.1f} ms; "
                      f"latent-distance query {c['ms']['latent_extra']:.2f} ms", "",
                      "| method | cost / backbone call |", "|---|---|"]
            lines += [f"| {k} | {fmt(v, 2)} |" for k, v in c["relative"].items()]
    for kind, r in res["backbones"].items():
        for key, title in (("operating_point", "Operating point: thresholds chosen on the fit pool"),
                           ("leave_shift_out", "Leave-shift-out: head and thresholds from in-distribution frames "
                                               "only, evaluated on every shifted file")):
            for label, entry in r.get(key, {}).items():
                lines += operating_table(kind, label, entry, title)
    if res.get("scaling"):
        lines += ["", "## Scaling: PROBE (quantile τ) vs MACE width (seed 0, max_L 1, 2 interactions)", "",
                  "| channels | params | F RMSE meV/Å per force file | force AUROC | force ρ | energy AUROC | energy ρ |",
                  "|---|---|---|---|---|---|---|"]
        for row in res["scaling"]:
            fr = ", ".join(fmt(v, 0) for v in row["force_rmse_meV_A_by_file"] if v is not None)
            lines.append(f"| {row['channels']} | {row['params']} | {fr} | {fmt(row.get('force_rmse_auroc'))} | "
                         f"{fmt(row.get('force_rmse_spearman'))} | {fmt(row.get('energy_auroc'))} | {fmt(row.get('energy_spearman'))} |")
    lines += ["", "Plots: `plots/<backbone>_<regime>_<criterion>/` (roc, risk_coverage, scatter, reliability_diagram).", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--backbones", nargs="+", default=["mace", "schnetpack"], choices=["mace", "schnetpack"])
    ap.add_argument("--epochs", type=int, default=None, help="MACE epochs (default 20; quick 3)")
    ap.add_argument("--spk-epochs", type=int, default=None, help="SchNetPack epochs (default 25; quick 3)")
    ap.add_argument("--channels", type=int, default=None, help="MACE channels (default 16; quick 8)")
    ap.add_argument("--spk-rep", default="painn", choices=["painn", "schnet"])
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT/results.md from OUT/results.json")
    ap.add_argument("--aux-quantiles", type=float, nargs="*", default=list(HeadConfig().aux_quantiles), metavar="Q",
                    help="auxiliary error-quantile targets of the head (default: HeadConfig's 0.3 0.5 0.7 0.9; "
                         "none: off)")
    ap.add_argument("--no-atom-error", action="store_true",
                    help="PROBE head without the per-atom force-error regression (HeadConfig.atom_error=False; the "
                         "default before commit e78e9a2, 2026-12-03) instead of the default (on for force criteria)")
    ap.add_argument("--models", type=Path, default=None, help="cached backbone folder (default OUT/models)")
    ap.add_argument("--calibration", default="split", choices=["split", "crossfit"],
                    help="PROBE's FitOptions.calibration (default split; crossfit: 5 fold heads, every fit frame "
                         "calibrates once, the mean head deployed)")
    ap.add_argument("--fallback", default="strictest", choices=["strictest", "target"],
                    help="where a method's target risk cannot be certified, which threshold certified at the larger "
                         "risk it gets (FitOptions.fallback, the same for PROBE and every baseline; default strictest)")
    ap.add_argument("--target-risk", type=float, default=0.05,
                    help="target risk (fraction 0-1) for every method's operating threshold (default 0.05)")
    ap.add_argument("--fit-seed", type=int, default=0,
                    help="PROBE's FitOptions.seed (split, initialisation, shuffling; default 0): another seed shows "
                         "how far a row moves with the fit's own randomness")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch / OpenMP threads here and in mace_run_train (default 1: on shared cores more threads "
                         "spin-wait and ran ~50x slower here)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = args.data.resolve()
    out = (args.out or Path("benchmarks/results") / f"uq-{data.name}{'-quick' if args.quick else ''}").resolve()
    if args.render:
        res = json.loads((out / "results.json").read_text())
        atomic_write(out / "results.md", lambda tmp: tmp.write_text(markdown(res)))
        print(f"wrote {out / 'results.md'}")
        return
    models, cache = (args.models or out / "models").resolve(), out / "cache"
    models.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs or (3 if args.quick else 20)
    spk_epochs = args.spk_epochs or (3 if args.quick else 25)
    channels = args.channels or (8 if args.quick else 16)
    width = 8 if args.quick else 32

    # HeadConfig knobs beyond FitOptions; at their defaults PROBE is plain fit_probe
    head = {"aux_quantiles": tuple(args.aux_quantiles), "atom_error": False if args.no_atom_error else None}
    name, train, pool, pool_in, evals, e0s = load_splits(data, args.quick)
    print(f"{name}: {len(train)} training frames, fit pool {len(pool)}, evaluation "
          + ", ".join(f"{k} {len(v)}" for k, v in evals.items()))
    settings = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])), "quick": args.quick,
                "members": args.members, "threads": torch.get_num_threads(),
                "mace": f"mace_run_train, float32, {channels} channels, max_L 1, 2 interactions, correlation 3, "
                        f"r_max 5, {epochs} epochs, batch 10, E0s from isolated_atoms.xyz",
                "schnetpack": f"{args.spk_rep}, {width} features, 2 interactions, cutoff 5, {spk_epochs} epochs, "
                              "schnetpack AtomisticTask + pytorch_lightning Trainer, AdamW lr 1e-3, batch 16, "
                              "loss 0.01 E + 0.99 F MSE, best validation checkpoint",
                "probe_head": asdict(study_configs(probe_options(args.quick), head).head),
                "probe_calibration": args.calibration,
                "threshold_fallback": args.fallback, "split_seed": 0, "fit_seed": args.fit_seed, "n_train": len(train), "n_fit_pool": len(pool),
                "labels": "error of member 0 (the deployed model) for every method"}
    res = {"dataset": name, "settings": settings, "environment": environment(), "backbones": {}, "timings_s": {}}

    for kind in args.backbones:
        t0 = time.perf_counter()
        paths = []
        for seed in tqdm(range(args.members), desc=f"train {kind}", unit="model"):
            if kind == "mace":
                paths.append(train_mace(train, e0s, models, channels, 1, epochs, seed, args.retrain))
            else:
                paths.append(train_spk(train, e0s, models, args.spk_rep, width, spk_epochs, seed, args.retrain))
        res["timings_s"][f"{kind}_train"] = time.perf_counter() - t0
        res["environment"]["models"].update({Path(m).name: file_digest(m) for m in paths})
        t0 = time.perf_counter()
        arrays: dict[str, np.ndarray] = {}
        res["backbones"][kind] = evaluate_backbone(kind, paths, pool, evals, args.quick, cache, out, head,
                                                   pool_in=pool_in, target_risk=args.target_risk,
                                                   calibration=args.calibration, fallback=args.fallback,
                                                   arrays=arrays, fit_seed=args.fit_seed)
        atomic_write(out / f"scores-{kind}.npz", lambda tmp: _save_npz(tmp, arrays))
        res["timings_s"][f"{kind}_evaluate"] = time.perf_counter() - t0
        for n, row in res["backbones"][kind]["backbone_errors"].items():
            print(f"  {kind} {n:28s} E RMSE {row['member0_energy_rmse_meV_atom']:8.1f} meV/atom   "
                  f"F RMSE {fmt(row.get('member0_force_rmse_meV_A'), 1):>7} meV/Å")
        if kind == "mace" and not args.no_scaling:
            t0 = time.perf_counter()
            res["scaling"] = scaling_rows(train, e0s, pool, evals, models, args.quick, epochs, args.retrain,
                                          cache, paths[0], channels, head)
            res["timings_s"]["scaling"] = time.perf_counter() - t0
        res["wall_seconds"] = time.perf_counter() - start
        _write(out, res)  # partial results after each backbone
    res["wall_seconds"] = time.perf_counter() - start
    _write(out, res)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} ({res['wall_seconds'] / 60:.1f} min)")


def _save_npz(path: Path, arrays: dict[str, np.ndarray]):
    with open(path, "wb") as fh:  # a handle: savez would append ".npz" to the temporary name
        np.savez_compressed(fh, **arrays)


def _write(out: Path, res: dict):
    write_json(out / "results.json", clean(res))
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(markdown(clean(res))))


if __name__ == "__main__":
    main()
