"""Error criteria, tolerances and labels on small hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

import probe_ase
from probe_ase.fitting.labels import (
    CRITERIA,
    UNITS,
    check_criterion,
    make_labels,
    needs_forces,
    resolve_tolerance,
    structure_error,
)

REF_F = np.zeros((2, 3))


def test_criteria_and_units():
    assert set(CRITERIA) == {"force_rmse", "force_max", "energy_per_atom", "energy"}
    assert UNITS == {"force_rmse": "eV/Å", "force_max": "eV/Å", "energy_per_atom": "eV/atom", "energy": "eV"}
    assert needs_forces("force_rmse") and needs_forces("force_max")
    assert not needs_forces("energy") and not needs_forces("energy_per_atom")


def test_force_rmse_hand_case():
    # dF = [[1,2,2],[2,1,2]]: squares sum 1+4+4+4+1+4 = 18 over 6 components -> sqrt(3)
    pred = np.array([[1.0, 2.0, 2.0], [2.0, 1.0, 2.0]])
    assert structure_error("force_rmse", 0.0, 0.0, pred, REF_F) == pytest.approx(np.sqrt(3.0))
    # dF = [[3,4,0],[0,0,1]]: (9+16+1)/6 -> sqrt(26/6); sign of dF does not matter
    pred = np.array([[3.0, -4.0, 0.0], [0.0, 0.0, -1.0]])
    assert structure_error("force_rmse", 0.0, 0.0, pred, REF_F) == pytest.approx(np.sqrt(26 / 6))


def test_force_max_hand_case():
    # per-atom norms |[3,4,0]| = 5 and |[0,0,1]| = 1 -> 5 (not the largest component, 4)
    ref = np.array([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    pred = ref + np.array([[3.0, -4.0, 0.0], [0.0, 0.0, 1.0]])
    assert structure_error("force_max", 0.0, 0.0, pred, ref) == pytest.approx(5.0)
    # both atoms have norm 3 -> 3
    pred = np.array([[1.0, 2.0, 2.0], [2.0, 1.0, 2.0]])
    assert structure_error("force_max", 0.0, 0.0, pred, REF_F) == pytest.approx(3.0)


def test_force_criteria_ignore_energy():
    pred = np.array([[1.0, 2.0, 2.0], [2.0, 1.0, 2.0]])
    assert structure_error("force_max", -5.0, 7.0, pred, REF_F) == pytest.approx(3.0)


def test_energy_hand_case():
    # |(-10.0) - (-10.6)| = 0.6 eV, either sign
    assert structure_error("energy", -10.0, -10.6) == pytest.approx(0.6)
    assert structure_error("energy", -10.6, -10.0) == pytest.approx(0.6)
    assert structure_error("energy", 2.5, 2.5) == 0.0


def test_energy_per_atom_hand_case():
    # 0.6 eV over 3 atoms -> 0.2 eV/atom; atom count from pred forces or, if absent, ref forces
    forces = np.zeros((3, 3))
    assert structure_error("energy_per_atom", -10.0, -10.6, forces, None) == pytest.approx(0.2)
    assert structure_error("energy_per_atom", -10.0, -10.6, None, forces) == pytest.approx(0.2)
    # 1.2 eV over 4 atoms -> 0.3 eV/atom
    assert structure_error("energy_per_atom", 1.2, 0.0, np.zeros((4, 3)), np.ones((4, 3))) == pytest.approx(0.3)


def test_resolve_tolerance_threshold():
    errors = np.array([0.1, 0.5, 0.9])
    assert resolve_tolerance(errors, threshold=0.25) == 0.25
    assert isinstance(resolve_tolerance(errors, threshold=1), float)


@pytest.mark.parametrize("q", [0.1, 0.3, 0.7, 0.95])
def test_resolve_tolerance_quantile_matches_numpy(q):
    errors = np.random.default_rng(3).gamma(2.0, 0.05, size=57)
    assert resolve_tolerance(errors, quantile=q) == pytest.approx(float(np.quantile(errors, q)), rel=1e-12)


def test_resolve_tolerance_quantile_hand_case():
    # linear interpolation: 0.5 quantile of [1,2,3,4] is 2.5
    assert resolve_tolerance(np.array([4.0, 1.0, 3.0, 2.0]), quantile=0.5) == pytest.approx(2.5)


def test_resolve_tolerance_needs_exactly_one():
    errors = np.array([0.1, 0.2])
    with pytest.raises(probe_ase.InputError, match="exactly one"):
        resolve_tolerance(errors)
    with pytest.raises(probe_ase.InputError, match="exactly one"):
        resolve_tolerance(errors, threshold=0.1, quantile=0.5)


@pytest.mark.parametrize("q", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_resolve_tolerance_bad_quantile(q):
    with pytest.raises(probe_ase.InputError, match="quantile"):
        resolve_tolerance(np.array([0.1, 0.2]), quantile=q)


@pytest.mark.parametrize("t", [0.0, -0.1, float("inf"), float("nan")])
def test_resolve_tolerance_bad_threshold(t):
    with pytest.raises(probe_ase.InputError, match="threshold"):
        resolve_tolerance(np.array([0.1, 0.2]), threshold=t)


def test_make_labels_reliable_is_error_at_most_tau():
    labels = make_labels(np.array([0.1, 0.3, 0.2, 0.5]), 0.2)
    np.testing.assert_array_equal(labels, [1, 0, 1, 0])  # 0.2 <= 0.2 is reliable
    assert labels.dtype == np.int64


def test_make_labels_all_reliable():
    with pytest.raises(probe_ase.LabelError, match=r"all 3 structures are reliable"):
        make_labels(np.array([0.1, 0.2, 0.3]), 0.3)


def test_make_labels_all_unreliable():
    with pytest.raises(probe_ase.LabelError, match=r"all 3 structures are unreliable"):
        make_labels(np.array([0.1, 0.2, 0.3]), 0.05)


def test_label_error_is_probe_error():
    assert issubclass(probe_ase.LabelError, probe_ase.ProbeError)
    assert issubclass(probe_ase.InputError, ValueError)


def test_unknown_criterion():
    with pytest.raises(probe_ase.InputError, match="unknown criterion 'force_mae'"):
        check_criterion("force_mae")
    with pytest.raises(probe_ase.InputError, match="unknown criterion"):
        structure_error("rmse", 0.0, 1.0, REF_F, REF_F)
    with pytest.raises(probe_ase.InputError, match="unknown criterion"):
        needs_forces("Energy")
    assert check_criterion("energy") == "energy"
