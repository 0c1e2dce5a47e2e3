"""The rules a config key's value must follow, and the base class that checks them (:mod:`probe_ase.al.config`).

A :class:`Rule` says what one key takes (kind, range, unit, allowed strings);
:class:`Section` is a frozen dataclass whose fields carry rules, checked on
construction, and :meth:`Section.from_table` builds one from a TOML table,
refusing unknown and missing keys with an :class:`~probe_ase.exceptions.InputError`
that names the key, the file (:data:`PATH`), what is allowed and the unit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Self

from probe_ase.exceptions import InputError

#: the config file being read (None: a mapping or a dataclass built in Python), named in errors
PATH: ContextVar[str | None] = ContextVar("probe_ase_al_config_path", default=None)


def source() -> str:
    """The config being read, as errors name it."""
    path = PATH.get()
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
            raise InputError(f"{key} in {source()} must be {self.describe()}, got {value!r}", path=PATH.get(),
                             key=key, value=value)
        if isinstance(value, str) and value in self.choices:
            return value
        if self.kind is float:
            return float(value)
        if self.kind is str:
            return os.fspath(value)
        return dict(value) if self.kind is dict else value


def rule_field(rule: Rule, default: object = MISSING, factory: Any = MISSING) -> Any:
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
            raise InputError(f"unknown keys {unknown} in {where} of {source()}; allowed: {allowed}",
                             path=PATH.get(), section=cls.NAME, unknown=unknown, allowed=allowed)
        missing = [item.name for item in dataclasses.fields(cls) if item.default is MISSING
                   and item.default_factory is MISSING and table.get(item.name) is None]
        if missing:
            place = f"[{cls.NAME}] of {source()}" if cls.NAME else source()
            raise InputError(f"{place} lacks {missing}", path=PATH.get(), section=cls.NAME, missing=missing)
        return cls(**{key: value for key, value in table.items() if value is not None})
