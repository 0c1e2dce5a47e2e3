"""A companion model's second opinion on the mlearn crystals: the combined verdict, its every-k cost, heads fitted on
companion labels.

    python -m benchmarks.companion --data ../shared/data/mlearn [--mlearn benchmarks/results/mlearn]
        [--backbones chgnet-0.3.0 7net-0 7net-l3i5] [--companions chgnet-0.2.0] [--every 1 5 10 50]
        [--out benchmarks/results/companion]
    python -m benchmarks.companion --data ../shared/data/mlearn --timing [--pairs chgnet-0.3.0:7net-l3i5 ...]

Builds on ``benchmarks/mlearn.py``: the same cells, protocols (``random``, ``shift``), label regimes (``absolute``
0.2 eV/Å, ``quantile`` 0.8) and cached model passes (``--mlearn``/cache), and its DFT-label heads (``--mlearn``/heads;
run that benchmark first). Every scored backbone is paired with every other model (scored ones and ``--companions``).

* **Every k.** The cells of each file and config_type form a sequence (the file's order; AIMD snapshots in
  time order); at ``k`` the companion runs on every k-th cell of a sequence and the cells between carry its last
  disagreement (the calculator's ``companion_every``). Disagreement: force RMSE between the two models (eV/Å).
* **The combined verdict** (:func:`probe_ase.verdict.judge`): PROBE's certified verdict, and a disagreement above the
  head's tau refuses the cell (``models_disagree``); with ``vouch`` v, a cell outside the novelty support whose two
  models agree within v x tau is accepted. v is chosen on the fit pools' own splits (a random half of the fit pool;
  for ``shift``, fit on its AIMD cells and judge its elastic ones), at k = 1: the largest of 0, 0.25, 0.5, 0.75, 1
  whose risk stays within the target on every inner row.
* **Every vouch on the evaluation cells** (k = 1): the risk and coverage a user who sets ``vouch`` would get; read
  only, nothing is chosen on them.
* **Companion-label heads**: the same fit cells, labelled by the companion instead of DFT (its forces as the
  reference: ``companion_labels``), same regime; scored against the DFT errors of the evaluation cells and compared
  with the DFT-label head (AUROC ratio; paired bootstrap of the difference).
* ``--timing``: seconds per MD step (velocity Verlet, 1 fs, a 64-atom Si cell, one thread) of the bare backbone, with
  the head, and with the head and the companion at every k, relative to the bare backbone.

Writes ``OUT/results.json``, ``OUT/results.md`` (every row) and ``OUT/verdict.png``; ``--timing`` writes
``OUT/timing.json`` and ``OUT/timing.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import fmt, write_json, write_results
from benchmarks.environment import environment
from benchmarks.mlearn import ABSOLUTE, FILES, QUANTILE, fit_head, load_cells, model_pass, protocols
from benchmarks.stats import bootstrap
from probe_ase.companion import LABEL_SOURCE
from probe_ase.evaluation import metrics
from probe_ase.fileio import atomic_write
from probe_ase.fitting.data import FeatureSet
from probe_ase.fitting.labels import atom_errors
from probe_ase.fitting.spec import FitOptions, FitSpec
from probe_ase.model.graph import HeadGraph
from probe_ase.verdict import judge

VOUCHES = (0.0, 0.25, 0.5, 0.75, 1.0)
REGIMES = {"absolute": {"tolerance": ABSOLUTE, "atom_tolerance": ABSOLUTE},
           "quantile": {"quantile": QUANTILE, "atom_quantile": QUANTILE}}


def sequences(cells: list, element: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Per cell, the index of the cell that starts its sequence (same file and config_type, contiguous)."""
    start = np.zeros(len(cells), int)
    for i in range(1, len(cells)):
        same = element[i] == element[i - 1] and kind[i] == kind[i - 1] and len(cells[i]) == len(cells[i - 1])
        start[i] = start[i - 1] if same else i
    return start


