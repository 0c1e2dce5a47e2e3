"""A fit's large arrays on disk (:mod:`probe_ase.fitting.store`): cached features and graphs memory-mapped and pickled
as their paths, and reads a chunk at a time that give what one read gives."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from probe_ase import find_tap, featurize
from probe_ase.fitting import novelty as novelty_fitting
from probe_ase.fitting import store
from probe_ase.fitting.data import FeatureSet
from probe_ase.fitting.store import Graphs
from probe_ase.fitting.novelty import fit_novelty
from probe_ase.fitting.train import HeadLoss, feature_moments, head_outputs
from probe_ase.model.graph import radius_graph
from probe_ase.model.head import HeadConfig, ProbeHead
from probe_ase.model.novelty import NoveltyConfig


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def test_cached_features_and_graphs_are_mapped_and_pickle_as_their_paths(backbones, cu_data, tmp_path):
    """The cache's features equal a fresh pass's bit for bit, are read from a mapped file (no scratch file left), and
    a pickled set (what worker processes get) is its path, not its rows; the graphs cached beside them likewise."""
    frames = cu_data["pool"]
    with find_tap(backbones("mace")) as tap:
        fresh = featurize(tap, frames, cache_dir=False, progress=False)
        written = featurize(tap, frames, cache_dir=tmp_path, progress=False)
        cached = featurize(tap, frames, cache_dir=tmp_path, progress=False)
    assert fresh.source is None and written.source == cached.source and cached.source.parent == tmp_path
    assert not list(tmp_path.glob(".scratch-*")) and str(cached.source) in _mapped_files()
    blob = pickle.dumps(cached)
    assert len(blob) < 1000 < cached.features.numpy().nbytes // 100
    for features in (written, cached, pickle.loads(blob)):
        assert torch.equal(features.features, fresh.features) and torch.equal(features.numbers, fresh.numbers)
        np.testing.assert_array_equal(features.forces, fresh.forces)
        np.testing.assert_array_equal(features.atom_errors, fresh.atom_errors)
        assert all(np.array_equal(features.errors[c], fresh.errors[c]) for c in fresh.errors)

    path = Graphs.cache_beside(cached, 4.0)
    in_memory, built, loaded = Graphs.build(frames, 4.0), Graphs.build(frames, 4.0, path), Graphs.build(frames, 4.0, path)
    assert in_memory.source is None and built.source == loaded.source == path and str(path) in _mapped_files()
    assert Graphs.cache_beside(fresh, 4.0) is None and len(pickle.dumps(loaded)) < 1000
    for graphs in (in_memory, built, loaded, pickle.loads(pickle.dumps(loaded))):
        assert len(graphs) == len(frames)
        for k in (0, 57, len(frames) - 1):
            expected = radius_graph(frames[k], 4.0)
            assert graphs[k].dtype == np.int64 and np.array_equal(graphs[k], expected)


def test_structure_chunks_cover_the_structures_in_order_within_the_bound(monkeypatch):
    monkeypatch.setattr(store, "CHUNK_ATOMS", 10)
    monkeypatch.setattr(store, "READ_ATOMS", 13)
    ptr = np.cumsum([0, 4, 4, 4, 12, 1, 9, 3])
    structures = np.array([6, 0, 1, 2, 3, 4, 5])
    groups = store.structure_chunks(ptr, structures)
    assert [g.tolist() for g in groups] == [[6, 0], [1, 2], [3], [4, 5]]  # 12 atoms: a group of its own
    assert [g.tolist() for g in store.structure_chunks(ptr, structures, read_only=True)] == [[6, 0, 1], [2], [3, 4],
                                                                                             [5]]
    assert store.structure_chunks(ptr, structures[:0]) == []


def test_reads_a_chunk_at_a_time_give_what_one_read_gives(backbones, cu_data, monkeypatch):
    """Feature moments, held-out outputs, the validation loss (every term) and the novelty's out-of-fold distances
    over many small chunks equal those of one read."""
    frames = cu_data["pool"]
    with find_tap(backbones("mace")) as tap:
        data: FeatureSet = featurize(tap, frames, cache_dir=False, progress=False)
    edges = Graphs.build(frames, 4.0)
    labels = (data.errors["force_rmse"] <= np.quantile(data.errors["force_rmse"], 0.7)).astype(float)
    atom_labels = (data.atom_errors <= np.median(data.atom_errors)).astype(float)
    torch.manual_seed(0)
    head = ProbeHead(data.features.shape[1], (29,), HeadConfig(hidden=16, cutoff=4.0, atom_logit=True, atom_error=True))
    structures = np.arange(len(data) - 1)  # chunks of 3 structures (32 atoms each) and a last one of 2
    loss = HeadLoss(head, data, edges, labels, structures[::2], data.errors["force_rmse"], atom_labels)
    fit = np.arange(0, len(data), 3)

    def reads():
        return (feature_moments(data, structures, torch.float32), head_outputs(head, data, edges, structures),
                loss.validation(structures),
                fit_novelty(data, fit, (29,), NoveltyConfig())[1])

    one = reads()
    monkeypatch.setattr(store, "CHUNK_ATOMS", 100)
    monkeypatch.setattr(store, "READ_ATOMS", 100)
    monkeypatch.setattr(novelty_fitting, "CHUNK_ATOMS", 100)
    assert [len(g) for g in store.structure_chunks(data.ptr, structures)] == [3] * 39 + [2]
    chunked = reads()
    for mine, theirs in zip(chunked[0], one[0]):
        torch.testing.assert_close(mine.float(), theirs, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(chunked[1], one[1]):
        assert mine.shape == theirs.shape and mine.size
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert chunked[2] == pytest.approx(one[2], rel=1e-6)
    np.testing.assert_allclose(chunked[3], one[3], rtol=1e-9)
