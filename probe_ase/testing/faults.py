"""Fault scenarios for labelling: real processes, real ``kill -9``, a real database (SQLite or PostgreSQL).

Each scenario writes small pending frames, labels them with
:class:`~probe_ase.testing.reference.CountingEMT` (slowed, logging every call
as it starts and as it finishes), injects its fault and returns a
:class:`FaultResult`: reference calls started and finished, frames called
more than once (duplicates), frames never labelled (lost), interrupted calls
retried, finished frames recomputed, and the database's integrity check. The
tests assert on them; ``benchmarks/al_faults.py`` tabulates them.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ase.build import bulk
from ase.db import connect

from probe_ase.al.label import label_pending
from probe_ase.al.store import check_database
from probe_ase.testing.reference import CountingEMT, geometry_hash

_DRIVER = """
import functools, os, sys, time
from probe_ase.al.label import label_pending
from probe_ase.testing.reference import CountingEMT
url, log, start_log, delay, lease, ready, go = sys.argv[1:]
open(ready, "w").close()  # imported: ready to label
while not os.path.exists(go):  # every driver of the scenario starts labelling at once
    time.sleep(0.01)
label_pending(url, functools.partial(CountingEMT, log=log, start_log=start_log, delay=float(delay)),
              lease=float(lease), progress=False)
