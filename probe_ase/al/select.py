"""Selection: which explored steps go to the reference calculator.

Each explored step falls in one of three bands (as DP-GEN does with force-deviation trust levels),
:meth:`Bands.band`. Inside the novelty support (``novelty <= max_novelty``) the bands are by reliability
``p``: *reliable* (``p >= p_hi``: keep exploring), *candidate* (``p_lo <= p < p_hi``: worth a reference
calculation) and *failed* (``p < p_lo``: too far off to be useful; that trajectory stops, the frame is stored
``rejected``). Outside the support ``p`` is not trusted, so the band is by novelty alone: *candidate* while
``novelty <= novelty_hi`` (new, yet near enough to be useful training data), *failed* beyond.

*A second opinion*: with a companion model, a step whose models disagree beyond the head's tolerance ``tau``
(on its criterion's scale) is a *candidate* up to ``disagreement_hi`` x tau and *failed* beyond (DP-GEN's
trust levels on the force deviation), whatever PROBE says; the worse of the two bands counts. Outside the
support, agreement within the calculator's ``vouch`` x tau makes the step *reliable*, as its verdict does.

:func:`select` then keeps at most ``max_new`` candidates: out-of-support ones first, then least reliable
first, at least ``min_separation`` steps apart within a trajectory and never two near-identical ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms


BAND_ORDER = ("reliable", "candidate", "failed")


@dataclass(frozen=True)
class Bands:
    """The band edges of one exploration (module docstring): reliability ``p_lo`` <= ``p_hi`` (0-1), novelty
    ``novelty_hi``, and the companion's ``disagreement_hi``; the head's ``tau`` (its criterion's unit), the
    calculator's ``max_novelty`` and ``vouch``."""

    p_lo: float
    p_hi: float
    novelty_hi: float
    disagreement_hi: float
    tau: float
    max_novelty: float
    vouch: float

    def band(self, reliability: float, novelty: float, disagreement: float | None = None) -> str:
        """``"reliable"``, ``"candidate"`` or ``"failed"`` for one step; ``disagreement``: a companion's, on the
        head's criterion scale (None: no companion)."""
        tau = self.tau
        if disagreement is not None and disagreement > tau:
            second = "candidate" if disagreement <= self.disagreement_hi * tau else "failed"
        else:
            second = "reliable"
        if novelty > self.max_novelty:
            vouched = disagreement is not None and self.vouch > 0 and disagreement <= self.vouch * tau
            first = "reliable" if vouched else "candidate" if novelty <= self.novelty_hi else "failed"
        elif reliability >= self.p_hi:
            first = "reliable"
        else:
            first = "candidate" if reliability >= self.p_lo else "failed"
        return max(first, second, key=BAND_ORDER.index)

    def reason(self, cand: Candidate) -> str:
        """Why ``cand`` was not reliable: ``models_disagree``, ``out_of_support``, ``low_probability`` or
        ``low_atom_reliability``."""
        if cand.disagreement is not None and cand.disagreement > self.tau:
            return "models_disagree"
        if cand.novelty > self.max_novelty:
            return "out_of_support"
        return "low_probability" if cand.reliability < self.p_hi else "low_atom_reliability"


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
