"""What a fallback threshold accepts as calibration data grow: the default rule against fallback="target".

When ``certify`` cannot certify the target risk, by default it returns the *strictest*
threshold tested at the lowest fallback risk the data certify (the first of
that rung's fixed sequence, expected to accept about ``START_MARGIN x
min_accepted(rung, delta / rungs)`` calibration structures: a count, not a
share). This measures what that costs, on the score model of
``tests/test_fitting_certify.py`` (scores uniform on (0, 1), P(unreliable | s) =
floor + (1 - s)^2 / 2, so the true risk and coverage of every threshold are
known), against the opt-in ``fallback="target"``: the loosest threshold of
the same certified prefix whose calibration risk is at most the target
(certified at the same fallback risk, since every threshold of the prefix is). Per calibration size: the share of draws that
fall back, and over those draws the mean certified risk, each rule's true
coverage and true risk, and how often each rule's true risk exceeds the
target and the risk it is reported certified at::

    python -m benchmarks.fallback_coverage

With ``--data`` and ``--run`` (a finished ``uq_quality.py`` run of MACE), the
same two rules on real scores instead: the ensemble baselines' scores over
the fit pool (mean and max force std, energy std, latent distance; no head
is fitted, no evaluation file is read), for ``uq_quality.py``'s four labels
and ``--reps`` seeded draws of two splits of the fit pool: *exchangeable*
(60 % of the pool certifies, 40 % grid / 60 % calibration as in
``uq_quality.py``; the other 40 % are fresh frames) and *leave-shift-out*
(60 % of the pool's in-distribution part certifies; fresh: the rest of
that part, and apart, the pool's shifted part, acac train_600K or ethanol's
methanol frames). Per split, label and score, over the draws that fall
back: accepted fresh frames, their risk and the coverage of the reliable
ones, per rule::

    python -m benchmarks.fallback_coverage --data ../shared/data/acac --run benchmarks/results/uq-acac

Prints a table and writes JSON (default ``benchmarks/results/fallback-coverage.json``;
``RUN/fallback_coverage.json`` for ``--run``), atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from probe_ase.fitting.certify import certify

from benchmarks.common import write_json
from benchmarks.environment import environment


def true_risk(t: float, floor: float) -> float:
    """Risk among scores >= t under the score model (fraction 0-1)."""
    return floor + (1 - min(max(t, 0.0), 1.0)) ** 2 / 6


def thresholds(scores, bad, grid_scores, target: float, delta: float) -> tuple:
    """The certificate, and the threshold of each fallback rule (the same unless it falls back)."""
    cert = certify(scores, bad, grid_scores, target, delta)
    return cert, cert.threshold, certify(scores, bad, grid_scores, target, delta, fallback="target").threshold


def operating(score: np.ndarray, bad: np.ndarray, threshold: float) -> dict:
    """Fresh frames accepted at ``threshold`` (score >= it), their risk and the coverage of the reliable ones."""
    accepted = score >= threshold
    return {"accepted": int(accepted.sum()), "n": len(score),
            "risk": float(bad[accepted].mean()) if accepted.any() else float("nan"),
            "coverage_of_reliable": float(accepted[~bad].mean()) if (~bad).any() else float("nan")}


def fit_pool_rows(data: Path, run: Path, reps: int, target: float, delta: float) -> list[dict]:
    """Both rules on the MACE ensemble baselines' fit-pool scores, exchangeable and leave-shift-out draws."""
    from benchmarks.common import find_members, load_splits, make_calc
    from benchmarks.uq_quality import REGIMES, pool_scores

    _, _, pool, pool_in, _, _ = load_splits(data.resolve(), quick=False)
    paths = find_members(run / "models", seeds="[0-4]", count=5)
    errors, baselines = pool_scores("mace", paths, make_calc("mace", paths[0]), pool, run / "cache")
    inside = np.arange(len(pool)) < len(pool_in)  # the pool lists its in-distribution part first
    rows = []
    for rep in range(reps):
        rng = np.random.default_rng(rep)
        for split in ("exchangeable", "leave-shift-out"):
            candidates = np.flatnonzero(inside) if split == "leave-shift-out" else np.arange(len(pool))
            order = rng.permutation(candidates)
            certifying = order[: int(round(0.6 * len(order)))]
            grid_part = rng.uniform(size=len(certifying)) < 0.4
            fresh = {"fresh": order[len(certifying):]}
            if split == "leave-shift-out":
                fresh["shifted"] = np.flatnonzero(~inside)
            for crit, tau_abs in REGIMES["absolute"].items():
                for label, tau in ((f"{tau_abs:g}", tau_abs),
                                   ("top 20 %", float(np.quantile(errors[crit][certifying], REGIMES["quantile"])))):
                    bad = errors[crit] > tau
                    for name, baseline in baselines.items():
                        score = -baseline  # higher: more reliable
                        cal, grid = certifying[~grid_part], certifying[grid_part]
                        cert, t_strict, t_target = thresholds(score[cal], bad[cal], score[grid], target, delta)
                        row = {"rep": rep, "split": split, "criterion": crit, "label": label, "score": name,
                               "certified": cert.certified, "certified_risk": cert.risk, "n_cal": len(cal)}
                        for part, ids in fresh.items():
                            row[part] = {rule: operating(score[ids], bad[ids], t)
                                         for rule, t in (("strictest", t_strict), ("target", t_target))}
                        rows.append(row)
    return rows


