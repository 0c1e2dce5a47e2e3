"""Is the novelty weight applied on the logit scale it was fitted on? (fit pool only)

``fit_probe`` fits the novelty weight on the out-of-fold logits of five fold
heads and applies it to the deployed head's logit. This compares the two on
the structures both score held out, the validation split: the ratio of their
standard deviations (deployed / fold heads), the slope and the correlation of
deployed on out-of-fold logits, for member 0 of a ``uq_quality.py`` run, on
the whole fit pool and on its in-distribution part, a few labels and seeds::

    python benchmarks/logit_scale.py --data ../shared/data/acac --run benchmarks/results/uq-acac

A ratio near 1 with a high correlation: the weight means on the deployed head
what it meant where it was fitted. A ratio near 0: the deployed head's logit
is nearly constant (it stopped near its initialisation) and novelty decides
the ranking whatever the weight. Units: τ in eV/Å (forces) or eV (energy).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import uq_quality as uq  # noqa: E402
from head_seeds import seed_study_main  # noqa: E402

import probe_ase.fit as fit  # noqa: E402
from probe_ase import LabelError, TrainConfig  # noqa: E402
from probe_ase.fitting.data import featurize  # noqa: E402
from probe_ase.model.graph import HeadGraph  # noqa: E402
from probe_ase.model.head import batch_inputs  # noqa: E402
from probe_ase.fitting.labels import make_labels  # noqa: E402
from probe_ase.taps import find_tap  # noqa: E402

LABELS = (("force_rmse", {"threshold": 0.1}), ("force_rmse", {"quantile": 0.8}), ("energy", {"quantile": 0.8}))


def study(data: Path, run: Path, seeds: int) -> dict:
    name, _, pool, pool_in, _, _ = uq.load_splits(data, False)
    paths = sorted((run / "models").glob("ssmace_c16_L1_e20_*_s0.model"))
    if not paths:
        raise SystemExit(f"{run / 'models'}: no MACE member 0 of uq_quality.py")
    calc = uq.make_calc("mace", paths[0])
    captured = {}
    library = fit.out_of_fold_logits

    def capturing(*args, **kwargs):  # keep the fold heads' out-of-fold logits of this fit
        captured["oof"] = library(*args, **kwargs)
        return captured["oof"]

    fit.out_of_fold_logits = capturing  # this process only: fit_probe looks it up there
    rows = []
    for frames, protocol in ((pool, "whole pool"), (pool_in, "in-distribution")):
        with find_tap(calc) as tap:
            fs = featurize(tap, frames, cache_dir=run / "cache", progress=False)
        for crit, kw in LABELS:
            for seed in range(seeds):
                captured.clear()
                train = TrainConfig(seed=seed)
                try:
                    probe = fit.fit_probe(calc, frames, crit, train=train, cache_dir=run / "cache", progress=False, **kw)
                except LabelError as err:
                    rows.append({"protocol": protocol, "criterion": crit, **kw, "skipped": str(err)})
                    break
                if "oof" not in captured:  # too few minority structures for fold heads
                    continue
                tr, val, _ = fit.split_indices(make_labels(fs.error(crit), probe.meta.tau), train)
                edges = HeadGraph(probe.meta.config.cutoff).frames(frames)
                with torch.no_grad():
                    z = probe.head.all_logits(*batch_inputs(fs.features, fs.numbers, fs.ptr, edges, val))[0]
                z, z_oof = z.numpy()[:, 0], captured["oof"][len(tr):, 0]  # out-of-fold rows: train then validation
                rows.append({"protocol": protocol, "criterion": crit, **kw, "seed": seed,
                             "weight": probe.meta.novelty_weight, "cal_auroc": probe.meta.report["auroc"],
                             "std_ratio": float(np.std(z) / np.std(z_oof)), "slope": float(np.polyfit(z_oof, z, 1)[0]),
                             "correlation": float(np.corrcoef(z_oof, z)[0, 1])})
                print(rows[-1], flush=True)
    return {"dataset": name, "environment": uq.environment(paths), "seeds": seeds, "rows": rows}


def table(res: dict) -> str:
    lines = [f"{res['dataset']}: deployed head against fold heads on the validation split", "",
             "| protocol | label | seed | weight | cal AUROC | std ratio | slope | correlation |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        label = f"{r['criterion']} " + (f"{r['threshold']:g}" if "threshold" in r else f"q {r['quantile']:g}")
        if "skipped" in r:
            lines.append(f"| {r['protocol']} | {label} | skipped: {r['skipped']} | | | | | |")
        else:
            lines.append(f"| {r['protocol']} | {label} | {r['seed']} | {r['weight']:.3g} | {r['cal_auroc']:.3f} | "
                         f"{r['std_ratio']:.3g} | {r['slope']:.3g} | {r['correlation']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return seed_study_main(argv, __doc__, "logit_scale", study, table, 2, "seeds 0..N-1 of each fit",
                           "a uq_quality.py output folder (models/, cache/)")


if __name__ == "__main__":
    sys.exit(main())
