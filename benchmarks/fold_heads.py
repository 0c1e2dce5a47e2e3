"""How many fold heads the novelty weight needs: chosen on the fit pool's leave-shift-out split (never evaluation files).

The novelty weight (``FitOptions.weight_folds``, default 5) is fitted on the
out-of-fold logits of fold heads trained on the train + validation split; they
are most of a fit's time (``benchmarks/fit_cost.py``). This study refits the
default head with ``weight_folds`` K in ``--folds`` (0: the validation split,
no extra heads) and ``--seeds`` seeds on the fit pool's in-distribution part,
member 0 of a ``uq_quality`` run (acac: the fit half of test_MD_300K; ethanol:
the fit half of test_MD), and scores the pool's shifted part as the unseen
shift (acac: train_600K; ethanol: the methanol frames of train_eth_meth), as
``novelty_variants.py`` does::

    python -m benchmarks.fold_heads --data ../shared/data/acac --models benchmarks/results/uq-acac/models \\
        --out benchmarks/results/fold-heads-acac.json

Per label, K and seed: the weight, the fold heads' seconds, calibration-split
and shift AUROC / Spearman ρ of 1 - p, and the shipped verdict on the shift
(frames accepted, their risk). The main head, its split and its novelty model
do not depend on K (same seed): only the weight, hence p and the threshold,
move. Units: force RMSE in eV/Å.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import clean, find_members, fmt, load_splits, make_calc, write_json
from benchmarks.environment import environment
from benchmarks.novelty_variants import nov_of, outcome, ranking, verdict
from probe_ase import FitOptions, fit_probe
from probe_ase.exceptions import LabelError
from probe_ase.fitting.data import featurize
from probe_ase.fitting.split import split_indices
from probe_ase.fitting.train import TrainConfig
from probe_ase.model.graph import radius_graph
from probe_ase.taps import find_tap

#: (name, criterion, tolerance in eV/Å or None, quantile of the in-distribution errors or None)
LABELS = [("force_rmse 0.1 eV/Å", "force_rmse", 0.1, None), ("force_rmse q0.8", "force_rmse", None, 0.8)]


def one_fit(calc, pool_in, shift, fs_in, fs_sh, crit, tolerance, quantile, folds, seed, cache) -> dict:
    """The default fit with ``weight_folds=folds`` and ``seed`` on the in-distribution part; its scores."""
    start = time.perf_counter()
    probe = fit_probe(calc, pool_in, criterion=crit, tolerance=tolerance, quantile=quantile, cache_dir=cache,
                      progress=False, options=FitOptions(weight_folds=folds, seed=seed))
    seconds = time.perf_counter() - start
    err_in, err_sh, tau = fs_in.error(crit), fs_sh.error(crit), probe.meta.tau
    cal = split_indices((err_in <= tau).astype(np.int64), TrainConfig(seed=seed))[2]
    cutoff = probe.meta.config.cutoff
    p_in, p_sh = (probe.predict(fs.features, fs.numbers, fs.ptr, [radius_graph(a, cutoff) for a in frames]).reliability
                  for fs, frames in ((fs_in, pool_in), (fs_sh, shift)))
    bad_in, bad_sh = err_in > tau, err_sh > tau
    return {"weight": probe.meta.calibration.novelty_weight, "seconds": seconds,
            "fold_heads_s": probe.report["seconds"].get("fold_heads", 0.0), "tau": tau,
            "certified_risk": probe.meta.certified_risk, "cal": ranking(p_in[cal], bad_in[cal], err_in[cal]),
            "shift_ranking": ranking(p_sh, bad_sh, err_sh),
            "shift": outcome(verdict(probe, p_sh, nov_of(probe, fs_sh)), bad_sh),
            "in_cal": outcome(verdict(probe, p_in[cal], nov_of(probe, fs_in)[cal]), bad_in[cal])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="acac or ethanol folder (../shared/data/acac)")
    ap.add_argument("--models", type=Path, required=True, help="a uq_quality run's models folder (member 0)")
    ap.add_argument("--folds", type=int, nargs="+", default=[5, 3, 2, 0], help="weight_folds values (0: validation)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="FitOptions seeds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name, _, pool, pool_in, _, _ = load_splits(args.data, False)
    shift = pool[len(pool_in):]
    member0 = find_members(args.models)[0]
    calc, cache = make_calc("mace", member0), args.models.parent / "cache"  # the run's feature cache
    with find_tap(calc) as tap:
        fs_in, fs_sh = (featurize(tap, frames, cache_dir=cache, progress=False) for frames in (pool_in, shift))
    out = {"command": "python -m benchmarks.fold_heads " + " ".join(sys.argv[1:] if argv is None else argv),
           "dataset": name, "environment": environment([member0]), "n_in": len(pool_in), "n_shift": len(shift),
           "rows": []}
    for label, crit, tolerance, quantile in LABELS:
        try:
            for folds in args.folds:
                for seed in args.seeds:
                    row = {"label": label, "weight_folds": folds, "seed": seed,
                           **one_fit(calc, pool_in, shift, fs_in, fs_sh, crit, tolerance, quantile, folds, seed, cache)}
                    out["rows"].append(row)
                    print(f"{name} {label} K={folds} seed {seed}: w {row['weight']:.3g}, fold heads "
                          f"{row['fold_heads_s']:.1f} s of {row['seconds']:.1f} s; cal AUROC "
                          f"{fmt(row['cal']['auroc'])} rho {fmt(row['cal']['spearman'])}; shift AUROC "
                          f"{fmt(row['shift_ranking']['auroc'])} rho {fmt(row['shift_ranking']['spearman'])}; verdict "
                          f"on the shift {row['shift']['accepted']} at {fmt(row['shift']['risk'] * 100, 1)} %",
                          flush=True)
                    write_json(args.out, clean(out))  # partial results after each fit
        except LabelError as exc:  # e.g. ethanol at 0.1 eV/Å: one unreliable in-distribution frame
            out.setdefault("skipped", {})[label] = str(exc)
            print(f"{name} {label}: skipped ({exc})", flush=True)
    write_json(args.out, clean(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
