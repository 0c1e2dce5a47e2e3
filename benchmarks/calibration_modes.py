"""Split against cross-fitted calibration, on the fit pool alone: what each certifies, and what it then delivers.

For ``--reps`` seeded draws, the fit pool (``--pool full``, the default: the
whole fit pool of ``uq_quality.py``; ``in-distribution``: the
leave-shift-out protocol's pool, the fit half of test_MD_300K / test_MD, which
holds too few unreliable frames for most labels: acac 9 of 195 fitted frames
above 43 meV, 1-2 above 0.1 eV/Å) is split at random into a
part the head is fitted on (``--fit-share``, default 60 %) and *fresh* frames
exchangeable with it. On each draw and label, a head is fitted on the first
part with ``FitOptions(calibration="split")`` and with ``"crossfit"`` (MACE
or PaiNN member 0 of a finished ``uq_quality.py`` run, its benchmark
training options), and its verdict (p >= p* and inside the support) is
applied to the fresh frames: the certified risk, the calibration structures,
the fresh frames accepted, their risk, the coverage of the reliable fresh
frames, and the AUROC of 1 - p on them. Labels: ``uq_quality.py``'s four
(force RMSE at 0.1 eV/Å, |ΔE| at 43 meV, and the top 20 % of each). No evaluation file is read::

    python -m benchmarks.calibration_modes --data ../shared/data/acac --run benchmarks/results/uq-acac

Prints a table and writes JSON (default ``RUN/calibration_modes_<backbone>_<pool>.json``), atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore")
warnings.filterwarnings("ignore")

from probe_ase import FitOptions, fit_probe

from probe_ase.evaluation import metrics
from probe_ase.fitting.data import featurize
from probe_ase.exceptions import LabelError
from probe_ase.fitting.spec import CALIBRATION
from probe_ase.model.graph import radius_graph
from tqdm.auto import tqdm
from benchmarks.common import find_members, load_splits, make_calc, write_json
from benchmarks.uq_quality import REGIMES
from benchmarks.environment import environment


def run_draw(calc, fit, fresh, criterion, tolerance, seed, cache) -> dict:
    """Both calibration modes on one draw: certificate and fresh-frame operating point of each."""
    out = {}
    for mode in CALIBRATION:
        t0 = time.perf_counter()
        try:
            probe = fit_probe(calc, fit, criterion=criterion, cache_dir=cache, progress=False,
                              options=FitOptions(seed=seed, calibration=mode), **tolerance)
        except LabelError as err:
            out[mode] = {"skipped": str(err)}
            continue
        with probe.tap_for(calc) as tap:
            fs = featurize(tap, fresh, cache_dir=cache, progress=False)
        graphs = [radius_graph(a, probe.meta.config.cutoff) for a in fresh]
        scored = probe.predict(fs.features.to(probe.head.feature_mean.dtype), fs.numbers, fs.ptr, graphs)
        accepted = probe.verdict(scored).reliable
        good = fs.error(criterion) <= probe.meta.tau
        out[mode] = {"certified_risk": probe.meta.certified_risk, "certified": probe.report["certificate"]["certified"],
                     "n_cal": probe.report["n_cal"], "fresh": len(fresh), "accepted": int(accepted.sum()),
                     "risk": float(np.mean(~good[accepted])) if accepted.any() else float("nan"),
                     "coverage_of_reliable": float(accepted[good].mean()) if good.any() else float("nan"),
                     "auroc": metrics.auroc(~good, 1 - scored.reliability), "fit_seconds": time.perf_counter() - t0}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder of the BOTNet data")
    ap.add_argument("--run", required=True, type=Path, help="a finished uq_quality.py output folder (models/, cache/)")
    ap.add_argument("--backbone", default="mace", choices=["mace", "schnetpack"], help="whose member 0")
    ap.add_argument("--pool", default="full", choices=["full", "in-distribution"])
    ap.add_argument("--fit-share", type=float, default=0.6, help="share (0-1) of the pool the heads are fitted on")
    ap.add_argument("--reps", type=int, default=3, help="seeded draws of the split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, _, pool, pool_in, _, _ = load_splits(args.data.resolve(), quick=False)
    frames = pool_in if args.pool == "in-distribution" else pool
    paths = find_members(args.run / "models", args.backbone)
    calc = make_calc(args.backbone, paths[0])
    cache = args.run / "cache"
    # uq_quality's four labels: absolute tolerances, and the top 20 % of the fitted part unreliable
    labels = [(crit, f"{tau:g}", {"tolerance": tau}) for crit, tau in REGIMES["absolute"].items()]
    labels += [(crit, "top 20 %", {"quantile": REGIMES["quantile"]}) for crit in REGIMES["absolute"]]
    rows = []
    for rep in tqdm(range(args.reps), desc="draws", unit="draw"):
        order = np.random.default_rng(rep).permutation(len(frames))
        n_fit = int(round(args.fit_share * len(frames)))
        fit, fresh = [frames[i] for i in order[:n_fit]], [frames[i] for i in order[n_fit:]]
        for crit, tau, tolerance in labels:
            rows.append({"rep": rep, "criterion": crit, "tau": tau,
                         **run_draw(calc, fit, fresh, crit, tolerance, rep, cache)})
    print(f"\n{args.data.name}, {args.backbone} member 0, pool {args.pool} ({len(frames)} frames, "
          f"{args.fit_share:.0%} fitted on): certified risk, calibration structures, fresh accepted, risk, "
          "coverage of reliable, AUROC")
    print("| label | draw | mode | certified risk | n_cal | accepted / fresh | risk | coverage of reliable | AUROC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for mode in CALIBRATION:
            m = row[mode]
            if "skipped" in m:
                print(f"| {row['criterion']} {row['tau']} | {row['rep']} | {mode} | skipped: {m['skipped']} |")
                continue
            print(f"| {row['criterion']} {row['tau']} | {row['rep']} | {mode} | {m['certified_risk']:.3f} | "
                  f"{m['n_cal']} | {m['accepted']} / {m['fresh']} | {m['risk']:.3f} | "
                  f"{m['coverage_of_reliable']:.3f} | {m['auroc']:.3f} |")
    out = args.out or args.run / f"calibration_modes_{args.backbone}_{args.pool}.json"
    result = {"command": " ".join(["calibration_modes.py"] + (argv or sys.argv[1:])), "rows": rows,
              "environment": environment()}
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
