"""Worker processes of a fit (``FitOptions.workers``): spawned, one torch thread each, given the fit's data once."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch

from probe_ase.exceptions import InputError

#: a worker process's copy of the data its jobs read (set once by :func:`_start`, in that process only)
_DATA: list[tuple] = []


def worker_pool(workers: int, jobs: int, data: tuple) -> ProcessPoolExecutor:
    """``min(workers, jobs)`` fresh (spawned) processes of one torch thread each, each given ``data`` once
    (:func:`worker_data`); a mapped :class:`~probe_ase.fitting.data.FeatureSet` in it travels as its path."""
    if multiprocessing.current_process().daemon:
        raise InputError(f"workers={workers} cannot start processes here: this is a daemonic process (a "
                         "multiprocessing.Pool worker, say); fit with workers=1 in it", workers=workers)
    return ProcessPoolExecutor(min(workers, jobs), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start, initargs=data)


def worker_data() -> tuple:
    """The ``data`` this worker process was started with."""
    return _DATA[0]


def _start(*data: object) -> None:
    torch.set_num_threads(1)
    _DATA.append(data)
