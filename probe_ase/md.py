"""Gated molecular dynamics: ASE dynamics plus monitor, trajectory and progress bar."""

from __future__ import annotations

import os
import warnings
from typing import Literal

import numpy as np
from ase import Atoms, units
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nptberendsen import NPTBerendsen
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from tqdm.auto import tqdm

from probe_ase.exceptions import InputError
from probe_ase.observers import ReliabilityMonitor, ReliabilityTrajectory

Ensemble = Literal["nve", "nvt", "npt"]


def make_dynamics(
    atoms: Atoms,
    ensemble: Ensemble = "nvt",
    temperature_K: float = 300.0,
    timestep_fs: float = 1.0,
    friction_per_fs: float = 0.01,
    pressure_GPa: float = 0.0,
    compressibility_per_GPa: float = 0.01,
    seed: int = 0,
    keep_momenta: bool = False,
) -> MolecularDynamics:
    """ASE dynamics for ``atoms``, velocities drawn at ``temperature_K`` (K).

    NVE: velocity Verlet; NVT: Langevin (friction in 1/fs); NPT: Berendsen
    barostat and thermostat (pressure in GPa, compressibility in 1/GPa,
    periodic cells only). Timestep in fs. ``keep_momenta``: start from the
    momenta ``atoms`` carries (a restart from a trajectory's last frame)
    instead of drawing new ones.
    """
    if ensemble not in ("nve", "nvt", "npt"):
        raise InputError(f"ensemble must be nve, nvt or npt, got {ensemble!r}", ensemble=ensemble)
    if not timestep_fs > 0:
        raise InputError(f"timestep must be positive (fs), got {timestep_fs}", timestep_fs=timestep_fs)
    if not temperature_K >= 0:
        raise InputError(f"temperature must be >= 0 K, got {temperature_K}", temperature_K=temperature_K)
    if ensemble != "nve" and not friction_per_fs > 0:
        raise InputError(f"friction must be positive (1/fs), got {friction_per_fs}", friction_per_fs=friction_per_fs)
    if ensemble == "npt" and not atoms.pbc.all():
        raise InputError("NPT needs a periodic cell in all three directions", pbc=atoms.pbc.tolist())
    rng = np.random.default_rng(seed)
    if keep_momenta:
        if not atoms.has("momenta"):
            raise InputError("keep_momenta=True but the atoms carry no momenta (velocities)", keep_momenta=True)
    else:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    dt = timestep_fs * units.fs
    if ensemble == "nve":
        return VelocityVerlet(atoms, dt)
    if ensemble == "nvt":
        with warnings.catch_warnings():  # ASE >= 3.28 deprecates the default fixcm=True it still runs: not the user's
            warnings.filterwarnings("ignore", message=".*fixcm.*", category=FutureWarning)
            return Langevin(atoms, dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs, rng=rng)
    return NPTBerendsen(atoms, dt, temperature_K=temperature_K, pressure_au=pressure_GPa * units.GPa,
                        taut=100 * units.fs, taup=1000 * units.fs,
                        compressibility_au=compressibility_per_GPa / units.GPa)


def run_gated(
    dyn: MolecularDynamics,
    steps: int,
    trajectory: str | os.PathLike | None = None,
    interval: int = 1,
    progress: bool = True,
    **monitor_options,
) -> ReliabilityMonitor:
    """Run ``dyn`` for ``steps`` under a :class:`ReliabilityMonitor`; return the monitor.

    ``trajectory`` (``.traj`` or extxyz, appended to) gets every ``interval``-th
    frame (the start frame included) with its reliability and importances. ``monitor_options`` go to
    :class:`ReliabilityMonitor` (action, threshold, patience, log, flagged ...).
    The observers it attaches are detached again when it returns.
    """
    if steps < 0 or int(steps) != steps:
        raise InputError(f"steps must be a whole number >= 0, got {steps}", steps=steps)
    if interval < 1 or int(interval) != interval:
        raise InputError(f"interval must be a whole number >= 1, got {interval}", interval=interval)
    atoms = dyn.atoms
    bar = tqdm(total=steps, desc="md", unit="step", disable=not progress)

    def tick() -> None:
        if dyn.nsteps:
            bar.update(1)
            bar.set_postfix(reliability=f"{atoms.calc.results['reliability']:.3f}")

    ours: list = []
    with ReliabilityMonitor(dyn, **monitor_options) as monitor:
        ours += [monitor, tick]
        dyn.attach(monitor, interval=1)
        dyn.attach(tick, interval=1)
        try:
            if trajectory is not None:
                with ReliabilityTrajectory(atoms, trajectory) as writer:
                    ours.append(writer)
                    dyn.attach(writer, interval=interval)
                    dyn.run(steps)
            else:
                dyn.run(steps)
        finally:  # leave dyn as we found it: our observers hold files that are now closed
            dyn.observers = [obs for obs in dyn.observers if not any(obs[0] is o for o in ours)]
    bar.close()
    return monitor
