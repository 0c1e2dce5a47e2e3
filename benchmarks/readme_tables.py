"""The README's DFT tables, written from ``uq_quality.py`` runs (no fitting, seconds).

Prints, in the README's markdown: the pooled AUROC / Spearman summary (every
backbone × regime × criterion), the operating-point table (original protocol
and leave-shift-out, MACE), the leave-shift-out ranking table, and the issue's
leave-shift-out target check (files with >= 20 frames accepted by the verdict)::

    python -m benchmarks.readme_tables benchmarks/results/uq-acac benchmarks/results/uq-ethanol

Units: τ in eV/Å (force RMSE) and meV (|ΔE|); coverage and risk are fractions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

BACKBONES = {"mace": "MACE", "schnetpack": "PaiNN"}
CRITERIA = {"force_rmse": "force RMSE", "energy": "\\|ΔE\\|"}
ENSEMBLE = ("ens_force_std", "ens_force_max_std", "ens_energy_std")
OPERATING = ("PROBE (p only)", "PROBE verdict (p and support)", "ens_force_std", "ens_force_max_std",
             "ens_energy_std", "latent_distance")
OPERATING_HEADS = ("PROBE p only", "PROBE verdict", "ens. mean force std", "ens. max force std", "ens. energy std",
                   "latent distance")
#: the issue's leave-shift-out targets: files with this many accepted frames, risk cap, coverage share of the ensemble's
MIN_ACCEPTED, RISK_CAP, COVERAGE_SHARE = 20, 0.10, 0.8


def num(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` decimals with a typographic minus; "—" for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}".replace("-", "−")


def tau_label(regime: str, crit: str, tau: float) -> str:
    """"0.1 eV/Å", "43 meV" or "top 20 %"."""
    if regime == "quantile":
        return "top 20 %"
    return f"{tau:g} eV/Å" if crit == "force_rmse" else f"{tau * 1000:.0f} meV"


def summary(runs: dict[str, dict]) -> list[str]:
    """Pooled AUROC / ρ of PROBE, the ensemble's best score (by AUROC), latent distance; OOD AUROC."""
    lines = ["| data | backbone | τ | criterion | PROBE | ensemble | latent distance | OOD: PROBE | OOD: ensemble |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, res in runs.items():
        for kind, bb in res["backbones"].items():
            for regime, crits in bb["regimes"].items():
                for crit, r in crits.items():
                    pooled, ood = r["pooled"], r.get("ood_pooled") or {}
                    ens = max(ENSEMBLE, key=lambda m: pooled[m]["auroc"])
                    pair = lambda m: f"{num(pooled[m]['auroc'])} / {num(pooled[m]['spearman'])}"  # noqa: E731
                    lines.append(f"| {name} | {BACKBONES[kind]} | {tau_label(regime, crit, r['tau'])} | "
                                 f"{CRITERIA[crit]} | {pair('PROBE')} | {pair(ens)} | {pair('latent_distance')} | "
                                 f"{num(ood.get('PROBE', {}).get('auroc'))} | {num(ood.get(ens, {}).get('auroc'))} |")
    return lines


def cell(row: dict) -> str:
    """"coverage / risk", or "0 / —" when nothing is accepted."""
    return "0 / —" if not row["accepted"] else f"{row['coverage']:.2f} / {row['risk']:.2f}"


def label_of(key: str, tau: float) -> str:
    regime, crit = key.split("/")
    return f"{CRITERIA[crit]}, {tau_label(regime, crit, tau)}"


def operating(runs: dict[str, dict], kind: str) -> list[str]:
    """Coverage / risk of every method's fit-pool threshold on each evaluation file, both protocols."""
    lines = ["| data | protocol | label | certified risk: PROBE / ens. mean force std | file | frames | "
             + " | ".join(OPERATING_HEADS) + " |", "|---" * (6 + len(OPERATING)) + "|"]
    for name, res in runs.items():
        bb = res["backbones"].get(kind)
        for protocol, key in (("original", "operating_point"), ("leave-shift-out", "leave_shift_out")):
            for label, entry in (bb or {}).get(key, {}).items():
                cert = entry["certified_risk"]
                for file, methods in entry["files"].items():
                    n = methods[OPERATING[0]]["n"]
                    lines.append(f"| {name} | {protocol} | {label_of(label, entry['tau'])} | "
                                 f"{cert[OPERATING[1]]:.3g} / {cert['ens_force_std']:.3g} | {file} | {n} | "
                                 + " | ".join(cell(methods[m]) for m in OPERATING) + " |")
    return lines


def shift_ranking(runs: dict[str, dict], kind: str) -> list[str]:
    """AUROC of each score on each shifted file of the leave-shift-out protocol."""
    ranked = ("PROBE (p only)", *ENSEMBLE, "latent_distance")
    lines = ["| data | label | file | PROBE (1 − p) | ens. mean force std | ens. max force std | ens. energy std | "
             "latent distance |", "|---|---|---|---|---|---|---|---|"]
    for name, res in runs.items():
        for label, entry in res["backbones"].get(kind, {}).get("leave_shift_out", {}).items():
            for file, methods in entry["files"].items():
                lines.append(f"| {name} | {label_of(label, entry['tau'])} | {file} | "
                             + " | ".join(num(methods[m].get("auroc")) for m in ranked) + " |")
    return lines


def targets(runs: dict[str, dict], kind: str) -> list[str]:
    """The issue's leave-shift-out targets on every file where the verdict accepts >= MIN_ACCEPTED frames."""
    verdict = OPERATING[1]
    lines = ["| data | label | file | verdict accepted | verdict risk | risk ≤ 10 % | ens. mean / max force std risk | "
             "risk ≤ ensemble's | coverage of reliable: verdict / ens. mean / ens. max | ≥ 80 % of ensemble's |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in runs.items():
        for label, entry in res["backbones"].get(kind, {}).get("leave_shift_out", {}).items():
            for file, methods in entry["files"].items():
                v, mean, mx = methods[verdict], methods["ens_force_std"], methods["ens_force_max_std"]
                if v["accepted"] < MIN_ACCEPTED:
                    continue
                risks = [r["risk"] for r in (mean, mx) if r["accepted"]]
                cover = v["coverage_of_reliable"]
                lines.append(
                    f"| {name} | {label_of(label, entry['tau'])} | {file} | {v['accepted']} | {v['risk']:.3f} | "
                    f"{'yes' if v['risk'] <= RISK_CAP else 'no'} | {num(mean['risk'])} / {num(mx['risk'])} | "
                    f"{'yes' if all(v['risk'] <= r for r in risks) else 'no'} | {cover:.3f} / "
                    f"{mean['coverage_of_reliable']:.3f} / {mx['coverage_of_reliable']:.3f} | "
                    f"{'yes' if cover >= COVERAGE_SHARE * max(mean['coverage_of_reliable'], mx['coverage_of_reliable']) else 'no'} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="uq_quality.py output folders (each with results.json)")
    ap.add_argument("--backbone", default="mace", choices=list(BACKBONES),
                    help="backbone of the operating-point and leave-shift-out tables")
    args = ap.parse_args(argv)
    runs = {}
    for folder in args.runs:
        path = folder / "results.json"
        if not path.exists():
            raise SystemExit(f"{path}: no results.json (run uq_quality.py --out {folder} first)")
        res = json.loads(path.read_text())
        runs[res["dataset"]] = res
    for title, lines in (("Pooled AUROC / Spearman ρ", summary(runs)),
                         ("Operating point", operating(runs, args.backbone)),
                         ("Ranking under leave-shift-out (AUROC)", shift_ranking(runs, args.backbone)),
                         (f"Leave-shift-out targets (files with >= {MIN_ACCEPTED} frames accepted by the verdict)",
                          targets(runs, args.backbone))):
        print(f"### {title}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
