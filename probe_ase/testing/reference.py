"""Reference calculators for testing active learning: counted, slowed or failing EMT."""

from __future__ import annotations

import hashlib
import os
import time

from ase.calculators.emt import EMT


class CountingEMT(EMT):
    """EMT that appends a line per calculation to ``log`` (geometry hash) and may sleep.

    Picklable, so it works as a reference factory for process pools and Dask
    (``functools.partial(CountingEMT, log="calls.txt")``).

    Args:
        log: file to append one line per finished calculation to, or None.
        delay: seconds to sleep per calculation (to make runs interruptible).
        start_log: file to append ``<geometry hash> <process id>`` to as
            each calculation starts (a call killed mid-way shows here only).
        fail_above_x: raise RuntimeError when atom 0's x (Å) exceeds this.
    """

    def __init__(self, log: str | os.PathLike | None = None, delay: float = 0.0,
                 fail_above_x: float | None = None, start_log: str | os.PathLike | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log, self.delay, self.fail_above_x, self.start_log = log, delay, fail_above_x, start_log

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        """EMT's calculation, after the optional failure check and delay; then log the geometry hash."""
        if self.fail_above_x is not None and atoms.positions[0, 0] > self.fail_above_x:
            raise RuntimeError(f"reference failed: atom 0 at x = {atoms.positions[0, 0]:.3f} Å")
        if self.start_log is not None:
            _append(self.start_log, f"{geometry_hash(atoms)} {os.getpid()}\n")
        time.sleep(self.delay)
        super().calculate(atoms, properties, system_changes)
        if self.log is not None:
            _append(self.log, geometry_hash(atoms) + "\n")


def _append(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single write on an O_APPEND file: lines from many processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def geometry_hash(atoms) -> str:
    """Short hash of positions and numbers, to recognise a structure."""
    digest = hashlib.sha256(atoms.positions.round(8).tobytes() + atoms.numbers.tobytes())
    return digest.hexdigest()[:16]
