"""Scores to verdict to results: the one place that judges a structure and names its results.

:meth:`Probe.predict <probe_ase.model.probe.Probe.predict>` gives :class:`~probe_ase.model.probe.Scores`;
:func:`judge` turns them into a :class:`Verdict` (reliable iff the probability reaches the threshold **and**
the structure lies inside the novelty support, with the reason); :func:`structure_results` names the results
of one structure, as the calculator, batched scoring and :func:`~probe_ase.calculator.annotate` all store them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from probe_ase.companion import Disagreement
    from probe_ase.model.probe import Scores

#: why a structure is not reliable (``results["reason"]``); "ok" when it is. "models_disagree": a companion model's
#: disagreement exceeds the head's tolerance (:mod:`probe_ase.companion`). The monitor adds "low_atom_reliability"
#: when it judges atoms (:class:`~probe_ase.observers.ReliabilityMonitor`)
Reason = Literal["ok", "low_probability", "out_of_support", "models_disagree", "low_atom_reliability"]
REASONS: tuple[Reason, ...] = ("ok", "low_probability", "out_of_support", "models_disagree", "low_atom_reliability")
#: per-structure results (``atoms.info`` after :func:`~probe_ase.calculator.annotate`); ``force_error`` only from
#: heads that regress atom force errors; the ``*disagreement*`` keys only with a companion
#: (:class:`~probe_ase.companion.Disagreement`: eV/Å, eV/atom, steps)
STRUCTURE_RESULTS = ("reliability", "reliable", "reason", "novelty", "force_error", "force_disagreement",
                     "energy_disagreement", "disagreement_age")
#: per-atom results (``atoms.arrays``); ``atom_reliability`` only from heads with a per-atom logit,
#: ``atom_force_error`` only from heads that regress atom force errors, ``atom_disagreement`` (eV/Å) only with a
#: companion
ATOM_RESULTS = ("atom_novelty", "atom_importance", "atom_reliability", "atom_force_error", "atom_disagreement")


@dataclass(frozen=True)
class Verdict:
    """Per structure: ``reliable`` (bool) and its ``reason`` (:data:`REASONS`)."""

    reliable: np.ndarray
    reason: np.ndarray


def judge(reliability: np.ndarray, novelty: np.ndarray, threshold: float, max_novelty: float = 1.0,
          disagreement: np.ndarray | None = None, tolerance: float | None = None, vouch: float = 0.0) -> Verdict:
    """Reliable iff ``reliability >= threshold`` (0-1) and ``novelty <= max_novelty``, and, with a companion,
    its disagreement is at most ``tolerance``.

    The reason of an unreliable structure is ``models_disagree`` when a
    companion's ``disagreement`` (per structure, on the head's criterion
    scale; NaN where none was measured) exceeds ``tolerance`` (the head's
    tau), else ``out_of_support`` when it lies outside the support (there the
    probability itself is not trusted), else ``low_probability``; ``ok`` for
    reliable ones. ``vouch`` (0-1): outside the support, two models that
    agree within ``vouch * tolerance`` make the structure reliable (0: never).
    """
    inside = np.asarray(novelty) <= max_novelty
    confident = np.asarray(reliability) >= threshold
    tau = 0.0 if tolerance is None else tolerance
    gap = np.full(inside.shape, np.nan) if disagreement is None or tolerance is None else np.asarray(disagreement)
    disagree, vouched = gap > tau, (vouch > 0) & (gap <= vouch * tau)  # NaN (not measured): both False
    judged = np.where(inside, np.where(confident, "ok", "low_probability"),
                      np.where(vouched, "ok", "out_of_support"))
    reason = np.where(disagree, "models_disagree", judged)
    return Verdict(reason == "ok", reason)


def structure_results(scores: Scores, verdict: Verdict, k: int, ptr: np.ndarray,
                      disagreement: Disagreement | None = None) -> dict:
    """The results of structure ``k`` (its atoms ``ptr[k]:ptr[k+1]``): the keys of :data:`STRUCTURE_RESULTS` and
    :data:`ATOM_RESULTS` the head gives (reliability 0-1, novelty, force errors in eV/Å), and a companion's
    ``disagreement`` with it when given."""
    atoms = slice(int(ptr[k]), int(ptr[k + 1]))
    out = {"reliability": float(scores.reliability[k]), "reliable": bool(verdict.reliable[k]),
           "reason": str(verdict.reason[k]), "novelty": float(scores.novelty[k]),
           "atom_novelty": scores.atom_novelty[atoms], "atom_importance": scores.importance[atoms]}
    if len(scores.atom_reliability):
        out["atom_reliability"] = scores.atom_reliability[atoms]
    if len(scores.force_error):
        out.update(force_error=float(scores.force_error[k]), atom_force_error=scores.atom_force_error[atoms])
    if disagreement is not None:
        out.update(force_disagreement=disagreement.force, energy_disagreement=disagreement.energy,
                   disagreement_age=disagreement.age, atom_disagreement=disagreement.atom)
    return out
