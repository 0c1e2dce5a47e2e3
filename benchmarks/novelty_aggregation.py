"""How atom novelties should make a structure's novelty for ranking errors (fit pool only).

The default GMM novelty (:func:`probe_ase.fitting.novelty.fit_novelty`) is fitted on
80 % of the fit pool's in-distribution part (acac: the fit half of
test_MD_300K; ethanol: the fit half of test_MD; three seeds), and scores the
pool's shifted part (acac: train_600K; ethanol: the methanol frames), which
it never saw. For each way of aggregating a structure's atom novelties (the
largest, the mean, the root mean square, the mean of the three largest, the
median) it reports the shift's AUROC (unreliable = positive) and Spearman ρ
against member 0's error, beside the 5-member ensemble's force and energy
std on the same frames (cached by ``novelty_variants.py``)::

    python -m benchmarks.novelty_aggregation --data ../shared/data/acac \\
        --models benchmarks/results/uq-acac/models --cache benchmarks/results/novelty-acac/cache \\
        --out benchmarks/results/novelty-aggregation-acac.json

Labels: force RMSE at 0.1 eV/Å and at the in-distribution errors' 0.8
quantile, energy error at its 0.8 quantile (eV). Evaluation files are never
read. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from benchmarks.common import clean, find_members, load_splits, make_calc, write_json
from benchmarks.environment import environment

from probe_ase import featurize, find_tap

from probe_ase.evaluation import metrics
from probe_ase.model.novelty import NoveltyConfig
from probe_ase.fitting.novelty import fit_novelty

AGGREGATES = {"max": np.max, "mean": np.mean, "rms": lambda a: np.sqrt(np.mean(a**2)),
              "top-3 mean": lambda a: np.sort(a)[-3:].mean(), "median": np.median}
ENSEMBLE = ("ens_force_std", "ens_force_max_std", "ens_energy_std")


def study(data: Path, models: Path, cache: Path, seeds: int) -> dict:
    name, _, pool, pool_in, _, _ = load_splits(data, False)
    shift = pool[len(pool_in):]
    paths = find_members(models)
    ensemble_file = cache / f"ensemble-{name}.npz"
    if not ensemble_file.exists():
        raise SystemExit(f"{ensemble_file}: run novelty_variants.py with this --cache first (it caches the ensemble)")
    ensemble = np.load(ensemble_file)
    with find_tap(make_calc("mace", paths[0])) as tap:
        fs_in = featurize(tap, pool_in, cache_dir=cache, progress=False)
        fs = featurize(tap, shift, cache_dir=cache, progress=False)
    elements = sorted(set(fs_in.numbers.tolist()))
    novelty = []
    for seed in range(seeds):
        fit = np.random.default_rng(seed).permutation(len(pool_in))[: int(0.8 * len(pool_in))]
        model, _ = fit_novelty(fs_in, fit, elements, NoveltyConfig(), seed=seed)
        with torch.no_grad():
            atoms = model(fs.features, fs.numbers).numpy()
        novelty.append([atoms[fs.ptr[k] : fs.ptr[k + 1]] for k in range(len(shift))])
    out = {"dataset": name, "environment": environment(paths[:1]), "n_in": len(pool_in), "n_shift": len(shift), "seeds": seeds, "labels": {}}
    for label, crit, tau in [("force_rmse 0.1 eV/Å", "force_rmse", 0.1),
                             ("force_rmse q0.8", "force_rmse", float(np.quantile(fs_in.error("force_rmse"), 0.8))),
                             ("energy q0.8", "energy", float(np.quantile(fs_in.error("energy"), 0.8)))]:
        error = fs.error(crit)
        bad = error > tau
        rows = {m: {"auroc": [metrics.auroc(bad, ensemble[f"shift/{m}"])],
                    "spearman": [metrics.spearman(ensemble[f"shift/{m}"], error)]} for m in ENSEMBLE}
        for agg, f in AGGREGATES.items():
            scores = [np.array([f(a) for a in per_seed]) for per_seed in novelty]
            rows[f"novelty, {agg}"] = {"auroc": [metrics.auroc(bad, s) for s in scores],
                                       "spearman": [metrics.spearman(s, error) for s in scores]}
        out["labels"][label] = {"tau": tau, "fraction_bad": float(bad.mean()), "rows": rows}
    return out


def table(res: dict) -> str:
    f = lambda xs: "—" if not np.isfinite(xs).all() else "/".join(f"{x:.3f}" for x in xs)  # noqa: E731
    lines = [f"{res['dataset']}: novelty fitted on {res['n_in']} in-distribution frames (80 %, seeds 0-{res['seeds'] - 1}), "
             f"scored on {res['n_shift']} shifted frames; AUROC and Spearman ρ per seed",
             "| label | score | AUROC | ρ |", "|---|---|---|---|"]
    for label, entry in res["labels"].items():
        for score, r in entry["rows"].items():
            lines.append(f"| {label} ({entry['fraction_bad']:.0%} bad) | {score} | {f(r['auroc'])} | {f(r['spearman'])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder of shared/data")
    ap.add_argument("--models", required=True, type=Path, help="folder with uq_quality.py's MACE members (member 0 is used)")
    ap.add_argument("--cache", required=True, type=Path, help="novelty_variants.py's cache folder (features, ensemble)")
    ap.add_argument("--out", required=True, type=Path, help="JSON file to write")
    ap.add_argument("--seeds", type=int, default=3, help="novelty fits on seeds 0 .. seeds-1 (default 3)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = study(args.data.resolve(), args.models.resolve(), args.cache, args.seeds)
    res["command"] = " ".join(["novelty_aggregation.py"] + (argv or sys.argv[1:]))
    print(table(res))
    write_json(args.out, clean(res))


if __name__ == "__main__":
    main()
