"""The active-learning configuration (``probe-ase al``'s TOML file) as typed, frozen dataclasses.

:class:`AlConfig` holds the top level of the file and one dataclass per table:
:class:`ReferenceConfig` (``[reference]``; its ``pyscf`` table a :class:`PySCFConfig`), :class:`ExploreConfig`
(``[explore]``), :class:`LabelConfig` (``[label]``) and :class:`RetrainConfig`
(``[retrain]``, optional). :meth:`AlConfig.from_toml` reads a file and
:meth:`AlConfig.from_mapping` a dict; each dataclass can also be built directly
in Python. Every field carries a :class:`Rule` (kind, range, unit, allowed
strings) checked on construction, so unknown keys, missing keys, wrong types and
out-of-range numbers raise an :class:`~probe_ase.exceptions.InputError` that
names the key (``explore.steps``), the file, what is allowed and the unit. A new
key is one new field with its rule.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import chemical_symbols
from ase.md.md import MolecularDynamics

from probe_ase.al.rules import PATH, Rule, Section, rule_field, source
from probe_ase.exceptions import InputError
from probe_ase.md import Ensemble, make_dynamics

@dataclass(frozen=True)
class PySCFConfig(Section):
    """``[reference] pyscf = {...}``: DFT for molecules with PySCF (:mod:`probe_ase.al.dft`); a reference factory.

    Attributes:
        xc: functional as PySCF (libxc) names it: ``"PBE"``, ``"B3LYP"``; ``"HF"``: Hartree-Fock.
        basis: basis set as PySCF names it: ``"def2-SVP"``, ``"sto-3g"``.
        charge: total charge (elementary charges).
        multiplicity: spin multiplicity 2S + 1; None: 1 for an even electron count, 2 for an odd one.
            Closed shells run restricted (RKS), others unrestricted (UKS).
        conv_tol: SCF energy convergence in Hartree (PySCF's own setting and unit; 1e-9 Hartree = 2.7e-8 eV).
        max_cycle: SCF iterations at most; a frame whose SCF has not converged by then is ``failed``.
        threads: OpenMP threads of each reference call.
        energy_offsets: eV per atom of each element, added to PySCF's energy so its labels share the
            training data's energy zero (:func:`probe_ase.al.dft.fit_energy_offsets`); {}: none.
    """

    NAME: ClassVar[str] = "reference.pyscf"

    xc: str = rule_field(Rule(str), "PBE")
    basis: str = rule_field(Rule(str), "def2-SVP")
    charge: int = rule_field(Rule(int), 0)
    multiplicity: int | None = rule_field(Rule(int, 1), None)
    conv_tol: float = rule_field(Rule(float, 0, positive=True, unit="Hartree"), 1e-9)
    max_cycle: int = rule_field(Rule(int, 1), 50)
    threads: int = rule_field(Rule(int, 1), 1)
    energy_offsets: dict[str, float] = rule_field(Rule(dict, what="a table of element = eV per atom"), factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        offsets = {}
        for symbol, value in self.energy_offsets.items():
            key = f"{self.NAME}.energy_offsets.{symbol}"
            if symbol not in chemical_symbols[1:]:
                raise InputError(f"{key} in {source()}: {symbol!r} is not an element symbol", path=PATH.get(),
                                 key=key)
            offsets[symbol] = Rule(float, unit="eV per atom").check(key, value)
        object.__setattr__(self, "energy_offsets", offsets)

    def __call__(self) -> Calculator:
        """A fresh :class:`~probe_ase.al.dft.PySCFCalculator` with these settings (energies eV, forces eV/Å)."""
        from probe_ase.al.dft import PySCFCalculator

        return PySCFCalculator(self)


@dataclass(frozen=True)
class ReferenceConfig(Section):
    """``[reference]``: the reference calculator that labels the selected frames; exactly one of two forms.

    Attributes:
        calculator: ``"module:attribute"`` of a calculator class or factory
            returning energies in eV and forces in eV/Å (e.g.
            ``"ase.calculators.emt:EMT"``).
        options: keyword arguments for it.
        pyscf: PySCF's DFT instead (:class:`PySCFConfig`), e.g.
            ``pyscf = {xc = "PBE", basis = "def2-SVP", threads = 1}``.
    """

    NAME: ClassVar[str] = "reference"

    calculator: str | None = rule_field(Rule(str, what='a string "module:attribute" (e.g. "ase.calculators.emt:EMT")'),
                                  None)
    options: dict[str, Any] = rule_field(Rule(dict, what="a table of keyword arguments"), factory=dict)
    pyscf: PySCFConfig | None = rule_field(Rule(PySCFConfig), None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calculator is None and self.pyscf is None:
            raise InputError(f"[reference] of {source()} lacks ['calculator']", path=PATH.get(), section=self.NAME,
                             missing=["calculator"])
        if self.pyscf is not None and (self.calculator is not None or self.options):
            raise InputError(f"[reference] of {source()} takes calculator (with options) or pyscf (a table of PySCF "
                             "settings), not both", path=PATH.get(), section=self.NAME)

    def factory(self) -> Callable[[], Calculator]:
        """A picklable factory of fresh reference calculators (``functools.partial`` of the imported attribute,
        or the :class:`PySCFConfig`).

        Raises:
            InputError: the module or the attribute cannot be imported; PySCF
                is missing or knows no such functional or basis.
        """
        import functools
        import importlib

        if self.pyscf is not None:
            from probe_ase.al.dft import check_settings

            return check_settings(self.pyscf)
        module_name, _, attribute = self.calculator.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise InputError(f"cannot import reference calculator {self.calculator!r}: {err}",
                             calculator=self.calculator) from err
        return functools.partial(factory, **self.options)


@dataclass(frozen=True)
class ExploreConfig(Section):
    """``[explore]``: the MD that explores and the bands and budget that select frames.

    Attributes:
        ensemble: ``"nve"``, ``"nvt"`` (Langevin) or ``"npt"`` (Berendsen).
        temperature: K, >= 0; velocities are drawn at it and NVT / NPT hold it.
        timestep: fs, > 0.
        friction: Langevin friction, 1/fs, > 0.
        seed: velocities of round N are drawn with seed ``seed + N``.
        steps: MD steps per start structure and round.
        max_new: frames selected for labelling per round, at most.
        min_separation: steps, at least, between two selected frames of one trajectory.
        p_lo: lower band edge on reliability (0-1); None: p*/2.
        p_hi: upper band edge on reliability (0-1); None: the head's p*.
        region_buffer: Å, > 0: label regions (unreliable atoms plus this
            radius) instead of whole cells; None: whole cells.
        min_atom_reliability: with ``region_buffer``, atoms below this
            reliability (0-1) are unreliable; ``"auto"``: the head's atom p*.
        companion: a second model (file or pretrained name) whose force
            disagreement also selects frames (:mod:`probe_ase.companion`); None: none.
        companion_every: run the companion every this many steps (>= 1).
        vouch: outside the novelty support, agreement within ``vouch`` x the
            head's tolerance makes a step reliable (0-1; 0: never).
        disagreement_hi: disagreement beyond this multiple (>= 1) of the head's
            tolerance is failed, below it a candidate.
    """

    NAME: ClassVar[str] = "explore"

    ensemble: Ensemble = rule_field(Rule(str, choices=get_args(Ensemble)), "nvt")
    temperature: float = rule_field(Rule(float, 0, unit="K"), 300.0)
    timestep: float = rule_field(Rule(float, 0, positive=True, unit="fs"), 1.0)
    friction: float = rule_field(Rule(float, 0, positive=True, unit="1/fs"), 0.01)
    seed: int = rule_field(Rule(int, 0), 0)
    steps: int = rule_field(Rule(int, 1), 500)
    max_new: int = rule_field(Rule(int, 1), 20)
    min_separation: int = rule_field(Rule(int, 1, unit="steps"), 10)
    p_lo: float | None = rule_field(Rule(float, 0, 1), None)
    p_hi: float | None = rule_field(Rule(float, 0, 1), None)
    region_buffer: float | None = rule_field(Rule(float, 0, positive=True, unit="Å"), None)
    min_atom_reliability: float | Literal["auto"] = rule_field(Rule(float, 0, 1, choices=("auto",)), "auto")
    companion: str | None = rule_field(Rule(str), None)
    companion_every: int = rule_field(Rule(int, 1, unit="steps"), 1)
    vouch: float = rule_field(Rule(float, 0, 1), 0.0)
    disagreement_hi: float = rule_field(Rule(float, 1), 3.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.p_lo is not None and self.p_hi is not None and self.p_lo > self.p_hi:
            raise InputError(f"explore.p_lo in {source()} must be <= explore.p_hi, got p_lo={self.p_lo}, "
                             f"p_hi={self.p_hi}", path=PATH.get(), p_lo=self.p_lo, p_hi=self.p_hi)
        if self.companion is None and (self.vouch or self.companion_every != 1):
            raise InputError(f"explore.companion_every and explore.vouch in {source()} need explore.companion "
                             "(a model file or pretrained name)", path=PATH.get())

    def dynamics(self, atoms: Atoms, round: int) -> MolecularDynamics:
        """ASE dynamics for ``atoms`` in exploration round ``round`` (velocities drawn with seed ``seed + round``)."""
        return make_dynamics(atoms, self.ensemble, self.temperature, self.timestep, self.friction,
                             seed=self.seed + round)


@dataclass(frozen=True)
class LabelConfig(Section):
    """``[label]``: how the reference calculations run.

    Attributes:
        workers: reference calls at once; > 1 runs a process pool of this size.
        retries: extra attempts for a failing call before its frame is ``failed``.
        lease: s, > 0: a dead driver's frames are taken over after this (live drivers renew it).
    """

    NAME: ClassVar[str] = "label"

    workers: int = rule_field(Rule(int, 1), 1)
    retries: int = rule_field(Rule(int, 0), 1)
    lease: float = rule_field(Rule(float, 0, positive=True, unit="s"), 60.0)


@dataclass(frozen=True)
class RetrainConfig(Section):
    """``[retrain]``: retraining the backbone and refitting the head after each round.

    Attributes:
        method: ``"train"``: MACE trained by ``mace_run_train`` on ``train_data`` and the new frames
            (:class:`~probe_ase.al.retrain.MaceTrainer`); ``"fine-tune"``: the current backbone (MACE or
            CHGNet) fine-tuned by its own library's trainer on the new frames (and ``train_data`` when
            given; :class:`~probe_ase.al.finetune.FineTuner`).
        train_data: the backbone's own training frames (a structure file); ``"train"`` needs them.
        fit_data: frames the head is refitted on, with the new ones (a structure file).
        epochs: training or fine-tuning epochs per round.
        learning_rate: the fine-tuning trainer's initial learning rate; None: its default.
        work_dir: folder for training files and each round's model and head.
    """

    NAME: ClassVar[str] = "retrain"

    fit_data: str = rule_field(Rule(str))
    method: Literal["train", "fine-tune"] = rule_field(Rule(str, choices=("train", "fine-tune")), "train")
    train_data: str | None = rule_field(Rule(str), None)
    epochs: int = rule_field(Rule(int, 1), 20)
    learning_rate: float | None = rule_field(Rule(float, 0, positive=True), None)
    work_dir: str = rule_field(Rule(str), "al-retrain")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "train" and self.train_data is None:
            raise InputError(f"[retrain] of {source()} lacks ['train_data'] (method \"train\" trains on them)",
                             path=PATH.get(), section=self.NAME, missing=["train_data"])

    def trainer(self) -> Callable[..., object]:
        """The round's retraining step for :meth:`ActiveLearner.run_round <probe_ase.al.learner.ActiveLearner.run_round>`."""
        if self.method == "fine-tune":
            from probe_ase.al.finetune import FineTuner

            return FineTuner(self.fit_data, self.train_data, self.work_dir, self.epochs, self.learning_rate)
        from probe_ase.al.retrain import MaceTrainer

        return MaceTrainer(self.train_data, self.fit_data, self.work_dir, self.epochs)


