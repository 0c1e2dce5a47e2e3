"""How much the default head's novelty weight and verdict move with the fit seed (fit pool only).

For one data folder (acac or ethanol, as in ``novelty_variants.py``) the
default ``fit_probe`` fits on the fit pool's in-distribution part once per
seed (``TrainConfig(seed=s)``: the train / validation / calibration split,
the head's initialisation and shuffling, the fold heads' folds), for each of
``novelty_variants.py``'s labels; each head then scores the pool's shifted
part, which it never saw::

    python benchmarks/weight_seeds.py --data ../shared/data/acac \\
        --models benchmarks/results/uq-acac/models --cache benchmarks/results/novelty-acac/cache \\
        --out benchmarks/results/weight-seeds-acac.json

Per seed: the fitted novelty weight, the calibration-split AUROC, the shift's
AUROC and Spearman of 1 - p against the error, and the verdict's accepted
shifted frames and their risk (fraction outside tolerance). Evaluation files
are never read. Prints a table and writes JSON; units: eV/Å, eV.

``--weight-fit shared-ratio`` swaps the library's weight fit (one novelty
coefficient shared by the main and auxiliary labels, converted with the main
label's slope) for a variant tried and not kept: one *weight*, in each
logit's own standard deviations, shared by all labels
(:func:`fit_weight_shared_ratio`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import uq_quality as uq
from novelty_variants import LABELS
from tqdm import tqdm

import numpy as np
from scipy.optimize import minimize

import probe_ase.fit
from probe_ase import LabelError, TrainConfig, featurize, find_tap, fit_probe
from probe_ase.evaluation import metrics
from probe_ase.fileio import atomic_write
from probe_ase.model.graph import radius_graph
from probe_ase.model.novelty import NOVELTY_FLOOR, NoveltyConfig, PENALTIES


def fit_weight_shared_ratio(logits: np.ndarray, novelty: np.ndarray, reliable: np.ndarray) -> float:
    """Variant of :func:`probe_ase.fitting.novelty.fit_logit_weight` (tried, not kept).

    Logistic regression of each label column ``k`` on ``a_k (z_k - v log n) + b_k``,
    ``z_k`` the column's logit in its own standard deviations, one ``v >= 0``
    shared by all columns and ``a_k >= 0``; returns ``v`` in the main logit's
    units. The library instead shares ``lam`` in ``a_k z_k + b_k - lam log n``
    and divides by the main column's slope.
    """
    y = np.asarray(reliable, dtype=float).reshape(len(novelty), -1)
    z = np.asarray(logits, dtype=float).reshape(len(novelty), -1)
    scale = z.std(0)
    keep = (y.min(0) < y.max(0)) & (scale > 1e-12)
    if not keep[0]:
        return 0.0
    y, z, scale = y[:, keep], z[:, keep], scale[keep]
    z = (z - z.mean(0)) / scale
    log_n = np.log(np.maximum(np.asarray(novelty, dtype=float), NOVELTY_FLOOR))[:, None]
    k = z.shape[1]

    def nll(params: np.ndarray) -> float:
        s = params[:k] * (z - params[-1] * log_n) + params[k:2 * k]
        return float(np.sum(np.logaddexp(0, s) - y * s))

    bounds = [(0, None)] * k + [(None, None)] * k + [(0, None)]
    fits = [minimize(nll, np.concatenate([np.ones(k), np.zeros(k), [v0]]), method="L-BFGS-B", bounds=bounds)
            for v0 in (0.0, 1.0, 3.0)]  # bilinear: a few starts
    best = min(fits, key=lambda r: r.fun).x
    return float(best[-1] * scale[0]) if best[0] > 0 else 0.0


WEIGHT_FITS = {"shared-coefficient": probe_ase.fit.fit_logit_weight, "shared-ratio": fit_weight_shared_ratio}


def study(data: Path, models: Path, cache: Path, seeds: int, novelty: NoveltyConfig = NoveltyConfig()) -> dict:
    name, _, pool, pool_in, _, _ = uq.load_splits(data, False)
    shift = pool[len(pool_in):]
    paths = sorted(models.glob("ssmace_c16_L1_e20_*_s[0-4].model"))
    if not paths:
        raise SystemExit(f"{models}: no MACE member of uq_quality.py")
    calc = uq.make_calc("mace", paths[0])
    with find_tap(calc) as tap:
        fs = featurize(tap, shift, cache_dir=cache, progress=False)
    out = {"dataset": name, "environment": uq.environment(paths[:1]), "n_in": len(pool_in), "n_shift": len(shift), "penalty": novelty.penalty,
           "weight_fit": next(k for k, f in WEIGHT_FITS.items() if f is probe_ase.fit.fit_logit_weight), "labels": {}}
    for label, crit, threshold, quantile in LABELS:
        rows, error = [], fs.error(crit)
        for seed in tqdm(range(seeds), desc=f"{name} {label}", unit="fit"):
            t0 = time.perf_counter()
            try:
                probe = fit_probe(calc, pool_in, crit, threshold=threshold, quantile=quantile,
                                  train=TrainConfig(seed=seed), novelty=novelty, cache_dir=cache, progress=False)
            except LabelError as exc:  # e.g. too few unreliable in-distribution frames at this tolerance
                rows = str(exc)
                break
            bad = error > probe.meta.tau
            scores = probe.predict(fs.features, fs.numbers, fs.ptr,
                                   [radius_graph(a, probe.meta.config.cutoff) for a in shift])
            reliable = probe.verdict(scores.reliability, scores.novelty)[0]
            rows.append({
                "seed": seed, "weight": probe.meta.novelty_weight, "cal_auroc": probe.report["auroc"],
                "shift_fraction_bad": float(bad.mean()),
                "shift_auroc": metrics.auroc(bad, 1 - scores.reliability) if 0 < bad.sum() < len(bad) else None,
                "shift_spearman": metrics.spearman(1 - scores.reliability, error),
                "verdict_accepted": int(reliable.sum()),
                "verdict_risk": float(bad[reliable].mean()) if reliable.any() else None,
                "certified_risk": probe.meta.certified_risk, "seconds": time.perf_counter() - t0,
            })
        out["labels"][label] = rows
    return out


def table(res: dict) -> str:
    f = lambda x: "—" if x is None else f"{x:.3g}"  # noqa: E731
    lines = [f"{res['dataset']}: {res['n_in']} in-distribution fit frames, {res['n_shift']} shifted; logit penalty "
             f"on the {res['penalty']} atom novelty; weight fit {res['weight_fit']}",
             "| label | seed | weight | cal AUROC | shift AUROC | shift ρ | verdict accepted | verdict risk |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rows in res["labels"].items():
        if isinstance(rows, str):
            lines.append(f"| {label} | skipped: {rows} | | | | | | |")
            continue
        for r in rows:
            lines.append(f"| {label} | {r['seed']} | {f(r['weight'])} | {f(r['cal_auroc'])} | {f(r['shift_auroc'])} | "
                         f"{f(r['shift_spearman'])} | {r['verdict_accepted']} | {f(r['verdict_risk'])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder of shared/data")
    ap.add_argument("--models", required=True, type=Path, help="folder with uq_quality.py's MACE members (member 0 is used)")
    ap.add_argument("--cache", required=True, type=Path, help="feature cache folder (e.g. novelty_variants.py's)")
    ap.add_argument("--out", required=True, type=Path, help="JSON file to write")
    ap.add_argument("--seeds", type=int, default=5, help="fit seeds 0 .. seeds-1 (default 5)")
    ap.add_argument("--penalty", choices=PENALTIES, default=NoveltyConfig().penalty,
                    help="which structure novelty lowers the logit: mean or largest atom novelty (NoveltyConfig.penalty)")
    ap.add_argument("--weight-fit", choices=list(WEIGHT_FITS), default="shared-coefficient",
                    help="how the novelty weight is fitted: the library's (default) or the variant tried and not kept")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    probe_ase.fit.fit_logit_weight = WEIGHT_FITS[args.weight_fit]  # this process only: fit_probe looks it up there
    res = study(args.data.resolve(), args.models.resolve(), args.cache, args.seeds, NoveltyConfig(penalty=args.penalty))
    res["command"] = " ".join(["weight_seeds.py"] + (argv or sys.argv[1:]))
    print(table(res))
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(uq.clean(res), indent=1)))


if __name__ == "__main__":
    main()
