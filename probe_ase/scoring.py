"""Batched scoring of many structures: one backbone pass per batch, then the head."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import torch
from ase import Atoms

from probe_ase.calculator import annotate
from probe_ase.model.graph import HeadGraph
from probe_ase.model.probe import Probe
from probe_ase.taps.base import Tap
from probe_ase.validate import check_atoms
from probe_ase.verdict import structure_results


def score_frames(probe: Probe, tap: Tap, frames: Iterable[Atoms], batch_size: int = 32) -> Iterator[Atoms]:
    """Score ``frames`` lazily; yield copies carrying the results.

    Each yielded frame keeps its own ``info``/``arrays`` and gains
    ``info["reliability"]`` (0-1), ``info["reliable"]`` (the verdict at the
    head's p* and support), ``info["reason"]``, ``info["novelty"]``,
    ``info["mlip_energy"]`` (eV), ``arrays["mlip_forces"]`` (eV/Å),
    ``arrays["atom_novelty"]``, ``arrays["atom_importance"]``, from heads
    with a per-atom logit ``arrays["atom_reliability"]`` (0-1), and from
    heads that regress atom errors ``info["force_error"]`` and
    ``arrays["atom_force_error"]`` (predicted, eV/Å).
    Memory stays constant in the number of frames.
    """
    frames = iter(frames)
    graphs = HeadGraph(probe.meta.config.cutoff)
    index = 0
    while chunk := list(islice(frames, batch_size)):
        for k, atoms in enumerate(chunk):
            check_atoms(atoms, probe.meta.elements, where=f"frame {index + k}", what="the head")
        predictions = list(tap.predict(chunk, batch_size=len(chunk)))
        features = torch.cat([pr.features for pr in predictions])
        ptr = np.cumsum([0] + [len(a) for a in chunk])
        numbers = torch.as_tensor(np.concatenate([a.numbers for a in chunk]), device=features.device)
        edges = graphs.frames(chunk)
        scores = probe.predict(features, numbers, ptr, edges)
        verdict = probe.verdict(scores)
        for k, (atoms, pred) in enumerate(zip(chunk, predictions)):
            out = atoms.copy()
            out.calc = atoms.calc  # keeps reference energy/forces from extxyz
            annotate(out, structure_results(scores, verdict, k, ptr))
            out.info["mlip_energy"] = pred.energy
            out.arrays["mlip_forces"] = np.asarray(pred.forces, dtype=float)
            yield out
        index += len(chunk)
