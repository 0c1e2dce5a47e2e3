"""Compare PROBE head variants on the fit pool only (never on evaluation files).

DESIGN.md §5b: when PROBE trails the ensemble, try method changes and judge them
on the fit pool's own held-out splits. For member 0 of a trained
``uq_quality.py`` run (its cached MACE or SchNetPack model), each variant is
fitted ``--seeds`` times with different seeds (a different stratified
train / validation / calibration split each time) and scored on that seed's
calibration split: AUROC (unreliable = positive) and Spearman ρ between
1 - p and the continuous error. With ``--shift`` each variant is also fitted
on the pool's in-distribution part only (acac: the fit half of test_MD_300K;
ethanol: the fit half of test_MD) and scored on the pool's shifted part
(acac: train_600K; ethanol: the methanol frames), labelled at that head's own
tolerance: how the variant ranks a shift its head never saw. Means and
standard errors go to a table and a JSON file::

    python -m benchmarks.head_variants --data ../shared/data/acac --run benchmarks/results/uq-acac
    python -m benchmarks.head_variants --data ../shared/data/acac --run benchmarks/results/uq-acac \
        --criteria force_rmse --shift --variants "+ aux quantiles 0.3/0.5/0.7/0.9" \
        "+ dense aux quantiles 0.1-0.9, 0.95" --out benchmarks/results/uq-acac/head_variants_shift.json

With ``--features scalars+norms`` (DESIGN §5b "richer invariant features") the
head reads, besides each layer's scalar channels, the norm of every non-scalar
channel of that layer (rotation invariant as well): the tap's
``channels="scalars+norms"``. ``--features scalars`` reads the scalars alone,
for PaiNN too (whose default is now ``scalars+norms``).

Units: force RMSE in eV/Å, energy error in eV.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.environment import environment

from probe_ase import FitOptions, LabelError
from benchmarks.common import fit, load_splits, make_calc, study_configs

from probe_ase.evaluation import metrics
from probe_ase.fitting.data import featurize
from probe_ase.fileio import atomic_write
from probe_ase.fitting.train import STOP_ON, TrainConfig
from probe_ase.model.graph import radius_graph
from probe_ase.taps import find_tap

#: each variant's HeadConfig knobs (the rest at the head's defaults; fitted through fit_spec)
VARIANTS = {
    "baseline (attention pool)": {"aux_quantiles": (), "atom_error": False},
    "+ max pool": {"max_pool": True, "aux_quantiles": (), "atom_error": False},
    "+ aux quantiles 0.3/0.5/0.7/0.9": {"aux_quantiles": (0.3, 0.5, 0.7, 0.9), "atom_error": False},
    "+ max pool + aux quantiles": {"max_pool": True, "aux_quantiles": (0.3, 0.5, 0.7, 0.9), "atom_error": False},
    "+ aux quantiles + per-element scaling": {"per_element_scaling": True, "atom_error": False},
    "+ dense aux quantiles 0.1-0.9, 0.95": {"aux_quantiles": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
                                            "atom_error": False},
    "+ aux quantiles, shared score": {"shared_score": True, "atom_error": False},
    "+ aux quantiles + atom-error regression (default)": {"atom_error": True},
}


def shift_ranking(probe, calc, frames, cache, features: str = "scalars") -> tuple[float, float]:
    """AUROC and Spearman ρ of ``1 - reliability`` on ``frames`` (labels at the probe's own tolerance)."""
    with find_tap(calc, channels=features) as tap:
        fs = featurize(tap, frames, cache_dir=cache, progress=False)
    graphs = [radius_graph(a, probe.meta.config.cutoff) for a in frames]
    p = probe.predict(fs.features.to(probe.head.feature_mean.dtype), fs.numbers, fs.ptr, graphs).reliability
    error = fs.error(probe.meta.criterion)
    return metrics.auroc(error > probe.meta.tau, 1 - p), metrics.spearman(1 - p, error)


def mean_se(values: list) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard errors of ``values`` (rows: seeds)."""
    s = np.array(values, dtype=float)
    return s.mean(0), s.std(0, ddof=1) / np.sqrt(len(s))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder of the BOTNet data")
    ap.add_argument("--run", required=True, type=Path, help="output folder of a finished uq_quality.py run (models, cache)")
    ap.add_argument("--backbone", default="mace", choices=["mace", "schnetpack"])
    ap.add_argument("--criteria", nargs="+", default=["force_rmse", "energy"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names of VARIANTS to fit (default: all)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="absolute tolerance τ in the criterion's unit (eV/Å, eV) instead of the default quantile 0.8")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shift", action="store_true",
                    help="also fit on the pool's in-distribution part and rank its shifted part (leave-shift-out)")
    ap.add_argument("--stop-on", choices=STOP_ON, default=TrainConfig().stop_on,
                    help="the validation loss early stopping watches (TrainConfig.stop_on)")
    ap.add_argument("--features", choices=["scalars", "scalars+norms"], default="scalars",
                    help="what the head reads: each layer's scalar channels (default), or also the norms of its "
                         "non-scalar channels (the tap's channels)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default RUN/head_variants_<backbone>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tolerance = {"quantile": 0.8} if args.threshold is None else {"tolerance": args.threshold}
    _, _, pool, pool_in, _, _ = load_splits(args.data.resolve(), quick=False)
    shifted = pool[len(pool_in):]  # load_splits puts the in-distribution part first
    pattern = "ssmace_*_s0.model" if args.backbone == "mace" else "spkpl_*_s0.pt"
    member0 = sorted((args.run / "models").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not member0:
        raise SystemExit(f"no {pattern} in {args.run / 'models'}: run uq_quality.py first")
    calc = make_calc(args.backbone, member0[0])
    cache = args.run / "cache"  # the cache key tells the channel sets apart
    tap = find_tap(calc, channels=args.features)
    rows = []
    print("| criterion | variant | AUROC (cal) | Spearman (cal) |"
          + (" AUROC (unseen shift) | Spearman (unseen shift) |" if args.shift else ""), flush=True)
    for crit in args.criteria:
        for name in args.variants:
            head = VARIANTS[name]
            train = {"stop_on": args.stop_on}
            scores, shift_scores = [], []
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                options = FitOptions(seed=seed)
                probe = fit(tap, pool, options, head=head, train=train, criterion=crit, **tolerance,
                            cache_dir=cache, progress=False)
                scores.append((probe.meta.report["auroc"], probe.meta.report["spearman"]))
                if args.shift:
                    try:
                        probe_in = fit(tap, pool_in, options, head=head, train=train, criterion=crit, **tolerance,
                                       cache_dir=cache, progress=False)
                    except LabelError as err:  # e.g. too few in-distribution structures above an absolute τ
                        print(f"no unseen-shift fit: {err}", flush=True)
                        continue
                    shift_scores.append(shift_ranking(probe_in, calc, shifted, cache, args.features))
            mean, se = mean_se(scores)
            row = {"criterion": crit, "variant": name, "features": args.features, "config": asdict(study_configs(FitOptions(), head).head),
                   "auroc_mean": mean[0], "auroc_se": se[0], "spearman_mean": mean[1], "spearman_se": se[1],
                   "per_seed": np.array(scores).tolist(), "seconds": time.perf_counter() - t0}
            line = f"| {crit} | {name} | {mean[0]:.3f} ± {se[0]:.3f} | {mean[1]:.3f} ± {se[1]:.3f} |"
            if shift_scores:
                mean, se = mean_se(shift_scores)
                row.update(shift_auroc_mean=mean[0], shift_auroc_se=se[0], shift_spearman_mean=mean[1],
                           shift_spearman_se=se[1], shift_per_seed=np.array(shift_scores).tolist())
                line += f" {mean[0]:.3f} ± {se[0]:.3f} | {mean[1]:.3f} ± {se[1]:.3f} |"
            rows.append(row)
            print(line, flush=True)
    tap.close()
    out = args.out or args.run / f"head_variants_{args.backbone}.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps({"member0": str(member0[0]), "seeds": args.seeds,
                                                                 "stop_on": args.stop_on, "tolerance": tolerance,
                                                                 "environment": environment(member0[:1]),
                                                                 "rows": rows}, indent=1)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
