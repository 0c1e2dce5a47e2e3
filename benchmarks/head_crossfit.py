"""Compare head configurations, and averaging heads over seeds, by cross-fitting on the fit pool only.

A finer instrument than one calibration split per seed
for gaps of a few thousandths of AUROC (DESIGN.md §5b). For member 0 of a
trained ``uq_quality.py`` run, the whole fit pool is split into ``--folds``
stratified folds (``--reps`` times, each with its own shuffle); for every
held-out fold and every variant, ``--seeds`` heads are trained on the other
folds (:func:`probe_ase.fitting.train.train_head`, early stopping on a stratified 15 %
of them, the training settings of ``uq_quality.py``) and rank the held-out
fold by their main logit. Each variant gets two scores per fold: the mean
over seeds of one head's AUROC / Spearman ρ, and those of the mean logit of
its seeds (a bagged head: ``seeds`` heads averaged). Variants are paired on
the same folds; the table gives means over folds and each variant's paired
difference to the first, with standard errors over folds. Only the head is
compared: no novelty penalty, no temperature (neither changes the ranking
of in-distribution frames much; temperature not at all)::

    python -m benchmarks.head_crossfit --data ../shared/data/acac --run benchmarks/results/uq-acac --threshold 0.1
    python -m benchmarks.head_crossfit --data ../shared/data/ethanol --run benchmarks/results/uq-ethanol \
        --backbone schnetpack --variants default "2 attention blocks"

``--features`` compares what the head reads, on the same folds: ``scalars``
(the tap's ``channels="scalars"``, the default here) and ``scalars+vector
norms`` (``channels="scalars+norms"``): beside each tapped layer's scalars the
norm of each of its non-scalar channels (PaiNN: each vector channel of ``mu``
over x, y, z; MACE: each ``l > 0`` irrep channel of a product block's
output), rotation invariant. This comparison chose PaiNN's default channels
(``scalars+norms`` since head-file version 8); MACE's stay ``scalars``::

    python -m benchmarks.head_crossfit --data ../shared/data/acac --run benchmarks/results/uq-acac \
        --backbone schnetpack --threshold 0.1 --variants default --features scalars "scalars+vector norms"

``scalars+force norms`` appends to each atom's scalars ``log(|F_i| + 0.01)``,
``F_i`` the backbone's own predicted force on it (eV/Å; rotation invariant):
an output-space number, as an ensemble reads (tried on MACE, not taken).
``scalars+message scalars`` (MACE) appends the ``l = 0`` part of each
interaction block's message, the input of the product block the adapter taps.

Units: force RMSE in eV/Å, energy error in eV.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm.auto import tqdm

from benchmarks.common import MEMBER0, clean, find_members, load_splits, make_calc, write_json
from benchmarks.environment import environment

from probe_ase.evaluation import metrics
from probe_ase.fitting.data import featurize
from probe_ase.fitting.train import TrainConfig, train_head
from probe_ase.model.graph import HeadGraph
from probe_ase.model.head import HeadConfig, batch_inputs
from probe_ase.fitting.labels import make_labels, resolve_tolerance
from probe_ase.fitting.data import features_only
from probe_ase.taps import ModuleTap, find_tap

#: changes to the default head (``HeadConfig()``, cutoff from the backbone)
VARIANTS = {
    "default": {},
    "2 attention blocks": {"blocks": 2},
    "3 attention blocks": {"blocks": 3},
    "hidden 128, 8 heads": {"hidden": 128, "heads": 8},
}

#: what the head reads: the tap's channel set of each name, and whether each atom's log predicted force norm joins it
FEATURES = {"scalars": ("scalars", False), "scalars+vector norms": ("scalars+norms", False),
            "scalars+force norms": ("scalars", True), "scalars+message scalars": ("scalars", False)}


def with_message_scalars(calc, pool, fs):
    """``fs`` with each MACE interaction block's message scalars beside the product scalars: the ``l = 0``
    component of every channel of ``interactions[i]``'s output ``(n, channels, (lmax + 1)**2)``."""
    model = calc.models[0]
    widths = [int(block.target_irreps.count("0e")) for block in model.interactions]
    with ModuleTap(calc, modules=[f"interactions.{i}" for i in range(len(widths))], widths=widths, model=model,
                   cutoff=float(calc.r_max), invariant=lambda layer, out: out[0][:, :, 0]) as tap:
        extra, _ = features_only(tap, pool)
    return replace(fs, features=torch.cat([fs.features, extra.to(fs.features.dtype)], dim=1))


