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

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Literal, Self, get_args

from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import chemical_symbols
from ase.md.md import MolecularDynamics

from probe_ase.exceptions import InputError
from probe_ase.md import Ensemble, make_dynamics

#: the config file being read (None: a mapping or a dataclass built in Python), named in errors
_PATH: ContextVar[str | None] = ContextVar("probe_ase_al_config_path", default=None)


def _source() -> str:
    path = _PATH.get()
    return "the config" if path is None else f"config {path}"


@dataclass(frozen=True)
class Rule:
    """The values one config key takes.

    Args:
        kind: ``int`` (a whole number), ``float`` (any number), ``str``,
            ``dict`` (a table) or a :class:`Section` class (a nested table).
        low: lowest allowed number (inclusive; exclusive with ``positive``).
        high: highest allowed number (inclusive); None: no upper bound.
        positive: numbers must exceed ``low`` rather than reach it.
        unit: the number's unit, named in errors (K, fs, 1/fs, Å, s, steps).
        choices: the strings allowed, instead of or besides a number.
        what: the allowed values in words, replacing the generated text.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    positive: bool = False
    unit: str = ""
    choices: tuple[str, ...] = ()
    what: str = ""

    def describe(self) -> str:
        """The allowed values in words, e.g. ``a whole number >= 1`` or ``a positive number (fs)``."""
        if self.what:
            return self.what
        if self.kind not in (int, float):
            if self.choices:
                return f"one of {', '.join(self.choices)}"
            return "a string" if self.kind is str else "a table"
        text = "a whole number" if self.kind is int else "a number"
        if self.positive:
            text = text.replace("a ", "a positive ", 1)
        elif self.high is not None:
            text += f" in [{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            text += f" >= {self.low:g}"
        text += f" ({self.unit})" if self.unit else ""
        return " or ".join([*(f'"{choice}"' for choice in self.choices), text])

    def accepts(self, value: object) -> bool:
        """Whether ``value`` is allowed (a bool is not a number; NaN and inf are not allowed)."""
        if isinstance(value, str) and value in self.choices:
            return True
        if self.kind is str:
            return not self.choices and isinstance(value, (str, os.PathLike))
        if self.kind not in (int, float):
            return isinstance(value, Mapping if self.kind is dict else self.kind)
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.positive else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def check(self, key: str, value: object) -> Any:
        """``value`` for the dotted ``key``, converted (a number to float, a path to str, a table to its section).

        Raises:
            InputError: ``value`` is not allowed; the message names ``key``,
                the file, the allowed values and the unit.
        """
        if isinstance(self.kind, type) and issubclass(self.kind, Section) and isinstance(value, Mapping):
            return self.kind.from_table(value)
        if not self.accepts(value):
            raise InputError(f"{key} in {_source()} must be {self.describe()}, got {value!r}", path=_PATH.get(),
                             key=key, value=value)
        if isinstance(value, str) and value in self.choices:
            return value
        if self.kind is float:
            return float(value)
        if self.kind is str:
            return os.fspath(value)
        return dict(value) if self.kind is dict else value


def _key(rule: Rule, default: object = MISSING, factory: Any = MISSING) -> Any:
    """A dataclass field checked by ``rule``; without ``default`` or ``factory`` it is required."""
    return field(default=default, default_factory=factory, metadata={"rule": rule})


class Section:
    """Base of the config's dataclasses: checks (and converts) every field against its :class:`Rule`."""

    #: the TOML table ("" for the top level)
    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None and item.default is None:
                continue  # an optional key left unset
            key = f"{self.NAME}.{item.name}" if self.NAME else item.name
            object.__setattr__(self, item.name, item.metadata["rule"].check(key, value))

    @classmethod
    def from_table(cls, table: Mapping[str, object]) -> Self:
        """The section from its table; unknown keys and missing required ones are errors, None means the default."""
        where = f"[{cls.NAME}]" if cls.NAME else "the top level"
        allowed = sorted(item.name for item in dataclasses.fields(cls))
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise InputError(f"unknown keys {unknown} in {where} of {_source()}; allowed: {allowed}",
                             path=_PATH.get(), section=cls.NAME, unknown=unknown, allowed=allowed)
        missing = [item.name for item in dataclasses.fields(cls) if item.default is MISSING
                   and item.default_factory is MISSING and table.get(item.name) is None]
        if missing:
            place = f"[{cls.NAME}] of {_source()}" if cls.NAME else _source()
            raise InputError(f"{place} lacks {missing}", path=_PATH.get(), section=cls.NAME, missing=missing)
        return cls(**{key: value for key, value in table.items() if value is not None})


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

    xc: str = _key(Rule(str), "PBE")
    basis: str = _key(Rule(str), "def2-SVP")
    charge: int = _key(Rule(int), 0)
    multiplicity: int | None = _key(Rule(int, 1), None)
    conv_tol: float = _key(Rule(float, 0, positive=True, unit="Hartree"), 1e-9)
    max_cycle: int = _key(Rule(int, 1), 50)
    threads: int = _key(Rule(int, 1), 1)
    energy_offsets: dict[str, float] = _key(Rule(dict, what="a table of element = eV per atom"), factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        offsets = {}
        for symbol, value in self.energy_offsets.items():
            key = f"{self.NAME}.energy_offsets.{symbol}"
            if symbol not in chemical_symbols[1:]:
                raise InputError(f"{key} in {_source()}: {symbol!r} is not an element symbol", path=_PATH.get(),
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

    calculator: str | None = _key(Rule(str, what='a string "module:attribute" (e.g. "ase.calculators.emt:EMT")'),
                                  None)
    options: dict[str, Any] = _key(Rule(dict, what="a table of keyword arguments"), factory=dict)
    pyscf: PySCFConfig | None = _key(Rule(PySCFConfig), None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calculator is None and self.pyscf is None:
            raise InputError(f"[reference] of {_source()} lacks ['calculator']", path=_PATH.get(), section=self.NAME,
                             missing=["calculator"])
        if self.pyscf is not None and (self.calculator is not None or self.options):
            raise InputError(f"[reference] of {_source()} takes calculator (with options) or pyscf (a table of PySCF "
                             "settings), not both", path=_PATH.get(), section=self.NAME)

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
    """

    NAME: ClassVar[str] = "explore"

    ensemble: Ensemble = _key(Rule(str, choices=get_args(Ensemble)), "nvt")
    temperature: float = _key(Rule(float, 0, unit="K"), 300.0)
    timestep: float = _key(Rule(float, 0, positive=True, unit="fs"), 1.0)
    friction: float = _key(Rule(float, 0, positive=True, unit="1/fs"), 0.01)
    seed: int = _key(Rule(int, 0), 0)
    steps: int = _key(Rule(int, 1), 500)
    max_new: int = _key(Rule(int, 1), 20)
    min_separation: int = _key(Rule(int, 1, unit="steps"), 10)
    p_lo: float | None = _key(Rule(float, 0, 1), None)
    p_hi: float | None = _key(Rule(float, 0, 1), None)
    region_buffer: float | None = _key(Rule(float, 0, positive=True, unit="Å"), None)
    min_atom_reliability: float | Literal["auto"] = _key(Rule(float, 0, 1, choices=("auto",)), "auto")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.p_lo is not None and self.p_hi is not None and self.p_lo > self.p_hi:
            raise InputError(f"explore.p_lo in {_source()} must be <= explore.p_hi, got p_lo={self.p_lo}, "
                             f"p_hi={self.p_hi}", path=_PATH.get(), p_lo=self.p_lo, p_hi=self.p_hi)

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

    workers: int = _key(Rule(int, 1), 1)
    retries: int = _key(Rule(int, 0), 1)
    lease: float = _key(Rule(float, 0, positive=True, unit="s"), 60.0)


@dataclass(frozen=True)
class RetrainConfig(Section):
    """``[retrain]``: fine-tuning the MACE backbone and refitting the head after each round.

    Attributes:
        train_data: the backbone's own training frames (a structure file).
        fit_data: frames the head is refitted on, with the new ones (a structure file).
        epochs: fine-tuning epochs per round.
        work_dir: folder for training files and each round's model and head.
    """

    NAME: ClassVar[str] = "retrain"

    train_data: str = _key(Rule(str))
    fit_data: str = _key(Rule(str))
    epochs: int = _key(Rule(int, 1), 20)
    work_dir: str = _key(Rule(str), "al-retrain")


@dataclass(frozen=True)
class AlConfig(Section):
    """A whole active-learning configuration: the TOML file's top level and its tables.

    Attributes:
        backbone: the MACE model file explored with.
        probe: the head file.
        start: structure file of the start structures (every frame).
        reference: ``[reference]``.
        db: SQLite file, or ``postgresql://user@host:port/name``.
        rounds: rounds in all (a restarted run counts the finished ones).
        explore: ``[explore]``.
        label: ``[label]``.
        retrain: ``[retrain]``; None: only explore and label.
    """

    backbone: str = _key(Rule(str))
    probe: str = _key(Rule(str))
    start: str = _key(Rule(str))
    reference: ReferenceConfig = _key(Rule(ReferenceConfig))
    db: str = _key(Rule(str), "al.db")
    rounds: int = _key(Rule(int, 1), 1)
    explore: ExploreConfig = _key(Rule(ExploreConfig), factory=ExploreConfig)
    label: LabelConfig = _key(Rule(LabelConfig), factory=LabelConfig)
    retrain: RetrainConfig | None = _key(Rule(RetrainConfig), None)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object], path: str | os.PathLike | None = None) -> AlConfig:
        """The config from a mapping shaped like the TOML file (tables as nested mappings; None: the default).

        ``path``: the file it was read from, named in errors.

        Raises:
            InputError: an unknown or missing key, or a value of the wrong
                type or out of range.
        """
        token = _PATH.set(None if path is None else os.fspath(path))
        try:
            if not isinstance(mapping, Mapping):
                raise InputError(f"{_source()} must be a table of keys, got {mapping!r}", path=_PATH.get())
            return cls.from_table(mapping)
        finally:
            _PATH.reset(token)

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
