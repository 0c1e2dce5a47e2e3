"""Observers that log, flag or halt ASE dynamics and optimisers on reliability.

A :class:`ReliabilityMonitor` is an ordinary ASE observer
(``dyn.attach(monitor, interval=1)``). It reads the ``reliability`` and
``novelty`` that the :class:`~probe_ase.ProbeCalculator` already computed for
the current step (no extra backbone pass); a step is unreliable when the
verdict says so: reliability below the threshold (reason
``low_probability``), novelty beyond the support (``out_of_support``) or, with a
companion model, disagreement beyond the head's tolerance (``models_disagree``). With
``min_atom_reliability`` (heads fitted with ``atom_tolerance``) a step is also
unreliable when any atom's ``atom_reliability`` falls below it or any atom
lies outside the support (reason ``low_atom_reliability``), so one bad region
of a big cell counts even while the cell as a whole looks fine. It acts:

* ``"log"``: append one line per call to a text log (step, time in fs,
  reliability, novelty, energy in eV, temperature in K, the head's predicted
  force RMSE in eV/Å (``-`` from heads without it), verdict, reason, and the
  count and indices of unreliable atoms, ``-`` when atoms are not judged);
* ``"flag"``: also append unreliable frames, with their results and per-atom
  importances, novelties and reliabilities (``atom_reliability`` column, for
  OVITO to colour by), to an extxyz file (at most ``max_flagged`` per run);
* ``"halt"``: also stop the dynamics cleanly after ``patience`` consecutive
  unreliable steps. The run returns normally (``run`` and ``irun`` both end,
  as when the step budget is spent); ``monitor.halted`` is True and
  ``monitor.last_reliable`` holds a copy of the last reliable state
  (positions, momenta, cell). With ``raise_on_halt=True`` a
  :class:`ReliabilityHalt` is raised instead.

Files are opened in append mode and flushed after every write, so nothing
already written is ever truncated and everything written survives an
exception in the middle of a run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Literal

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.io.trajectory import Trajectory
from ase.md.md import MolecularDynamics
from ase.optimize.optimize import Dynamics

from probe_ase.calculator import ProbeCalculator, annotate
from probe_ase.exceptions import InputError, ReliabilityHalt
from probe_ase.verdict import ATOM_RESULTS

#: most unreliable-atom indices written per log line (then "+N")
LOG_ATOMS = 20

Action = Literal["log", "flag", "halt"]


@dataclass
class MonitorSummary:
    """What a monitor saw (reliability is a probability, 0-1)."""

    steps_seen: int = 0
    unreliable_steps: int = 0
    out_of_support_steps: int = 0
    models_disagree_steps: int = 0
    low_atom_reliability_steps: int = 0
    max_unreliable_atoms: int = 0
    flagged_frames: int = 0
    first_unreliable_step: int | None = None
    min_reliability: float = float("nan")
    min_reliability_step: int | None = None
    halted: bool = False
    halt_step: int | None = None
    reliabilities: list[float] = field(default_factory=list, repr=False)
    steps: list[int] = field(default_factory=list, repr=False)


def dynamics_atoms(dyn: Dynamics) -> Atoms:
    """The Atoms a dynamics object moves (unwrapping ASE filters)."""
    atoms = dyn.atoms
    return getattr(atoms, "atoms", atoms)


class ReliabilityMonitor:
    """Log, flag or halt an ASE dynamics/optimiser run on PROBE reliability.

    Use it as a context manager (or call :meth:`close`) to close its log.

    Args:
        dyn: the MD or optimiser object it is attached to.
        action: ``"log"``, ``"flag"`` or ``"halt"`` (each includes the previous).
        threshold: a step is unreliable when ``reliability < threshold`` or
            its novelty exceeds the calculator's ``max_novelty``; default the
            calculator's threshold (the head's certified p*).
        patience: consecutive unreliable steps before ``"halt"`` stops the run.
        log: text log path (appended), or None.
        flagged: extxyz path for unreliable frames (appended), or None.
        max_flagged: most frames written to ``flagged`` per run.
        callback: called as ``callback(monitor, atoms)`` at every unreliable step.
        raise_on_halt: raise :class:`ReliabilityHalt` instead of stopping cleanly.
        min_atom_reliability: also judge atoms: an atom is unreliable below
            this ``atom_reliability`` (0-1) or outside the support; ``"auto"``
            takes the head's ``atom_p_star``; None (default) judges the
            structure only. Needs a head fitted with ``atom_tolerance`` or ``atom_quantile``.
    """

    def __init__(
        self,
        dyn: Dynamics,
        action: Action = "log",
        threshold: float | None = None,
        patience: int = 3,
        log: str | os.PathLike | None = None,
        flagged: str | os.PathLike | None = None,
        max_flagged: int = 100,
        callback: Callable[[ReliabilityMonitor, Atoms], None] | None = None,
        raise_on_halt: bool = False,
        min_atom_reliability: float | Literal["auto"] | None = None,
    ) -> None:
        if action not in ("log", "flag", "halt"):
            raise InputError(f"action must be 'log', 'flag' or 'halt', got {action!r}", action=action)
        if patience < 1:
            raise InputError(f"patience must be at least 1 step, got {patience}", patience=patience)
        self.dyn, self.action, self.patience = dyn, action, int(patience)
        self.atoms = dynamics_atoms(dyn)
        if not isinstance(self.atoms.calc, ProbeCalculator):
            raise InputError(f"the dynamics' atoms need a ProbeCalculator, not {type(self.atoms.calc).__name__}",
                             calculator=type(self.atoms.calc).__name__)
        self.threshold = self.atoms.calc.threshold if threshold is None else float(threshold)
        meta = self.atoms.calc.probe.meta
        if min_atom_reliability is not None and not meta.local:
            raise InputError("min_atom_reliability needs a head with per-atom reliability: refit it with "
                             "atom_tolerance= (eV/Å) or atom_quantile=", min_atom_reliability=min_atom_reliability,
                             local=False)
        if min_atom_reliability == "auto":
            min_atom_reliability = meta.atom_p_star
        if min_atom_reliability is not None and not 0 <= float(min_atom_reliability) <= 1:
            raise InputError(f"min_atom_reliability must lie in 0-1 (or be 'auto'), got {min_atom_reliability}",
                             min_atom_reliability=min_atom_reliability)
        self.min_atom_reliability = None if min_atom_reliability is None else float(min_atom_reliability)
        self.log_path, self.flagged_path = log, flagged
        self.max_flagged, self.callback, self.raise_on_halt = int(max_flagged), callback, raise_on_halt
        self.summary_data = MonitorSummary()
        self.streak = 0
        self.last_reliable: Atoms | None = None
        self._log: IO[str] | None = None

    # ---- the observer ------------------------------------------------------
    def __call__(self) -> None:
        """Judge the dynamics' current step and act on it.

        Logs every step to ``log`` (if given). An unreliable step is written to ``flagged`` (actions flag and
        halt, at most ``max_flagged``) and passed to ``callback``; ``patience`` in a row halt the dynamics
        (action halt).
        """
        atoms, calc, step = self.atoms, self.atoms.calc, self.dyn.nsteps
        p = float(calc.get_property("reliability", atoms))
        novelty = float(calc.results["novelty"])
        reliable, reason = bool(calc.results["reliable"]), str(calc.results["reason"])
        if self.threshold != calc.threshold:  # the monitor's own threshold: judged again, the same way
            verdict = calc.judge(p, novelty, self.threshold)
            reliable, reason = bool(verdict.reliable[0]), str(verdict.reason[0])
        bad_atoms = self.unreliable_atoms()
        s = self.summary_data
        if bad_atoms is not None:
            s.max_unreliable_atoms = max(s.max_unreliable_atoms, len(bad_atoms))
            if reliable and len(bad_atoms):
                reliable, reason = False, "low_atom_reliability"
        s.steps_seen += 1
        s.steps.append(step)
        s.reliabilities.append(p)
        if not p >= s.min_reliability:  # also true while min is NaN
            s.min_reliability, s.min_reliability_step = p, step
        self._write_log(step, p, novelty, calc.get_property("energy", atoms), calc.results.get("force_error"),
                        reason, bad_atoms)
        if reliable:
            self.streak = 0
            self.last_reliable = _snapshot(atoms)
            return
        self.streak += 1
        s.unreliable_steps += 1
        s.out_of_support_steps += reason == "out_of_support"
        s.models_disagree_steps += reason == "models_disagree"
        s.low_atom_reliability_steps += reason == "low_atom_reliability"
        if s.first_unreliable_step is None:
            s.first_unreliable_step = step
        if self.action in ("flag", "halt") and self.flagged_path and s.flagged_frames < self.max_flagged:
            self._write_flagged(step, reason, bad_atoms)
        if self.callback is not None:
            self.callback(self, atoms)
        if self.action == "halt" and self.streak >= self.patience:
            s.halted, s.halt_step = True, step
            self.dyn.max_steps = self.dyn.nsteps  # ASE's run/irun loops end after this step
            if self.raise_on_halt:
                raise ReliabilityHalt(
                    f"{self.patience} consecutive unreliable steps (step {step}: reliability {p:.3f} vs threshold "
                    f"{self.threshold:.3f}, novelty {novelty:.2f} vs support edge {calc.max_novelty:.2f}"
                    + ("" if bad_atoms is None else f", {len(bad_atoms)} unreliable atoms") + f"; {reason})",
                    step=step, reliability=p, threshold=self.threshold, novelty=novelty, max_novelty=calc.max_novelty,
                    reason=reason, unreliable_atoms=None if bad_atoms is None else np.asarray(bad_atoms).tolist(),
                )

    def _write_flagged(self, step: int, reason: str, bad_atoms: np.ndarray | None) -> None:
        """Append this step's frame, its step, reason and unreliable atoms, to ``flagged`` (extxyz)."""
        frame = result_frame(self.atoms)
        for key in ATOM_RESULTS:  # per-atom columns in extxyz
            frame.info.pop(key, None)
        frame.info.update(step=step, reason=reason)
        if bad_atoms is not None:
            frame.arrays["atom_unreliable"] = np.isin(np.arange(len(frame)), bad_atoms)
        with open(self.flagged_path, "a") as handle:
            write(handle, frame, format="extxyz")
        self.summary_data.flagged_frames += 1

    def unreliable_atoms(self) -> np.ndarray | None:
        """Indices of this step's unreliable atoms (None when the monitor does not judge atoms)."""
        if self.min_atom_reliability is None:
            return None
        calc = self.atoms.calc
        ok = calc.probe.atom_verdict(calc.results["atom_reliability"], calc.results["atom_novelty"],
                                     self.min_atom_reliability, calc.max_novelty)
        return np.flatnonzero(~ok)

    def _write_log(self, step: int, p: float, novelty: float, energy: float, force_error: float | None,
                   reason: str, bad_atoms: np.ndarray | None) -> None:
        if self.log_path is None:
            return
        if self._log is None:
            new = not os.path.exists(self.log_path) or os.path.getsize(self.log_path) == 0
            self._log = open(self.log_path, "a", buffering=1)
            if new:
                self._log.write(f"# {'step':>8} {'time_fs':>10} {'reliability':>11} {'novelty':>8} {'energy_eV':>14} "
                                f"{'T_K':>8} {'F_err_eV/A':>10} reliable reason n_bad_atoms bad_atoms\n")
        time_fs = self.dyn.get_time() / units.fs if isinstance(self.dyn, MolecularDynamics) else float("nan")
        temperature = self.atoms.get_temperature() if self.atoms.get_momenta().any() else 0.0
        if bad_atoms is None:
            count, listed = "-", "-"
        else:
            count = str(len(bad_atoms))
            listed = ",".join(map(str, bad_atoms[:LOG_ATOMS])) + (f",+{len(bad_atoms) - LOG_ATOMS}"
                                                                  if len(bad_atoms) > LOG_ATOMS else "")
        error = "-" if force_error is None else f"{force_error:.4f}"
        self._log.write(f"{step:>10d} {time_fs:>10.2f} {p:>11.5f} {novelty:>8.3f} {energy:>14.6f} {temperature:>8.1f} "
                        f"{error:>10} {int(reason == 'ok'):>8d} {reason} {count} {listed or '-'}\n")

    # ---- reporting and files ------------------------------------------------
    @property
    def halted(self) -> bool:
        """Whether the monitor halted the dynamics."""
        return self.summary_data.halted

    def summary(self) -> dict:
        """Steps seen, unreliable and flagged counts, first unreliable step, minimum reliability, halt."""
        s = self.summary_data
        return {k: v for k, v in vars(s).items() if k not in ("reliabilities", "steps")} | {
            "threshold": self.threshold, "patience": self.patience, "action": self.action,
        }

    def close(self) -> None:
        """Close the log file (the monitor reopens it if called again)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ReliabilityMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _snapshot(atoms: Atoms) -> Atoms:
    """A calculator-free copy (positions, momenta, cell) of ``atoms``."""
    copy = atoms.copy()
    copy.calc = None
    return copy


def result_frame(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` carrying its calculator's results for writing.

    Standard results (energy in eV, forces in eV/Å ...) go to a
    SinglePointCalculator; PROBE results go to ``info``/``arrays`` via
    :func:`~probe_ase.annotate`, and the per-atom importances and novelties
    also to ``info`` because ASE trajectories keep ``info`` but not custom
    per-atom arrays.
    """
    results = atoms.calc.results
    frame = annotate(atoms.copy(), results)
    for key in ATOM_RESULTS:
        if key in frame.arrays:
            frame.info[key] = frame.arrays[key].tolist()
    frame.calc = SinglePointCalculator(frame, **{k: v for k, v in results.items() if k in all_properties})
    return frame


