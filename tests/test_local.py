"""Local reliability: per-atom labels, outputs, gating and region extraction."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule
from ase.geometry import get_distances
from ase.io import read
from ase.md.verlet import VelocityVerlet

from probe_ase import (HeadConfig, InputError, MismatchError, Probe, ProbeCalculator, ReliabilityMonitor,
                       TrainConfig, fit_probe, metrics)
from probe_ase.regions import extract_regions
from probe_ase.testing import assert_invariant, emt_frames, hot_spot_frames


@pytest.fixture(scope="module")
def local_probe(backbones):
    """A head with a per-atom logit, fitted on thermal 108-atom cells and cells with one hot spot each."""
    pool = emt_frames(12, 300, size=3, seed=11) + hot_spot_frames(24, seed=12)
    return fit_probe(backbones("mace"), pool, criterion="force_rmse", quantile=0.7, atom_quantile=0.9,
                     config=HeadConfig(hidden=32), train=TrainConfig(epochs=30, patience=10), progress=False,
                     cache_dir=False)


@pytest.fixture(scope="module")
def local_calc(backbones, local_probe):
    with ProbeCalculator(backbones("mace"), local_probe) as calc:
        yield calc


def atom_scores(calc, frames):
    """Per-atom reliability and force-error norm (eV/Å) over ``frames``."""
    p, error = [], []
    for frame in frames:
        atoms = frame.copy()
        atoms.calc = calc
        forces = atoms.get_forces()
        p.append(calc.results["atom_reliability"])
        error.append(np.linalg.norm(forces - frame.get_forces(), axis=1))
    return np.concatenate(p), np.concatenate(error)


def test_atom_reliability_finds_the_hot_spot_atoms(local_calc, local_probe):
    """Learning test: held-out hot spots, per-atom AUROC >= 0.8 against |ΔF_i| > atom tolerance."""
    meta = local_probe.meta
    assert meta.local and meta.atom_quantile == 0.9 and meta.atom_tau > 0 and 0 < meta.atom_p_star <= 1
    p, error = atom_scores(local_calc, hot_spot_frames(10, seed=13))
    assert p.min() >= 0 and p.max() <= 1
    bad = error > meta.atom_tau
    assert 0.02 < bad.mean() < 0.5  # both kinds of atom are there
    assert metrics.auroc(bad, 1 - p) >= 0.8
    report = local_probe.report["atoms"]
    assert report["auroc"] >= 0.8 and report["n_atoms"] > 500
    assert report["risk_at_p_star"] <= local_probe.meta.target_risk + 1e-9


def test_structure_verdict_misses_what_atoms_see(local_calc, local_probe):
    """Hot-spot cells whose structure probability passes still have their hot atoms marked."""
    marked = 0
    for frame in hot_spot_frames(10, seed=14):
        atoms = frame.copy()
        atoms.calc = local_calc
        atoms.get_forces()
        bad = ~local_probe.atom_verdict(local_calc.results["atom_reliability"], local_calc.results["atom_novelty"])
        if bad.any():
            centre = frame.info["hot_spot"]
            distance = atoms.get_distances(centre, np.flatnonzero(bad), mic=True)
            marked += np.median(distance) < 4.0  # the marked atoms sit at the hot spot
    assert marked >= 7


def test_per_atom_outputs_are_invariant_and_follow_permutation(local_calc):
    assert "atom_reliability" in local_calc.implemented_properties
    # float32 features: a steep atom logit turns their rounding into ~1e-5 of probability
    assert_invariant(local_calc, hot_spot_frames(1, seed=15)[0], tol=1e-4, novelty_tol=1e-3)


def test_head_file_keeps_the_atom_logit(local_probe, backbones, tmp_path):
    local_probe.save(tmp_path / "local.pt")
    loaded = Probe.load(tmp_path / "local.pt")
    assert loaded.meta.atom_tau == local_probe.meta.atom_tau and loaded.meta.atom_p_star == local_probe.meta.atom_p_star
    frame = hot_spot_frames(1, seed=16)[0]
    results = []
    for probe in (local_probe, loaded):
        with ProbeCalculator(backbones("mace"), probe) as calc:
            atoms = frame.copy()
            atoms.calc = calc
            atoms.get_forces()
            results.append(calc.results["atom_reliability"])
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


def test_heads_without_atoms_say_so(backbones, probes, cu_data):
    atoms = cu_data["test_in"][0].copy()
    with ProbeCalculator(backbones("mace"), probes("mace")) as calc:
        atoms.calc = calc
        atoms.get_forces()
        assert "atom_reliability" not in calc.results and "atom_reliability" not in calc.implemented_properties
        with pytest.raises(MismatchError, match="no per-atom logit"):
            calc.probe.atom_verdict(np.ones(len(atoms)), np.zeros(len(atoms)))
        with pytest.raises(InputError, match="per-atom reliability"):
            ReliabilityMonitor(VelocityVerlet(atoms, units.fs), min_atom_reliability=0.5)


def test_atom_labels_need_reference_forces(backbones, cu_data):
    frames = []
    for frame in cu_data["pool"][:40]:
        copy = frame.copy()
        copy.info["energy"] = frame.get_potential_energy()  # energy only: no reference forces
        frames.append(copy)
    with pytest.raises(Exception, match="per-atom labels need reference forces"):
        fit_probe(backbones("mace"), frames, criterion="energy", quantile=0.7, atom_threshold=0.1, progress=False,
                  cache_dir=False)


def test_monitor_logs_and_flags_unreliable_atoms(local_calc, local_probe, tmp_path):
    atoms = hot_spot_frames(1, seed=17)[0]
    atoms.calc = local_calc
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    threshold = local_probe.meta.atom_p_star
    with ReliabilityMonitor(dyn, action="flag", threshold=0.0, min_atom_reliability="auto", log=tmp_path / "r.log",
                            flagged=tmp_path / "f.xyz") as monitor:
        dyn.attach(monitor, interval=1)
        dyn.run(3)
    assert monitor.min_atom_reliability == threshold
    lines = [line.split() for line in open(tmp_path / "r.log") if not line.startswith("#")]
    assert len(lines) == 4
    flagged = read(tmp_path / "f.xyz", ":")
    assert monitor.summary()["low_atom_reliability_steps"] == len(flagged) > 0  # threshold 0: only atoms decide
    for frame in flagged:
        line = next(x for x in lines if int(x[0]) == frame.info["step"])
        bad = np.flatnonzero(frame.arrays["atom_reliability"] < threshold)
        assert line[7] == "low_atom_reliability" and int(line[8]) == len(bad)
        assert line[9].split(",")[: len(bad)] == [str(i) for i in bad[:20]]
        np.testing.assert_array_equal(frame.arrays["atom_unreliable"], frame.arrays["atom_reliability"] < threshold)


# --- region extraction ---------------------------------------------------------------


def test_region_across_the_periodic_boundary_is_whole():
    cell = bulk("Cu", "fcc", a=3.61, cubic=True) * (6, 6, 6)
    _, distance = get_distances(cell.positions[:1], cell.positions, cell=cell.cell, pbc=True)
    core = np.flatnonzero(distance[0] < 2.6)  # atom 0 at the corner and its 12 neighbours: spans every boundary
    (region,) = extract_regions(cell, core, buffer=4.0)
    assert not region.periodic and not region.atoms.pbc.any()
    assert sorted(region.source_index[region.core]) == sorted(core)
    _, expected = get_distances(cell.positions[:1], cell.positions, cell=cell.cell, pbc=True)
    _, to_core = get_distances(cell.positions[core], cell.positions, cell=cell.cell, pbc=True)
    assert set(region.source_index) == set(np.flatnonzero(to_core.min(0) <= 4.0))  # every atom within the buffer
    _, in_cell = get_distances(cell.positions[region.source_index], cell=cell.cell, pbc=True)
    _, in_region = get_distances(region.atoms.positions)
    np.testing.assert_allclose(in_region, in_cell, atol=1e-9)  # the cut keeps every distance
    np.testing.assert_array_equal(region.atoms.arrays["source_index"], region.source_index)
    np.testing.assert_array_equal(region.atoms.numbers, cell.numbers[region.source_index])


def test_far_apart_cores_give_separate_regions_and_small_cells_stay_periodic():
    cell = bulk("Cu", "fcc", a=3.61, cubic=True) * (6, 6, 6)
    _, distance = get_distances(cell.positions[:1], cell.positions, cell=cell.cell, pbc=True)
    far = int(np.argmax(distance[0]))
    regions = extract_regions(cell, [0, far], buffer=3.0)
    assert [int(r.core.sum()) for r in regions] == [1, 1] and [len(r.atoms) for r in regions] == [13, 13]  # 1 + 12
    assert not extract_regions(cell, [], buffer=3.0)
    small = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    (whole,) = extract_regions(small, [0], buffer=4.0)
    assert whole.periodic and len(whole.atoms) == len(small) and whole.core.sum() == 1
    water = molecule("H2O")
    (region,) = extract_regions(water, [0], buffer=0.5)  # a molecule: no periodic images at all
    assert len(region.atoms) == 1 and not region.periodic
    with pytest.raises(InputError, match="buffer"):
        extract_regions(cell, [0], buffer=0)
    with pytest.raises(InputError, match="indices"):
        extract_regions(cell, [len(cell)], buffer=2.0)
