"""How sure are the DFT comparisons? Paired bootstrap intervals from ``uq_quality.py``'s per-frame scores.

Reads ``results.json`` and ``scores-<backbone>.npz`` of each run folder (no
fitting, about a minute) and resamples the evaluation frames, within each
file (so a pooled metric keeps the files' mix), ``--reps`` times::

    python -m benchmarks.paired_bootstrap benchmarks/results/uq-acac benchmarks/results/uq-ethanol

1. **Ranking**: for every backbone × label, PROBE's pooled AUROC and
   Spearman ρ minus the ensemble's best score (by AUROC on all frames, as the
   README's summary table picks it; that choice favours the ensemble), and the
   same AUROC difference on the OOD files. Each row gives the difference, its
   95 % interval, and how often a resample put PROBE below the ensemble.
2. **Leave-shift-out operating points** (the issue's target check, MACE
   rows of ``readme_tables.py``): on each shifted file where the verdict
   accepts >= 20 frames, the verdict's risk (target: <= 10 %), its risk minus
   each ensemble score's, and its coverage of truly reliable frames divided by
   the larger of the two ensemble scores' (target: >= 0.8), with how often a
   resample meets each target.

What the intervals cover: which evaluation frames were drawn, with each
method's thresholds, heads and members fixed. Not covered: the calibration
draw behind a threshold, the head's seed (see ``head_seeds.py``) and the
members' training. Frames are resampled as independent; frames of one MD
trajectory are correlated, which makes the intervals too narrow, not too wide.

Writes ``paired-bootstrap.json`` and ``paired-bootstrap.png`` (AUROC
differences with their intervals, every row) into ``--out``. Units: τ in
eV/Å (force RMSE) and meV (|ΔE|); risk and coverage are fractions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.common import write_json
from benchmarks.stats import bootstrap
from probe_ase.evaluation import metrics
from probe_ase.fileio import atomic_write
from benchmarks.readme_tables import (BACKBONES, COVERAGE_SHARE, CRITERIA, ENSEMBLE, MIN_ACCEPTED, OPERATING, RISK_CAP, num,
                           tau_label)

VERDICT = OPERATING[1]
#: the issue's leave-shift-out targets on one resample's statistic
MEETS = {"verdict_risk": lambda r: r <= RISK_CAP, "coverage_share": lambda c: c >= COVERAGE_SHARE}


def load(folder: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """A run's results and, per backbone, its per-frame arrays."""
    path = folder / "results.json"
    if not path.exists():
        raise SystemExit(f"{path}: no results.json (run uq_quality.py --out {folder} first)")
    res = json.loads(path.read_text())
    arrays = {}
    for kind in list(res["backbones"]):
        npz = folder / f"scores-{kind}.npz"
        if not npz.exists():
            print(f"{npz}: missing, so its {BACKBONES[kind]} rows are left out (uq_quality.py writes it; rerun it "
                  f"with --backbones {kind})", file=sys.stderr)
            del res["backbones"][kind]
            continue
        with np.load(npz) as z:
            arrays[kind] = {k: z[k] for k in z.files}
    return res, arrays


