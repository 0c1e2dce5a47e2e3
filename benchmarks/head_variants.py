"""Compare PROBE head variants on the fit pool only (never on evaluation files).

DESIGN.md §5b: when PROBE trails the ensemble, try method changes and judge them
on the fit pool's own held-out splits. For member 0 of a trained
``uq_quality.py`` run (its cached MACE or SchNetPack model), each variant is
fitted ``--seeds`` times with different seeds (a different stratified
train / validation / calibration split each time) and scored on that seed's
calibration split: AUROC (unreliable = positive) and Spearman ρ between
1 - p and the continuous error. Means and standard errors go to a table and a
JSON file::

    python benchmarks/head_variants.py --data ../shared/data/acac --run benchmarks/results/uq-acac

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import uq_quality  # noqa: E402

from probe_ase import HeadConfig, TrainConfig, fit_probe  # noqa: E402
from probe_ase.fileio import atomic_write  # noqa: E402

VARIANTS = {
    "baseline (attention pool)": HeadConfig(aux_quantiles=()),
    "+ max pool": HeadConfig(max_pool=True, aux_quantiles=()),
    "+ aux quantiles 0.3/0.5/0.7/0.9 (default)": HeadConfig(aux_quantiles=(0.3, 0.5, 0.7, 0.9)),
    "+ max pool + aux quantiles": HeadConfig(max_pool=True, aux_quantiles=(0.3, 0.5, 0.7, 0.9)),
    "+ aux quantiles + per-element scaling": HeadConfig(per_element_scaling=True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder of the BOTNet data")
    ap.add_argument("--run", required=True, type=Path, help="output folder of a finished uq_quality.py run (models, cache)")
    ap.add_argument("--backbone", default="mace", choices=["mace", "schnetpack"])
    ap.add_argument("--criteria", nargs="+", default=["force_rmse", "energy"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names of VARIANTS to fit (default: all)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default RUN/head_variants_<backbone>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, _, pool, _, _, _ = uq_quality.load_splits(args.data.resolve(), quick=False)
    pattern = "ssmace_*_s0.model" if args.backbone == "mace" else "spkpl_*_s0.pt"
    member0 = sorted((args.run / "models").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not member0:
        raise SystemExit(f"no {pattern} in {args.run / 'models'}: run uq_quality.py first")
    calc = uq_quality.make_calc(args.backbone, member0[0])
    rows = []
    for crit in args.criteria:
        for name in args.variants:
            config = VARIANTS[name]
            scores = []
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                probe = fit_probe(calc, pool, criterion=crit, quantile=0.8, config=config,
                                  train=TrainConfig(epochs=150, patience=20, seed=seed),
                                  cache_dir=args.run / "cache", progress=False)
                scores.append((probe.meta.report["auroc"], probe.meta.report["spearman"]))
            s = np.array(scores)
            rows.append({"criterion": crit, "variant": name, "config": asdict(config),
                         "auroc_mean": s[:, 0].mean(), "auroc_se": s[:, 0].std(ddof=1) / np.sqrt(len(s)),
                         "spearman_mean": s[:, 1].mean(), "spearman_se": s[:, 1].std(ddof=1) / np.sqrt(len(s)),
                         "per_seed": s.tolist(), "seconds": time.perf_counter() - t0})
            r = rows[-1]
            print(f"| {crit} | {name} | {r['auroc_mean']:.3f} ± {r['auroc_se']:.3f} | "
                  f"{r['spearman_mean']:.3f} ± {r['spearman_se']:.3f} |", flush=True)
    out = args.out or args.run / f"head_variants_{args.backbone}.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps({"member0": str(member0[0]), "seeds": args.seeds,
                                                                 "rows": rows}, indent=1)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