def with_force_norms(tap, pool, fs):
    """``fs`` with one more feature per atom: ``log(|F_i| + 0.01)``, F_i the backbone's own force (eV/Å) on the atom."""
    forces = np.concatenate([p.forces for p in tap.predict(pool)])
    extra = torch.from_numpy(np.log(np.linalg.norm(forces, axis=1) + 0.01)).to(fs.features.dtype)[:, None]
    return replace(fs, features=torch.cat([fs.features, extra], dim=1))


def crossfit(features, edges, errors, labels, configs: dict, folds: int, reps: int, seeds: int) -> list[dict]:
    """Per fold and variant: held-out AUROC / ρ of each seed's head and of the seeds' mean logit."""
    elements = tuple(sorted(set(features.numbers.tolist())))
    rows = []
    bar = tqdm(total=reps * folds * len(configs) * seeds, desc="heads", unit="head")
    for rep in range(reps):
        split = StratifiedKFold(folds, shuffle=True, random_state=100 + rep).split(np.zeros(len(labels)), labels)
        for fold, (rest, held) in enumerate(split):
            tr, val = train_test_split(rest, test_size=0.15 / (1 - 1 / folds), stratify=labels[rest], random_state=rep)
            splits = (np.sort(tr), np.sort(val), np.sort(held))
            held = splits[2]
            unreliable, error = labels[held] == 0, errors[held]
            row = {"rep": rep, "fold": fold, "n_held": len(held), "n_unreliable": int(unreliable.sum()), "variants": {}}
            for name, config in configs.items():
                logits, seconds = [], time.perf_counter()
                for seed in range(seeds):
                    head, _ = train_head(features, edges, labels, splits, elements, config,
                                         TrainConfig(epochs=150, patience=20, seed=seed), False, errors)  # FitOptions' training
                    with torch.no_grad():
                        z = head.all_logits(*batch_inputs(features.features, features.numbers, features.ptr, edges,
                                                          held))[0][:, 0].numpy().astype(float)
                    logits.append(z)
                    bar.update()
                single = [(metrics.auroc(unreliable, -z), metrics.spearman(-z, error)) for z in logits]
                bagged = np.mean(logits, 0)
                row["variants"][name] = {"per_seed": single, "single": np.mean(single, 0).tolist(),
                                         "bagged": [metrics.auroc(unreliable, -bagged), metrics.spearman(-bagged, error)],
                                         "seconds": time.perf_counter() - seconds}
            rows.append(row)
    bar.close()
    return rows


def summarise(rows: list[dict], names: list[str]) -> list[dict]:
    """Means over folds and paired differences to the first variant's single head, with SEs over folds."""
    out = []
    base = np.array([r["variants"][names[0]]["single"] for r in rows])
    for name in names:
        for kind in ("single", "bagged"):
            s = np.array([r["variants"][name][kind] for r in rows])
            d = s - base
            se = lambda a: (a.std(0, ddof=1) / np.sqrt(len(a))).tolist() if len(a) > 1 else [float("nan")] * 2  # noqa: E731
            out.append({"variant": name, "kind": kind, "mean": s.mean(0).tolist(), "se": se(s),
                        "diff": d.mean(0).tolist(), "diff_se": se(d)})
    return out


