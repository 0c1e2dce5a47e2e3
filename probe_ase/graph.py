"""Neighbourhood graphs that bound the head's attention to local atoms."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list
from matscipy.neighbours import neighbour_list


def radius_graph(atoms: Atoms, cutoff: float) -> np.ndarray:
    """Directed edges ``(2, n_edges)`` between atoms closer than ``cutoff`` (Å).

    Each atom also gets a self edge, and periodic images count as separate
    edges, so the graph is invariant to rotation, translation and (up to
    relabelling) permutation of atoms. Cost is linear in the number of atoms.
    """
    n = len(atoms)
    positions = atoms.positions
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.array(atoms.cell, dtype=float)
    if not pbc.any():
        positions = positions - positions.min(axis=0)
        cell = np.diag(positions.max(axis=0) + cutoff + 1.0)
    try:
        i, j = neighbour_list("ij", positions=positions, cell=cell, pbc=pbc, cutoff=cutoff)
    except np.linalg.LinAlgError:  # mixed pbc with a degenerate cell vector
        i, j = ase_neighbor_list("ij", atoms, cutoff)
    self_loops = np.arange(n)
    dst = np.concatenate([self_loops, i]).astype(np.int64)
    src = np.concatenate([self_loops, j]).astype(np.int64)
    return np.stack([dst, src])
