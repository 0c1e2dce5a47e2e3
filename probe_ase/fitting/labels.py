"""Error criteria: how far a backbone prediction is from the reference.

A structure is *reliable* (label 1) when its error under the chosen criterion
is at most the tolerance ``tau``:

==================  ========================================  =========
criterion           error                                     unit
==================  ========================================  =========
``force_rmse``      RMS over atoms and components of ΔF       eV/Å
``force_max``       largest per-atom norm of ΔF               eV/Å
``energy_per_atom`` abs(ΔE) / n_atoms                         eV/atom
``energy``          abs(ΔE)                                   eV
==================  ========================================  =========

An *atom* is reliable (atom label 1) when the norm of its force error,
``|ΔF_i|`` in eV/Å, is at most the atom tolerance (``atom_tolerance``). A
structure is reliable under ``force_max`` at ``tau`` exactly when every atom
is reliable at atom tolerance ``tau``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from probe_ase.exceptions import InputError, LabelError

if TYPE_CHECKING:
    from probe_ase.fitting.data import FeatureSet
    from probe_ase.fitting.spec import FitSpec

Criterion = Literal["force_rmse", "force_max", "energy_per_atom", "energy"]
CRITERIA: tuple[str, ...] = get_args(Criterion)
UNITS = {"force_rmse": "eV/Å", "force_max": "eV/Å", "energy_per_atom": "eV/atom", "energy": "eV"}


def needs_forces(criterion: str) -> bool:
    """Whether ``criterion`` compares forces (and so needs reference forces)."""
    return check_criterion(criterion).startswith("force")


def check_criterion(criterion: str) -> str:
    """Return ``criterion`` unchanged, or raise :class:`InputError` if it is not one of :data:`CRITERIA`."""
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}",
                         criterion=criterion, allowed=list(CRITERIA))
    return criterion


def structure_error(
    criterion: str,
    pred_energy: float,
    ref_energy: float | None,
    pred_forces: np.ndarray | None = None,
    ref_forces: np.ndarray | None = None,
) -> float:
    """Error of one structure under ``criterion`` (units in the module table)."""
    check_criterion(criterion)
    if needs_forces(criterion):
        diff = np.asarray(pred_forces) - np.asarray(ref_forces)
        if criterion == "force_rmse":
            return float(np.sqrt(np.mean(diff**2)))
        return float(np.linalg.norm(diff, axis=1).max())
    delta = abs(float(pred_energy) - float(ref_energy))
    if criterion == "energy_per_atom":
        n_atoms = len(pred_forces) if pred_forces is not None else len(ref_forces)
        return delta / n_atoms
    return delta


def atom_errors(pred_forces: np.ndarray, ref_forces: np.ndarray) -> np.ndarray:
    """Norm of each atom's force error ``|ΔF_i|`` (eV/Å), shape (n_atoms,)."""
    return np.linalg.norm(np.asarray(pred_forces, dtype=float) - np.asarray(ref_forces, dtype=float), axis=1)


def resolve_tolerance(errors: np.ndarray, threshold: float | None = None, quantile: float | None = None) -> float:
    """Tolerance ``tau``: an absolute ``threshold`` or a ``quantile`` (0-1) of ``errors``."""
    if (threshold is None) == (quantile is None):
        raise InputError("give exactly one of threshold (absolute, criterion units) or quantile (0-1)",
                         threshold=threshold, quantile=quantile)
    if threshold is not None:
        if not np.isfinite(threshold) or threshold <= 0:
            raise InputError(f"threshold must be a positive number, got {threshold}", threshold=threshold)
        return float(threshold)
    if not 0 < quantile < 1:
        raise InputError(f"quantile must lie strictly between 0 and 1, got {quantile}", quantile=quantile)
    return float(np.quantile(errors, quantile))


def make_labels(errors: np.ndarray, tau: float, what: str = "structures") -> np.ndarray:
    """Binary labels, 1 = reliable (error <= tau); both classes must occur."""
    labels = (np.asarray(errors) <= tau).astype(np.int64)
    n_good = int(labels.sum())
    if n_good == 0 or n_good == len(labels):
        which = "reliable" if n_good else "unreliable"
        raise LabelError(
            f"all {len(labels)} {what} are {which} at tau={tau:.4g} "
            f"(errors span {np.min(errors):.4g}..{np.max(errors):.4g}); choose another threshold or add data",
            n=len(labels), n_reliable=n_good, tau=tau,
        )
    return labels


def mean_force_rmse(calc, frames) -> float:
    """Mean over ``frames`` of the force RMSE (eV/Å) of ``calc`` against each frame's reference forces."""
    errors = []
    for atoms in frames:
        mlip = atoms.copy()
        mlip.calc = calc
        errors.append(structure_error("force_rmse", 0.0, None, mlip.get_forces(), atoms.get_forces()))
    return float(np.mean(errors)) if errors else float("nan")


@dataclass(frozen=True)
class Labels:
    """The fit pool's labels: per-structure errors (criterion's unit), tolerance and 1 = reliable; per atom too
    when the fit has an atom tolerance (``atom_tau`` in eV/Å, else None)."""

    errors: np.ndarray
    tau: float
    y: np.ndarray
    atom_tau: float | None = None
    atom_y: np.ndarray | None = None


def make_structure_labels(features: FeatureSet, spec: FitSpec) -> Labels:
    """Label the featurised fit pool as ``spec`` asks (criterion, tolerance or quantile, atom tolerance)."""
    errors = features.error(spec.criterion)
    tau = resolve_tolerance(errors, spec.tolerance, spec.quantile)
    if not spec.local:
        return Labels(errors, tau, make_labels(errors, tau))
    atom_tau = resolve_tolerance(features.atom_error(), spec.atom_tolerance, spec.atom_quantile)
    return Labels(errors, tau, make_labels(errors, tau), atom_tau, make_labels(features.atom_errors, atom_tau, "atoms"))
