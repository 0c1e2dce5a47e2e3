"""Run a backbone over labelled structures and collect features and errors.

Reference energies (eV) and forces (eV/Å) come from extxyz ``info``/``arrays``
keys, from a SinglePointCalculator attached to each frame, or from ase.db rows.
The backbone runs in batches through its tap (one pass for energy, forces and
features), and results are cached on disk keyed by the backbone fingerprint,
tapped layers and channels and a hash of the data. A cached feature set, and
the head's graphs cached beside it (:class:`~probe_ase.fitting.store.Graphs`),
are read memory-mapped (:mod:`probe_ase.fitting.store`). A file of frames is
read again on each pass (:class:`FrameFile`), never held whole.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.io import iread, read
from tqdm.auto import tqdm

from probe_ase.exceptions import InputError, MissingReferenceError
from probe_ase.fitting.labels import CRITERIA, atom_errors, check_criterion, needs_forces, structure_error
from probe_ase.fitting.store import load_mapped, save_mapped, scratch
from probe_ase.taps.base import Tap
from probe_ase.validate import check_atoms

Frames = str | os.PathLike | Sequence[Atoms]
#: part of every cache file name: bumped when FeatureSet gains fields (2: per-atom force errors, 3: predicted forces)
CACHE_SCHEMA = "s3"


def default_cache_dir() -> Path:
    """``$PROBE_ASE_CACHE``, else ``$XDG_CACHE_HOME/probe-ase``, else ``~/.cache/probe-ase``."""
    if "PROBE_ASE_CACHE" in os.environ:
        return Path(os.environ["PROBE_ASE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "probe-ase"


def read_frames(source: Frames) -> list[Atoms]:
    """Structures from a file ASE can read (extxyz, traj, ase.db ...) or a list of Atoms.

    ASE's selection syntax works too, e.g. ``"al.db@status=done"``.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists() and not Path(str(source).split("@")[0]).exists():
            raise InputError(f"no such file: {path}", path=str(path))
        if "@" in str(source):  # ASE's selection syntax
            try:
                frames = read(source)
            except Exception as err:  # ASE raises many types (XYZError, KeyError, ValueError ...)
                raise InputError(f"cannot read structures from {source}: {type(err).__name__}: {err}",
                                 path=str(source)) from err
            frames = frames if isinstance(frames, list) else [frames]
        else:
            frames = list(iter_frames(source))
    else:
        frames = list(source)
    if not frames:
        named = isinstance(source, (str, os.PathLike))
        raise InputError(f"no structures in {source if named else 'the list'}", path=str(source) if named else None)
    return frames


def iter_frames(path: str | os.PathLike) -> Iterator[Atoms]:
    """Structures of a file one at a time (constant memory); unreadable ones raise :class:`InputError`."""
    frames = iread(path, index=":")
    index = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as err:  # ASE raises many types (XYZError, KeyError, ValueError ...)
            raise InputError(f"cannot read structures from {path} (frame {index}): {type(err).__name__}: {err}",
                             path=str(path), index=index) from err
        yield atoms
        index += 1


