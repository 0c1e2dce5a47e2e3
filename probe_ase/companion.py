"""A second opinion: another pretrained model's disagreement with the backbone.

A *companion* is any ASE calculator of a second model (another universal
potential: ``load_backbone("7net-l3i5")``, or another seed of your own
model). :class:`Companion` runs it every ``every``-th step of a
:class:`~probe_ase.ProbeCalculator` and measures how far its forces and
energy are from the backbone's (:class:`Disagreement`); the calculator's
verdict then refuses a step whose disagreement exceeds the head's tolerance
(reason ``models_disagree``). :func:`companion_labels` turns the companion's
predictions into error labels, so a head can be fitted on frames without
reference data: such a head predicts the *agreement of two models*, not the
accuracy against DFT, and its certificate certifies that agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from tqdm.auto import tqdm

from probe_ase.exceptions import InputError
from probe_ase.fitting.data import Frames, read_frames, reference_energy, reference_forces
from probe_ase.fitting.labels import atom_errors, check_criterion
from probe_ase.validate import check_atoms

#: ``info`` key a frame's label source is recorded under by :func:`companion_labels`
LABEL_SOURCE = "label_source"


@dataclass(frozen=True)
class Disagreement:
    """How far the companion's prediction is from the backbone's, for one structure.

    Attributes:
        atom: per atom, the norm of the force difference ``|F_i - F'_i|`` (eV/Å).
        force: RMS over atoms and components of the force difference (eV/Å),
            as the ``force_rmse`` criterion measures an error.
        energy: ``|E - E'| / n_atoms`` (eV/atom).
        age: steps since the companion measured it (0: this step).
    """

    atom: np.ndarray
    force: float
    energy: float
    age: int = 0

    def on(self, criterion: str) -> float:
        """The disagreement on ``criterion``'s scale (its unit: eV/Å, eV/atom or eV), comparable to a head's tau."""
        return {"force_rmse": self.force, "force_max": float(self.atom.max()), "energy_per_atom": self.energy,
                "energy": self.energy * len(self.atom)}[check_criterion(criterion)]

    def aged(self) -> Disagreement:
        """This disagreement one step older."""
        return Disagreement(self.atom, self.force, self.energy, self.age + 1)


def measure(energy: float, forces: np.ndarray, other_energy: float, other_forces: np.ndarray) -> Disagreement:
    """The disagreement of two predictions of one structure (energies in eV, forces in eV/Å)."""
    forces, other_forces = np.asarray(forces, dtype=float), np.asarray(other_forces, dtype=float)
    return Disagreement(atom_errors(forces, other_forces), float(np.sqrt(np.mean((forces - other_forces) ** 2))),
                        abs(float(energy) - float(other_energy)) / len(forces))


def predict(calc: Calculator, atoms: Atoms) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) of ``calc`` on a copy of ``atoms`` (the caller's atoms keep their calculator)."""
    copy = atoms.copy()
    copy.calc = None
    calc.calculate(copy, ["energy", "forces"], all_changes)
    return float(calc.results["energy"]), np.array(calc.results["forces"], dtype=float)


def identify(calc: Calculator) -> tuple[tuple[int, ...], str] | None:
    """The atomic numbers a model knows and its parameters' fingerprint, when an adapter recognises it (else None)."""
    from probe_ase.taps import backbone_calculators

    found = backbone_calculators(calc)
    if len(found) != 1:
        return None
    tap_cls, backbone = found[0]
    with tap_cls(backbone) as tap:
        return tuple(tap.elements), tap.fingerprint()


