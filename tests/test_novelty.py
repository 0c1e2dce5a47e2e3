"""Novelty and the fail-safe verdict: unseen shifts are caught, the scale means what it says."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from conftest import fit_with

from probe_ase import FitOptions, InputError, Probe, ProbeCalculator, featurize, find_tap, fit_probe
from probe_ase.fitting.train import TrainConfig
from probe_ase.model.head import HeadConfig
from probe_ase.model.graph import HeadGraph
from probe_ase.model.headfile import save_head
from probe_ase.evaluation.metrics import auroc
from probe_ase.model.novelty import NoveltyConfig, logit_penalty, structure_novelty
from probe_ase.fitting.data import FeatureSet
from probe_ase.fitting.novelty import fit_logit_weight, fit_novelty
from probe_ase.testing import assert_invariant, emt_frames


def feature_set(features: torch.Tensor, numbers: torch.Tensor, ptr: np.ndarray) -> FeatureSet:
    """Per-atom features of structures ``ptr`` as a feature set without errors."""
    return FeatureSet(features, numbers, ptr, {}, np.full(len(numbers), np.nan))


def labelled(atoms):
    atoms.calc = EMT()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def fit_cold(backbone, novelty: NoveltyConfig):
    """A head fitted on 300 K frames only: it has never seen a shift."""
    pool = emt_frames(120, 300, seed=50)
    return fit_with(backbone, pool, criterion="force_rmse", quantile=0.7, head=HeadConfig(hidden=32),
                    train=TrainConfig(epochs=60, patience=10), novelty=novelty)


@pytest.fixture(scope="module")
def cold_probe(backbones):
    """Novelty kept out of the probability: what the head alone says, and the verdict's override."""
    return fit_cold(backbones("mace"), NoveltyConfig(logit_weight=False))


def shifted_frames():
    compressed = emt_frames(6, 300, strain=-0.03, seed=51)
    slabs = []
    for frame in emt_frames(6, 300, seed=52):
        slab = frame.copy()
        slab.pbc = [True, True, False]
        slab.center(vacuum=6.0, axis=2)
        slabs.append(labelled(slab))
    return {"compressed 3 %": compressed, "surface slab": slabs}


def test_unseen_shift_passes_the_probability_but_not_the_verdict(cold_probe, backbones):
    calc = ProbeCalculator(backbones("mace"), cold_probe)
    passed_by_p_only = []
    for name, frames in shifted_frames().items():
        for atoms in frames:
            atoms = atoms.copy()
            atoms.calc = calc
            atoms.get_forces()
            r = calc.results
            assert r["reliable"] == (r["reliability"] >= calc.threshold and r["novelty"] <= 1.0)
            if r["reliability"] >= calc.threshold and r["reason"] == "out_of_support":
                passed_by_p_only.append(name)
    # compressed cells (never in the pool) leave the support; some keep a probability above p* (2 of 6 with the
    # default head, whose atom-error regression already lowers the rest; 3 or more without it)
    assert passed_by_p_only.count("compressed 3 %") >= 1, passed_by_p_only
    # in distribution, the support holds fresh frames (about 90 % by the default support_quantile)
    fresh = emt_frames(20, 300, seed=53)
    novelty = []
    for atoms in fresh:
        atoms.calc = calc
        atoms.get_forces()
        novelty.append(calc.results["novelty"])
    assert np.mean(np.array(novelty) <= 1.0) >= 0.7
    calc.close()


