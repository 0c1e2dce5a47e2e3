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


def hot_spot_frames(
    n: int,
    displacement: float = 0.3,
    radius: float = 3.0,
    size: int = 3,
    temperature_K: float = 300.0,
    symbol: str = "Cu",
    seed: int = 0,
) -> list[Atoms]:
    """``n`` thermal fcc frames, each with one local hot spot: a local defect for per-atom labels.

    Every atom within ``radius`` (Å) of one random atom is displaced by a
    random vector of length up to ``displacement`` (Å); the rest of the cell
    stays thermal (``temperature_K``), so the error is local. Frames come
    from :func:`emt_frames` (``size`` repeats: 3 gives 108 atoms) and carry
    EMT energy (eV) and forces (eV/Å); ``info["hot_spot"]`` is the centre atom.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for atoms in emt_frames(n, temperature_K, symbol=symbol, size=size, interval=20, seed=seed):
        centre = int(rng.integers(len(atoms)))
        near = atoms.get_distances(centre, range(len(atoms)), mic=True) <= radius
        kick = rng.normal(size=(int(near.sum()), 3))
        kick *= displacement * rng.uniform(0.3, 1.0, size=(len(kick), 1)) / np.linalg.norm(kick, axis=1, keepdims=True)
        atoms.positions[near] += kick
        atoms.calc = EMT()
        frame = atoms.copy()
        frame.info["hot_spot"] = centre
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)
    return frames
