"""Did a change of PROBE's default make any ``uq_quality.py`` row worse? PROBE after minus PROBE before, paired.

Runs of ``uq_quality.py`` on the same members (same data, splits and member-0
errors; checked), with the previous default (``--before``) and the changed
one (``--after``), each a run folder with ``results.json`` and
``scores-<backbone>.npz``::

    python -m benchmarks.paired_change --before /tmp/uq-acac-k5 /tmp/uq-ethanol-k5 \\
        --after /tmp/uq-acac-k3 /tmp/uq-ethanol-k3 --out benchmarks/results/paired-change.json

Runs are grouped by data set and paired by PROBE's fit seed (``uq_quality.py
--fit-seed``, 0 when not recorded): give each data set's runs with the same
seeds on both sides. For every backbone × label row: PROBE's pooled AUROC and
Spearman ρ and its AUROC on the OOD files, after minus before, averaged over
the seeds, with the 95 % paired bootstrap interval (evaluation frames
resampled within each file, as ``paired_bootstrap.py`` does, one resample for
every seed), each seed's values, and the verdict's coverage and risk at p*
on the pooled frames before and after (averaged over the seeds). With
several seeds each resample draws the seed pairs with replacement too, so
the interval holds the fit's own randomness (the frames-only interval is
kept beside it, ``frames_low``/``frames_high``). A row is **worse** when the
interval lies wholly below 0. One seed per side compares two single fits:
another fit seed alone can move a row beyond that interval, so a row it
flags needs more seeds before it decides. Units: τ in eV/Å (force RMSE) and meV (|ΔE|).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import write_json
from benchmarks.paired_bootstrap import interval, label_text, load
from benchmarks.readme_tables import BACKBONES
from benchmarks.stats import bootstrap, bootstrap_seeds
from probe_ase.evaluation import metrics

Run = tuple[dict, dict]  # paired_bootstrap.load's (results, arrays)


def change_rows(before: Run | list[Run], after: Run | list[Run], reps: int = 2000, seed: int = 0) -> list[dict]:
    """The rows of one data set: ``before`` and ``after`` are runs (:func:`~benchmarks.paired_bootstrap.load`'s
    ``(results, arrays)``), or equally long lists of runs paired by fit seed. Raises ValueError when the runs'
    member files (their digests, where recorded), frames or member-0 errors differ."""
    before, after = ([runs] if isinstance(runs, tuple) else list(runs) for runs in (before, after))
    if len(before) != len(after) or not before:
        raise ValueError(f"pair the runs: {len(before)} before, {len(after)} after")
    res0, arr0 = before[0]
    for res, _ in before + after:
        models = [r.get("environment", {}).get("models") for r in (res0, res)]
        if all(models) and models[0] != models[1]:
            raise ValueError(f"{res0['dataset']}: the runs' member files differ (SHA-256): compare runs on the same "
                             "members")
    rows = []
    for kind in [k for k in res0["backbones"] if all(k in r["backbones"] for r, _ in before + after)]:
        a0 = arr0[kind]
        if any(list(a[kind]["files"]) != list(a0["files"]) or not np.array_equal(a[kind]["file_of"], a0["file_of"])
               for _, a in before + after):
            raise ValueError(f"{res0['dataset']} {kind}: the runs scored different frames")
        files, file_of = list(a0["files"]), a0["file_of"]
        for regime, crits in res0["backbones"][kind]["regimes"].items():
            for crit, r0 in crits.items():
                key = f"{regime}/{crit}"
                found = [r["backbones"][kind]["regimes"].get(regime, {}).get(crit) for r, _ in before + after]
                if any(r is None or "pooled" not in r for r in found):
                    continue
                err = a0[f"{key}/error"]
                for r, (_, a) in zip(found, before + after):
                    if not np.allclose(err, a[kind][f"{key}/error"], rtol=1e-5, atol=1e-6, equal_nan=True) or \
                            not np.isclose(r0["tau"], r["tau"], rtol=1e-5):  # the same member: float noise only
                        raise ValueError(f"{res0['dataset']} {kind} {key}: the runs' member-0 errors or tau differ "
                                         "(other members): compare runs on the same members")
                rows.append(change_row(res0["dataset"], kind, regime, crit, r0, found[: len(before)],
                                       found[len(before) :], [a[kind][f"{key}/score/PROBE"] for _, a in before],
                                       [a[kind][f"{key}/score/PROBE"] for _, a in after], err, files, file_of,
                                       reps, seed))
    return rows


def change_row(data: str, kind: str, regime: str, crit: str, r0: dict, olds: list[dict], news: list[dict],
               s0: list[np.ndarray], s1: list[np.ndarray], err: np.ndarray, files: list, file_of: np.ndarray,
               reps: int, seed: int) -> dict:
    """One row: after minus before per metric, averaged over the seed pairs, with its paired interval."""
    row = {"data": data, "backbone": kind, "regime": regime, "criterion": crit, "tau": r0["tau"], "seeds": len(olds)}
    for part, names in (("pooled", r0["pooled_files"]), ("ood", r0.get("ood_files") or [])):
        idx = np.flatnonzero(np.isin(file_of, [files.index(f) for f in names]))
        if not len(idx):
            continue
        bad, e = err[idx] > r0["tau"], err[idx]
        pairs = [(a[idx], b[idx]) for a, b in zip(s0, s1)]
        metric_of = {"auroc": lambda i, s: metrics.auroc(bad[i], s[i])}
        if part == "pooled":
            metric_of["spearman"] = lambda i, s: metrics.spearman(s[i], e[i])
        summary = "pooled" if part == "pooled" else "ood_pooled"
        for metric, value in metric_of.items():
            per_pair = [lambda i, a=a, b=b: value(i, b) - value(i, a) for a, b in pairs]
            both = bootstrap_seeds(per_pair, len(idx), strata=file_of[idx], reps=reps, seed=seed)
            frames = both if len(per_pair) == 1 else bootstrap(lambda i: np.mean([d(i) for d in per_pair]), len(idx),
                                                               strata=file_of[idx], reps=reps, seed=seed)
            per_seed = {when: [r[summary]["PROBE"][metric] for r in runs] for when, runs in (("before", olds),
                                                                                              ("after", news))}
            row[f"{part}_{metric}"] = {
                "before": float(np.mean(per_seed["before"])), "after": float(np.mean(per_seed["after"])),
                "per_seed": per_seed, "difference": both.estimate, "low": both.low, "high": both.high,
                "worse": bool(both.high < 0), "frames_low": frames.low, "frames_high": frames.high,
                "frames": len(idx)}
    row["verdict"] = {when: {k: mean_or_none([r["pooled"]["PROBE"].get(k) for r in runs])
                             for k in ("coverage_at_p_star", "risk_at_p_star")}
                      for when, runs in (("before", olds), ("after", news))}
    return row


def mean_or_none(values: list) -> float | None:
    """The mean of ``values``; None when any is None (nothing accepted)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def grouped(folders: list[Path]) -> dict[str, list[Run]]:
    """Runs by data set, each data set's sorted by fit seed."""
    runs: dict[str, list[tuple[int, Run]]] = defaultdict(list)
    for folder in folders:
        run = load(folder)
        runs[run[0]["dataset"]].append((run[0]["settings"].get("fit_seed", 0), run))
    return {data: [run for _, run in sorted(group, key=lambda x: x[0])] for data, group in runs.items()}


