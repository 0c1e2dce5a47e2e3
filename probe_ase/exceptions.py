"""Exceptions raised by probe-ase.

Every error the package raises on purpose derives from :class:`ProbeError`, so
``except ProbeError`` catches them all::

    ProbeError
    ├── InputError            bad structures or data (also a ValueError)
    │   ├── EmptyStructureError   a structure with zero atoms
    │   ├── NonFiniteError        NaN or inf positions / cell
    │   ├── UnknownElementError   an element the backbone was not trained on
    │   └── MissingReferenceError reference energy or forces absent
    ├── LabelError            labels that cannot train a classifier (all one class)
    ├── BackboneError         no supported backbone in a calculator, or a tap used closed / before a pass
    ├── MismatchError         head file and backbone disagree (fingerprint, width)
    ├── HeadFileError         a head file that is missing, truncated or tampered
    ├── TrainingError         the backbone's trainer (mace_run_train) failed
    ├── SCFNotConvergedError  a PySCF reference call whose SCF did not converge (not retried)
    ├── StoreError            the active-learning database used out of order (a nested transaction)
    └── ReliabilityHalt       a monitor with raise_on_halt=True stopped a run

Errors carry the offending values as attributes besides the message, e.g.
``err.unknown`` (atomic numbers) of an :class:`UnknownElementError`; every
error lists them in ``err.details`` (a dict, empty when there are none).
"""

from __future__ import annotations


class ProbeError(Exception):
    """Root of every error raised on purpose by probe-ase.

    ``ProbeError(message, **details)``: each detail (an offending value) is
    also an attribute, and all of them are in ``details``.
    """

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message)
        self.details = details
        for name, value in details.items():
            setattr(self, name, value)


class InputError(ProbeError, ValueError):
    """A structure or data set that cannot be used as given."""


class EmptyStructureError(InputError):
    """A structure has zero atoms."""


class NonFiniteError(InputError):
    """Positions or cell contain NaN or inf."""


class UnknownElementError(InputError):
    """A structure holds an element the backbone was not trained on."""


class MissingReferenceError(InputError):
    """Reference energy or forces needed by the chosen criterion are absent."""


class LabelError(ProbeError, ValueError):
    """Labels are unusable for training (for example, all reliable)."""


class BackboneError(ProbeError, TypeError):
    """No supported backbone (MACE, SchNetPack) in a calculator, or a tap used after close or before any pass."""


class MismatchError(ProbeError, ValueError):
    """A head does not belong to the backbone it is used with."""


class HeadFileError(ProbeError, OSError):
    """A head file is missing, truncated, tampered with, or of an unknown version."""


class TrainingError(ProbeError, RuntimeError):
    """The backbone's trainer failed (``returncode`` and the tail of its ``stderr`` as attributes)."""


class SCFNotConvergedError(ProbeError, RuntimeError):
    """A reference SCF (PySCF) did not converge within ``max_cycle`` iterations; the loop does not retry it."""

    #: read by :func:`~probe_ase.al.label.label_pending`: the same start gives the same failure
    retry = False


class StoreError(ProbeError, RuntimeError):
    """The active-learning database was used out of order (a transaction opened inside another)."""


class ReliabilityHalt(ProbeError):
    """Raised by a monitor with ``raise_on_halt=True`` when it halts a run."""
