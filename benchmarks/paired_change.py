"""Did a change of PROBE's default make any ``uq_quality.py`` row worse? PROBE after minus PROBE before, paired.

Two runs of ``uq_quality.py`` on the same members (same data, splits and
member-0 errors; checked), one with the previous default (``--before``) and
one with the changed one (``--after``), each a run folder with
``results.json`` and ``scores-<backbone>.npz``::

    python -m benchmarks.paired_change --before /tmp/uq-acac-k5 /tmp/uq-ethanol-k5 \\
        --after /tmp/uq-acac-k3 /tmp/uq-ethanol-k3 --out benchmarks/results/paired-change.json

For every backbone × label row: PROBE's pooled AUROC and Spearman ρ and its
AUROC on the OOD files, after minus before, with the 95 % paired bootstrap
interval (evaluation frames resampled within each file, as
``paired_bootstrap.py`` does), and the verdict's coverage and risk at p* on
the pooled frames before and after. A row is **worse** when the interval lies
wholly below 0. Units: τ in eV/Å (force RMSE) and meV (|ΔE|).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import write_json
from benchmarks.paired_bootstrap import interval, label_text, load
from benchmarks.readme_tables import BACKBONES
from benchmarks.stats import bootstrap
from probe_ase.evaluation import metrics


def change_rows(before: tuple[dict, dict], after: tuple[dict, dict], reps: int = 2000, seed: int = 0) -> list[dict]:
    """The rows of one data set: ``before`` and ``after`` are :func:`~benchmarks.paired_bootstrap.load`'s
    ``(results, arrays)`` of the two runs. Raises ValueError when the runs' member files (their digests, where
    recorded), frames or member-0 errors differ."""
    (res0, arr0), (res1, arr1) = before, after
    models = [r.get("environment", {}).get("models") for r in (res0, res1)]
    if all(models) and models[0] != models[1]:
        raise ValueError(f"{res0['dataset']}: the runs' member files differ (SHA-256): compare runs on the same members")
    rows = []
    for kind in [k for k in res0["backbones"] if k in res1["backbones"]]:
        a0, a1 = arr0[kind], arr1[kind]
        if list(a0["files"]) != list(a1["files"]) or not np.array_equal(a0["file_of"], a1["file_of"]):
            raise ValueError(f"{res0['dataset']} {kind}: the two runs scored different frames")
        files, file_of = list(a0["files"]), a0["file_of"]
        for regime, crits in res0["backbones"][kind]["regimes"].items():
            for crit, r0 in crits.items():
                r1 = res1["backbones"][kind]["regimes"].get(regime, {}).get(crit)
                if "pooled" not in r0 or r1 is None or "pooled" not in r1:
                    continue
                key = f"{regime}/{crit}"
                err = a0[f"{key}/error"]
                if not np.allclose(err, a1[f"{key}/error"], rtol=1e-5, atol=1e-6, equal_nan=True) or not np.isclose(
                        r0["tau"], r1["tau"], rtol=1e-5):  # another pass over the same member: float noise only
                    raise ValueError(f"{res0['dataset']} {kind} {key}: the runs' member-0 errors or tau differ "
                                     "(other members): compare runs on the same members")
                old, new = a0[f"{key}/score/PROBE"], a1[f"{key}/score/PROBE"]
                row = {"data": res0["dataset"], "backbone": kind, "regime": regime, "criterion": crit,
                       "tau": r0["tau"]}
                for part, names in (("pooled", r0["pooled_files"]), ("ood", r0.get("ood_files") or [])):
                    idx = np.flatnonzero(np.isin(file_of, [files.index(f) for f in names]))
                    if not len(idx):
                        continue
                    bad, e, s0, s1 = err[idx] > r0["tau"], err[idx], old[idx], new[idx]
                    stats = {"auroc": lambda i: metrics.auroc(bad[i], s1[i]) - metrics.auroc(bad[i], s0[i])}
                    if part == "pooled":
                        stats["spearman"] = lambda i: metrics.spearman(s1[i], e[i]) - metrics.spearman(s0[i], e[i])
                    for metric, stat in stats.items():
                        iv = bootstrap(stat, len(idx), strata=file_of[idx], reps=reps, seed=seed)
                        summary = "pooled" if part == "pooled" else "ood_pooled"
                        row[f"{part}_{metric}"] = {
                            "before": r0[summary]["PROBE"][metric], "after": r1[summary]["PROBE"][metric],
                            "difference": iv.estimate, "low": iv.low, "high": iv.high,
                            "worse": bool(iv.high < 0), "frames": len(idx)}
                row["verdict"] = {when: {k: r["pooled"]["PROBE"].get(k) for k in ("coverage_at_p_star",
                                                                                  "risk_at_p_star")}
                                  for when, r in (("before", r0), ("after", r1))}
                rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    """Markdown: every row, after − before with its interval, and the verdict's pooled coverage / risk."""
    lines = ["| data | backbone | label | AUROC before → after | after − before [95 %] | ρ before → after | "
             "after − before [95 %] | OOD AUROC after − before [95 %] | verdict coverage / risk before → after |",
             "|---" * 9 + "|"]
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
        lines.append(f"| {r['data']} | {BACKBONES[r['backbone']]} | {label_text(r)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", nargs="+", type=Path, required=True, help="uq_quality.py folders, previous default")
    ap.add_argument("--after", nargs="+", type=Path, required=True,
                    help="uq_quality.py folders, changed default (same data sets, same order)")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/paired-change.json"))
    args = ap.parse_args(argv)
    if len(args.before) != len(args.after):
        raise SystemExit("give as many --after folders as --before folders (one per data set, same order)")
    rows = []
    for old, new in zip(args.before, args.after):
        rows += change_rows(load(old), load(new), args.reps, args.seed)
    print("\n".join(table(rows)))
    worse = [f"{r['data']} {r['backbone']} {label_text(r)} {m}" for r in rows
             for m in ("pooled_auroc", "pooled_spearman", "ood_auroc") if r.get(m, {}).get("worse")]
    print(f"\n{len(rows)} rows; worse beyond the interval: {', '.join(worse) or 'none'}")
    write_json(args.out, {"command": "python -m benchmarks.paired_change " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                          "reps": args.reps, "seed": args.seed, "level": 0.95, "rows": rows, "worse": worse})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
