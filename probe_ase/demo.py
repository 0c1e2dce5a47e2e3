"""The embedded demo: generate data, train a tiny MACE, fit PROBE, score shifted frames.

Copper under ASE's EMT potential stands in for DFT: the backbone is trained
on 300 K frames only, the head is fitted on a separate pool of in- and
out-of-distribution frames (300 K, 900 K, expanded cells), and evaluation uses
fresh frames at 300 K, at 1000 K, under 4 % strain and under compression, a
shift the pool never showed (the novelty term must catch it). Finally a gated
Langevin MD is heated from 300 K to 2000 K until the reliability monitor halts
it; the run then continues unguarded for a while to show what the halt
prevented. Needs no files and no network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from probe_ase.evaluation import metrics
from probe_ase.fileio import atomic_write
from probe_ase.fitting.pipeline import fit_probe
from probe_ase.fitting.spec import FitOptions
from probe_ase.scoring import score_frames
from probe_ase.testing import emt_frames, train_mace

EVAL_SETS = {  # name: (frames, temperature K, strain, seed)
    "300 K (in distribution)": (40, 300, 0.0, 11),
    "1000 K (hot)": (30, 1000, 0.0, 12),
    "700 K, +4 % strain": (30, 700, 0.04, 13),
    "300 K, -4 % (unseen)": (30, 300, -0.04, 14),
}


def force_rmse(frame) -> float:
    """Force RMSE (eV/Å) of the MLIP against the reference on a scored frame."""
    return float(np.sqrt(np.mean((frame.arrays["mlip_forces"] - frame.get_forces()) ** 2)))


def run_demo(out_dir: str | Path = "probe-ase-demo", seed: int = 0, log=print) -> dict:
    """Run the demo; write model, head, scored frames, table and plot into ``out_dir``."""
    import torch
    from ase.io import write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log("1/5 generating Cu frames with EMT (300 K training set, fit pool, evaluation sets)")
    train = emt_frames(50, 300, seed=seed)
    pool = emt_frames(60, 300, seed=seed + 1) + emt_frames(40, 900, seed=seed + 2) \
        + emt_frames(40, 600, strain=0.03, seed=seed + 3)
    evaluation = {name: emt_frames(n, t, strain=s, seed=seed + k) for name, (n, t, s, k) in EVAL_SETS.items()}
    log(f"2/5 training a tiny MACE on {len(train)} frames at 300 K")
    calc = train_mace(train, epochs=40, seed=seed)
    torch.save(calc.models[0], out / "backbone.model")
    log(f"3/5 fitting the PROBE head on {len(pool)} pool frames (tolerance: top 20 % force RMSE)")
    probe = fit_probe(calc, pool, criterion="force_rmse", quantile=0.8, cache_dir=False,
                      options=FitOptions(seed=seed))
    probe.save(out / "probe.pt")
    log("4/5 scoring the evaluation sets")
    rows, scored_all = [], []
    with probe.tap_for(calc) as tap:
        for name, frames in evaluation.items():
            scored = list(score_frames(probe, tap, frames))
            for f in scored:
                f.info["set"] = name
            rows.append({"set": name, **_verdict_stats(scored, probe)})
            scored_all += scored
    pooled = _verdict_stats(scored_all, probe)
    err = np.array([force_rmse(f) for f in scored_all])
    p = np.array([f.info["reliability"] for f in scored_all])
    summary = {
        "tau_eV_A": probe.meta.tau, "p_star": probe.p_star, "target_risk": probe.meta.target_risk,
        "certified_risk": probe.meta.certified_risk, "delta": probe.meta.delta, "n_cal": probe.report["n_cal"],
        "frames_needed": probe.report["certificate"]["frames_needed"], "rows": rows, "pooled": pooled,
        "auroc": metrics.auroc(err > probe.meta.tau, 1 - p), "spearman": metrics.spearman(1 - p, err),
        "seconds": time.perf_counter() - start,
    }
    atomic_write(out / "scored.xyz", lambda tmp: write(tmp, scored_all, format="extxyz"))
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    plot_demo(scored_all, probe.meta.tau, probe.p_star, out / "demo.png")
    log(format_table(summary))
    log("5/5 gated MD heated from 300 K to 2000 K (Langevin, 2 fs steps, halt after 5 unreliable steps)")
    summary["md"] = gated_md_demo(calc, probe, train[-1], out, seed)
    md = summary["md"]
    log(f"    monitor halted at step {md['halt_step']} ({md['halt_temperature_K']:.0f} K); force RMSE at the halt "
        f"{md['error_at_halt_meV_A']:.0f} meV/Å vs tau {1000 * probe.meta.tau:.0f} meV/Å; "
        f"{md['extra_steps']} unguarded steps later it is {md['error_after_meV_A']:.0f} meV/Å")
    if md["stopped_by_novelty_only"]:
        log(f"    {md['stopped_by_novelty_only']} guarded steps (first: step {md['first_stopped_by_novelty_only']}) had "
            "p >= p* but lay outside the support: the probability alone would have passed them, the verdict did not")
    summary["seconds"] = time.perf_counter() - start
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    log(f"wrote {out}/: backbone.model, probe.pt, scored.xyz, summary.json, demo.png, "
        f"md.traj, md.log, md.png ({summary['seconds']:.0f} s)")
    return summary


def _verdict_stats(scored: list, probe) -> dict:
    """Per set: true error, the probability alone at p*, and the verdict (p* and support)."""
    err = np.array([force_rmse(f) for f in scored])
    bad = err > probe.meta.tau
    p = np.array([f.info["reliability"] for f in scored])
    by_p, verdict = p >= probe.p_star, np.array([f.info["reliable"] for f in scored])
    return {"frames": len(scored), "force_rmse_meV_A": 1000 * float(np.mean(err)),
            "predicted_force_rmse_meV_A": 1000 * float(np.mean([f.info["force_error"] for f in scored])),
            "unreliable_true": float(bad.mean()),
            "mean_reliability": float(p.mean()),
            "out_of_support": float(np.mean([f.info["reason"] == "out_of_support" for f in scored])),
            "accepted_p_only": float(by_p.mean()), "risk_p_only": _risk(bad, by_p),
            "accepted": float(verdict.mean()), "risk": _risk(bad, verdict)}


def _risk(bad: np.ndarray, accepted: np.ndarray) -> float:
    return float(bad[accepted].mean()) if accepted.any() else float("nan")


def gated_md_demo(calc, probe, start, out: Path, seed: int, steps: int = 600, extra: int = 80) -> dict:
    """Heat a gated Langevin run until the monitor halts it; record true errors along the way."""
    from ase.calculators.emt import EMT

    from probe_ase.calculator import ProbeCalculator
    from probe_ase.md import make_dynamics, run_gated

    atoms = start.copy()
    atoms.calc = ProbeCalculator(calc, probe)
    dyn = make_dynamics(atoms, "nvt", 300.0, timestep_fs=2.0, friction_per_fs=0.02, seed=seed)
    record: dict[str, list] = {"step": [], "T": [], "p": [], "novelty": [], "err": [], "predicted": []}
    reference = EMT()

    def ramp_and_record() -> None:
        target = 300.0 + 1700.0 * min(dyn.nsteps / steps, 1.0)
        dyn.set_temperature(temperature_K=target)
        exact = atoms.copy()
        exact.calc = reference
        err = np.sqrt(np.mean((atoms.calc.results["forces"] - exact.get_forces()) ** 2))
        results = atoms.calc.results
        for key, value in zip(record, (dyn.nsteps, target, results["reliability"], results["novelty"], err,
                                       results["force_error"])):
            record[key].append(float(value))

    dyn.attach(ramp_and_record, interval=1)
    for name in ("md.traj", "md.log"):
        (out / name).unlink(missing_ok=True)  # the demo owns these files: start them afresh
    monitor = run_gated(dyn, steps, trajectory=out / "md.traj", action="halt", patience=5,
                        log=out / "md.log", progress=False)
    halt = monitor.summary()["halt_step"]
    halt_index = len(record["step"]) - 1
    dyn.run(extra)  # unguarded continuation: what the halt prevented
    atoms.calc.close()
    plot_md(record, monitor.threshold, probe.meta.tau, halt, out / "md.png")
    guarded = slice(0, halt_index + 1)
    passed_by_p = [s for s, p, n in zip(record["step"][guarded], record["p"][guarded], record["novelty"][guarded])
                   if p >= monitor.threshold and n > 1.0]
    return {
        "stopped_by_novelty_only": len(passed_by_p),
        "first_stopped_by_novelty_only": int(passed_by_p[0]) if passed_by_p else None,
        "halt_step": halt, "halted": monitor.halted,
        "halt_temperature_K": record["T"][halt_index],
        "first_unreliable_step": monitor.summary()["first_unreliable_step"],
        "error_at_halt_meV_A": 1000 * record["err"][halt_index],
        "extra_steps": extra, "error_after_meV_A": 1000 * record["err"][-1],
        "max_error_before_halt_meV_A": 1000 * max(record["err"][: halt_index + 1]),
    }


def plot_md(record: dict, threshold: float, tau: float, halt: int | None, path: Path) -> None:
    """Reliability and true force error along the heated run, with the halt marked."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch

    fig = Figure(figsize=(6.4, 7.0))
    top, middle, bottom = fig.subplots(3, 1, sharex=True)
    top.plot(record["step"], record["p"], lw=1, color="tab:blue")
    top.axhline(threshold, color="grey", ls=":", lw=1, label=f"threshold p* = {threshold:.2f}")
    top.set_ylabel("PROBE reliability")
    middle.plot(record["step"], record["novelty"], lw=1, color="tab:purple")
    middle.axhline(1.0, color="grey", ls=":", lw=1, label="support edge (novelty 1)")
    middle.set_ylabel("novelty")
    bottom.plot(record["step"], 1000 * np.asarray(record["err"]), lw=1, color="tab:red", label="true (EMT reference)")
    bottom.plot(record["step"], 1000 * np.asarray(record["predicted"]), lw=1, color="tab:green", ls="-.",
                label="predicted by the head (results['force_error'])")
    bottom.axhline(1000 * tau, color="k", ls="--", lw=1, label=f"tolerance tau = {1000 * tau:.0f} meV/Å")
    bottom.set_ylabel("force RMSE (meV/Å)")
    bottom.set_xlabel("MD step (2 fs), heated 300 K -> 2000 K")
    for ax in (top, middle, bottom):
        if halt is not None:
            ax.axvspan(halt, record["step"][-1], color="tab:orange", alpha=0.15, lw=0)
            ax.axvline(halt, color="tab:orange", lw=1.5, label=f"monitor halts (step {halt}); shaded: unguarded")
        ax.legend(fontsize=8, loc="best")
    top.set_title("Gated MD driven out of distribution")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def format_table(summary: dict) -> str:
    """A plain-text table of the demo's results: the probability alone at p* beside the verdict."""
    def pct(x: float) -> str:
        return "—" if np.isnan(x) else f"{x:.0%}"

    head = (f"{'evaluation set':<24}{'frames':>7}{'F-RMSE':>8}{'pred':>7}{'bad':>6}{'mean p':>8}{'novel':>7}"
            f"{'p-only acc':>11}{'risk':>6}{'verdict acc':>12}{'risk':>6}")
    lines = [head, f"{'':<24}{'':>7}{'meV/Å':>8}{'meV/Å':>7}", "-" * len(head)]
    for r in summary["rows"] + [{"set": "pooled", **summary["pooled"]}]:
        lines.append(f"{r['set']:<24}{r['frames']:>7}{r['force_rmse_meV_A']:>8.1f}"
                     f"{r['predicted_force_rmse_meV_A']:>7.1f}{pct(r['unreliable_true']):>6}"
                     f"{r['mean_reliability']:>8.2f}{pct(r['out_of_support']):>7}{pct(r['accepted_p_only']):>11}"
                     f"{pct(r['risk_p_only']):>6}{pct(r['accepted']):>12}{pct(r['risk']):>6}")
    needed = f"; {summary['frames_needed']} would certify the target" if summary["frames_needed"] else ""
    lines.append(f"pooled AUROC {summary['auroc']:.3f}, Spearman {summary['spearman']:.3f}; tau = "
                 f"{1000 * summary['tau_eV_A']:.0f} meV/Å; p* = {summary['p_star']:.2f}, certified at risk "
                 f"{summary['certified_risk']:.1%} (target {summary['target_risk']:.0%}, delta {summary['delta']}) "
                 f"from {summary['n_cal']} calibration frames{needed}")
    return "\n".join(lines)


def plot_demo(scored: list, tau: float, p_star: float, path: Path) -> None:
    """Scatter of true force error against reliability, one colour per evaluation set."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for name in EVAL_SETS:
        frames = [f for f in scored if f.info["set"] == name]
        ax.scatter([1000 * force_rmse(f) for f in frames], [f.info["reliability"] for f in frames], s=18, label=name)
    ax.axvline(1000 * tau, color="k", ls="--", lw=1, label=f"tolerance tau = {1000 * tau:.0f} meV/Å")
    ax.axhline(p_star, color="grey", ls=":", lw=1, label=f"operating threshold p* = {p_star:.2f}")
    ax.set_xlabel("true force RMSE of the MLIP (meV/Å)")
    ax.set_ylabel("PROBE reliability")
    ax.set_title("Tiny MACE on EMT copper: reliability vs true error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