def table(res: dict) -> str:
    lines = [f"{res['dataset']}, {res['backbone']} member 0, {res['criterion']} at τ = {res['tau']:.4g}; "
             f"{res['reps']} × {res['folds']}-fold cross-fitting over the {res['n_pool']}-frame fit pool, "
             f"{res['seeds']} seeds per variant", "",
             "| variant | head | AUROC | ρ | ΔAUROC vs default single | Δρ |", "|---|---|---|---|---|---|"]
    for s in res["summary"]:
        head = "one head (mean over seeds)" if s["kind"] == "single" else f"mean logit of {res['seeds']} heads"
        lines.append(f"| {s['variant']} | {head} | {s['mean'][0]:.4f} ± {s['se'][0]:.4f} | {s['mean'][1]:.4f} ± "
                     f"{s['se'][1]:.4f} | {s['diff'][0]:+.4f} ± {s['diff_se'][0]:.4f} | "
                     f"{s['diff'][1]:+.4f} ± {s['diff_se'][1]:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="acac or ethanol folder of the BOTNet data")
    ap.add_argument("--run", required=True, type=Path, help="a finished uq_quality.py output folder (models/, cache/)")
    ap.add_argument("--backbone", choices=list(MEMBER0), default="mace", help="whose member 0 (schnetpack: PaiNN)")
    ap.add_argument("--criterion", default="force_rmse", choices=["force_rmse", "energy"])
    tol = ap.add_mutually_exclusive_group()
    tol.add_argument("--threshold", type=float, help="absolute tolerance τ (eV/Å for forces, eV for energy)")
    tol.add_argument("--quantile", type=float, help="τ as this quantile (0-1) of the pool's errors (default 0.8)")
    ap.add_argument("--variants", nargs="+", default=["default", "2 attention blocks"], choices=list(VARIANTS),
                    help="names of VARIANTS; the first is the reference of the paired differences")
    ap.add_argument("--features", nargs="+", default=["scalars"], choices=list(FEATURES),
                    help="what the head reads; several are crossed with --variants")
    ap.add_argument("--layers", type=int, nargs="+", metavar="I",
                    help="interaction layers every feature set reads (default: all); folds stay those of the full run")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of the fold split, each shuffled anew")
    ap.add_argument("--seeds", type=int, default=3, help="heads per variant and fold (seeds 0..N-1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default RUN/head_crossfit_<backbone>_<label>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name, _, pool, _, _, _ = load_splits(args.data.resolve(), quick=False)
    paths = find_members(args.run / "models", args.backbone)
    calc = make_calc(args.backbone, paths[0])
    feature_sets = {}
    for kind in args.features:
        channels, force_norms = FEATURES[kind]
        with find_tap(calc, args.layers, channels) as tap:
            feature_sets[kind] = featurize(tap, pool, cache_dir=args.run / "cache", progress=False)
            if force_norms:
                feature_sets[kind] = with_force_norms(tap, pool, feature_sets[kind])
            if kind == "scalars+message scalars":
                feature_sets[kind] = with_message_scalars(calc, pool, feature_sets[kind])
            cutoff = tap.cutoff
    errors = feature_sets[args.features[0]].error(args.criterion)  # the backbone's errors: the same for every tap
    quantile = 0.8 if args.threshold is None and args.quantile is None else args.quantile
    tau = resolve_tolerance(errors, args.threshold, quantile)
    labels = make_labels(errors, tau)
    atom_error = args.criterion == "force_rmse"  # fit_probe's default: on for force criteria
    configs = {v: replace(HeadConfig(cutoff=cutoff, atom_error=atom_error), **VARIANTS[v]) for v in args.variants}
    edges = HeadGraph(cutoff).frames(pool)
    t0 = time.perf_counter()
    rows = []
    for kind in args.features:  # the same folds for every feature set (same labels, same shuffles)
        fitted = crossfit(feature_sets[kind], edges, errors, labels, configs, args.folds, args.reps, args.seeds)
        named = fitted if len(args.features) == 1 else [
            {**r, "variants": {f"{v}, {kind}": x for v, x in r["variants"].items()}} for r in fitted]
        rows = named if not rows else [{**a, "variants": a["variants"] | b["variants"]} for a, b in zip(rows, named)]
    names = args.variants if len(args.features) == 1 else [f"{v}, {k}" for k in args.features for v in args.variants]
    res = {"dataset": name, "backbone": args.backbone, "member0": str(paths[0]), "criterion": args.criterion,
           "tau": tau, "quantile": quantile, "n_pool": len(pool), "folds": args.folds, "reps": args.reps,
           "seeds": args.seeds, "configs": {k: asdict(c) for k, c in configs.items()}, "rows": rows,
           "features": args.features, "layers": args.layers, "summary": summarise(rows, names), "seconds": time.perf_counter() - t0,
           "environment": environment(paths[:1]), "command": " ".join(["head_crossfit.py"] + (argv or sys.argv[1:]))}
    print(table(res))
    label = f"{args.criterion}_{'tau' + format(tau, '.3g') if args.threshold is not None else f'q{quantile:g}'}"
    extra = "" if args.features == ["scalars"] else "_" + "_".join(k.replace("+", "_").replace(" ", "_") for k in args.features)
    extra += "" if args.layers is None else "_layers" + "".join(map(str, args.layers))
    out = args.out or args.run / f"head_crossfit_{args.backbone}_{label}{extra}.json"
    write_json(out, clean(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
