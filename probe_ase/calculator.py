"""ProbeCalculator: the user's MLIP calculator plus a reliability verdict per step."""

from __future__ import annotations

import os
import warnings
import weakref

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from probe_ase.companion import Companion, Disagreement
from probe_ase.exceptions import InputError
from probe_ase.model.graph import HeadGraph
from probe_ase.model.headfile import HeadMeta
from probe_ase.model.probe import Probe
from probe_ase.taps import Tap
from probe_ase.validate import check_atoms
from probe_ase.verdict import ATOM_RESULTS, STRUCTURE_RESULTS, Verdict, judge, structure_results



class ProbeCalculator(Calculator):
    """Wrap a backbone calculator (MACE, SchNet, PaiNN, CHGNet, or any with a ModuleTap) and add a reliability verdict.

    The backbone runs unchanged; hooks capture its per-atom features during its
    own energy/force pass and the PROBE head scores them. Several wrappers may
    share one backbone calculator, also across threads: they share its hooks
    and a lock, so their steps on it run one at a time and each reads its own
    pass. ``results`` holds
    everything the backbone gives (energy in eV, forces in eV/Å, stress in
    eV/Å³ ...) plus:

    * ``reliability``: calibrated probability (0-1) that the prediction is
      within the head's tolerance;
    * ``novelty``: how unlike the fit data the structure's features are
      (the largest ``atom_novelty``; <= 1 inside the support the calibration
      covered, see :mod:`probe_ase.model.novelty`);
    * ``atom_novelty``: per atom, same scale;
    * ``reliable``: the verdict, ``reliability >= threshold`` **and**
      ``novelty <= max_novelty``;
    * ``reason``: ``"ok"``, ``"low_probability"`` or ``"out_of_support"``
      (outside the support the probability is not trusted, whatever its value);
    * ``atom_importance``: per-atom attention importance, summing to 1;
    * ``atom_reliability`` (heads fitted with ``atom_tolerance`` or ``atom_quantile`` only):
      per atom, calibrated probability (0-1) that its force error norm
      ``|ΔF_i|`` is within the head's atom tolerance (eV/Å);
    * ``atom_force_error`` and ``force_error`` (heads that regress atom
      errors: the default for force criteria): per atom, the predicted
      force-error norm ``|ΔF_i|`` (eV/Å), and per structure the predicted
      force RMSE over components, as the ``force_rmse`` criterion defines it
      (eV/Å, ``sqrt(mean_i atom_force_error_i**2 / 3)``). Estimates in eV/Å,
      median-like (about half of the true errors lie above them), with no
      novelty term: the verdict, not these, is what fails safe;
    * with a ``companion`` (:mod:`probe_ase.companion`): ``atom_disagreement``
      (per atom ``|F_i - F'_i|``, eV/Å), ``force_disagreement`` (RMS over
      components, eV/Å), ``energy_disagreement`` (``|E - E'| / n_atoms``,
      eV/atom) and ``disagreement_age`` (steps since the companion measured
      them; 0: this step). A disagreement above the head's tolerance (on its
      criterion's scale) makes the step unreliable, reason ``models_disagree``.

    Args:
        base: the backbone calculator, or an ASE mixing calculator
            (``SumCalculator`` ...) holding exactly one backbone.
        probe: a fitted :class:`~probe_ase.model.probe.Probe` or a head-file path.
        threshold: operating threshold on ``reliability``; default the head's
            certified ``p*`` (a warning says so when the head's data could not
            certify its target risk and ``p*`` holds only at a larger one).
        max_novelty: support edge of the verdict (default 1.0, where the
            certificate holds; larger values trust the head farther out, at
            your own risk).
        tap: a tap you built (e.g. a :class:`~probe_ase.taps.ModuleTap` for a
            backbone no adapter knows) on the backbone in ``base``, instead of
            the adapter found for it. It stays yours: :meth:`close` leaves it open.
        companion: a second model's calculator (e.g. another universal
            potential), run every ``companion_every``-th step for a second
            opinion (results above); it must know the head's elements.
        companion_every: run the companion on every k-th step (1: every step,
            about twice the cost of the backbone alone when both cost the same);
            between runs the last disagreement counts, with its age.
        vouch: outside the novelty support, two models agreeing within
            ``vouch`` x the head's tolerance make the step reliable (0-1;
            default 0: never, the fail-safe verdict). Needs a companion. On
            the mlearn crystals ``vouch=1`` let up to 35 % unreliable cells
            through under a shift (docs: validation, the companion model).
    """

    def __init__(self, base: Calculator, probe: Probe | str | os.PathLike, threshold: float | None = None,
                 max_novelty: float = 1.0, tap: Tap | None = None, companion: Calculator | None = None,
                 companion_every: int = 1, vouch: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.base = base
        self.probe = probe if isinstance(probe, Probe) else Probe.load(probe)
        meta = self.probe.meta
        self._own_tap = tap is None
        self.tap = self.probe.tap_for(base) if tap is None else tap
        if self._own_tap:
            weakref.finalize(self, self.tap.close)  # a dropped calculator leaves no hooks behind
        try:
            if not self._own_tap and not _holds(base, tap.calc):
                raise InputError(f"the tap watches a {type(tap.calc).__name__} that is not (inside) this "
                                 f"{type(base).__name__}", tap_calculator=type(tap.calc).__name__)
            self.probe.check_backbone(self.tap)
            self.attach_companion(companion, companion_every, vouch)
        except Exception:
            self.close()
            raise
        self.threshold = meta.p_star if threshold is None else float(threshold)
        if threshold is None and not meta.certified:
            warnings.warn(_uncertified(meta), stacklevel=2)
        self.max_novelty = float(max_novelty)
        self.probe.to(next(self.tap.module.parameters()).device)
        self._graph = HeadGraph(meta.config.cutoff)

    def attach_companion(self, companion: Calculator | None, every: int = 1, vouch: float = 0.0) -> None:
        """Use ``companion`` (None: none) from the next step on, every ``every``-th step, with ``vouch`` (0-1; the
        arguments of the same names in the class docstring)."""
        if not 0 <= vouch <= 1 or (vouch and companion is None):
            raise InputError(f"vouch must lie in 0-1 and needs a companion, got {vouch} "
                             f"{'with' if companion is not None else 'without'} one", vouch=vouch)
        paired = Companion(companion, every) if companion is not None else None
        if paired is not None:
            paired.check(self.base, self.probe.meta.elements, self.probe.meta.fingerprint)
        self.companion, self.vouch = paired, float(vouch)
        #: the companion's disagreement at the last step (None without a companion)
        self.disagreement: Disagreement | None = None
        meta = self.probe.meta
        gives = {"atom_reliability": meta.local, "force_error": self.probe.head.atom_error,
                 "atom_force_error": self.probe.head.atom_error, "force_disagreement": paired is not None,
                 "energy_disagreement": paired is not None, "disagreement_age": paired is not None,
                 "atom_disagreement": paired is not None}
        self.implemented_properties = list(self.base.implemented_properties) + [
            key for key in STRUCTURE_RESULTS + ATOM_RESULTS if gives.get(key, True)]
        self.reset()

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        """Run the backbone (hooks fire), then the head; fill ``self.results``."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        check_atoms(atoms, self.probe.meta.elements, what="the head (fitted on these elements)")
        # energy and forces come from one backbone pass: ask for both, so a
        # calculator that stores only what was asked (SpkCalculator) runs once per step
        wanted = [p for p in ("energy", "forces") if p in self.base.implemented_properties]
        wanted += [p for p in properties or [] if p in self.base.implemented_properties and p not in wanted]
        # the lock is shared by every wrapper on this backbone: its calculator keeps one results dict
        with self.tap.lock:
            before = self.tap.n_forward
            backbone = self.tap.calc
            if backbone is not self.base:  # inside a mixing calculator: one pass fills the backbone's cache
                backbone.calculate(atoms, [p for p in ("energy", "forces") if p in backbone.implemented_properties],
                                   all_changes)
            self.base.calculate(atoms, wanted, system_changes)
            if self.tap.n_forward == before:  # backbone answered from its cache: make it run
                self.tap.calc.reset()
                self.base.calculate(atoms, wanted, all_changes)
            self.results = dict(self.base.results)
            features = self.tap.features()[: len(atoms)]
            edges = [self._graph.step(atoms, self.tap)]  # the backbone's own list when it covers the cutoff
        numbers = torch.as_tensor(atoms.numbers, dtype=torch.long, device=features.device)
        ptr = np.array([0, len(atoms)])
        scores = self.probe.predict(features, numbers, ptr, edges)
        self.disagreement = None
        if self.companion is not None:
            self.disagreement = self.companion.step(atoms, self.results["energy"], self.results["forces"])
        verdict = self.judge(scores.reliability, scores.novelty, self.threshold)
        self.results.update(structure_results(scores, verdict, 0, ptr, self.disagreement))

    def judge(self, reliability: float | np.ndarray, novelty: float | np.ndarray, threshold: float) -> Verdict:
        """The verdict (:func:`~probe_ase.verdict.judge`) on this step's ``reliability`` (0-1) and ``novelty`` at
        ``threshold`` (0-1), with the support edge and the companion's disagreement of this calculator."""
        gap = None if self.disagreement is None else np.array([self.disagreement.on(self.probe.meta.criterion)])
        return judge(np.atleast_1d(reliability), np.atleast_1d(novelty), threshold, self.max_novelty, gap,
                     self.probe.meta.tau, self.vouch)

    def close(self) -> None:
        """Remove the hooks from the backbone (a tap passed as ``tap=`` stays open: it is yours)."""
        if self._own_tap:
            self.tap.close()

    def __enter__(self) -> ProbeCalculator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _holds(calc: Calculator, backbone: Calculator) -> bool:
    """Whether ``backbone`` is ``calc`` or one of the calculators an ASE mixing calculator holds."""
    if calc is backbone:
        return True
    members = getattr(getattr(calc, "mixer", calc), "calcs", [])
    return any(_holds(member, backbone) for member in members)


def annotate(atoms: Atoms, results: dict | None = None) -> Atoms:
    """Copy PROBE results into ``atoms.info`` / ``atoms.arrays`` so any ASE writer keeps them.

    ASE's extxyz and trajectory writers store only the standard calculator
    properties; after ``annotate`` a frame carries ``info["reliability"]``
    (0-1), ``info["reliable"]``, ``info["reason"]``, ``info["novelty"]`` and
    the per-atom ``arrays["atom_novelty"]``, ``arrays["atom_importance"]``
    (sums to 1) and, from heads with a per-atom logit,
    ``arrays["atom_reliability"]`` (0-1), and from heads that regress atom
    errors ``info["force_error"]`` and ``arrays["atom_force_error"]`` (eV/Å),
    and with a companion ``info["force_disagreement"]`` (eV/Å),
    ``info["energy_disagreement"]`` (eV/atom), ``info["disagreement_age"]``
    (steps) and ``arrays["atom_disagreement"]`` (eV/Å), which OVITO and
    ``ase.io.read`` read back. ``results`` defaults to
    ``atoms.calc.results``. Returns ``atoms``.
    """
    results = atoms.calc.results if results is None else results
    atoms.info.update({key: results[key] for key in STRUCTURE_RESULTS if key in results})
    atoms.arrays.update({key: np.asarray(results[key], dtype=float) for key in ATOM_RESULTS if key in results})
    return atoms


def _uncertified(meta: HeadMeta) -> str:
    """What the verdict promises when the head's fit data could not certify its target risk."""
    if meta.certified_risk >= 1:
        return (f"this head's data certified no threshold at target risk {meta.target_risk:.1%}: its p* accepts "
                "nothing, so every verdict is False; refit on more calibration structures or raise target_risk")
    return (f"this head's p* = {meta.p_star:.3f} is certified at risk {meta.certified_risk:.1%} only, not its target "
            f"{meta.target_risk:.1%} (with probability >= {1 - meta.delta:g}): up to "
            f"{meta.certified_risk:.1%} of the structures the verdict calls reliable may be outside tolerance "
            "(probe.report['certificate'] says how many calibration structures the target needs)")