def ranking_rows(name: str, res: dict, arrays: dict, reps: int, seed: int) -> list[dict]:
    """PROBE minus the ensemble's best score: pooled AUROC, pooled ρ, OOD AUROC, with intervals."""
    rows = []
    for kind, bb in res["backbones"].items():
        a = arrays[kind]
        files, file_of = list(a["files"]), a["file_of"]
        for regime, crits in bb["regimes"].items():
            for crit, r in crits.items():
                if "pooled" not in r:
                    continue
                key = f"{regime}/{crit}"
                ens = max(ENSEMBLE, key=lambda m: r["pooled"][m]["auroc"])
                row = {"data": name, "backbone": kind, "regime": regime, "criterion": crit, "tau": r["tau"],
                       "ensemble_score": ens}
                for part, names in (("pooled", r["pooled_files"]), ("ood", r.get("ood_files") or [])):
                    idx = np.flatnonzero(np.isin(file_of, [files.index(f) for f in names]))
                    if not len(idx):
                        continue
                    err, probe, other = (a[f"{key}/error"][idx], a[f"{key}/score/PROBE"][idx],
                                         a[f"{key}/score/{ens}"][idx])
                    bad = err > r["tau"]
                    stats = {"auroc": lambda i: metrics.auroc(bad[i], probe[i]) - metrics.auroc(bad[i], other[i])}
                    if part == "pooled":
                        stats["spearman"] = lambda i: metrics.spearman(probe[i], err[i]) - metrics.spearman(other[i],
                                                                                                             err[i])
                    for metric, stat in stats.items():
                        iv = bootstrap(stat, len(idx), strata=file_of[idx], reps=reps, seed=seed)
                        summary = r["pooled" if part == "pooled" else "ood_pooled"]
                        row[f"{part}_{metric}"] = {
                            "probe": summary["PROBE"][metric], "ensemble": summary[ens][metric],
                            "difference": iv.estimate, "low": iv.low, "high": iv.high,
                            "share_probe_below": iv.share_below_zero, "frames": len(idx)}
                rows.append(row)
    return rows


def shift_rows(name: str, res: dict, arrays: dict, reps: int, seed: int) -> list[dict]:
    """The leave-shift-out target check, each number with its interval."""
    rows = []
    for kind, bb in res["backbones"].items():
        a = arrays[kind]
        files, file_of = list(a["files"]), a["file_of"]
        for label, entry in bb.get("leave_shift_out", {}).items():
            acc = {m: a[f"{label}/leave_shift_out/accept/{m}"] for m in (VERDICT, *ENSEMBLE[:2])}
            err = a[f"{label}/error"]
            for file, methods in entry["files"].items():
                if methods[VERDICT]["accepted"] < MIN_ACCEPTED:
                    continue
                shifted = [files.index(f) for f in (entry["files"] if file == "pooled" else [file]) if f != "pooled"]
                idx = np.flatnonzero(np.isin(file_of, shifted) & np.isfinite(err))
                good = err[idx] <= entry["tau"]
                v, mean, mx = (acc[m][idx] for m in (VERDICT, *ENSEMBLE[:2]))

                def risk(accepted, i):
                    return float(np.mean(~good[i][accepted[i]])) if accepted[i].any() else float("nan")

                def cover(accepted, i):
                    return float(accepted[i][good[i]].mean()) if good[i].any() else float("nan")

                def ratio(i):
                    best = max(cover(mean, i), cover(mx, i))
                    return cover(v, i) / best if best > 0 else float("nan")

                stats = {"verdict_risk": lambda i: risk(v, i),
                         "risk_minus_mean_force_std": lambda i: risk(v, i) - risk(mean, i),
                         "risk_minus_max_force_std": lambda i: risk(v, i) - risk(mx, i),
                         "coverage_share": ratio}
                row = {"data": name, "backbone": kind, "label": label, "tau": entry["tau"], "file": file,
                       "frames": len(idx), "verdict_accepted": methods[VERDICT]["accepted"],
                       "reliable_frames": int(good.sum())}
                for metric, stat in stats.items():
                    iv = bootstrap(stat, len(idx), strata=file_of[idx], reps=reps, seed=seed)
                    row[metric] = {"estimate": iv.estimate, "low": iv.low, "high": iv.high,
                                   "share_below_zero": iv.share_below_zero}
                    if metric in MEETS:  # how often a resample meets the target
                        row[metric]["share_meeting_target"] = float(np.mean(MEETS[metric](iv.replicates)))
                rows.append(row)
    return rows


def label_text(row: dict) -> str:
    regime = row.get("regime") or row["label"].split("/")[0]
    crit = row.get("criterion") or row["label"].split("/")[1]
    return f"{CRITERIA[crit]}, {tau_label(regime, crit, row['tau'])}"


def interval(d: dict, key: str = "difference") -> str:
    return f"{num(d[key])} [{num(d['low'])}, {num(d['high'])}]"


def share(x: float) -> str:
    """A fraction as a percentage; "—" when no resample gave a value."""
    return "—" if np.isnan(x) else f"{x:.0%}"