class ReliabilityTrajectory:
    """Observer appending each frame with its reliability and importances to a file.

    ``.traj`` files are ASE trajectories (``info["reliability"]``,
    ``info["reason"]``, ``info["novelty"]``, ``info["atom_importance"]``,
    ``info["atom_novelty"]`` and, from heads with a per-atom logit,
    ``info["atom_reliability"]``); anything else is extxyz with those
    per-atom results as columns that OVITO can colour by. Files
    are only ever appended to and flushed per frame.
    """

    def __init__(self, atoms: Atoms, path: str | os.PathLike) -> None:
        self.atoms, self.path = atoms, os.fspath(path)
        self._traj = Trajectory(self.path, "a") if self.path.endswith(".traj") else None

    def __call__(self) -> None:
        """Append the current frame with its reliability results to the file."""
        frame = result_frame(self.atoms)
        if self._traj is not None:
            self._traj.write(frame)
            return
        for key in ATOM_RESULTS:  # extxyz has them as columns
            frame.info.pop(key, None)
        with open(self.path, "a") as handle:
            write(handle, frame, format="extxyz")

    def close(self) -> None:
        """Close the ASE trajectory, if the file is one (extxyz files are opened per frame)."""
        if self._traj is not None:
            self._traj.close()

    def __enter__(self) -> ReliabilityTrajectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