@dataclass(frozen=True)
class AlConfig(Section):
    """A whole active-learning configuration: the TOML file's top level and its tables.

    Attributes:
        backbone: the backbone explored with: a model file or a pretrained name (``chgnet-0.3.0``).
        probe: the head file.
        start: structure file of the start structures (every frame).
        reference: ``[reference]``.
        db: SQLite file, or ``postgresql://user@host:port/name``.
        rounds: rounds in all (a restarted run counts the finished ones).
        explore: ``[explore]``.
        label: ``[label]``.
        retrain: ``[retrain]``; None: only explore and label.
    """

    backbone: str = rule_field(Rule(str))
    probe: str = rule_field(Rule(str))
    start: str = rule_field(Rule(str))
    reference: ReferenceConfig = rule_field(Rule(ReferenceConfig))
    db: str = rule_field(Rule(str), "al.db")
    rounds: int = rule_field(Rule(int, 1), 1)
    explore: ExploreConfig = rule_field(Rule(ExploreConfig), factory=ExploreConfig)
    label: LabelConfig = rule_field(Rule(LabelConfig), factory=LabelConfig)
    retrain: RetrainConfig | None = rule_field(Rule(RetrainConfig), None)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object], path: str | os.PathLike | None = None) -> AlConfig:
        """The config from a mapping shaped like the TOML file (tables as nested mappings; None: the default).

        ``path``: the file it was read from, named in errors.

        Raises:
            InputError: an unknown or missing key, or a value of the wrong
                type or out of range.
        """
        token = PATH.set(None if path is None else os.fspath(path))
        try:
            if not isinstance(mapping, Mapping):
                raise InputError(f"{source()} must be a table of keys, got {mapping!r}", path=PATH.get())
            return cls.from_table(mapping)
        finally:
            PATH.reset(token)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> AlConfig:
        """The config in the TOML file ``path``.

        Raises:
            InputError: the file cannot be read or parsed, or a key or value
                is not allowed (:meth:`from_mapping`).
        """
        try:
            with open(path, "rb") as handle:
                mapping = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise InputError(f"cannot read config {os.fspath(path)}: {err}", path=os.fspath(path)) from err
        return cls.from_mapping(mapping, path)
