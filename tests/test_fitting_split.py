"""Held-out splits of the fit pool (:mod:`probe_ase.fitting.split`): stratified, disjoint, covering, seeded."""

from __future__ import annotations

import numpy as np
import pytest

import probe_ase
from probe_ase.fitting.split import split_indices
from probe_ase.fitting.train import TrainConfig


def _labels(n: int, n_pos: int) -> np.ndarray:
    labels = np.zeros(n, dtype=np.int64)
    labels[np.random.default_rng(n).permutation(n)[:n_pos]] = 1
    return labels


@pytest.mark.parametrize("n, n_pos", [(100, 30), (100, 70), (200, 20), (12, 6)])
def test_split_indices_disjoint_covering_stratified(n, n_pos):
    labels = _labels(n, n_pos)
    train = TrainConfig()
    tr, val, cal = split_indices(labels, train)
    everything = np.concatenate([tr, val, cal])
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # covering and disjoint
    for part in (tr, val, cal):
        np.testing.assert_array_equal(part, np.sort(part))
        assert 0 < labels[part].sum() < len(part)  # both classes in every split
    if n == 100:
        # sizes: cal 0.2*100 = 20; val 0.15/0.8 of the remaining 80 = 15; train 65
        assert (len(tr), len(val), len(cal)) == (65, 15, 20)
    frac = n_pos / n
    for part in (tr, val, cal):
        assert abs(labels[part].mean() - frac) <= 1.0 / len(part) + 1e-12
    # deterministic for a seed
    again = split_indices(labels, train)
    for a, b in zip((tr, val, cal), again):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_pos", [5, 95, 0])
def test_split_indices_too_few_minority(n_pos):
    with pytest.raises(probe_ase.LabelError, match=f"only {min(n_pos, 100 - n_pos)} structures"):
        split_indices(_labels(100, n_pos), TrainConfig())


def test_split_indices_six_minority_is_enough():
    tr, val, cal = split_indices(_labels(100, 6), TrainConfig())
    assert len(tr) + len(val) + len(cal) == 100
