"""Local reliability: per-atom labels, outputs, gating and region extraction."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule
from ase.geometry import get_distances
from ase.io import read
from ase.md.verlet import VelocityVerlet

from conftest import fit_with

from probe_ase import FitOptions, InputError, MismatchError, Probe, ProbeCalculator, ReliabilityMonitor, fit_probe
from probe_ase.model.head import HeadConfig

from probe_ase.evaluation import metrics
from probe_ase.al.regions import extract_regions
from probe_ase.testing import assert_invariant, emt_frames, hot_spot_frames


@pytest.fixture(scope="module")
def local_probe(backbones):
    """A head with a per-atom logit, fitted on thermal 108-atom cells and cells with one hot spot each."""
    pool = emt_frames(12, 300, size=3, seed=11) + hot_spot_frames(24, seed=12)
    return fit_probe(backbones("mace"), pool, criterion="force_rmse", quantile=0.7, atom_quantile=0.9,
                     options=FitOptions(hidden=32, epochs=30, patience=10), progress=False,
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


def test_active_learning_refit_keeps_the_heads_settings(local_probe, backbones):
    """The retraining step's head refit keeps the atom tolerance, certificate level and novelty options."""
    from dataclasses import replace

    from probe_ase.al.retrain import refit_spec

    spec = local_probe.spec
    spec = replace(spec, delta=0.2, options=replace(spec.options, support_quantile=0.95, weight_folds=0))
    meta = replace(local_probe.meta, spec=spec)
    pool = emt_frames(8, 300, size=3, seed=13) + hot_spot_frames(16, seed=14)
    refit = fit_probe(backbones("mace"), pool, **refit_spec(meta, head_epochs=3, seed=0), cache_dir=False,
                      progress=False)
    assert refit.meta.local and refit.meta.atom_tau == meta.atom_tau and refit.meta.tau == meta.tau
    assert (refit.meta.delta, refit.meta.target_risk) == (0.2, meta.target_risk)
    assert (refit.meta.novelty.support_quantile, refit.meta.novelty.weight_folds) == (0.95, 0)
    assert refit.spec.options.epochs == 3 and refit.meta.config == meta.config


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


def test_bad_atom_options_are_input_errors(backbones, cu_data):
    options = dict(criterion="force_rmse", quantile=0.7, progress=False, cache_dir=False)
    with pytest.raises(InputError, match="needs per-atom labels"):
        fit_with(backbones("mace"), cu_data["pool"], head=HeadConfig(atom_logit=True), criterion="force_rmse",
                 quantile=0.7)
    with pytest.raises(InputError, match="quantile must lie strictly between 0 and 1"):
        fit_probe(backbones("mace"), cu_data["pool"], atom_quantile=1.5, **options)
    with pytest.raises(InputError, match="atom_tolerance or atom_quantile, not both"):
        fit_probe(backbones("mace"), cu_data["pool"], atom_quantile=0.9, atom_tolerance=0.1, **options)


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
        assert line[8] == "low_atom_reliability" and int(line[9]) == len(bad)
        assert line[10].split(",")[: len(bad)] == [str(i) for i in bad[:20]]
        assert float(line[6]) == pytest.approx(frame.info["force_error"], abs=1e-4)  # predicted force RMSE, eV/Å
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


# --- active learning on regions --------------------------------------------------------


def test_active_learning_labels_regions_not_cells(local_calc, local_probe, tmp_path):
    from ase.calculators.emt import EMT

    from probe_ase import ActiveLearner
    from probe_ase.al.retrain import mace_training_frames

    start = hot_spot_frames(1, size=5, seed=18)[0]  # 500 atoms, one hot spot
    learner = ActiveLearner(local_calc, EMT, db=tmp_path / "al.db", region_buffer=3.0)
    assert learner.min_atom_reliability == local_probe.meta.atom_p_star
    counts = learner.explore([start], md=lambda atoms: VelocityVerlet(atoms, 0.5 * units.fs), steps=3, max_new=2,
                             min_separation=1, progress=False)
    assert counts["selected"] >= 1
    sources = {row.id: row for row in learner.db.select(status="source")}
    regions = list(learner.db.select(status="pending"))
    assert sources and regions and all(row.source_id in sources for row in regions)
    for row in regions:
        source = sources[row.source_id].toatoms()
        index, core = row.data["source_index"], row.data["core"]
        assert row.natoms == len(index) < len(source) // 2 and core.sum() == row.n_core > 0
        assert not row.periodic_region and not row.toatoms().pbc.any()
        _, in_source = get_distances(source.positions[index], cell=source.cell, pbc=True)
        _, in_region = get_distances(row.toatoms().positions)
        np.testing.assert_allclose(in_region, in_source, atol=1e-6)  # the mapping is right across the boundary
    assert learner.label(progress=False)["done"] == len(regions)
    frames = learner.labelled()
    training = mace_training_frames(frames)
    for frame, train in zip(frames, training):
        core = frame.arrays["core"]
        np.testing.assert_allclose(train.arrays["REF_forces"][core], frame.get_forces()[core])
        np.testing.assert_allclose(train.arrays["REF_forces"][~core], frame.arrays["mlip_forces"][~core])
    assert learner.export(tmp_path / "regions.xyz") == len(regions)
    exported = read(tmp_path / "regions.xyz", ":")
    assert len(exported) == len(frames)
    for written, frame in zip(exported, frames):  # export writes the labelled frames, in their order
        np.testing.assert_array_equal(written.arrays["core"], frame.arrays["core"])
        np.testing.assert_allclose(written.get_forces(), frame.get_forces(), atol=1e-6)  # the reference's, eV/Å


# --- evaluation and the command line ------------------------------------------------------


def test_evaluate_reports_atoms_and_the_cli_gates_on_them(local_probe, local_calc, backbones, tmp_path, capsys):
    import json

    from ase.io import write

    from probe_ase.cli import main
    from probe_ase.evaluation.evaluate import evaluate

    frames = hot_spot_frames(6, seed=19)
    results = evaluate(local_probe, backbones("mace"), frames, tmp_path / "report")
    atoms = results["atoms"]
    assert atoms["n_atoms"] == 6 * 108 and atoms["auroc"] >= 0.8 and -1 <= atoms["importance_spearman"] <= 1
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["atoms"]["auroc"] == atoms["auroc"]
    assert "## Per-atom" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "atom_roc.png").stat().st_size > 0

    local_calc.tap.save_backbone(tmp_path / "mace.model")  # a hook-free copy: the live tap's hooks do not pickle
    local_probe.save(tmp_path / "local.pt")
    write(tmp_path / "start.xyz", frames[0])
    args = ["md", str(tmp_path / "start.xyz"), "--probe", str(tmp_path / "local.pt"), "--backbone",
            str(tmp_path / "mace.model"), "--ensemble", "nve", "--temperature", "10", "--timestep", "0.5",
            "--steps", "2", "--action", "log", "--threshold", "0", "--min-atom-reliability", "auto",
            "--trajectory", str(tmp_path / "md.traj"), "--log", str(tmp_path / "r.log")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["low_atom_reliability_steps"] >= 1 and summary["max_unreliable_atoms"] >= 1
    with pytest.raises(SystemExit):
        main(args[:-4] + ["--min-atom-reliability", "most"])