"""


@dataclass
class FaultResult:
    """What one fault scenario did to the labelling of ``frames`` pending frames."""

    scenario: str
    backend: str
    frames: int
    faults: int  #: processes killed with SIGKILL
    calls_started: int
    calls_finished: int
    duplicates: int  #: frames whose reference call finished more than once
    lost: int  #: frames not ``done`` at the end
    retried: int  #: frames whose call was interrupted and then run again
    recomputed: int  #: frames already ``done`` at a fault and called again after it
    processes: int  #: distinct processes that ran reference calls (drivers or Dask workers)
    integrity_ok: bool
    seconds: float

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)


class _Run:
    """One scenario's database, logs and frames."""

    def __init__(self, url: str, folder: Path, frames: int, delay: float, lease: float) -> None:
        self.url, self.delay, self.lease = url, delay, lease
        self.log, self.start_log = folder / "finished.txt", folder / "started.txt"
        for path in (self.log, self.start_log):
            path.unlink(missing_ok=True)
        db = connect(url)
        self.hashes = []
        with db:
            for k in range(frames):  # 4-atom copper cells rattled by 0.05 Å
                atoms = bulk("Cu", cubic=True)
                atoms.rattle(0.05, seed=k)
                self.hashes.append(geometry_hash(atoms))
                db.write(atoms, status="pending", round=1)
        self.t0 = time.perf_counter()

    def reference(self) -> functools.partial:
        return functools.partial(CountingEMT, log=str(self.log), start_log=str(self.start_log), delay=self.delay)

    def drivers(self, n: int) -> list[subprocess.Popen]:
        """``n`` labelling drivers, each in its own process importing this very probe_ase, started together.

        Each waits, once imported, until all are: started one after the other, a driver slow to import (a
        busy machine) could find every frame labelled by the others, and a scenario would test nothing.
        """
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        folder = self.log.parent
        go = folder / "go"
        go.unlink(missing_ok=True)
        ready = [folder / f"ready-{k}" for k in range(n)]
        procs = []
        for path in ready:
            path.unlink(missing_ok=True)
            procs.append(subprocess.Popen([sys.executable, "-c", _DRIVER, self.url, str(self.log), str(self.start_log),
                                           str(self.delay), str(self.lease), str(path), str(go)], env=env))

        def all_ready() -> bool:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a labelling driver exited before it started: exit codes {[p.poll() for p in procs]}")
            return all(path.exists() for path in ready)

        try:
            _wait(all_ready, what=f"{n} labelling drivers to import")
        except BaseException:  # none left waiting for a start that never comes
            for proc in procs:
                proc.kill()
            raise
        go.touch()
        return procs

    def started(self) -> list[tuple[str, int]]:
        lines = self.start_log.read_text().split("\n") if self.start_log.exists() else []
        return [(h, int(pid)) for h, pid in (line.split() for line in lines if line)]

    def finished(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def done(self) -> set[str]:
        return {geometry_hash(row.toatoms()) for row in connect(self.url).select(status="done")}

    def in_flight(self) -> set[str]:
        """Frames whose call has started and not finished."""
        return {h for h, _ in self.started()} - set(self.finished())

    def result(self, scenario: str, faults: int, interrupted: set[str], done_at_fault: set[str],
               calls_at_fault: int, starts_at_fault: int) -> FaultResult:
        finished, started = self.finished(), self.started()
        counts = Counter(finished)
        done = self.done()
        after_fault = Counter(h for h, _ in started[starts_at_fault:])
        return FaultResult(
            scenario=scenario, backend="postgresql" if self.url.startswith("postgres") else "sqlite",
            frames=len(self.hashes), faults=faults, calls_started=len(started), calls_finished=len(finished),
            duplicates=sum(n > 1 for n in counts.values()), lost=len(set(self.hashes) - done),
            retried=sum(after_fault[h] > 0 for h in interrupted),
            recomputed=len(done_at_fault & set(finished[calls_at_fault:])),
            processes=len({pid for _, pid in started}), integrity_ok=check_database(self.url).ok,
            seconds=round(time.perf_counter() - self.t0, 1))


def _wait(condition: Callable[[], bool], timeout: float = 120.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _kill_mid_call(run: _Run, proc: subprocess.Popen, min_done: int) -> tuple[set, set, int, int]:
    """SIGKILL ``proc`` once ``min_done`` frames are done and one of its calls is in flight."""
    def ready() -> bool:
        return len(run.done()) >= min_done and any(pid == proc.pid for h, pid in run.started()
                                                   if h in run.in_flight())

    _wait(ready, what=f"{min_done} frames done and a call in flight")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = {h for h, pid in run.started() if pid == proc.pid} - set(run.finished())
    return interrupted, run.done(), len(run.finished()), len(run.started())


def two_drivers(url: str, folder: Path, frames: int = 8, delay: float = 0.3, lease: float = 0.6) -> FaultResult:
    """Two driver processes label one database at once (calls last longer than a lease: the heartbeat holds them)."""
    run = _Run(url, folder, frames, delay, lease)
    procs = run.drivers(2)
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a labelling driver failed: exit codes {codes}")
    return run.result("two drivers at once", 0, set(), set(), 0, 0)


def driver_killed(url: str, folder: Path, frames: int = 6, delay: float = 0.4, lease: float = 1.0) -> FaultResult:
    """``kill -9`` the only driver mid-call, then start a new one: it takes the orphaned claim over after its lease."""
    run = _Run(url, folder, frames, delay, lease)
    proc, = run.drivers(1)
    interrupted, done, calls, starts = _kill_mid_call(run, proc, min_done=2)
    label_pending(url, run.reference(), lease=lease, progress=False)
    return run.result("driver killed mid-call, restarted", 1, interrupted, done, calls, starts)


def one_of_two_drivers_killed(url: str, folder: Path, frames: int = 8, delay: float = 0.3,
                              lease: float = 1.0) -> FaultResult:
    """Two drivers; ``kill -9`` one mid-call: the survivor labels the rest, the dead one's frame after its lease."""
    run = _Run(url, folder, frames, delay, lease)
    victim, survivor = run.drivers(2)
    interrupted, done, calls, starts = _kill_mid_call(run, victim, min_done=1)
    if survivor.wait():
        raise RuntimeError(f"the surviving driver failed: exit code {survivor.returncode}")
    return run.result("one of two drivers killed mid-call", 1, interrupted, done, calls, starts)


def dask_worker_killed(url: str, folder: Path, frames: int = 6, delay: float = 0.5, lease: float = 1.0) -> FaultResult:
    """Label through a Dask LocalCluster of 2 worker processes; ``kill -9`` the worker of the first call mid-call."""
    import distributed

    run = _Run(url, folder, frames, delay, lease)
    killed: list[tuple[str, int]] = []

    def kill_first_worker() -> None:
        _wait(lambda: bool(run.started()), what="the first reference call")
        killed.append(run.started()[0])
        os.kill(killed[0][1], signal.SIGKILL)

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        run.t0 = time.perf_counter()
        killer = threading.Thread(target=kill_first_worker, daemon=True)
        killer.start()
        label_pending(url, run.reference(), executor=client.get_executor(), lease=lease, progress=False)
        killer.join()
    return run.result("Dask worker killed mid-call", 1, {killed[0][0]}, set(), 0, 1)


SCENARIOS = {"two_drivers": two_drivers, "driver_killed": driver_killed,
             "one_of_two_drivers_killed": one_of_two_drivers_killed, "dask_worker_killed": dask_worker_killed}
