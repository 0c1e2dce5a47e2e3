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
    from probe_ase.model.probe import Scores

#: why a structure is not reliable (``results["reason"]``); "ok" when it is. The monitor adds
#: "low_atom_reliability" when it judges atoms (:class:`~probe_ase.observers.ReliabilityMonitor`)
Reason = Literal["ok", "low_probability", "out_of_support", "low_atom_reliability"]
REASONS: tuple[Reason, ...] = ("ok", "low_probability", "out_of_support", "low_atom_reliability")
#: per-structure results (``atoms.info`` after :func:`~probe_ase.calculator.annotate`); ``force_error`` only from
#: heads that regress atom force errors
STRUCTURE_RESULTS = ("reliability", "reliable", "reason", "novelty", "force_error")
#: per-atom results (``atoms.arrays``); ``atom_reliability`` only from heads with a per-atom logit,
#: ``atom_force_error`` only from heads that regress atom force errors
ATOM_RESULTS = ("atom_novelty", "atom_importance", "atom_reliability", "atom_force_error")


@dataclass(frozen=True)
class Verdict:
    """Per structure: ``reliable`` (bool) and its ``reason`` (:data:`REASONS`)."""

    reliable: np.ndarray
    reason: np.ndarray


def judge(reliability: np.ndarray, novelty: np.ndarray, threshold: float, max_novelty: float = 1.0) -> Verdict:
    """Reliable iff ``reliability >= threshold`` (0-1) and ``novelty <= max_novelty``.

    The reason of an unreliable structure is ``out_of_support`` when it lies
    outside the support (there the probability itself is not trusted), else
    ``low_probability``; ``ok`` for reliable ones.
    """
    inside = np.asarray(novelty) <= max_novelty
    confident = np.asarray(reliability) >= threshold
    reason = np.where(~inside, "out_of_support", np.where(confident, "ok", "low_probability"))
    return Verdict(inside & confident, reason)


def structure_results(scores: Scores, verdict: Verdict, k: int, ptr: np.ndarray) -> dict:
    """The results of structure ``k`` (its atoms ``ptr[k]:ptr[k+1]``): the keys of :data:`STRUCTURE_RESULTS` and
    :data:`ATOM_RESULTS` the head gives (reliability 0-1, novelty, force errors in eV/Å)."""
    atoms = slice(int(ptr[k]), int(ptr[k + 1]))
    out = {"reliability": float(scores.reliability[k]), "reliable": bool(verdict.reliable[k]),
           "reason": str(verdict.reason[k]), "novelty": float(scores.novelty[k]),
           "atom_novelty": scores.atom_novelty[atoms], "atom_importance": scores.importance[atoms]}
    if len(scores.atom_reliability):
        out["atom_reliability"] = scores.atom_reliability[atoms]
    if len(scores.force_error):
        out.update(force_error=float(scores.force_error[k]), atom_force_error=scores.atom_force_error[atoms])
    return out
