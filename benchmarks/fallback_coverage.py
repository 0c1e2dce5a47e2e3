"""What a fallback threshold accepts as calibration data grow, by simulation (seconds; no data, no model).

When ``certify`` cannot certify the target risk, it returns the *strictest*
threshold tested at the lowest fallback risk the data certify (the first of
that rung's fixed sequence, expected to accept about ``START_MARGIN x
min_accepted(rung, delta / rungs)`` calibration structures: a count, not a
share). This measures what that costs, on the score model of
``tests/test_certify.py`` (scores uniform on (0, 1), P(unreliable | s) =
floor + (1 - s)^2 / 2, so the true risk and coverage of every threshold are
known), against a rule the package does not ship: the loosest threshold of
the same certified prefix whose calibration risk is at most the target
("aim at the target"; certified at the same fallback risk, since every
threshold of the prefix is). Per calibration size: the share of draws that
fall back, and over those draws the mean certified risk, each rule's true
coverage and true risk, and how often each rule's true risk exceeds the
target and the risk it is reported certified at::

    python benchmarks/fallback_coverage.py

Prints a table and writes JSON (default ``benchmarks/results/fallback-coverage.json``), atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from probe_ase.certify import certify, fallback_ladder, fixed_sequence, threshold_grid
from probe_ase.fileio import atomic_write

sys.path.insert(0, str(Path(__file__).parent))
from environment import environment  # noqa: E402


def true_risk(t: float, floor: float) -> float:
    """Risk among scores >= t under the score model (fraction 0-1)."""
    return floor + (1 - min(max(t, 0.0), 1.0)) ** 2 / 6


def aim_at_target(scores, bad, val, risk: float, target: float, delta: float) -> float:
    """Loosest threshold certified at the fallback ``risk`` whose calibration risk is <= ``target`` (else the strictest)."""
    level = delta / len(fallback_ladder(target))
    grid = threshold_grid(val, np.ones(len(val), dtype=bool), len(scores), risk, level)
    last = fixed_sequence(scores, bad, np.ones(len(scores), dtype=bool), grid, risk, level)
    best = 0
    for j in range(last + 1):
        accepted = scores >= grid[j]
        if bad[accepted].mean() <= target:
            best = j
    return float(grid[best])


def scenario(n_cal: int, floor: float, target: float, delta: float, draws: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(draws):
        scores = rng.uniform(size=n_cal)
        bad = rng.uniform(size=n_cal) < floor + 0.5 * (1 - scores) ** 2
        val = rng.uniform(size=int(0.75 * n_cal))  # fit_probe's split: 15 % validation beside 20 % calibration
        cert = certify(scores, bad, val, target, delta)
        if cert.certified or cert.risk >= 1:
            rows.append(None)
            continue
        t_aim = aim_at_target(scores, bad, val, cert.risk, target, delta)
        rows.append([cert.risk, 1 - cert.threshold, true_risk(cert.threshold, floor), 1 - t_aim, true_risk(t_aim, floor)])
    fell = np.array([r for r in rows if r is not None]).reshape(-1, 5)
    # the loosest threshold whose true risk is the target: floor + c^2 / 6 = target at coverage c
    oracle = float(min(1.0, np.sqrt(6 * (target - floor)))) if target > floor else 0.0
    out = {"n_cal": n_cal, "floor": floor, "draws": draws, "fallback_share": len(fell) / draws,
           "oracle_coverage": oracle}
    if len(fell):
        cert_risk = fell[:, 0]
        for name, cov, risk in (("strictest", fell[:, 1], fell[:, 2]), ("aim_at_target", fell[:, 3], fell[:, 4])):
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
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fallback-coverage.json")
    args = ap.parse_args(argv)
    rows = [scenario(n, f, args.target_risk, args.delta, args.draws, seed=k)
            for k, (f, n) in enumerate((f, n) for f in args.floors for n in args.sizes)]
    print(f"target {args.target_risk:.0%}, delta {args.delta}, {args.draws} draws per row; over the draws that fall "
          "back: mean certified risk, then coverage / true risk / share above target / share above certified risk")
    print("| floor | n_cal | true coverage at target | fallback draws | certified risk | strictest (shipped) "
          "| aim at target (not shipped) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "strictest" not in r:
            print(f"| {r['floor']:g} | {r['n_cal']} | {r['oracle_coverage']:.3f} | {r['fallback_share']:.0%} | - | - | - |")
            continue
        cells = [f"{r[k]['coverage']:.3f} / {r[k]['risk']:.1%} / {r[k]['above_target']:.0%} / {r[k]['above_certified']:.1%}"
                 for k in ("strictest", "aim_at_target")]
        print(f"| {r['floor']:g} | {r['n_cal']} | {r['oracle_coverage']:.3f} | {r['fallback_share']:.0%} | "
              f"{r['certified_risk']:.1%} | {cells[0]} | {cells[1]} |")
    result = {"command": " ".join(["fallback_coverage.py"] + (argv if argv is not None else sys.argv[1:])),
              "target_risk": args.target_risk, "delta": args.delta, "rows": rows, "environment": environment()}
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
