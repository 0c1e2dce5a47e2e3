"""Labelling: the reference calculator on every pending frame of an active-learning database.

:func:`label_pending` runs the reference calculator on every pending
frame through a ``concurrent.futures.Executor`` (serial by default, a
process pool, or Dask's ``Client.get_executor()``). Each frame is claimed
in a transaction first (:mod:`probe_ase.al.store`: owner and lease, renewed
while the driver lives), so several drivers can label one database and no
frame is called twice. Each result is committed as soon as it arrives,
with the claim dropped in the same transaction (status ``done``, the
reference energy in eV and forces in eV/Å as the row's calculator
results); a failing reference call is retried, then recorded as
``failed`` with its error (an error whose class sets ``retry = False``,
such as an SCF that did not converge, at once). Killing a driver loses only its calls in
flight: their frames are taken over once the lease lapses, and
a later call labels what is still pending and never repeats a finished
one.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from ase.calculators.singlepoint import SinglePointCalculator
from tqdm.auto import tqdm

from probe_ase.al.store import ALStore

ReferenceFactory = Callable[[], BaseCalculator]


class SerialExecutor(Executor):
    """Runs each call at submission, in this process (the default executor)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Call ``fn(*args, **kwargs)`` now; return a done future holding its result or its exception."""
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - handed to the caller; Ctrl-C still stops the loop
            future.set_exception(err)
        return future


def reference_calculation(factory: ReferenceFactory, atoms: Atoms) -> dict:
    """Energy (eV) and forces (eV/Å) of ``atoms`` from a fresh reference calculator, and the energy offset (eV)
    it added, if it reports one (``results["energy_offset"]``, as :class:`~probe_ase.al.dft.PySCFCalculator`)."""
    atoms = atoms.copy()
    atoms.calc = factory()
    result = {"energy": float(atoms.get_potential_energy()), "forces": np.asarray(atoms.get_forces(), dtype=float)}
    if "energy_offset" in atoms.calc.results:
        result["energy_offset"] = float(atoms.calc.results["energy_offset"])
    return result


def label_pending(
    db_path: str,
    reference: ReferenceFactory,
    executor: Executor | None = None,
    retries: int = 1,
    progress: bool = True,
    lease: float = 60.0,
    max_in_flight: int | None = None,
) -> dict[str, int]:
    """Run the reference on every ``pending`` row of ``db_path``; commit each result as it arrives.

    Each frame is claimed in a transaction before its call (:class:`~probe_ase.al.store.ALStore`),
    so any number of drivers, in any processes, can label one database: no
    frame is called twice, and a frame whose driver died is taken over once
    its ``lease`` (seconds) lapses. With no executor the calls run here, one
    at a time; with an executor up to ``max_in_flight`` (default: all) are
    claimed and submitted at once. Returns when no pending row is left (it
    waits for frames other drivers hold), with counts ``{"done": n, "failed":
    m}`` of the frames this call labelled.
    """
    store = ALStore(db_path, lease=lease)
    serial = executor is None
    executor = executor or SerialExecutor()
    limit = 1 if serial else max_in_flight or sys.maxsize
    counts = {"done": 0, "failed": 0}
    attempts: dict[int, int] = {}
    atoms_of: dict[int, Atoms] = {}
    futures: dict[Future, int] = {}

    def submit(row_id: int) -> None:
        futures[executor.submit(reference_calculation, reference, atoms_of[row_id])] = row_id

    bar = tqdm(total=store.pending(), desc="label", unit="frame", disable=not progress)
    try:
        with store.heartbeat():
            while True:
                for row_id, atoms in store.claim(limit - len(futures)):
                    atoms_of[row_id], attempts[row_id] = atoms, 0
                    submit(row_id)
                if not futures:
                    if not store.pending():
                        break
                    time.sleep(store.poll)  # other drivers hold the rest: wait for them, or for their leases
                    continue
                finished, _ = wait(futures, timeout=store.poll, return_when=FIRST_COMPLETED)
                for done in finished:
                    row_id = futures.pop(done)
                    attempts[row_id] += 1
                    error = done.exception()
                    if error is not None and attempts[row_id] <= retries and getattr(error, "retry", True):
                        submit(row_id)  # still claimed: retry
                        continue
                    status, committed = _record(store, row_id, atoms_of[row_id], done, attempts[row_id])
                    counts[status] += committed
                    bar.update(1)
    finally:
        bar.close()
        store.release()  # frames still in flight go back to pending at once (a killed driver's wait a lease)
    return counts


def _record(store: ALStore, row_id: int, atoms: Atoms, done: Future, attempts: int) -> tuple[str, bool]:
    """Commit a finished reference call on claimed row ``row_id``: ``"done"`` with the reference energy (eV) and
    forces (eV/Å) (and ``energy_offset``, eV, when the reference added one), or ``"failed"`` with its error;
    returns the status and whether it was committed (only while this driver still held the claim)."""
    error = done.exception()
    if error is None:
        result = dict(done.result())
        offset = {"energy_offset": result.pop("energy_offset")} if "energy_offset" in result else {}
        labelled = atoms.copy()
        labelled.calc = SinglePointCalculator(labelled, **result)
        return "done", store.finish(row_id, atoms=labelled, status="done", attempts=attempts, **offset)
    message = "".join(traceback.format_exception_only(type(error), error)).strip()
    return "failed", store.finish(row_id, status="failed", error=message[:500], attempts=attempts)
