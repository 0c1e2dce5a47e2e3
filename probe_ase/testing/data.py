"""Labelled frames generated with ASE's EMT potential."""

from __future__ import annotations

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution


def emt_frames(
    n: int,
    temperature_K: float = 300.0,
    strain: float = 0.0,
    symbol: str = "Cu",
    size: int = 2,
    interval: int = 10,
    seed: int = 0,
) -> list[Atoms]:
    """``n`` frames of Langevin MD of an fcc crystal under EMT.

    Args:
        n: number of frames.
        temperature_K: thermostat temperature (K).
        strain: isotropic linear strain of the cell (0.05 = 5 % larger).
        symbol: an fcc element EMT knows (Cu, Al, Ag, Au, Ni, Pd, Pt).
        size: cubic supercell repeats (2 gives 32 atoms).
        interval: MD steps (1 fs each) between frames.
        seed: seeds velocities and the thermostat.

    Each frame carries a SinglePointCalculator with the EMT energy (eV) and
    forces (eV/Å), as extxyz files from DFT codes do.
    """
    atoms = bulk(symbol, "fcc", cubic=True) * (size, size, size)
    atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature_K, friction=0.05, fixcm=False, rng=rng)
    frames = []
    dyn.run(5 * interval)  # short equilibration
    for _ in range(n):
        dyn.run(interval)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)
    return frames