def test_novelty_in_the_probability_lowers_it_on_the_unseen_shift(cold_probe, backbones):
    """The default head learns a novelty weight on out-of-fold logits; the shift's probability then drops below p*."""
    weighted = fit_cold(backbones("mace"), NoveltyConfig())
    w = weighted.meta.calibration.novelty_weight
    assert cold_probe.meta.calibration.novelty_weight == 0.0 and w > 0 and weighted.report["novelty_weight"] == w
    assert weighted.report["novelty_weight_folds"] == 5 and cold_probe.report["novelty_weight_folds"] == 0
    # reliability = sigmoid((logit - w log(mean atom novelty)) / T), as documented: the same head at w = 0
    unweighted = Probe(weighted.head, replace(weighted.meta, calibration=replace(weighted.meta.calibration,
                                                                                  novelty_weight=0.0)), weighted.novelty)
    atoms = shifted_frames()["compressed 3 %"][0]
    results = []
    for probe in (weighted, unweighted):
        calc = ProbeCalculator(backbones("mace"), probe)
        atoms.calc = calc
        atoms.get_forces()
        results.append(dict(calc.results))
        calc.close()
    temperature = weighted.meta.calibration.temperature
    logit = temperature * np.log(results[1]["reliability"] / (1 - results[1]["reliability"]))
    expected = 1 / (1 + np.exp(-(logit - w * np.log(results[0]["atom_novelty"].mean())) / temperature))
    assert results[0]["reliability"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    compressed = shifted_frames()["compressed 3 %"]
    below = []
    for probe in (cold_probe, weighted):
        calc = ProbeCalculator(backbones("mace"), probe)
        p = []
        for atoms in compressed:
            atoms = atoms.copy()
            atoms.calc = calc
            atoms.get_forces()
            p.append(calc.results["reliability"])
        below.append(np.mean(np.array(p) < probe.p_star))
        calc.close()
    assert below[1] > below[0] and below[1] >= 0.5, below


def test_batched_penalty_reads_each_structures_own_mean_novelty(cold_probe, backbones):
    """A batch of structures of different sizes scores as each structure alone, its penalty on its own mean atom
    novelty: the documented formula, structure by structure."""
    frames = shifted_frames()["compressed 3 %"][:2]
    frames = [frames[0], labelled(frames[1].repeat((2, 1, 1))), shifted_frames()["surface slab"][0]]
    with find_tap(backbones("mace")) as tap:
        fs = featurize(tap, frames, cache_dir=False, progress=False)
    graph = HeadGraph(cold_probe.meta.config.cutoff)
    edges = graph.frames(frames)
    calibration = replace(cold_probe.meta.calibration, novelty_weight=2.0)
    probe = Probe(cold_probe.head, replace(cold_probe.meta, calibration=calibration), cold_probe.novelty)
    plain = cold_probe.predict(fs.features, fs.numbers, fs.ptr, edges)  # weight 0: the head's own probability
    batch = probe.predict(fs.features, fs.numbers, fs.ptr, edges)
    for k in range(len(frames)):
        rows = slice(int(fs.ptr[k]), int(fs.ptr[k + 1]))
        alone = probe.predict(fs.features[rows], fs.numbers[rows], np.array([0, rows.stop - rows.start]), [edges[k]])
        assert alone.reliability[0] == pytest.approx(batch.reliability[k], abs=1e-6)
        assert alone.novelty[0] == pytest.approx(batch.novelty[k]) == batch.atom_novelty[rows].max()
        # sigmoid((T logit(p0) - 2 log(mean atom novelty)) / T), p0 the probability at weight 0
        t, p0 = calibration.temperature, plain.reliability[k]
        z = t * np.log(p0 / (1 - p0)) - 2.0 * np.log(max(batch.atom_novelty[rows].mean(), 1e-3))
        assert batch.reliability[k] == pytest.approx(1 / (1 + np.exp(-z / t)), rel=1e-4, abs=1e-7)


def test_logit_weight_recovers_a_known_weight():
    """Simulated held-out structures with P(reliable) = sigmoid(2 z - 3 log n): the weight in z's units is 1.5."""
    rng = np.random.default_rng(0)
    z, log_n = rng.normal(size=4000), rng.normal(scale=0.5, size=4000)
    reliable = rng.uniform(size=4000) < 1 / (1 + np.exp(-(2 * z - 3 * log_n)))
    assert fit_logit_weight(z, np.exp(log_n), reliable) == pytest.approx(1.5, rel=0.15)
    # novelty that *raises* reliability is not used (the weight only ever lowers it), nor one class only
    raising = rng.uniform(size=4000) < 1 / (1 + np.exp(-(2 * z + 3 * log_n)))
    assert fit_logit_weight(z, np.exp(log_n), raising) == 0.0
    assert fit_logit_weight(z, np.exp(log_n), np.ones(4000, bool)) == 0.0


def test_a_logit_that_does_not_rank_leaves_the_ranking_to_novelty():
    """Fail safe: fold heads whose logits rank nothing must not switch novelty off (weight 0), but hand it the ranking."""
    rng = np.random.default_rng(1)
    log_n = rng.normal(scale=0.5, size=4000)
    reliable = rng.uniform(size=4000) < 1 / (1 + np.exp(3 * log_n))  # only novelty predicts
    novelty_auroc = auroc(~reliable, log_n)
    for z in (0.05 * rng.normal(size=4000), np.full(4000, 3.0)):  # a near-flat logit that ranks nothing; a flat one
        weight = fit_logit_weight(z, np.exp(log_n), reliable)
        assert weight > 0
        # the penalised logit ranks as well as novelty alone (weight 0 would leave it at chance, AUROC ~ 0.5)
        assert auroc(~reliable, -(z - weight * log_n)) > novelty_auroc - 0.02
        assert abs(auroc(~reliable, -z) - 0.5) < 0.05


def test_auxiliary_labels_steady_the_weight_of_a_strict_label():
    """About 2 % unreliable structures under the main label (as acac's in-distribution pool): a novelty
    coefficient shared with auxiliary quantile labels (looser tolerances) misses the true weight by less."""
    rng = np.random.default_rng(0)
    alone, joint = [], []
    for _ in range(60):
        quality, log_n = rng.normal(size=260), rng.normal(scale=0.5, size=260)
        z = np.repeat(quality[:, None], 5, axis=1)  # main logit, then four auxiliary logits of the same head
        bias = np.array([6.5, -2.0, -0.5, 1.0, 3.0])  # unreliable: ~2 %, then ~74 / 57 / 38 / 16 %
        reliable = rng.uniform(size=(260, 5)) < 1 / (1 + np.exp(-(2 * z + bias - 3 * log_n[:, None])))
        alone.append(fit_logit_weight(z[:, 0], np.exp(log_n), reliable[:, 0]))
        joint.append(fit_logit_weight(z, np.exp(log_n), reliable))
    miss_alone, miss_joint = np.abs(np.array(alone) - 1.5).mean(), np.abs(np.array(joint) - 1.5).mean()
    assert miss_joint < 0.9 * miss_alone, (miss_joint, miss_alone)
    assert np.median(joint) == pytest.approx(1.5, rel=0.2)


def test_logit_penalty_is_defined_for_infinite_novelty():
    """Novelty is infinite for an element without a density component: p stays a number (0 with a weight, else p)."""
    novelty = torch.tensor([0.5, 1.0, float("inf")], dtype=torch.float64)
    assert torch.equal(logit_penalty(novelty, 0.0), torch.zeros(3, dtype=torch.float64))
    penalty = logit_penalty(novelty, 2.0)
    assert penalty[1] == 0 and penalty[0] < 0 and penalty[2] == float("inf")
    assert torch.sigmoid(torch.tensor(3.0, dtype=torch.float64) - penalty[2]) == 0


def test_novelty_scale_on_known_distributions():
    """Gaussian features: held-out draws sit inside the support, shifted draws far outside."""
    rng = np.random.default_rng(0)
    n_struct, atoms_per = 200, 8
    features = torch.from_numpy(rng.normal(size=(n_struct * atoms_per, 6)))
    numbers = torch.from_numpy(np.where(np.arange(n_struct * atoms_per) % 2, 29, 8))
    ptr = np.arange(0, n_struct * atoms_per + 1, atoms_per)
    model, held_atoms = fit_novelty(feature_set(features, numbers, ptr), np.arange(n_struct), (8, 29), NoveltyConfig())
    held_out = structure_novelty(held_atoms, ptr)  # the fit structures are all of them, in order
    assert np.quantile(held_out, 0.9) == pytest.approx(1.0)  # default edge: 90 % of held-out structures inside
    mean = structure_novelty(held_atoms, ptr, "mean")  # what the logit penalty reads: below the largest, same scale
    assert (mean < held_out).all() and 0.2 < np.median(mean) < 1
    model, held_atoms = fit_novelty(feature_set(features, numbers, ptr), np.arange(n_struct), (8, 29),
                                    NoveltyConfig(support_quantile=1.0))
    assert structure_novelty(held_atoms, ptr).max() == pytest.approx(1.0)  # the radius: the farthest held-out structure
    fresh = torch.from_numpy(rng.normal(size=(4000, 6)))
    numbers_fresh = torch.full((4000,), 29)
    assert (model(fresh, numbers_fresh) <= 1.0).double().mean() > 0.99
    shifted = fresh + torch.tensor([8.0, 0, 0, 0, 0, 0], dtype=fresh.dtype)  # 8 sigma along one axis
    assert (model(shifted, numbers_fresh) > 1.0).float().mean() > 0.9
    # one Gaussian cannot see a gap between two clusters; two components can
    two = torch.cat([features[: len(features) // 2] - 5, features[len(features) // 2 :] + 5])
    middle = torch.zeros(50, 6, dtype=two.dtype)
    one_comp, _ = fit_novelty(feature_set(two, numbers, ptr), np.arange(n_struct), (8, 29), NoveltyConfig(components=1))
    two_comp, _ = fit_novelty(feature_set(two, numbers, ptr), np.arange(n_struct), (8, 29), NoveltyConfig(components=2))
    assert (one_comp(middle, torch.full((50,), 29)) <= 1).all()
    assert (two_comp(middle, torch.full((50,), 29)) > 1).all()


def test_mixtures_fitted_in_worker_processes_are_the_mixtures_fitted_here(monkeypatch):
    """workers=2: the six mixture sets (five out-of-fold, the final) are fitted in two spawned processes of one
    thread each (here small sets too); the model and the held-out novelties are bit for bit those of one thread."""
    from threadpoolctl import threadpool_limits

    from probe_ase.fitting import novelty

    monkeypatch.setattr(novelty, "PARALLEL_WORK", 0)

    rng = np.random.default_rng(3)
    n_struct, atoms_per = 60, 5
    features = torch.from_numpy(rng.normal(size=(n_struct * atoms_per, 4)))
    numbers = torch.from_numpy(np.where(np.arange(n_struct * atoms_per) % 3, 29, 8))
    data = feature_set(features, numbers, np.arange(0, n_struct * atoms_per + 1, atoms_per))
    reference = (torch.from_numpy(rng.normal(size=(40, 4))), torch.full((40,), 29))
    with threadpool_limits(1):
        fits = [fit_novelty(data, np.arange(0, n_struct, 2), (8, 29), NoveltyConfig(), reference, seed=4,
                            workers=workers) for workers in (1, 2)]
    (serial, serial_held), (parallel, parallel_held) = fits
    assert np.array_equal(serial_held, parallel_held) and np.isfinite(serial_held).all()
    for (name, x), (_, y) in zip(serial.state_dict().items(), parallel.state_dict().items()):
        assert torch.equal(x, y), name
    assert serial.active.any() and serial.radius.item() > 0


def test_element_too_rare_to_score_out_of_fold_is_never_in_support():
    """An element in one fit structure has no out-of-fold scale: warned, its atoms always out of support, radius finite."""
    rng = np.random.default_rng(1)
    n_struct, atoms_per = 40, 6
    features = torch.from_numpy(rng.normal(size=(n_struct * atoms_per, 4)))
    numbers = torch.full((n_struct * atoms_per,), 1)
    numbers[:2] = 8  # two O atoms, both in structure 0
    ptr = np.arange(0, n_struct * atoms_per + 1, atoms_per)
    with pytest.warns(UserWarning, match=r"element\(s\) \[8\] occur in too few fit structures"):
        model, held_atoms = fit_novelty(feature_set(features, numbers, ptr), np.arange(n_struct), (1, 8), NoveltyConfig())
    assert np.isfinite(model.radius.item()) and model.radius.item() > 0
    assert np.isinf(held_atoms[:2]).all() and np.isfinite(held_atoms[2:]).all()
    assert np.quantile(structure_novelty(held_atoms, ptr)[1:], 0.9) == pytest.approx(1.0, abs=0.05)
    fresh = torch.from_numpy(rng.normal(size=(10, 4)))
    assert torch.isinf(model(fresh, torch.full((10,), 8))).all()  # fail safe: never in support
    assert torch.isfinite(model(fresh, torch.full((10,), 1))).all()
    # the weight fit leaves infinite novelty out instead of returning nan
    z = rng.normal(size=n_struct)
    novelty = structure_novelty(held_atoms, ptr, "mean")
    weight = fit_logit_weight(z, novelty, z + rng.normal(size=n_struct) > 0)
    assert np.isfinite(weight) and weight >= 0
    # more unscorable structures than the support may leave out (6 of 40, each with an element of its own,
    # against 10 %): a clear error, not an infinite radius that would switch the edge off
    lonely = torch.full((n_struct * atoms_per,), 1)
    lonely[: 6 * atoms_per : atoms_per] = torch.tensor([3, 4, 5, 6, 7, 9])
    with pytest.warns(UserWarning), pytest.raises(InputError, match="no out-of-fold density could score"):
        fit_novelty(feature_set(features, lonely, ptr), np.arange(n_struct), (1, 3, 4, 5, 6, 7, 9), NoveltyConfig())


def test_novelty_is_invariant_on_a_real_backbone(backbones, cold_probe):
    frames = shifted_frames()
    with ProbeCalculator(backbones("mace"), cold_probe) as calc:
        assert_invariant(calc, frames["compressed 3 %"][0])
        # far outside the support (novelty ~6), whitening magnifies float32 rounding of the features
        assert_invariant(calc, frames["surface slab"][0], novelty_tol=1e-3)


def test_reference_data_widens_the_support(backbones, cu_data):
    pool = emt_frames(60, 300, seed=54)
    options = dict(criterion="force_rmse", quantile=0.7, options=FitOptions(hidden=32, epochs=5, patience=5),
                   cache_dir=False, progress=False)
    hot = emt_frames(10, 900, seed=55)
    plain = fit_probe(backbones("mace"), pool, **options)
    widened = fit_probe(backbones("mace"), pool, reference_data=hot, **options)
    assert widened.report["n_reference"] == 32 * 10 and plain.report["n_reference"] == 0
    probe_hot = emt_frames(5, 900, seed=56)
    with ProbeCalculator(backbones("mace"), plain) as a, ProbeCalculator(backbones("mace"), widened) as b:
        for atoms in probe_hot:
            atoms.calc = a
            atoms.get_forces()
            before = a.results["novelty"]
            atoms.calc = b
            atoms.get_forces()
            assert b.results["novelty"] < before


def test_head_file_keeps_novelty_and_certificate(cold_probe, backbones, tmp_path):
    cold_probe.save(tmp_path / "probe.pt")
    loaded = Probe.load(tmp_path / "probe.pt")
    assert loaded.meta == cold_probe.meta
    assert loaded.meta.certified_risk == cold_probe.meta.certified_risk and loaded.meta.delta == 0.1
    for key, value in cold_probe.novelty.state_dict().items():
        assert torch.equal(loaded.novelty.state_dict()[key], value)
    atoms = shifted_frames()["surface slab"][0]
    results = []
    for probe in (cold_probe, loaded):
        with ProbeCalculator(backbones("mace"), probe) as calc:
            atoms.calc = calc
            atoms.get_forces()
            results.append((calc.results["novelty"], calc.results["reason"], calc.results["atom_novelty"].copy()))
    assert results[0][:2] == results[1][:2]
    np.testing.assert_array_equal(results[0][2], results[1][2])


def test_older_head_file_names_both_versions(cold_probe, tmp_path):
    import probe_ase.model.headfile as headfile

    path = tmp_path / "old.pt"
    save_head(cold_probe.head, cold_probe.novelty, cold_probe.meta, path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 1
    torch.save(payload, path)
    readable = ", ".join(map(str, headfile.READABLE))
    with pytest.raises(headfile.HeadFileError,
                       match=rf"version 1; this probe-ase reads versions {readable} \(version 2 added the novelty") as info:
        Probe.load(path)
    assert (info.value.found_version, info.value.version) == (1, headfile.VERSION)