class Companion:
    """A second model, run every ``every``-th step; between runs its last disagreement is carried, one step older.

    Args:
        calc: the companion's ASE calculator (energy in eV, forces in eV/Å).
        every: run it on every ``every``-th step (1: every step); a step whose
            structure has another number or order of atoms than the last measured
            one always runs it.
    """

    def __init__(self, calc: Calculator, every: int = 1) -> None:
        if not isinstance(calc, Calculator) and not hasattr(calc, "calculate"):
            raise InputError(f"companion must be an ASE calculator, not {type(calc).__name__}",
                             companion=type(calc).__name__)
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise InputError(f"companion_every must be a whole number of steps >= 1, got {every!r}", every=every)
        self.calc, self.every = calc, int(every)
        self.runs = 0
        self._steps = 0
        self._last: Disagreement | None = None
        self._numbers: np.ndarray | None = None

    def check(self, base: Calculator, elements: Sequence[int], fingerprint: str) -> None:
        """Raise :class:`InputError` when the companion is the backbone (same calculator, or same weights: the
        backbone's ``fingerprint``) or does not know ``elements``."""
        from probe_ase.calculator import _holds

        found = identify(self.calc)
        if self.calc is base or _holds(base, self.calc) or (found is not None and found[1] == fingerprint):
            raise InputError("the companion is the backbone's own model: a second opinion needs a second model",
                             companion=type(self.calc).__name__)
        known = None if found is None else found[0]
        missing = sorted(set(elements) - set(known)) if known is not None else []
        if missing:
            from ase.data import chemical_symbols

            raise InputError(f"the companion ({type(self.calc).__name__}) does not know "
                             f"{', '.join(chemical_symbols[z] for z in missing)}, which the head scores",
                             missing=missing, companion_elements=list(known))

    def step(self, atoms: Atoms, energy: float, forces: np.ndarray) -> Disagreement:
        """This step's disagreement with the backbone's ``energy`` (eV) and ``forces`` (eV/Å): measured on every
        ``every``-th step (and whenever the atoms changed), else the last one, aged by a step."""
        due = self._steps % self.every == 0 or self._last is None or not np.array_equal(self._numbers, atoms.numbers)
        self._steps += 1
        if not due:
            self._last = self._last.aged()
            return self._last
        self._last = measure(energy, forces, *predict(self.calc, atoms))
        self._numbers = atoms.numbers.copy()
        self.runs += 1
        return self._last


def companion_labels(frames: Frames, companion: Calculator, *, name: str | None = None, replace: bool = False,
                     keys: tuple[str, str] = ("energy", "forces"), progress: bool = True) -> list[Atoms]:
    """Copies of ``frames`` labelled by a companion model, ready for :func:`~probe_ase.fit_probe`.

    A frame without a reference energy (``info[keys[0]]``, eV) gets the
    companion's energy (eV) and forces (eV/Å) under ``keys``; one with a
    reference keeps it (a blend: DFT labels where they exist, companion labels
    elsewhere) unless ``replace``. Each copy records where its labels came from
    in ``info["label_source"]`` (``"reference"`` or ``"companion <name>"``), and
    the head file counts them (``HeadMeta.labels``). A head fitted on companion
    labels predicts whether the backbone *agrees with the companion* within the
    tolerance; its certificate is about that agreement, not about the error
    against DFT.

    Args:
        frames: structures (a file ASE reads or a list of Atoms).
        companion: the second model's ASE calculator (eV, eV/Å); not the backbone.
        name: what the head file calls the companion (default its class name).
        replace: label every frame by the companion, also those with a reference.
        keys: ``info`` key of the energy (eV) and ``arrays`` key of the forces (eV/Å) to write.
        progress: show a progress bar.
    """
    source = f"companion {name or type(companion).__name__}"
    found = identify(companion)
    known = None if found is None else found[0]
    out = []
    for k, atoms in enumerate(tqdm(read_frames(frames), desc="companion labels", unit="frame", disable=not progress)):
        check_atoms(atoms, atoms.numbers if known is None else known, where=f"structure {k}", what="the companion")
        copy = atoms.copy()
        has_reference = reference_energy(atoms, keys[0]) is not None
        if has_reference and not replace:
            forces = reference_forces(atoms, keys[1])
            copy.info[keys[0]] = reference_energy(atoms, keys[0])
            if forces is not None:
                copy.arrays[keys[1]] = forces
            copy.info.setdefault(LABEL_SOURCE, "reference")
        else:
            energy, forces = predict(companion, atoms)
            copy.info[keys[0]], copy.arrays[keys[1]] = energy, forces
            copy.info[LABEL_SOURCE] = source
        copy.calc = None
        out.append(copy)
    return out
