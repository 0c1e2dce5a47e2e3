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
        log: file to append one line per calculation to, or None.
        delay: seconds to sleep per calculation (to make runs interruptible).
        fail_above_x: raise RuntimeError when atom 0's x (Å) exceeds this.
    """

    def __init__(self, log: str | os.PathLike | None = None, delay: float = 0.0,
                 fail_above_x: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log, self.delay, self.fail_above_x = log, delay, fail_above_x

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        """EMT's calculation, after the optional failure check and delay; then log the geometry hash."""
        if self.fail_above_x is not None and atoms.positions[0, 0] > self.fail_above_x:
            raise RuntimeError(f"reference failed: atom 0 at x = {atoms.positions[0, 0]:.3f} Å")
        time.sleep(self.delay)
        super().calculate(atoms, properties, system_changes)
        if self.log is not None:
            with open(self.log, "a") as handle:
                handle.write(geometry_hash(atoms) + "\n")


def geometry_hash(atoms) -> str:
    """Short hash of positions and numbers, to recognise a structure."""
    digest = hashlib.sha256(atoms.positions.round(8).tobytes() + atoms.numbers.tobytes())
    return digest.hexdigest()[:16]
