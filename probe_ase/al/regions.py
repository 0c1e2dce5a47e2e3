"""Cut regions around unreliable atoms out of a big cell, for a reference code to label.

A region is the *core* (the atoms PROBE distrusts) plus every atom within
``buffer`` Å of a core atom (the buffer shell). How the cut is made:

1. Core atoms closer than ``2 * buffer`` (minimum image) form one group, so
   overlapping shells give one region instead of two copies of the same atoms.
2. Each group is unwrapped: positions follow the minimum-image bonds from its
   first core atom (core-core links up to ``2 * buffer``, then each buffer
   atom from a core neighbour), so a region straddling a periodic boundary
   comes out whole, as a non-periodic cluster (``pbc=False``, no cell).
3. When that cannot be done consistently (the group reaches one atom through
   two different periodic images: the cell is too small for the cluster), the
   region is the whole periodic cell instead, with the same core marking.

Every region carries ``arrays["core"]`` (True for the core atoms) and
``arrays["source_index"]`` (each atom's index in the source frame). The
buffer's forces are distorted by the cut surface, so they are not trained on:
see :meth:`~probe_ase.ActiveLearner.export` and
:func:`~probe_ase.al.retrain.mace_training_frames`. Choose ``buffer`` at least the
backbone's receptive field (cutoff x interactions) so core atoms see the same
neighbourhood in the cluster as in the cell.

In an active-learning database each region is a ``pending`` row carrying
``source_id`` (the source frame's row) and, in ``data``, ``source_index``,
``core`` and ``mlip_forces`` (the MLIP's own forces on the region, eV/Å).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.geometry import get_distances
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from probe_ase.exceptions import InputError

#: positions (Å) reached along two paths must agree to this for a cluster cut
UNWRAP_TOL = 1e-6


@dataclass(frozen=True)
class Region:
    """One region cut from a source frame.

    Attributes:
        atoms: the region (a non-periodic cluster, or the whole cell when
            ``periodic``), with ``arrays["core"]`` and ``arrays["source_index"]``.
        source_index: index in the source frame of each region atom.
        core: True for core atoms (their forces train), False for the buffer.
        periodic: True when the cell was too small for a cluster and the whole
            periodic cell is the region.
    """

    atoms: Atoms
    source_index: np.ndarray
    core: np.ndarray
    periodic: bool


def extract_regions(atoms: Atoms, core: Sequence[int], buffer: float) -> list[Region]:
    """Regions around the ``core`` atom indices of ``atoms``, each with a ``buffer`` (Å) shell.

    Returns one :class:`Region` per group of nearby core atoms (see the module
    docstring); an empty ``core`` gives no regions. Cost: distances from the
    core atoms to all atoms, linear in the cell's size.
    """
    if not buffer > 0:
        raise InputError(f"buffer must be a positive radius (Å), got {buffer}", buffer=buffer)
    core = np.unique(np.asarray(core, dtype=int))
    if core.size and (core.min() < 0 or core.max() >= len(atoms)):
        raise InputError(f"core atom indices must lie in 0..{len(atoms) - 1}, got {core.min()}..{core.max()}",
                         core=core[(core < 0) | (core >= len(atoms))].tolist(), n_atoms=len(atoms))
    if not core.size:
        return []
    vectors, distances = get_distances(atoms.positions[core], cell=atoms.cell, pbc=atoms.pbc)
    _, group = connected_components(csr_matrix(distances <= 2 * buffer), directed=False)
    return [_cut(atoms, core[group == g], vectors[np.ix_(group == g, group == g)], buffer) for g in np.unique(group)]


def _cut(atoms: Atoms, members: np.ndarray, links: np.ndarray, buffer: float) -> Region:
    """One group's region: the unwrapped cluster, or the whole cell when it wraps onto itself.

    ``links`` are the members' minimum-image vectors (Å) to each other.
    """
    # core atoms: placed along core-core links (<= 2 buffer), breadth first from the first one
    placed = np.zeros((len(members), 3))
    done = np.zeros(len(members), dtype=bool)
    done[0], frontier = True, [0]
    linked = np.linalg.norm(links, axis=-1) <= 2 * buffer
    while frontier:
        a = frontier.pop()
        for b in np.flatnonzero(linked[a] & ~done):
            placed[b], done[b] = placed[a] + links[a, b], True
            frontier.append(b)
    placed += atoms.positions[members[0]]
    wraps = bool(np.abs((placed[None, :] - placed[:, None]) - links)[linked].max(initial=0) > UNWRAP_TOL)
    # every atom within the buffer of some core atom, placed from each such core atom: all placements must agree
    vectors, distances = get_distances(placed, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    near = distances <= buffer
    index = np.flatnonzero(near.any(axis=0))
    candidates = placed[:, None, :] + vectors  # (core, atom, 3): where each core atom puts each atom
    first = near[:, index].argmax(axis=0)
    position = candidates[first, index]
    spread = np.abs(candidates[:, index] - position[None]).max(axis=-1)
    wraps |= bool(spread[near[:, index]].max(initial=0) > UNWRAP_TOL)
    wraps |= _too_wide(atoms, position, buffer)
    is_core = np.zeros(len(atoms), dtype=bool)
    is_core[members] = True
    if wraps:
        index = np.arange(len(atoms))
        region = atoms.copy()
    else:
        region = Atoms(atoms.numbers[index], positions=position, pbc=False)
    region.calc = None
    region.info = {}
    region.arrays["core"] = is_core[index]
    region.arrays["source_index"] = index
    return Region(region, index, is_core[index], periodic=wraps)


def _too_wide(atoms: Atoms, position: np.ndarray, buffer: float) -> bool:
    """Whether a periodic image could reach the region: along a periodic direction, the cell's width is at most
    the region's extent along it (Å) plus ``buffer``."""
    normals = np.linalg.pinv(atoms.cell.array).T  # reciprocal vectors (no 2 pi): width = 1 / |normal|
    for normal, periodic in zip(normals, atoms.pbc):
        if periodic:
            width = 1 / np.linalg.norm(normal)
            if np.ptp(position @ (normal * width)) + buffer >= width:
                return True
    return False