class FrameFile:
    """The structures of a file ASE can read, read from it again on every pass: one frame in memory at a time.

    ``len()`` counts them (once; a full pass records it too). Unreadable frames raise :class:`InputError`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self._count = Path(path), None

    def __iter__(self) -> Iterator[Atoms]:
        count = 0
        for atoms in iter_frames(self.path):
            count += 1
            yield atoms
        self._count = count

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self)
        return self._count


def frame_source(source: Frames | FrameFile) -> list[Atoms] | FrameFile:
    """``source``'s structures for passes that read them in order: a file (without ASE's ``@`` selection) as a
    :class:`FrameFile`, anything else as :func:`read_frames` gives it."""
    if isinstance(source, FrameFile):
        return source
    if isinstance(source, (str, os.PathLike)) and "@" not in str(source):
        if not Path(source).exists():
            raise InputError(f"no such file: {source}", path=str(source))
        return FrameFile(source)
    return read_frames(source)


def reference_energy(atoms: Atoms, key: str = "energy") -> float | None:
    """Reference energy (eV) from ``atoms.info[key]`` or an attached calculator."""
    if key in atoms.info:
        return float(atoms.info[key])
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    return float(results[key]) if key in results else None


def reference_forces(atoms: Atoms, key: str = "forces") -> np.ndarray | None:
    """Reference forces (eV/Å) from ``atoms.arrays[key]`` or an attached calculator."""
    if key in atoms.arrays:
        return np.asarray(atoms.arrays[key], dtype=float)
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    return np.asarray(results[key], dtype=float) if key in results else None


@dataclass
class FeatureSet:
    """Backbone features and errors for a list of structures.

    ``features`` (n_atoms_total, F) and ``numbers`` are concatenated over
    structures; structure ``k`` owns rows ``ptr[k]:ptr[k+1]``. ``errors`` maps
    each criterion to per-structure errors (NaN where a reference is missing);
    ``atom_errors`` (n_atoms_total,) holds each atom's force-error norm
    ``|ΔF_i|`` in eV/Å (NaN where reference forces are missing);
    ``forces`` (n_atoms_total, 3) the backbone's own forces in eV/Å (None
    where not recorded). ``source``: the cache file it is memory-mapped from
    (None: in memory); such a set pickles as that path, so worker processes
    map the same file instead of copying it.
    """

    features: torch.Tensor
    numbers: torch.Tensor
    ptr: np.ndarray
    errors: dict[str, np.ndarray]
    atom_errors: np.ndarray
    forces: np.ndarray | None = None
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def __reduce_ex__(self, protocol: int):  # noqa: ANN204 - pickle's protocol
        if self.source is not None:
            return FeatureSet.load, (self.source,)
        return super().__reduce_ex__(protocol)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """The feature set cached at ``path``, memory-mapped."""
        return cls.from_dict(load_mapped(path), Path(path))

    def subset(self, indices: Sequence[int]) -> FeatureSet:
        """The structures ``indices`` (in that order) as a feature set of their own."""
        indices = np.asarray(indices, dtype=int)
        rows = np.concatenate([np.arange(self.ptr[k], self.ptr[k + 1]) for k in indices]) if len(indices) else \
            np.empty(0, dtype=int)
        return FeatureSet(self.features[torch.from_numpy(rows)], self.numbers[torch.from_numpy(rows)],
                          np.cumsum([0, *(self.ptr[indices + 1] - self.ptr[indices])]),
                          {k: v[indices] for k, v in self.errors.items()}, self.atom_errors[rows],
                          None if self.forces is None else self.forces[rows])

    def error(self, criterion: str) -> np.ndarray:
        """Per-structure errors under ``criterion``; every structure must have them."""
        values = self.errors[check_criterion(criterion)]
        missing = np.flatnonzero(np.isnan(values))
        if missing.size:
            what = "forces" if needs_forces(criterion) else "energy"
            raise MissingReferenceError(
                f"criterion {criterion!r} needs reference {what}, missing for {missing.size} structures "
                f"(first indices {missing[:5].tolist()}); use an energy criterion or add reference {what}",
                criterion=criterion, missing=missing.tolist(),
            )
        return values

    def atom_error(self) -> np.ndarray:
        """Per-atom force-error norms (eV/Å); every structure must have reference forces."""
        missing = [k for k in range(len(self)) if np.isnan(self.atom_errors[self.ptr[k]:self.ptr[k + 1]]).any()]
        if missing:
            raise MissingReferenceError(
                f"per-atom labels need reference forces, missing for {len(missing)} structures "
                f"(first indices {missing[:5]}); drop atom_tolerance / atom_quantile or add reference forces",
                missing=missing,
            )
        return self.atom_errors

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for ``torch.save`` (``weights_only`` loadable); errors go under ``error_<criterion>``."""
        out = {"features": self.features, "numbers": self.numbers, "ptr": torch.from_numpy(self.ptr),
               "atom_errors": torch.from_numpy(self.atom_errors)}
        if self.forces is not None:
            out["forces"] = torch.from_numpy(self.forces)
        out.update({f"error_{k}": torch.from_numpy(v) for k, v in self.errors.items()})
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], source: Path | None = None) -> FeatureSet:
        """Rebuild a feature set from :meth:`to_dict`'s output (memory-mapped from ``source``, if given)."""
        errors = {k[6:]: v.numpy() for k, v in d.items() if k.startswith("error_")}
        forces = d["forces"].numpy() if "forces" in d else None
        return cls(d["features"], d["numbers"], d["ptr"].numpy(), errors, d["atom_errors"].numpy(), forces, source)


def _hash_frame(digest: hashlib._Hash, atoms: Atoms, energy_key: str, forces_key: str) -> None:
    """Add one structure and its reference values to ``digest`` (the feature cache's key)."""
    for arr in (atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc):
        digest.update(np.ascontiguousarray(arr).tobytes())
    energy, forces = reference_energy(atoms, energy_key), reference_forces(atoms, forces_key)
    digest.update(repr(energy).encode())
    digest.update(b"" if forces is None else np.ascontiguousarray(forces).tobytes())


