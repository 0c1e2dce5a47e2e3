"""Check that reliability and novelty are invariant to rotation, translation and permutation."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from scipy.spatial.transform import Rotation

from probe_ase.verdict import ATOM_RESULTS

#: per-structure results that must not change (per-atom ones, :data:`~probe_ase.verdict.ATOM_RESULTS`, must follow a
#: permutation)
STRUCTURE_RESULTS = ("reliability", "novelty", "force_error")


def _score(calc: Calculator, atoms: Atoms) -> dict[str, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    return {key: np.array(calc.results[key], dtype=float) for key in STRUCTURE_RESULTS + ATOM_RESULTS
            if key in calc.results}  # some only from heads with a per-atom logit / atom-error regression


def moved_copies(atoms: Atoms, seed: int = 0, wrap: bool = False) -> list[tuple[str, Atoms, np.ndarray | None]]:
    """``(how, moved copy, permutation or None)`` for a random rotation (positions and cell), a random
    translation (Å; with ``wrap``, periodic atoms are wrapped back into the cell) and a random permutation."""
    rng = np.random.default_rng(seed)
    rotation = Rotation.random(random_state=seed).as_matrix()
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.cell = atoms.cell.array @ rotation.T
    translated = atoms.copy()
    translated.positions += rng.normal(size=3) * 3.0
    if wrap and translated.pbc.all():
        translated.wrap()  # atoms cross the cell boundary and come back on the other side
    perm = rng.permutation(len(atoms))
    return [("rotation", rotated, None), ("translation", translated, None), ("permutation", atoms[perm], perm)]


def assert_invariant(
    calc: Calculator, atoms: Atoms, tol: float = 1e-5, novelty_tol: float = 1e-4, seed: int = 0
) -> None:
    """Raise AssertionError unless reliability, novelty, force_error (and per-atom results, permuted) are invariant.

    Per-atom results are ``atom_importance``, ``atom_novelty``, when the
    head has a per-atom logit ``atom_reliability``, and when it regresses
    atom errors ``atom_force_error`` (eV/Å).

    Applies a random rotation (of positions and cell), a random translation
    (Å) and a random permutation of atoms, each on its own. Tolerances are
    absolute for values up to 1 and relative above (novelty can exceed 1);
    novelty gets its own (``novelty_tol``) because whitening magnifies the
    float32 rounding of the features.
    """
    reference = _score(calc, atoms)
    for name, moved, order in moved_copies(atoms, seed):
        scored = _score(calc, moved)
        for key, value in scored.items():
            expected = reference[key] if order is None or key in STRUCTURE_RESULTS else reference[key][order]
            change = np.max(np.abs(value - expected) / np.maximum(1.0, np.abs(expected)))
            limit = novelty_tol if "novelty" in key else tol
            if change > limit:
                raise AssertionError(f"{key} not invariant under {name}: largest (relative) change {change:.2e} "
                                     f"(tol {limit}); before {expected}, after {value}")
