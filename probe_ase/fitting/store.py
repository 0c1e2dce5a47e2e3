"""A fit's large arrays in files, memory-mapped: its memory is bounded by what it reads at a time, not by the data.

The feature cache and the graph cache are ``torch.save`` archives read back with ``mmap=True``: the operating
system pages rows in as batches touch them and may drop them again (they are file pages, not the process's own
memory). A fit reads whole sets of structures a chunk at a time: :data:`CHUNK_ATOMS` atoms per head pass (the
held-out scores, the validation loss) or novelty pass, :data:`READ_ATOMS` per plain read of features (the training
atoms' mean and spread). A set that fits one chunk is read in one go, as it always was, so fits on fewer atoms give
the same head bit for bit.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from probe_ase.fileio import atomic_write

#: the most atoms one head or novelty pass reads at a time: the head's activations over them are about 40 MiB
CHUNK_ATOMS = 2**13
#: the most atoms one plain read of features gathers: 64 MiB of 256 float32 features
READ_ATOMS = 2**16


def load_mapped(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` archive, memory-mapped (copy on write), no code run (``weights_only``)."""
    return torch.load(path, weights_only=True, mmap=True)


def save_mapped(path: str | os.PathLike, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``arrays`` to ``path`` atomically and return them memory-mapped from it."""
    atomic_write(path, lambda tmp: torch.save(arrays, tmp))
    return load_mapped(path)


@contextmanager
def scratch_file(folder: Path) -> Iterator[Path]:
    """A temporary file's path in ``folder``, removed on exit (a mapping of it stays valid until dropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".scratch-{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def scratch(folder: Path | None, shape: tuple[int, ...], dtype: np.dtype | type) -> Iterator[np.ndarray]:
    """A writable array backed by a temporary file in ``folder`` (removed on exit), or in memory when ``folder`` is
    None."""
    if folder is None or not np.prod(shape):
        yield np.empty(shape, dtype=dtype)
        return
    with scratch_file(folder) as path:
        yield np.memmap(path, dtype=dtype, mode="w+", shape=shape)


def structure_chunks(ptr: np.ndarray, structures: np.ndarray, read_only: bool = False) -> list[np.ndarray]:
    """``structures`` in order, in consecutive groups of at most :data:`CHUNK_ATOMS` atoms (:data:`READ_ATOMS` for
    a ``read_only`` pass; a larger structure is a group of its own); structure ``k`` owns the atoms
    ``ptr[k]:ptr[k+1]``."""
    limit = READ_ATOMS if read_only else CHUNK_ATOMS
    structures = np.asarray(structures, dtype=np.int64)
    ends = np.cumsum(ptr[structures + 1] - ptr[structures])
    groups, start = [], 0
    while start < len(structures):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + limit, side="right")))
        groups.append(structures[start:stop])
        start = stop
    return groups


def pooled_moments(chunks: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased standard deviation ``(width,)`` over the rows of all ``chunks``, pooled in float64
    (Chan et al.'s update: no sum of squares to cancel)."""
    n, mean, m2 = 0, None, None
    for chunk in chunks:
        x = chunk.double()
        nb, mb = len(x), x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        delta = mb - mean
        mean = mean + delta * nb / (n + nb)
        m2 = m2 + m2b + delta**2 * n * nb / (n + nb)
        n += nb
    return mean, (m2 / max(n - 1, 1)).sqrt()