def featurize(
    tap: Tap,
    frames: Frames,
    energy_key: str = "energy",
    forces_key: str = "forces",
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
) -> FeatureSet:
    """Run the tapped backbone over labelled ``frames``; return features and errors.

    Args:
        tap: the backbone's tap.
        frames: a file ASE can read (read again on each pass, one frame in
            memory at a time: :class:`FrameFile`), or a list of Atoms, with
            reference energy (eV, ``info[energy_key]``) and optionally forces
            (eV/Å, ``arrays[forces_key]``), or SinglePointCalculator results.
        batch_size: structures per backbone pass.
        cache_dir: where to cache results; None for the default
            (:func:`default_cache_dir`), False to disable.

    Returns:
        the features and errors; with a cache, memory-mapped from its file
        (``source``): the features are written there as the backbone gives
        them, never held in memory whole.
    """
    frames = frame_source(frames)
    data_key, sizes, numbers = _check(tap, frames, energy_key, forces_key)
    cache = None if cache_dir is False else _cache_path(tap, data_key, cache_dir)
    if cache is not None and cache.exists():
        try:
            return FeatureSet.load(cache)
        except Exception:  # corrupt cache: recompute and overwrite
            pass
    ptr = np.cumsum([0, *sizes])
    errors = {c: np.full(len(sizes), np.nan) for c in CRITERIA}
    atom_errs, forces = np.full(ptr[-1], np.nan), np.empty((ptr[-1], 3))
    predictions = ((atoms, pred) for chunk in _chunks(frames, 32 * batch_size)
                   for atoms, pred in zip(chunk, tap.predict(chunk, batch_size=batch_size)))
    first = next(predictions)
    width, dtype = first[1].features.shape[1], torch.empty(0, dtype=first[1].features.dtype).numpy().dtype
    bar = tqdm(total=len(sizes), desc="featurize", unit="frame", disable=not progress)
    # features go straight into their place (a file beside the cache, or memory): never a list of them and a copy
    with scratch(None if cache is None else cache.parent, (int(ptr[-1]), width), dtype) as rows:
        for k, (atoms, pred) in enumerate(itertools.chain([first], predictions)):
            rows[ptr[k]:ptr[k + 1]] = pred.features.detach().cpu().numpy()
            forces[ptr[k]:ptr[k + 1]] = pred.forces
            ref_e, ref_f = reference_energy(atoms, energy_key), reference_forces(atoms, forces_key)
            for c in CRITERIA:
                if ref_f is not None or not needs_forces(c):
                    errors[c][k] = structure_error(c, pred.energy, ref_e, pred.forces, ref_f)
            if ref_f is not None:
                atom_errs[ptr[k]:ptr[k + 1]] = atom_errors(pred.forces, ref_f)
            bar.update()
        bar.close()
        result = FeatureSet(torch.from_numpy(rows), numbers, ptr, errors, atom_errs, forces)
        return result if cache is None else FeatureSet.from_dict(save_mapped(cache, result.to_dict()), cache)


def _check(tap: Tap, frames: Iterable[Atoms], energy_key: str, forces_key: str
           ) -> tuple[str, list[int], torch.Tensor]:
    """One pass over ``frames``: each checked for the tap and a reference energy; the SHA-256 over them and their
    reference values, their atom counts and atomic numbers."""
    digest, sizes, numbers = hashlib.sha256(), [], []
    for k, atoms in enumerate(frames):
        check_atoms(atoms, tap.elements, where=f"structure {k}")
        if reference_energy(atoms, energy_key) is None:
            raise MissingReferenceError(f"structure {k} has no reference energy under key {energy_key!r}",
                                        index=k, energy_key=energy_key)
        _hash_frame(digest, atoms, energy_key, forces_key)
        sizes.append(len(atoms))
        numbers.append(atoms.numbers)
    if not sizes:
        path = getattr(frames, "path", None)
        raise InputError(f"no structures in {path or 'the list'}", path=None if path is None else str(path))
    return digest.hexdigest(), sizes, torch.from_numpy(np.concatenate(numbers).astype(np.int64))


def _chunks(frames: Iterable[Atoms], size: int) -> Iterator[list[Atoms]]:
    """``frames`` in consecutive lists of ``size`` (the last shorter): what a tap's batched pass takes."""
    frames = iter(frames)
    while chunk := list(itertools.islice(frames, size)):
        yield chunk


def _cache_path(tap: Tap, data_key: str, cache_dir: str | os.PathLike | None) -> Path:
    """The feature cache file of frames whose SHA-256 (:func:`_check`) is ``data_key``, through this tap (backbone,
    layers, channels)."""
    layers = "_".join(map(str, tap.layers)) + ("" if tap.channels == "scalars" else f"-{tap.channels.replace('+', '_')}")
    key = f"{CACHE_SCHEMA}-{tap.fingerprint()[:16]}-{layers}-{data_key[:24]}"
    return Path(cache_dir or default_cache_dir()) / f"{tap.kind}-{key}.pt"


def features_only(tap: Tap, frames: Sequence[Atoms], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tapped features ``(n_atoms, F)`` and atomic numbers of unlabelled ``frames`` (one batched pass)."""
    for k, atoms in enumerate(frames):
        check_atoms(atoms, tap.elements, where=f"reference structure {k}")
    features = torch.cat([pred.features for pred in tap.predict(frames, batch_size=batch_size)])
    numbers = torch.from_numpy(np.concatenate([a.numbers for a in frames]).astype(np.int64))
    return features, numbers
