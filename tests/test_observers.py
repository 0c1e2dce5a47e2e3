"""Gating real MD and optimisations: log, flag, halt, hand over."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.calculators.emt import EMT
from ase.io import read
from ase.io.trajectory import Trajectory
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE, LBFGS

from probe_ase import ProbeCalculator
from probe_ase.guard import guarded_optimize
from probe_ase.observers import ReliabilityHalt, ReliabilityMonitor


@pytest.fixture
def mace_probe_calc(backbones, probes):
    with ProbeCalculator(backbones("mace"), probes("mace")) as calc:
        yield calc


def md_atoms(cu_data, calc, temperature_K, seed=0):
    atoms = cu_data["test_in"][0].copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    return atoms


def read_log(path):
    """Steps, reliability, novelty, verdict (1 reliable) and reason of each logged step."""
    rows = np.loadtxt(path, comments="#", usecols=(0, 2, 3, 7))
    reasons = [line.split()[8] for line in open(path) if not line.startswith("#")]
    return rows[:, 0].astype(int), rows[:, 1], rows[:, 2], rows[:, 3].astype(int), reasons


def test_in_distribution_md_is_never_halted(mace_probe_calc, cu_data, tmp_path):
    atoms = md_atoms(cu_data, mace_probe_calc, 300)
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=300, friction=0.02, rng=np.random.default_rng(1))
    with ReliabilityMonitor(dyn, action="halt", patience=3, log=tmp_path / "r.log") as monitor:
        dyn.attach(monitor, interval=1)
        dyn.run(60)
    summary = monitor.summary()
    assert not monitor.halted and dyn.nsteps == 60
    assert summary["steps_seen"] == 61
    steps, p, *_ = read_log(tmp_path / "r.log")
    assert len(steps) == 61 and summary["min_reliability"] == pytest.approx(p.min(), abs=1e-5)


def test_heated_md_is_flagged_and_halted_where_the_log_says(mace_probe_calc, cu_data, tmp_path):
    atoms = md_atoms(cu_data, mace_probe_calc, 2500)
    dyn = VelocityVerlet(atoms, 2 * units.fs)
    traj = Trajectory(tmp_path / "md.traj", "w", atoms)
    dyn.attach(traj.write, interval=1)
    monitor = ReliabilityMonitor(dyn, action="halt", patience=3, log=tmp_path / "r.log",
                                 flagged=tmp_path / "flagged.xyz", max_flagged=2)
    dyn.attach(monitor, interval=1)
    dyn.run(400)
    monitor.close()
    traj.close()
    assert monitor.halted and dyn.nsteps < 400
    steps, p, novelty, verdict, reasons = read_log(tmp_path / "r.log")
    bad = verdict == 0
    np.testing.assert_array_equal(bad, (p < monitor.threshold) | (novelty > 1))
    assert all(r == ("ok" if v else "out_of_support" if n > 1 else "low_probability")
               for r, v, n in zip(reasons, verdict, novelty))
    # the halt step is the first step ending a run of `patience` unreliable steps in the log
    run = np.convolve(bad.astype(int), np.ones(3, dtype=int), mode="valid")
    assert steps[np.flatnonzero(run == 3)[0] + 2] == monitor.summary()["halt_step"] == dyn.nsteps
    assert monitor.summary()["first_unreliable_step"] == steps[np.flatnonzero(bad)[0]]
    flagged = read(tmp_path / "flagged.xyz", ":")
    assert len(flagged) == 2  # bounded
    assert all(f.info["reliability"] < monitor.threshold or f.info["novelty"] > 1 for f in flagged)
    assert all(f.info["reason"] in ("low_probability", "out_of_support") for f in flagged)
    assert flagged[0].arrays["atom_importance"].sum() == pytest.approx(1.0, abs=1e-5)
    assert flagged[0].arrays["atom_novelty"].max() == pytest.approx(flagged[0].info["novelty"])
    # the head's predicted force RMSE (eV/Å) is logged every step and travels with the flagged frames
    predicted = np.loadtxt(tmp_path / "r.log", comments="#", usecols=(6,))
    assert len(predicted) == len(steps) and (predicted > 0).all()
    assert flagged[0].info["force_error"] == pytest.approx(predicted[np.flatnonzero(bad)[0]], abs=1e-4)
    assert flagged[0].arrays["atom_force_error"].shape == (len(atoms),)
    assert len(read(tmp_path / "md.traj", ":")) == dyn.nsteps + 1  # trajectory intact
    last = monitor.last_reliable
    assert last is not None and last.calc is None and np.abs(last.get_momenta()).sum() > 0


def test_patience_is_respected(mace_probe_calc, cu_data):
    atoms = md_atoms(cu_data, mace_probe_calc, 300)
    dyn = VelocityVerlet(atoms, 1 * units.fs)
    calls = []
    monitor = ReliabilityMonitor(dyn, action="halt", threshold=1.01, patience=4,  # every step unreliable
                                 callback=lambda m, a: calls.append(m.dyn.nsteps))
    dyn.attach(monitor, interval=1)
    for _ in dyn.irun(50):  # works through irun too, ending the generator cleanly
        pass
    assert calls == [0, 1, 2, 3] and monitor.summary()["halt_step"] == 3 and dyn.nsteps == 3


def test_raise_on_halt(mace_probe_calc, cu_data):
    atoms = md_atoms(cu_data, mace_probe_calc, 300)
    dyn = VelocityVerlet(atoms, 1 * units.fs)
    dyn.attach(ReliabilityMonitor(dyn, action="halt", threshold=1.01, patience=2, raise_on_halt=True))
    with pytest.raises(ReliabilityHalt, match="2 consecutive unreliable steps"):
        dyn.run(20)


def test_files_survive_an_exception_mid_run(mace_probe_calc, cu_data, tmp_path):
    log = tmp_path / "r.log"
    log.write_text("# earlier run\n")
    atoms = md_atoms(cu_data, mace_probe_calc, 300)
    dyn = VelocityVerlet(atoms, 1 * units.fs)
    monitor = ReliabilityMonitor(dyn, action="flag", threshold=1.01, log=log, flagged=tmp_path / "f.xyz")
    dyn.attach(monitor, interval=1)

    def crash():
        if dyn.nsteps == 5:
            raise RuntimeError("simulated crash")

    dyn.attach(crash, interval=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dyn.run(20)
    lines = log.read_text().splitlines()
    assert lines[0] == "# earlier run" and len([x for x in lines if not x.startswith("#")]) == 6
    assert len(read(tmp_path / "f.xyz", ":")) == 6


@pytest.mark.parametrize("optimizer", [FIRE, LBFGS])
def test_monitor_works_with_optimisers(mace_probe_calc, cu_data, tmp_path, optimizer):
    atoms = cu_data["test_out"][0].copy()
    atoms.calc = mace_probe_calc
    opt = optimizer(atoms, logfile=None)
    with ReliabilityMonitor(opt, action="log", log=tmp_path / "opt.log") as monitor:
        opt.attach(monitor)
        opt.run(fmax=0.1, steps=10)
    assert monitor.summary()["steps_seen"] == opt.nsteps + 1
    rows = np.loadtxt(tmp_path / "opt.log", comments="#", ndmin=2, usecols=range(7))  # the 8th column is the reason
    assert len(rows) == opt.nsteps + 1 and np.isnan(rows[:, 1]).all()  # optimisers have no time axis


def test_handover_finishes_on_the_reference(mace_probe_calc, cu_data):
    atoms = cu_data["test_in"][1].copy()
    atoms.set_cell(atoms.cell * 0.94, scale_atoms=True)  # compressed: outside the training data
    atoms.rattle(0.05, seed=3)
    atoms.calc = mace_probe_calc
    report = guarded_optimize(atoms, reference=EMT(), optimizer=BFGS, fmax=0.05, steps=200)
    assert report.handover_step is not None and report.converged
    assert report.reference_steps > 0 and report.mlip_steps > 0
    names = [name for _, name in report.calculator_by_step]
    assert names == sorted(names)  # all mlip steps, then all reference steps
    # the reference takes over at the step the guard reports, where the MLIP's last step left the atoms
    mlip = [step for step, name in report.calculator_by_step if name == "mlip"]
    reference = [step for step, name in report.calculator_by_step if name == "reference"]
    assert reference[0] == report.handover_step == mlip[-1] and report.final_fmax < 0.05
    emt = atoms.copy()
    emt.calc = EMT()
    assert np.linalg.norm(emt.get_forces(), axis=1).max() < 0.05


def test_guard_without_reference_stops(mace_probe_calc, cu_data):
    atoms = cu_data["test_in"][1].copy()
    atoms.set_cell(atoms.cell * 0.94, scale_atoms=True)
    atoms.calc = mace_probe_calc
    report = guarded_optimize(atoms, fmax=0.01, steps=100)
    assert report.stopped_unreliable and not report.converged and report.reference_steps == 0


@pytest.mark.parametrize("suffix", [".traj", ".xyz"])
def test_trajectories_keep_reliability_per_frame(mace_probe_calc, cu_data, tmp_path, suffix):
    from probe_ase.observers import ReliabilityTrajectory

    path = tmp_path / f"md{suffix}"
    atoms = md_atoms(cu_data, mace_probe_calc, 300)
    dyn = VelocityVerlet(atoms, 1 * units.fs)
    seen = []
    with ReliabilityTrajectory(atoms, path) as writer:
        dyn.attach(writer, interval=2)
        dyn.attach(lambda: seen.append(mace_probe_calc.results["reliability"]), interval=2)
        dyn.run(6)
    frames = read(path, ":")
    assert [f.info["reliability"] for f in frames] == pytest.approx(seen, abs=1e-6)
    importance = [np.asarray(f.info["atom_importance"] if suffix == ".traj" else f.arrays["atom_importance"])
                  for f in frames]
    assert all(len(x) == len(atoms) and x.sum() == pytest.approx(1, abs=1e-5) for x in importance)
    assert frames[-1].get_potential_energy() == pytest.approx(mace_probe_calc.results["energy"])