def measured_at(start: np.ndarray, k: int) -> np.ndarray:
    """Per cell, the cell whose disagreement it carries when the companion runs on every k-th cell of a sequence."""
    position = np.arange(len(start)) - start
    return start + position // k * k


def gap(own: FeatureSet, theirs: FeatureSet) -> np.ndarray:
    """Per cell, the force RMSE between two models' forces (eV/Å)."""
    diff = (own.forces - theirs.forces) ** 2
    return np.array([np.sqrt(diff[own.ptr[c]:own.ptr[c + 1]].mean()) for c in range(len(own))])


def relabelled(own: FeatureSet, theirs: FeatureSet) -> FeatureSet:
    """``own`` with the companion's forces as the reference: what featurising ``companion_labels`` frames gives for
    the force criteria (energies are not compared: NaN)."""
    rmse = gap(own, theirs)
    atoms = atom_errors(own.forces, theirs.forces)
    cmax = np.array([atoms[own.ptr[c]:own.ptr[c + 1]].max() for c in range(len(own))])
    nan = np.full(len(own), np.nan)
    return replace(own, errors={"force_rmse": rmse, "force_max": cmax, "energy_per_atom": nan, "energy": nan},
                   atom_errors=atoms)


def scored(probe, own: FeatureSet, cells: list, idx: np.ndarray):
    """The head's scores of cells ``idx``."""
    sub = own.subset(idx)
    return probe.predict(sub.features, sub.numbers, sub.ptr, HeadGraph(probe.meta.config.cutoff).frames(
        [cells[c] for c in idx]))


def operating(accept: np.ndarray, bad: np.ndarray) -> dict:
    """Risk (unreliable share of the accepted), coverage, coverage of the reliable cells."""
    return {"risk": float(bad[accept].mean()) if accept.any() else float("nan"), "coverage": float(accept.mean()),
            "coverage_of_reliable": float(accept[~bad].mean()) if (~bad).any() else float("nan")}


def combined(sc, probe, d: np.ndarray, vouch: float) -> np.ndarray:
    """The calculator's verdict with a companion disagreement ``d`` (eV/Å) per cell."""
    return judge(sc.reliability, sc.novelty, probe.p_star, 1.0, d, probe.meta.tau, vouch).reliable