def fit_seeds(runs: list[Run]) -> list[int]:
    """The runs' PROBE fit seeds (0 where a run did not record one)."""
    return [res["settings"].get("fit_seed", 0) for res, _ in runs]


def table(rows: list[dict]) -> list[str]:
    """Markdown: every row, after − before (mean over the fit seeds) with its interval, and the verdict's pooled
    coverage / risk."""
    lines = ["| data | backbone | label | fit seeds | AUROC before → after | after − before [95 %] | "
             "ρ before → after | after − before [95 %] | OOD AUROC after − before [95 %] | "
             "verdict coverage / risk before → after |", "|---" * 10 + "|"]
    for r in rows:
        cells = []
        for part in ("pooled_auroc", "pooled_spearman"):
            d = r[part]
            cells += [f"{d['before']:.3f} → {d['after']:.3f}", interval(d) + (" **worse**" if d["worse"] else "")]
        d = r.get("ood_auroc")
        cells.append(interval(d) + (" **worse**" if d["worse"] else "") if d else "—")
        v = r["verdict"]
        cells.append(" → ".join(f"{x['coverage_at_p_star']:.2f} / {x['risk_at_p_star']:.3f}"
                                if x["coverage_at_p_star"] is not None and x["risk_at_p_star"] is not None else "—"
                                for x in (v["before"], v["after"])))
        lines.append(f"| {r['data']} | {BACKBONES[r['backbone']]} | {label_text(r)} | {r.get('seeds', 1)} | "
                     + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", nargs="+", type=Path, required=True, help="uq_quality.py folders, previous default")
    ap.add_argument("--after", nargs="+", type=Path, required=True,
                    help="uq_quality.py folders, changed default (the same data sets and fit seeds)")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/paired-change.json"))
    args = ap.parse_args(argv)
    before, after = grouped(args.before), grouped(args.after)
    for data in set(before) | set(after):
        if fit_seeds(before.get(data, [])) != fit_seeds(after.get(data, [])):
            raise SystemExit(f"{data}: fit seeds {fit_seeds(before.get(data, []))} before, "
                             f"{fit_seeds(after.get(data, []))} after: give runs with the same seeds on both sides")
    rows = [row for data in before for row in change_rows(before[data], after[data], args.reps, args.seed)]
    print("\n".join(table(rows)))
    worse = [f"{r['data']} {r['backbone']} {label_text(r)} {m}" for r in rows
             for m in ("pooled_auroc", "pooled_spearman", "ood_auroc") if r.get(m, {}).get("worse")]
    print(f"\n{len(rows)} rows; worse beyond the interval: {', '.join(worse) or 'none'}")
    write_json(args.out, {"command": "python -m benchmarks.paired_change " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                          "reps": args.reps, "seed": args.seed, "level": 0.95,
                          "fit_seeds": {data: fit_seeds(runs) for data, runs in before.items()}, "rows": rows,
                          "worse": worse})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
