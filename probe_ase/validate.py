"""Checks on structures before they reach a backbone or the head."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from probe_ase.exceptions import EmptyStructureError, NonFiniteError, UnknownElementError


def check_atoms(atoms: Atoms, elements: Iterable[int], where: str = "structure", what: str = "the backbone") -> None:
    """Raise a specific :class:`~probe_ase.exceptions.InputError` for unusable ``atoms``.

    Checks: at least one atom, finite positions (Å) and cell, and only
    elements in ``elements`` (atomic numbers the backbone, or head, knows).
    """
    if len(atoms) == 0:
        raise EmptyStructureError(f"{where} has no atoms", where=where)
    bad = ~np.isfinite(atoms.positions).all(axis=1)
    if bad.any():
        raise NonFiniteError(f"{where} has NaN or inf positions at atom indices {np.flatnonzero(bad)[:10].tolist()}",
                             where=where, atoms=np.flatnonzero(bad).tolist())
    if not np.isfinite(atoms.cell.array).all():
        raise NonFiniteError(f"{where} has a NaN or inf cell", where=where, atoms=[])
    known = set(int(z) for z in elements)
    unknown = sorted(set(atoms.numbers.tolist()) - known)
    if unknown:
        raise UnknownElementError(
            f"{where} contains {', '.join(chemical_symbols[z] for z in unknown)}, which {what} "
            f"does not know (it knows {', '.join(chemical_symbols[z] for z in sorted(known))})",
            where=where, unknown=unknown, known=sorted(known),
        )