def ranking_table(rows: list[dict]) -> list[str]:
    lines = ["| data | backbone | label | ensemble score | AUROC: PROBE − ensemble [95 %] | PROBE below | "
             "ρ: PROBE − ensemble [95 %] | PROBE below | OOD AUROC: PROBE − ensemble [95 %] | PROBE below |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for part in ("pooled_auroc", "pooled_spearman", "ood_auroc"):
            d = r.get(part)
            cells += [interval(d), share(d["share_probe_below"])] if d else ["—", "—"]
        lines.append(f"| {r['data']} | {BACKBONES[r['backbone']]} | {label_text(r)} | {r['ensemble_score']} | "
                     + " | ".join(cells) + " |")
    return lines


def shift_table(rows: list[dict]) -> list[str]:
    lines = ["| data | backbone | label | file | frames (reliable) | verdict accepted | verdict risk [95 %] | "
             "resamples ≤ 10 % | risk − ens. mean force std [95 %] | risk − ens. max force std [95 %] | "
             "coverage share of the ensemble's [95 %] | resamples ≥ 0.8 |", "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['data']} | {BACKBONES[r['backbone']]} | {label_text(r)} | {r['file']} | "
                     f"{r['frames']} ({r['reliable_frames']}) | "
                     f"{r['verdict_accepted']} | {interval(r['verdict_risk'], 'estimate')} | "
                     f"{share(r['verdict_risk']['share_meeting_target'])} | "
                     f"{interval(r['risk_minus_mean_force_std'], 'estimate')} | "
                     f"{interval(r['risk_minus_max_force_std'], 'estimate')} | "
                     f"{interval(r['coverage_share'], 'estimate')} | "
                     f"{share(r['coverage_share']['share_meeting_target'])} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Forest plot: every row's pooled and OOD AUROC difference with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.4))
    y = np.arange(len(rows))[::-1]
    for part, dy, colour in (("pooled_auroc", 0.12, "tab:blue"), ("ood_auroc", -0.12, "tab:orange")):
        have = [(yy, r[part]) for yy, r in zip(y, rows) if r.get(part)]
        if not have:
            continue
        ys = np.array([h[0] for h in have]) + dy
        d = np.array([[h[1]["difference"], h[1]["low"], h[1]["high"]] for h in have])
        ax.errorbar(d[:, 0], ys, xerr=[d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]], fmt="o", ms=3, color=colour,
                    capsize=2, label="pooled" if part == "pooled_auroc" else "OOD files")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [f"{r['data']} {BACKBONES[r['backbone']]} {label_text(r).replace(chr(92), '')}" for r in rows],
                  fontsize=7)
    ax.set_xlabel("AUROC: PROBE − ensemble's best score (95 % paired bootstrap interval)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="uq_quality.py output folders (results.json, scores-*.npz)")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                    help="folder for paired-bootstrap.json / .png (default benchmarks/results)")
    args = ap.parse_args(argv)
    ranking, shifts = [], []
    for folder in tqdm(args.runs, desc="runs", unit="run"):
        res, arrays = load(folder)
        ranking += ranking_rows(res["dataset"], res, arrays, args.reps, args.seed)
        shifts += shift_rows(res["dataset"], res, arrays, args.reps, args.seed)
    for title, lines in (("Ranking: PROBE minus the ensemble's best score", ranking_table(ranking)),
                         (f"Leave-shift-out targets (files where the verdict accepts >= {MIN_ACCEPTED} frames)",
                          shift_table(shifts))):
        print(f"### {title}\n\n" + "\n".join(lines) + "\n")
    out = {"command": " ".join(["paired_bootstrap.py"] + (argv if argv is not None else sys.argv[1:])),
           "reps": args.reps, "seed": args.seed, "level": 0.95, "ranking": ranking, "leave_shift_out": shifts}
    write_json(args.out / "paired-bootstrap.json", out)
    plot(ranking, args.out / "paired-bootstrap.png")
    print(f"wrote {args.out / 'paired-bootstrap.json'}, {args.out / 'paired-bootstrap.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
