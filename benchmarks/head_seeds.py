"""How much PROBE's pooled ranking on the evaluation files moves with the head's seed.

``uq_quality.py`` fits one head (seed 0) per label and compares its pooled
AUROC / Spearman ρ with the 5-member ensemble's. The ensemble's scores do not
depend on a head seed; PROBE's do (the seed draws the train / validation /
calibration split, the initialisation and the fold heads). This script refits
the head of each force row of one backbone (``--backbone mace``, the default,
or ``schnetpack``: PaiNN) with ``--seeds`` seeds on the same fit pool and
member 0, with the settings of ``uq_quality.py``, scores the same evaluation
files, and prints each seed's pooled AUROC / ρ beside the ensemble's from the
run's ``results.json``. Nothing is chosen here: it reports the spread of the
shipped method (seed 0 reproduces the run's own row). ``--head-members K``
fits each head as the mean of K heads (``FitOptions(members=K)``, chosen on
the fit pool by ``head_crossfit.py``) instead of the run's single head::

    python -m benchmarks.head_seeds --data ../shared/data/acac --run benchmarks/results/uq-acac
    python -m benchmarks.head_seeds --data ../shared/data/acac --run benchmarks/results/uq-acac --backbone schnetpack
    python -m benchmarks.head_seeds --data ../shared/data/acac --run benchmarks/results/uq-acac --head-members 5 --seeds 1

Units: force RMSE in eV/Å.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks import uq_quality as uq
from benchmarks.environment import environment

from probe_ase import FitOptions
from benchmarks.common import MEMBER0, OPTION_FIELDS, clean, find_members, fit, load_splits, make_calc, write_json

from probe_ase.evaluation import metrics
from probe_ase.model.graph import radius_graph

ROWS = (("absolute", "force_rmse"), ("quantile", "force_rmse"))
ENSEMBLE = ("ens_force_std", "ens_force_max_std", "ens_energy_std")


def study(data: Path, run: Path, seeds: int, backbone: str = "mace", members: int = 1) -> dict:
    res_run = json.loads((run / "results.json").read_text())
    name, _, pool, _, evals, _ = load_splits(data, False)
    paths = find_members(run / "models", backbone)
    calc = make_calc(backbone, paths[0])
    # the run's head: its HeadConfig knobs beyond FitOptions (hidden, cutoff and members are FitOptions')
    head = {k: tuple(v) if isinstance(v, list) else v for k, v in res_run["settings"]["probe_head"].items()
            if k not in OPTION_FIELDS["head"]}
    names = list(evals)
    frames = [a for n in names for a in evals[n]]
    file_of = np.concatenate([[i] * len(evals[n]) for i, n in enumerate(names)])
    energies, forces, feats, ptr = uq.member_pass(calc, frames, desc="member 0 on eval")
    numbers = torch.as_tensor(np.concatenate([a.numbers for a in frames]))
    err = uq.errors_of(frames, energies, forces)
    out = {"dataset": name, "backbone": backbone, "head_members": members, "environment": environment(paths),
           "seeds": seeds, "rows": []}
    graphs = {}
    for regime, crit in ROWS:
        entry = res_run["backbones"][backbone]["regimes"][regime][crit]
        pooled = entry["pooled"]
        mask = np.isin(file_of, [names.index(f) for f in entry["pooled_files"]]) & np.isfinite(err[crit])
        ens = max(ENSEMBLE, key=lambda m: pooled[m]["auroc"])
        spec = uq.REGIMES[regime]
        kw = {"tolerance": spec[crit]} if regime == "absolute" else {"quantile": spec}
        per_seed = []
        for seed in tqdm(range(seeds), desc=f"{name} {regime}/{crit}", unit="head"):
            t0 = time.perf_counter()
            probe = fit(calc, pool, FitOptions(seed=seed, members=members), head=head, criterion=crit,
                        cache_dir=run / "cache", progress=False, **kw)
            cutoff = probe.meta.config.cutoff
            if cutoff not in graphs:
                graphs[cutoff] = [radius_graph(a, cutoff) for a in frames]
            p = probe.predict(feats.to(probe.head.feature_mean.dtype), numbers, ptr, graphs[cutoff]).reliability
            e = err[crit][mask]
            per_seed.append({"seed": seed, "tau": probe.meta.tau, "auroc": metrics.auroc(e > probe.meta.tau, 1 - p[mask]),
                             "spearman": metrics.spearman(1 - p[mask], e), "seconds": time.perf_counter() - t0})
        a = np.array([[s["auroc"], s["spearman"]] for s in per_seed])
        out["rows"].append({
            "regime": regime, "criterion": crit, "files": entry["pooled_files"], "per_seed": per_seed,
            "mean": a.mean(0).tolist(), "se": (a.std(0, ddof=1) / np.sqrt(len(a))).tolist() if len(a) > 1 else None,
            "run_seed0": [pooled["PROBE"]["auroc"], pooled["PROBE"]["spearman"]],
            "ensemble": ens, "ensemble_scores": [pooled[ens]["auroc"], pooled[ens]["spearman"]],
            "seeds_at_or_above": [int((a[:, 0] >= pooled[ens]["auroc"]).sum()),
                                  int((a[:, 1] >= pooled[ens]["spearman"]).sum())],
        })
    return out


def table(res: dict) -> str:
    members = res.get("head_members", 1)
    lines = [f"{res['dataset']}, {res.get('backbone', 'mace')} member 0, {res['seeds']} head seeds on the same fit pool"
             + (f", each head the mean of {members}" if members > 1 else "")
             + "; pooled over the evaluation files of uq_quality.py's row", "",
             "| τ | " + " | ".join(f"seed {s}" for s in range(res["seeds"]))
             + " | mean ± SE | ensemble (best by AUROC) | seeds ≥ ensemble (AUROC, ρ) |",
             "|---" * (res["seeds"] + 4) + "|"]
    for row in res["rows"]:
        tau = "0.1 eV/Å" if row["regime"] == "absolute" else "top 20 %"
        se = row["se"] or [float("nan")] * 2
        lines.append(f"| {tau} | " + " | ".join(f"{s['auroc']:.3f} / {s['spearman']:.3f}" for s in row["per_seed"])
                     + f" | {row['mean'][0]:.3f} ± {se[0]:.3f} / {row['mean'][1]:.3f} ± {se[1]:.3f} | "
                     f"{row['ensemble_scores'][0]:.3f} / {row['ensemble_scores'][1]:.3f} ({row['ensemble']}) | "
                     f"{row['seeds_at_or_above'][0]}, {row['seeds_at_or_above'][1]} of {res['seeds']} |")
    return "\n".join(lines)


def seed_study_main(argv, doc: str, script: str, study, table, seeds: int, seeds_help: str, run_help: str,
                    backbones: tuple[str, ...] = (), head_members: bool = False) -> int:
    """Command line shared by the fit-pool seed studies: parse, run ``study(data, run, seeds)``, print, write JSON.

    With ``backbones`` a ``--backbone`` option (default the first) is passed on as ``study(..., backbone=)``;
    the default JSON name then gains ``_<backbone>`` for all but the first. With ``head_members`` a
    ``--head-members`` option is passed on as ``study(..., members=)``; above 1 the name gains ``_members<K>``.
    """
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder of the BOTNet data")
    ap.add_argument("--run", required=True, type=Path, help=run_help)
    ap.add_argument("--seeds", type=int, default=seeds, help=seeds_help)
    if backbones:
        ap.add_argument("--backbone", choices=backbones, default=backbones[0],
                        help=f"whose member 0 to refit (default {backbones[0]}; schnetpack: PaiNN)")
    if head_members:
        ap.add_argument("--head-members", type=int, default=1,
                        help="fit each head as the mean of this many heads (FitOptions.members; default 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default RUN/{script}.json"
                    + (f"; RUN/{script}_<backbone>.json for other backbones)" if backbones else ")"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = {"backbone": args.backbone} if backbones else {}
    if head_members:
        kw["members"] = args.head_members
    res = study(args.data.resolve(), args.run, args.seeds, **kw)
    res["command"] = " ".join([f"{script}.py"] + (argv or sys.argv[1:]))
    print(table(res))
    suffix = f"_{args.backbone}" if backbones and args.backbone != backbones[0] else ""
    suffix += f"_members{args.head_members}" if head_members and args.head_members > 1 else ""
    out = args.out or args.run / f"{script}{suffix}.json"
    write_json(out, clean(res))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    return seed_study_main(argv, __doc__, "head_seeds", study, table, 5, "head seeds 0..N-1 (seed 0 is the run's own head)",
                           "a finished uq_quality.py output folder (results.json, models/, cache/)", tuple(MEMBER0),
                           head_members=True)


if __name__ == "__main__":
    sys.exit(main())
