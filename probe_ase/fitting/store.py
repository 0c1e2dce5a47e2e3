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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from probe_ase.fileio import atomic_write
from probe_ase.model.graph import radius_graph

if TYPE_CHECKING:
    from ase import Atoms

    from probe_ase.fitting.data import FeatureSet

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


class Graphs(Sequence[np.ndarray]):
    """The head's radius graphs (:func:`~probe_ase.model.graph.radius_graph`) of many structures in one array.

    Structure ``k``'s edges are rows ``ptr[k]:ptr[k+1]`` of ``pairs`` ``(n_edges, 2)`` (int32 local atom indices,
    destination then source); ``graphs[k]`` is its ``(2, n_edges)`` int64 graph, as ``radius_graph`` gives it.
    Built with a cache path, the graphs are written there as they are found and read back memory-mapped (such
    graphs pickle as that path); without one they are held in memory.
    """

    def __init__(self, pairs: torch.Tensor, ptr: np.ndarray, source: Path | None = None) -> None:
        self.pairs, self.ptr, self.source = pairs, np.asarray(ptr, dtype=np.int64), source

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def __getitem__(self, k: int) -> np.ndarray:  # type: ignore[override]
        return self.pairs[self.ptr[k] : self.ptr[k + 1]].numpy().T.astype(np.int64)

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        if self.source is not None:
            return Graphs.load, (self.source,)
        return Graphs, (self.pairs, self.ptr)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Graphs:
        """The graphs cached at ``path``, memory-mapped."""
        arrays = load_mapped(path)
        return cls(arrays["pairs"], arrays["ptr"].numpy(), Path(path))

    @classmethod
    def build(cls, frames: Iterable[Atoms], cutoff: float, cache: Path | None = None) -> Graphs:
        """The graphs of ``frames`` within ``cutoff`` (Å): read from ``cache`` when there, else found (and written
        there, when given)."""
        if cache is not None and cache.exists():
            try:
                return cls.load(cache)
            except Exception:  # corrupt cache: rebuild and overwrite
                pass
        counts = [0]
        graphs = (np.ascontiguousarray(radius_graph(atoms, cutoff).T, dtype=np.int32) for atoms in frames)
        if cache is None:
            parts = list(graphs)
            counts += [len(g) for g in parts]
            return cls(torch.from_numpy(np.concatenate(parts)), np.cumsum(counts))
        with scratch_file(cache.parent) as raw:
            with open(raw, "wb") as out:
                for graph in graphs:
                    out.write(graph.tobytes())
                    counts.append(len(graph))
            ptr = np.cumsum(counts)
            pairs = np.memmap(raw, dtype=np.int32, mode="c", shape=(int(ptr[-1]), 2))
            arrays = save_mapped(cache, {"pairs": torch.from_numpy(pairs), "ptr": torch.from_numpy(ptr)})
        return cls(arrays["pairs"], arrays["ptr"].numpy(), cache)

    @staticmethod
    def cache_beside(features: FeatureSet, cutoff: float) -> Path | None:
        """Where the graphs within ``cutoff`` (Å) of a cached feature set's frames are cached (None: not cached)."""
        if features.source is None:
            return None
        return features.source.with_name(f"{features.source.stem}-graphs-{cutoff:.6g}.pt")
