"""Guarded geometry optimisation: stop, or hand over to a reference calculator.

:func:`guarded_optimize` runs an ASE optimiser on a
:class:`~probe_ase.ProbeCalculator`. When reliability stays below the
threshold for ``patience`` steps it either stops (no reference given) or
swaps ``atoms.calc`` for the reference calculator (any ASE calculator, e.g.
DFT) and continues the *same* optimiser from the current geometry. The report
says which steps used which calculator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from ase.optimize import BFGS
from ase.optimize.optimize import Optimizer

from probe_ase.observers import ReliabilityMonitor


@dataclass
class GuardReport:
    """Outcome of a guarded optimisation (forces in eV/Å)."""

    converged: bool
    stopped_unreliable: bool
    handover_step: int | None
    final_fmax: float
    calculator_by_step: list[tuple[int, str]] = field(default_factory=list)
    monitor: dict = field(default_factory=dict)

    @property
    def mlip_steps(self) -> int:
        """Optimiser steps recorded on the ProbeCalculator (the MLIP)."""
        return sum(1 for _, name in self.calculator_by_step if name == "mlip")

    @property
    def reference_steps(self) -> int:
        """Optimiser steps recorded on the reference calculator (0 without a handover)."""
        return sum(1 for _, name in self.calculator_by_step if name == "reference")


def guarded_optimize(
    atoms: Atoms,
    reference: BaseCalculator | None = None,
    optimizer: type[Optimizer] = BFGS,
    fmax: float = 0.05,
    steps: int = 500,
    threshold: float | None = None,
    patience: int = 1,
    trajectory: str | os.PathLike | None = None,
    logfile: str | None = None,
) -> GuardReport:
    """Optimise ``atoms`` (whose calc is a ProbeCalculator) under a reliability guard.

    Args:
        atoms: structure with a :class:`~probe_ase.ProbeCalculator` attached.
        reference: calculator to hand over to; None stops the optimisation instead.
        optimizer: an ASE optimiser class (BFGS, FIRE, LBFGS ...).
        fmax: convergence criterion on the largest force (eV/Å).
        steps: most optimiser steps in total.
        threshold: reliability below which a step is unreliable (default p*).
        patience: consecutive unreliable steps before stopping or handing over.
        trajectory: ASE trajectory path for the optimiser (steps of both calculators).
        logfile: optimiser log (None: silent, "-": stdout).
    """
    probe_calc = atoms.calc
    opt = optimizer(atoms, trajectory=trajectory, logfile=logfile)
    used: list[tuple[int, str]] = []
    opt.attach(lambda: used.append((opt.nsteps, "mlip" if atoms.calc is probe_calc else "reference")))
    with ReliabilityMonitor(opt, action="halt", threshold=threshold, patience=patience) as monitor:
        opt.attach(monitor, interval=1)
        converged = opt.run(fmax=fmax, steps=steps)
    handover = None
    if monitor.halted and reference is not None:
        opt.observers = [obs for obs in opt.observers if obs[0] is not monitor]
        handover = opt.nsteps
        atoms.calc = reference
        converged = opt.run(fmax=fmax, steps=max(steps - opt.nsteps, 0))
    final_fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    return GuardReport(
        converged=bool(converged), stopped_unreliable=monitor.halted and reference is None,
        handover_step=handover, final_fmax=final_fmax, calculator_by_step=used, monitor=monitor.summary(),
    )