def fit_pool_table(rows: list[dict], target: float) -> None:
    """Per split, label, score and fresh part: means over the draws that fall back, each rule."""
    print(f"\nfit pool, MACE ensemble baselines, target {target:.0%}; over the draws that fall back (of all draws): "
          "mean certified risk, then fresh accepted / risk / coverage of reliable per rule")
    print("| split | label | score | frames | fallback draws | certified risk | strictest (default) "
          "| fallback='target' (opt-in) |")
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["split"], r["criterion"], r["label"], r["score"]) for r in rows})
    for split, crit, label, score in keys:
        same = [r for r in rows if (r["split"], r["criterion"], r["label"], r["score"]) == (split, crit, label, score)]
        fell = [r for r in same if not r["certified"] and r["certified_risk"] < 1]
        for part in ("fresh", "shifted") if split == "leave-shift-out" else ("fresh",):
            if not fell:
                print(f"| {split} | {crit} {label} | {score} | {part} | 0 of {len(same)} | - | - | - |")
                continue
            cells = []
            for rule in ("strictest", "target"):
                ops = [r[part][rule] for r in fell]
                cells.append(f"{np.mean([o['accepted'] for o in ops]):.1f} / {np.nanmean([o['risk'] for o in ops]):.1%} / "
                             f"{np.nanmean([o['coverage_of_reliable'] for o in ops]):.3f}")
            print(f"| {split} | {crit} {label} | {score} | {part} ({same[0][part]['strictest']['n']}) | "
                  f"{len(fell)} of {len(same)} | {np.mean([r['certified_risk'] for r in fell]):.1%} | "
                  f"{cells[0]} | {cells[1]} |")


def scenario(n_cal: int, floor: float, target: float, delta: float, draws: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(draws):
        scores = rng.uniform(size=n_cal)
        bad = rng.uniform(size=n_cal) < floor + 0.5 * (1 - scores) ** 2
        val = rng.uniform(size=int(0.75 * n_cal))  # fit_probe's split: 15 % validation beside 20 % calibration
        cert, t_strict, t_target = thresholds(scores, bad, val, target, delta)
        if cert.certified or cert.risk >= 1:
            rows.append(None)
            continue
        rows.append([cert.risk, 1 - t_strict, true_risk(t_strict, floor), 1 - t_target, true_risk(t_target, floor)])
    fell = np.array([r for r in rows if r is not None]).reshape(-1, 5)
    # the loosest threshold whose true risk is the target: floor + c^2 / 6 = target at coverage c
    oracle = float(min(1.0, np.sqrt(6 * (target - floor)))) if target > floor else 0.0
    out = {"n_cal": n_cal, "floor": floor, "draws": draws, "fallback_share": len(fell) / draws,
           "oracle_coverage": oracle}
    if len(fell):
        cert_risk = fell[:, 0]
        for name, cov, risk in (("strictest", fell[:, 1], fell[:, 2]), ("target", fell[:, 3], fell[:, 4])):
            out[name] = {"coverage": float(cov.mean()), "risk": float(risk.mean()),
                         "above_target": float(np.mean(risk > target)), "above_certified": float(np.mean(risk > cert_risk))}
        out["certified_risk"] = float(cert_risk.mean())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[60, 120, 250, 500, 1000], help="calibration structures")
    ap.add_argument("--floors", type=float, nargs="+", default=[0.0, 0.03],
                    help="risk floor of the score model (fraction 0-1): the target's true coverage falls with it")
    ap.add_argument("--target-risk", type=float, default=0.05)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--data", type=Path, default=None, help="acac or ethanol folder: real fit-pool scores instead")
    ap.add_argument("--run", type=Path, default=None, help="with --data: a finished uq_quality.py run (models/, cache/)")
    ap.add_argument("--reps", type=int, default=10, help="with --data: seeded draws of each split")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    command = " ".join(["fallback_coverage.py"] + (argv if argv is not None else sys.argv[1:]))
    if (args.data is None) != (args.run is None):
        ap.error("--data and --run go together")
    if args.data is not None:
        rows = fit_pool_rows(args.data, args.run, args.reps, args.target_risk, args.delta)
        fit_pool_table(rows, args.target_risk)
        out = args.out or args.run / "fallback_coverage.json"
        result = {"command": command, "target_risk": args.target_risk, "delta": args.delta, "rows": rows,
                  "environment": environment()}
        write_json(out, result)
        print(f"wrote {out}")
        return
    rows = [scenario(n, f, args.target_risk, args.delta, args.draws, seed=k)
            for k, (f, n) in enumerate((f, n) for f in args.floors for n in args.sizes)]
    print(f"target {args.target_risk:.0%}, delta {args.delta}, {args.draws} draws per row; over the draws that fall "
          "back: mean certified risk, then coverage / true risk / share above target / share above certified risk")
    print("| floor | n_cal | true coverage at target | fallback draws | certified risk | strictest (default) "
          "| fallback='target' (opt-in) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "strictest" not in r:
            print(f"| {r['floor']:g} | {r['n_cal']} | {r['oracle_coverage']:.3f} | {r['fallback_share']:.0%} | - | - | - |")
            continue
        cells = [f"{r[k]['coverage']:.3f} / {r[k]['risk']:.1%} / {r[k]['above_target']:.0%} / {r[k]['above_certified']:.1%}"
                 for k in ("strictest", "target")]
        print(f"| {r['floor']:g} | {r['n_cal']} | {r['oracle_coverage']:.3f} | {r['fallback_share']:.0%} | "
              f"{r['certified_risk']:.1%} | {cells[0]} | {cells[1]} |")
    out = args.out or Path(__file__).parent / "results" / "fallback-coverage.json"
    result = {"command": command, "target_risk": args.target_risk, "delta": args.delta, "rows": rows,
              "environment": environment()}
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
