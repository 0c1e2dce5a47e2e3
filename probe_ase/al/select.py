"""Selection: which explored steps go to the reference calculator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms


@dataclass
class Candidate:
    """One explored step worth (or not worth) a reference calculation."""

    atoms: Atoms
    reliability: float
    novelty: float
    band: str
    trajectory: int
    step: int
    fingerprint: np.ndarray
    unreliable_atoms: np.ndarray | None = None
    #: a companion model's disagreement on the head's criterion scale (its unit), None without a companion
    disagreement: float | None = None


def select(candidates: Sequence[Candidate], known: Sequence[np.ndarray], max_new: int, min_separation: int,
           support: float = 1.0, dedup_tol: float = 1e-3) -> list[Candidate]:
    """At most ``max_new`` candidates: out of the support (novelty > ``support``) first, then least reliable, at least
    ``min_separation`` steps apart per trajectory, none within ``dedup_tol`` (relative) of another's or a ``known``
    frame's mean backbone features."""
    chosen: list[Candidate] = []
    order = sorted(candidates, key=lambda c: (c.novelty <= support, c.reliability, c.trajectory, c.step))
    for cand in order:
        if len(chosen) >= max_new:
            break
        if any(c.trajectory == cand.trajectory and abs(c.step - cand.step) < min_separation for c in chosen):
            continue
        scale = np.linalg.norm(cand.fingerprint) + 1e-12
        if any(np.linalg.norm(cand.fingerprint - f) < dedup_tol * scale
               for f in list(known) + [c.fingerprint for c in chosen]):
            continue
        chosen.append(cand)
    return chosen
