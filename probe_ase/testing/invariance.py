"""Check that reliability is invariant to rotation, translation and permutation."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from scipy.spatial.transform import Rotation


def _score(calc: Calculator, atoms: Atoms) -> tuple[float, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    return calc.results["reliability"], np.array(calc.results["atom_importance"])


def assert_invariant(calc: Calculator, atoms: Atoms, tol: float = 1e-5, seed: int = 0) -> None:
    """Raise AssertionError unless ``reliability`` (and importances, permuted) are invariant.

    Applies a random rotation (of positions and cell), a random translation
    (Å) and a random permutation of atoms, each on its own.
    """
    rng = np.random.default_rng(seed)
    p0, imp0 = _score(calc, atoms)
    rotation = Rotation.random(random_state=seed).as_matrix()
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.cell = atoms.cell.array @ rotation.T
    translated = atoms.copy()
    translated.positions += rng.normal(size=3) * 3.0
    perm = rng.permutation(len(atoms))
    permuted = atoms[perm]
    for name, moved, order in (("rotation", rotated, None), ("translation", translated, None), ("permutation", permuted, perm)):
        p, imp = _score(calc, moved)
        expected = imp0 if order is None else imp0[order]
        if abs(p - p0) > tol or np.max(np.abs(imp - expected)) > tol:
            raise AssertionError(
                f"not invariant under {name}: reliability {p0:.8f} -> {p:.8f}, "
                f"largest importance change {np.max(np.abs(imp - expected)):.2e} (tol {tol})"
            )