def choose_vouch(args, cells, element, kind, passes, pairs) -> tuple[float, list[dict]]:
    """The largest vouch whose combined verdict (k = 1) keeps the target risk on every inner split of the fit pools."""
    rng = np.random.default_rng(1)
    inner = {}
    for protocol, (fit, _) in protocols(element, kind).items():
        if protocol == "random":
            order = rng.permutation(fit)
            inner[protocol] = (np.sort(order[: len(fit) // 2]), np.sort(order[len(fit) // 2:]))
        else:
            inner[protocol] = (fit[kind[fit] == "AIMD-NVT"], fit[kind[fit] == "Elastic"])
    rows = []
    for protocol, (fit, ev) in inner.items():
        for regime, labels in REGIMES.items():
            for backbone in args.backbones:
                spec = FitSpec(target_risk=args.target_risk, options=FitOptions(weight_folds=0), **labels)
                probe = fit_head(backbone, [cells[c] for c in fit], passes[backbone].subset(fit), spec,
                                 args.out / "heads" / "inner" / protocol / regime / backbone)
                sc = scored(probe, passes[backbone], cells, ev)
                bad = passes[backbone].errors["force_rmse"][ev] > probe.meta.tau
                for other in pairs[backbone]:
                    d = gap(passes[backbone].subset(ev), passes[other].subset(ev))
                    for vouch in VOUCHES:
                        rows.append({"protocol": protocol, "regime": regime, "backbone": backbone, "companion": other,
                                     "vouch": vouch, "n": len(ev), "fraction_unreliable": float(bad.mean()),
                                     **operating(combined(sc, probe, d, vouch), bad)})
    ok = [v for v in VOUCHES if all(not r["risk"] > args.target_risk for r in rows if r["vouch"] == v)]
    return max(ok, default=0.0), rows


def evaluate(args, cells, element, start, passes, pairs, fit, ev, protocol, regime, backbone, vouch) -> dict:
    """Every companion of one backbone: disagreement and combined verdict at every k, companion-label heads."""
    own = passes[backbone]
    key = f"{protocol}/{regime}/{backbone}"
    spec = FitSpec(target_risk=args.target_risk, options=FitOptions(weight_folds=0), **REGIMES[regime])
    probe = fit_head(backbone, [cells[c] for c in fit], own.subset(fit), spec, args.mlearn / "heads" / key)
    tau = probe.meta.tau
    err = own.errors["force_rmse"][ev]
    bad = err > tau
    strata = element[ev]
    sc = scored(probe, own, cells, ev)
    p_fail = 1 - sc.reliability
    row = {"tau": tau, "n_eval": len(ev), "n_fit": len(fit), "fraction_unreliable": float(bad.mean()),
           "probe": {"auroc": metrics.auroc(bad, p_fail), "spearman": metrics.spearman(p_fail, err),
                     **operating(probe.verdict(sc).reliable, bad)}, "companions": {}}
    for other in pairs[backbone]:
        d_all = gap(own, passes[other])
        entry = {"every": {}}
        for k in args.every:
            d = d_all[measured_at(start, k)][ev]
            diff = bootstrap(lambda i, d=d: metrics.auroc(bad[i], p_fail[i]) - metrics.auroc(bad[i], d[i]),
                             len(ev), strata=strata, reps=args.reps, seed=0)
            verdicts = {}
            for v in sorted({0.0, vouch}):
                accept = combined(sc, probe, d, v)
                risk = bootstrap(lambda i, a=accept: float(bad[i][a[i]].mean()) if a[i].any() else float("nan"),
                                 len(ev), strata=strata, reps=args.reps, seed=0)
                cover = bootstrap(lambda i, a=accept: float(a[i][~bad[i]].mean()) if (~bad[i]).any() else float("nan"),
                                  len(ev), strata=strata, reps=args.reps, seed=0)
                verdicts[str(v)] = operating(accept, bad) | {"risk_interval": [risk.low, risk.high],
                                                             "coverage_of_reliable_interval": [cover.low, cover.high]}
            entry["every"][str(k)] = {"auroc": metrics.auroc(bad, d), "spearman": metrics.spearman(d, err),
                                      "probe_minus_auroc": [diff.estimate, diff.low, diff.high], "verdict": verdicts}
        d1 = d_all[ev]
        entry["vouch_curve"] = {str(v): operating(combined(sc, probe, d1, v), bad) for v in VOUCHES}
        entry["label_head"] = label_head(args, cells, strata, passes, fit, ev, key, other, spec, bad, p_fail)
        row["companions"][other] = entry
        k1 = entry["every"]["1"]
        print(f"{key} + {other}: PROBE {row['probe']['auroc']:.3f}, disagreement {k1['auroc']:.3f}; combined "
              f"(vouch {vouch}) risk {k1['verdict'][str(vouch)]['risk']:.3f} coverage of reliable "
              f"{k1['verdict'][str(vouch)]['coverage_of_reliable']:.3f}; companion-label head "
              f"{entry['label_head']['auroc']:.3f}", flush=True)
    return row


def label_head(args, cells, strata, passes, fit, ev, key, other, spec, bad, p_fail) -> dict:
    """A head fitted on the fit cells labelled by ``other`` (no DFT), scored against the DFT errors of ``ev``."""
    backbone = key.rsplit("/", 1)[1]
    frames = [cells[c].copy() for c in fit]
    for atoms in frames:
        atoms.info[LABEL_SOURCE] = f"companion {other}"
    features = relabelled(passes[backbone].subset(fit), passes[other].subset(fit))
    probe = fit_head(backbone, frames, features, spec, args.out / "heads" / key / other)
    sc = scored(probe, passes[backbone], cells, ev)
    q_fail = 1 - sc.reliability
    diff = bootstrap(lambda i: metrics.auroc(bad[i], q_fail[i]) - metrics.auroc(bad[i], p_fail[i]), len(ev),
                     strata=strata, reps=args.reps, seed=0)
    auroc = metrics.auroc(bad, q_fail)
    return {"auroc": auroc, "ratio": auroc / metrics.auroc(bad, p_fail), "minus_dft": [diff.estimate, diff.low,
                                                                                      diff.high],
            "tau": probe.meta.tau, "labels": probe.meta.labels, **operating(probe.verdict(sc).reliable, bad)}


def markdown(res: dict) -> str:
    """Every row: verdicts at every k, disagreement AUROC, companion-label heads; then the vouch selection."""
    v = res["vouch"]
    lines = ["# A companion model's second opinion (mlearn crystals, VASP PBE)\n",
             f"`{res['command']}`; commit {res['environment'].get('git_commit')}; target risk {res['target_risk']}; "
             f"vouch {v} (chosen on the fit pools' splits, table at the end). Risk / coverage of reliable: "
             f"the verdict's accepted cells that are unreliable / the reliable cells it accepts, [95 %] bootstrap "
             f"({res['reps']} resamples, stratified by element). AUROC difference: paired bootstrap.\n",
             "## Combined verdict and disagreement, every k\n",
             "| protocol / labels / backbone | companion | k | PROBE risk / cov. of reliable | combined (vouch 0) risk "
             "/ cov. | combined (vouch {v}) risk [95 %] / cov. [95 %] | PROBE AUROC | disagreement AUROC | PROBE − it "
             "[95 %] |".replace("{v}", str(v)), "|---|---|---|---|---|---|---|---|---|"]
    for key, row in res["rows"].items():
        p = row["probe"]
        for other, entry in row["companions"].items():
            for k, e in entry["every"].items():
                a, b = e["verdict"]["0.0"], e["verdict"][str(v)]
                lines.append(
                    f"| {key} | {other} | {k} | {fmt(p['risk'])} / {fmt(p['coverage_of_reliable'])} | "
                    f"{fmt(a['risk'])} / {fmt(a['coverage_of_reliable'])} | {fmt(b['risk'])} "
                    f"[{fmt(b['risk_interval'][0])}, {fmt(b['risk_interval'][1])}] / {fmt(b['coverage_of_reliable'])} "
                    f"[{fmt(b['coverage_of_reliable_interval'][0])}, {fmt(b['coverage_of_reliable_interval'][1])}] | "
                    f"{fmt(p['auroc'])} | {fmt(e['auroc'])} | {e['probe_minus_auroc'][0]:+.3f} "
                    f"[{e['probe_minus_auroc'][1]:+.3f}, {e['probe_minus_auroc'][2]:+.3f}] |")
    lines += ["\n## Heads fitted on companion labels (no DFT) against heads fitted on DFT labels, same cells\n",
              "| protocol / labels / backbone | companion | DFT-label head AUROC | companion-label head AUROC | ratio | "
              "difference [95 %] | companion-label verdict risk / coverage of reliable (DFT errors) |",
              "|---|---|---|---|---|---|---|"]
    for key, row in res["rows"].items():
        for other, entry in row["companions"].items():
            h = entry["label_head"]
            lines.append(f"| {key} | {other} | {fmt(row['probe']['auroc'])} | {fmt(h['auroc'])} | {fmt(h['ratio'])} | "
                         f"{h['minus_dft'][0]:+.3f} [{h['minus_dft'][1]:+.3f}, {h['minus_dft'][2]:+.3f}] | "
                         f"{fmt(h['risk'])} / {fmt(h['coverage_of_reliable'])} |")
    lines += ["\n## Every vouch on the evaluation cells (k = 1): what a user who sets it risks\n",
              "Read only: vouch was chosen on the fit pools' splits (next table), not on these rows.\n",
              "| protocol / labels / backbone | companion | " + " | ".join(
                  f"vouch {x}: risk / cov. of reliable" for x in VOUCHES) + " |", "|---|---|" + "---|" * len(VOUCHES)]
    for key, row in res["rows"].items():
        for other, entry in row["companions"].items():
            curve = entry["vouch_curve"]
            lines.append(f"| {key} | {other} | " + " | ".join(
                f"{fmt(curve[str(x)]['risk'])} / {fmt(curve[str(x)]['coverage_of_reliable'])}" for x in VOUCHES) + " |")
    lines += ["\n## Choosing vouch on the fit pools' splits (k = 1)\n",
              "| inner split / labels / backbone | companion | unreliable | " + " | ".join(
                  f"vouch {x}: risk / cov. of reliable" for x in VOUCHES) + " |", "|---|---|---|" + "---|" * len(VOUCHES)]
    inner = {}
    for r in res["inner"]:
        inner.setdefault((r["protocol"], r["regime"], r["backbone"], r["companion"]), {})[r["vouch"]] = r
    for (protocol, regime, backbone, other), by in inner.items():
        first = next(iter(by.values()))
        cells = " | ".join(f"{fmt(by[x]['risk'])} / {fmt(by[x]['coverage_of_reliable'])}" for x in VOUCHES)
        lines.append(f"| {protocol} / {regime} / {backbone} | {other} | {first['fraction_unreliable']:.0%} of "
                     f"{first['n']} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Risk against coverage of the reliable cells under the shift: PROBE alone and combined at every k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = str(res["vouch"])
    keys = [k for k in res["rows"] if k.startswith("shift/")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        row = res["rows"][key]
        ax.scatter(row["probe"]["coverage_of_reliable"], row["probe"]["risk"], marker="s", color="k", label="PROBE")
        for other, entry in row["companions"].items():
            ks = list(entry["every"])
            ax.plot([entry["every"][k]["verdict"][v]["coverage_of_reliable"] for k in ks],
                    [entry["every"][k]["verdict"][v]["risk"] for k in ks], "o-", ms=3, label=f"+ {other}")
        ax.axhline(res["target_risk"], color="grey", lw=0.8, ls="--")
        ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(key.replace("shift/", ""), fontsize=8)
        ax.set_xlabel("coverage of reliable", fontsize=8)
        ax.set_xlim(0, 1)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("risk (k = 1, 5, 10, 50 along each line)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def timing(args, cells, element, kind) -> None:
    """Seconds per MD step: bare backbone, with the head, with head and companion at every k (one thread)."""
    from ase.md.verlet import VelocityVerlet
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from probe_ase import ProbeCalculator
    from probe_ase.backbones import load_backbone
    from probe_ase.model.probe import Probe

    start = next(c for c, e, t in zip(cells, element, kind) if e == "Si" and t == "AIMD-NVT" and len(c) == 64)
    rows = {}

    def per_step(calc, steps: int) -> float:
        atoms = start.copy()
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=1.0)
        dyn.run(1)  # warm-up: first pass, TorchScript of the head
        begin = time.perf_counter()
        dyn.run(steps)
        return (time.perf_counter() - begin) / steps

    for pair in args.pairs:
        backbone, other = pair.split(":")
        base, second = load_backbone(backbone), load_backbone(other)
        probe = Probe.load(args.mlearn / "heads" / "random" / "absolute" / f"{backbone}.pt")
        bare = per_step(base, args.timing_steps)
        row = {"bare_s": bare, "companion_bare_s": per_step(second, args.timing_steps)}
        with ProbeCalculator(base, probe) as calc:
            row["probe_s"] = per_step(calc, args.timing_steps)
        for k in args.every:
            with ProbeCalculator(base, probe, companion=second, companion_every=k) as calc:
                row[f"k{k}_s"] = per_step(calc, max(args.timing_steps, 2 * k))
        row["ratios"] = {key: row[key] / bare for key in row if key.endswith("_s")}
        row["targets"] = {f"k{k}": 1 + 1.1 / k for k in args.every}
        rows[pair] = row
        print(pair, {k: round(v, 3) for k, v in row["ratios"].items()}, flush=True)
    res = {"command": "python -m benchmarks.companion " + " ".join(sys.argv[1:]), "environment": environment(),
           "cell": "Si AIMD-NVT, 64 atoms", "rows": rows}
    write_json(args.out / "timing.json", res, indent=1)
    lines = ["# Per-step cost of the second opinion (seconds per MD step, one thread)\n",
             f"`{res['command']}`; commit {res['environment'].get('git_commit')}; {res['cell']}.\n",
             "| backbone : companion | bare (s) | companion alone (s) | with head | " + " | ".join(
                 f"k = {k} (target ≤ {1 + 1.1 / k:.2f})" for k in args.every) + " |",
             "|---|---|---|---|" + "---|" * len(args.every)]
    for pair, row in rows.items():
        r = row["ratios"]
        lines.append(f"| {pair} | {row['bare_s']:.3f} | {row['companion_bare_s']:.3f} ({r['companion_bare_s']:.2f}×) | "
                     f"{r['probe_s']:.3f}× | " + " | ".join(f"{r[f'k{k}_s']:.2f}×" for k in args.every) + " |")
    atomic_write(args.out / "timing.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print(f"wrote {args.out}/timing.json, timing.md")


def main(argv: list[str] | None = None) -> None:
    """Choose vouch on the fit pools' splits, evaluate every pair under both protocols, write results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the mlearn folder (../shared/data/mlearn)")
    ap.add_argument("--mlearn", type=Path, default=Path("benchmarks/results/mlearn"),
                    help="benchmarks.mlearn's output folder (its cache and DFT-label heads)")
    ap.add_argument("--backbones", nargs="+", default=["chgnet-0.3.0", "7net-0", "7net-l3i5"])
    ap.add_argument("--companions", nargs="*", default=["chgnet-0.2.0"],
                    help="further models that only serve as companions")
    ap.add_argument("--every", type=int, nargs="+", default=[1, 5, 10, 50], help="companion every k-th step")
    ap.add_argument("--target-risk", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timing", action="store_true", help="measure the per-step cost instead")
    ap.add_argument("--pairs", nargs="+", default=["chgnet-0.3.0:7net-0", "7net-0:chgnet-0.3.0",
                                                   "7net-l3i5:7net-0"], help="backbone:companion pairs timed")
    ap.add_argument("--timing-steps", type=int, default=20, help="MD steps timed (at least 2k at every k)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/companion"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cells, element, kind = load_cells(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        timing(args, cells, element, kind)
        return
    names = [*args.backbones, *args.companions]
    passes = {name: model_pass(name, cells, args.mlearn / "cache") for name in names}
    pairs = {b: [m for m in names if m != b] for b in args.backbones}
    vouch, inner = choose_vouch(args, cells, element, kind, passes, pairs)
    print(f"vouch chosen on the fit pools' splits: {vouch}", flush=True)
    start = sequences(cells, element, kind)
    rows = {}
    for protocol, (fit, ev) in protocols(element, kind).items():
        for regime in REGIMES:
            for backbone in args.backbones:
                rows[f"{protocol}/{regime}/{backbone}"] = evaluate(args, cells, element, start, passes, pairs, fit, ev,
                                                                   protocol, regime, backbone, vouch)
    res = {"command": "python -m benchmarks.companion " + " ".join(sys.argv[1:] if argv is None else argv),
           "environment": environment(), "target_risk": args.target_risk, "reps": args.reps, "vouch": vouch,
           "every": args.every, "files": list(FILES), "inner": inner, "rows": rows}
    write_results(args.out, res, markdown, plot, "verdict.png")


if __name__ == "__main__":
    main()
