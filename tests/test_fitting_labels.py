"""Labels (:mod:`probe_ase.fitting.labels`): error criteria, tolerances and labels on small hand-computed cases; a fit
refuses labels it cannot use and criteria its data have no reference for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe_ase
from probe_ase import FitOptions, LabelError, MissingReferenceError, fit_probe
from probe_ase.fitting.data import FeatureSet, featurize
from probe_ase.fitting.labels import (
    CRITERIA,
    UNITS,
    atom_errors,
    check_criterion,
    make_labels,
    make_structure_labels,
    needs_forces,
    resolve_tolerance,
    structure_error,
)
from probe_ase.fitting.spec import FitSpec
from probe_ase.taps import find_tap

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
    # an int threshold above every error is taken as it is, as a float: the errors do not move it
    tau = resolve_tolerance(errors, threshold=1)
    assert tau == 1.0 and type(tau) is float


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


def test_atom_errors_hand_case():
    # ΔF = [[3,-4,0],[0,0,1],[1,2,2]]: norms 5, 1, 3 (eV/Å), whatever the reference forces
    ref = np.array([[1.0, 1.0, 1.0], [0.5, -0.5, 0.0], [-2.0, 0.0, 3.0]])
    pred = ref + np.array([[3.0, -4.0, 0.0], [0.0, 0.0, 1.0], [1.0, 2.0, 2.0]])
    np.testing.assert_allclose(atom_errors(pred, ref), [5.0, 1.0, 3.0])
    assert atom_errors(ref, ref).tolist() == [0.0, 0.0, 0.0]


def _feature_set(force_rmse, energy, atom_error, sizes) -> FeatureSet:
    """A fit pool of ``len(sizes)`` structures with given errors (the features do not enter the labels)."""
    n = sum(sizes)
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    errors = {"force_rmse": np.asarray(force_rmse, float), "force_max": np.full(len(sizes), np.nan),
              "energy": np.asarray(energy, float), "energy_per_atom": np.asarray(energy, float) / np.asarray(sizes)}
    return FeatureSet(torch.zeros(n, 4), torch.full((n,), 29), ptr, errors, np.asarray(atom_error, float))


def test_structure_labels_hand_case():
    """Structures of 2, 1 and 2 atoms: force RMSE 0.1, 0.3, 0.2 eV/Å; atom errors 0.05, 0.4 | 0.2 | 0.1, 0.3 eV/Å."""
    data = _feature_set([0.1, 0.3, 0.2], [0.02, 0.5, 0.01], [0.05, 0.4, 0.2, 0.1, 0.3], [2, 1, 2])
    labels = make_structure_labels(data, FitSpec(criterion="force_rmse", tolerance=0.2))
    assert labels.tau == 0.2 and labels.y.tolist() == [1, 0, 1]  # 0.2 <= 0.2 is reliable
    np.testing.assert_array_equal(labels.errors, [0.1, 0.3, 0.2])
    assert labels.atom_tau is None and labels.atom_y is None  # no atom tolerance: structures only
    # quantile 0.5 of [0.1, 0.3, 0.2] is 0.2; the energy criterion reads its own errors (0.02, 0.5, 0.01 eV)
    assert make_structure_labels(data, FitSpec(quantile=0.5)).tau == pytest.approx(0.2)
    energy = make_structure_labels(data, FitSpec(criterion="energy", tolerance=0.1))
    assert energy.y.tolist() == [1, 0, 1] and energy.errors.tolist() == [0.02, 0.5, 0.01]
    # per energy per atom: 0.01, 0.5, 0.005 eV/atom; at 0.008 only the last is reliable
    assert make_structure_labels(data, FitSpec(criterion="energy_per_atom", tolerance=0.008)).y.tolist() == [0, 0, 1]
    # atoms: reliable iff |ΔF_i| <= atom tolerance; the median of the five atom errors is 0.2
    local = make_structure_labels(data, FitSpec(tolerance=0.25, atom_tolerance=0.2))
    assert local.y.tolist() == [1, 0, 1] and local.atom_tau == 0.2 and local.atom_y.tolist() == [1, 0, 1, 1, 0]
    by_quantile = make_structure_labels(data, FitSpec(tolerance=0.25, atom_quantile=0.5))
    assert by_quantile.atom_tau == pytest.approx(0.2) and by_quantile.atom_y.tolist() == [1, 0, 1, 1, 0]


def test_structure_labels_name_the_structures_without_a_reference():
    data = _feature_set([0.1, np.nan, 0.2], [0.02, 0.5, 0.01], [0.05, 0.4, np.nan, 0.1, 0.3], [2, 1, 2])
    with pytest.raises(probe_ase.MissingReferenceError, match="needs reference forces, missing for 1 structures") as info:
        make_structure_labels(data, FitSpec(tolerance=0.15))
    assert info.value.missing == [1] and info.value.criterion == "force_rmse"
    with pytest.raises(probe_ase.MissingReferenceError, match="per-atom labels need reference forces") as info:
        make_structure_labels(data, FitSpec(criterion="energy", tolerance=0.1, atom_tolerance=0.2))
    assert info.value.missing == [1]
    # force_max was never computed for this pool: every structure lacks it
    with pytest.raises(probe_ase.MissingReferenceError) as info:
        make_structure_labels(data, FitSpec(criterion="force_max", tolerance=0.1))
    assert info.value.missing == [0, 1, 2]


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


def test_unusable_labels_are_clear_errors(backbones, cu_data):
    calc = backbones("mace")
    with pytest.raises(LabelError, match="all 120 structures are reliable") as info:
        fit_probe(calc, cu_data["pool"], criterion="force_rmse", tolerance=100.0, cache_dir=False, progress=False)
    assert (info.value.n, info.value.n_reliable, info.value.tau) == (120, 120, 100.0)
    with pytest.raises(LabelError, match="all 120 structures are unreliable") as info:
        fit_probe(calc, cu_data["pool"], criterion="force_rmse", tolerance=1e-9, cache_dir=False, progress=False)
    assert (info.value.n, info.value.n_reliable, info.value.tau) == (120, 0, 1e-9)


def test_force_criterion_needs_reference_forces(backbones, cu_data):
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = [a.copy() for a in cu_data["pool"]]
    for a, src in zip(frames, cu_data["pool"]):
        a.calc = SinglePointCalculator(a, energy=src.get_potential_energy())  # energy only
    with pytest.raises(MissingReferenceError, match="needs reference forces, missing for 120 structures") as info:
        fit_probe(backbones("mace"), frames, criterion="force_rmse", cache_dir=False, progress=False)
    assert info.value.missing == list(range(120))
    probe = fit_probe(backbones("mace"), frames, criterion="energy", quantile=0.7, options=FitOptions(epochs=3),
                      cache_dir=False, progress=False)
    # the energy criterion labels the pool at the 0.7 quantile of its |ΔE| (eV)
    with find_tap(backbones("mace")) as tap:
        de = featurize(tap, frames, cache_dir=False, progress=False).error("energy")
    assert probe.meta.criterion == "energy" and probe.meta.tau == pytest.approx(np.quantile(de, 0.7), rel=1e-6)
    assert probe.meta.config.atom_error is False  # nothing to regress without reference forces


def test_atom_labels_need_reference_forces(backbones, cu_data):
    frames = []
    for frame in cu_data["pool"][:40]:
        copy = frame.copy()
        copy.info["energy"] = frame.get_potential_energy()  # energy only: no reference forces
        frames.append(copy)
    with pytest.raises(MissingReferenceError, match="per-atom labels need reference forces") as info:
        fit_probe(backbones("mace"), frames, criterion="energy", quantile=0.7, atom_tolerance=0.1, progress=False,
                  cache_dir=False)
    assert info.value.missing == list(range(40))
