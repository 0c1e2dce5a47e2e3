"""Neighbourhood graphs that bound the head's attention to local atoms.

:class:`HeadGraph` is the one place that chooses a structure's graph: for a
calculator step the backbone's own neighbour list when it covers the head's
cutoff, else a Verlet list (:class:`NeighbourCache`); for batches of frames
(fitting, scoring) :func:`radius_graph` per frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list
from matscipy.neighbours import neighbour_list

if TYPE_CHECKING:
    import torch

    from probe_ase.taps.base import Tap


def radius_graph(atoms: Atoms, cutoff: float, shifts: bool = False) -> np.ndarray:
    """Directed edges ``(2, n_edges)`` between atoms closer than ``cutoff`` (Å).

    Each atom also gets a self edge (the first ``n_atoms`` columns), and
    periodic images count as separate edges, so the graph is invariant to
    rotation, translation and (up to relabelling) permutation of atoms. Cost
    is linear in the number of atoms. With ``shifts=True`` the result is a
    tuple ``(dst, src, offsets)`` where ``offsets`` (n_edges, 3) in Å is the
    periodic image vector to add to ``positions[src] - positions[dst]``.
    """
    n = len(atoms)
    positions = atoms.positions
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.array(atoms.cell, dtype=float)
    if not pbc.any():
        positions = positions - positions.min(axis=0)
        cell = np.diag(positions.max(axis=0) + cutoff + 1.0)
    try:
        i, j, S = neighbour_list("ijS", positions=positions, cell=cell, pbc=pbc, cutoff=cutoff)
    except np.linalg.LinAlgError:  # mixed pbc with a degenerate cell vector
        i, j, S = ase_neighbor_list("ijS", atoms, cutoff)
        cell = np.array(atoms.cell, dtype=float)
    self_loops = np.arange(n)
    dst = np.concatenate([self_loops, i]).astype(np.int64)
    src = np.concatenate([self_loops, j]).astype(np.int64)
    if shifts:
        return dst, src, np.concatenate([np.zeros((n, 3)), S @ cell])
    return np.stack([dst, src])


class NeighbourCache:
    """Radius graphs for successive steps of one trajectory, rebuilt only when needed.

    Pairs are listed once within ``cutoff + skin`` (Å) with their periodic
    shifts; each step keeps those still within ``cutoff``. The list is
    rebuilt when an atom has moved more than ``skin / 2`` since the last build
    or when the numbers, cell or periodicity change, so every step's graph
    equals :func:`radius_graph`'s (a Verlet list).
    """

    def __init__(self, cutoff: float, skin: float = 1.0) -> None:
        self.cutoff, self.skin = float(cutoff), float(skin)
        self._key: tuple | None = None
        self._positions: np.ndarray | None = None

    def __call__(self, atoms: Atoms) -> np.ndarray:
        """This step's radius graph ``(2, n_edges)`` of ``atoms``, self loops first; rebuilds the list when needed."""
        key = (atoms.numbers.tobytes(), atoms.cell.array.tobytes(), atoms.pbc.tobytes())
        moved = np.inf if self._positions is None or key != self._key or len(atoms) != len(self._positions) \
            else np.sqrt(((atoms.positions - self._positions) ** 2).sum(1)).max()
        if moved > self.skin / 2:
            self._build(atoms, key)
        vectors = atoms.positions[self._j] - atoms.positions[self._i] + self._offsets
        keep = (vectors**2).sum(1) < self.cutoff**2
        self_loops = np.arange(len(atoms))
        return np.stack([np.concatenate([self_loops, self._i[keep]]), np.concatenate([self_loops, self._j[keep]])])

    def _build(self, atoms: Atoms, key: tuple) -> None:
        wide = radius_graph(atoms, self.cutoff + self.skin, shifts=True)
        n = len(atoms)
        self._i, self._j, self._offsets = wide[0][n:], wide[1][n:], wide[2][n:]
        self._positions, self._key = atoms.positions.copy(), key


class HeadGraph:
    """The head's neighbourhood graph within ``cutoff`` (Å), chosen in one place.

    :meth:`step` serves a calculator step: the tap's graph from the
    backbone's own neighbour list of that pass when it covers ``cutoff`` (no
    second neighbour search), else this trajectory's Verlet list.
    :meth:`frames` serves batches: :func:`radius_graph` of each frame. All
    give the same set of edges.
    """

    def __init__(self, cutoff: float) -> None:
        self.cutoff = float(cutoff)
        self._cache = NeighbourCache(self.cutoff)

    def step(self, atoms: Atoms, tap: Tap | None = None) -> np.ndarray | torch.Tensor:
        """Graph of ``atoms`` just passed through the backbone that ``tap`` watches (call in the pass's thread)."""
        graph = None if tap is None else tap.neighbour_graph(self.cutoff)
        return graph if graph is not None else self._cache(atoms)

    def frames(self, frames: Sequence[Atoms]) -> list[np.ndarray]:
        """Graphs of independent structures."""
        return [radius_graph(atoms, self.cutoff) for atoms in frames]
