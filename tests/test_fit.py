"""Fitting learns a real signal, deterministically, and refuses unusable labels."""

from __future__ import annotations

from dataclasses import astuple, replace

import numpy as np
from scipy.stats import binom
import pytest
import torch

from conftest import fit_with

from probe_ase import FitOptions, LabelError, MissingReferenceError, find_tap, fit_probe
from probe_ase.fitting.train import TrainConfig
from probe_ase.model.head import HeadConfig
from probe_ase.model.novelty import NoveltyConfig
from probe_ase.evaluation.metrics import auroc
from probe_ase.taps import ADAPTERS
from probe_ase.scoring import score_frames


def held_out_scores(calc, probe, frames):
    with probe.tap_for(calc) as tap:
        scored = list(score_frames(probe, tap, frames))
    p = np.array([f.info["reliability"] for f in scored])
    err = np.array([np.sqrt(np.mean((f.arrays["mlip_forces"] - f.get_forces()) ** 2)) for f in scored])
    return p, err


def test_head_separates_shifted_frames(backbone_name, backbones, probes, cu_data):
    """On held-out in-distribution vs hot/strained frames, AUROC >= 0.8."""
    calc, probe = backbones(backbone_name), probes(backbone_name)
    p, err = held_out_scores(calc, probe, cu_data["test_in"] + cu_data["test_out"])
    unreliable = err > probe.meta.tau
    assert 0 < unreliable.sum() < len(err)
    assert auroc(unreliable, 1 - p) >= 0.8
    assert probe.meta.criterion == "force_rmse" and probe.meta.backbone == backbone_name
    assert probe.meta.channels == ADAPTERS[backbone_name].default_channels  # PaiNN: its vector norms too
    report = probe.report
    assert report["n_train"] + report["n_val"] + report["n_cal"] == len(cu_data["pool"])
    assert 0 < probe.meta.p_star and 0 <= probe.meta.coverage <= 1
    cert = report["certificate"]
    # what is certified holds on the calibration split: few enough errors among the accepted for that risk
    assert cert["n_accepted"] == 0 or binom.cdf(cert["n_errors"], cert["n_accepted"], probe.meta.certified_risk) <= 0.1
    assert probe.meta.certified == (probe.meta.certified_risk <= probe.meta.target_risk)


def test_fit_is_deterministic(backbones, cu_data):
    kwargs = dict(criterion="energy_per_atom", quantile=0.7, head=HeadConfig(hidden=16, heads=2),
                  train=TrainConfig(epochs=5, seed=3))
    # one intra-op thread: with two on busy cores (another process running) torch 2.4.1 gave fits 1e-5 apart
    # in the weights from run to run in one process; one thread stayed bitwise repeatable under the same load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = fit_with(backbones("mace"), cu_data["pool"], **kwargs)
        b = fit_with(backbones("mace"), cu_data["pool"], **kwargs)
    finally:
        torch.set_num_threads(threads)
    # same splits, labels and certificate exactly; floats to float32 rounding (newer torch builds
    # may order a reduction differently, so bitwise equality is not what a seed promises)
    assert (a.meta.tau, a.meta.elements, a.report["certificate"]) == (b.meta.tau, b.meta.elements, b.report["certificate"])
    assert {k: a.report[k] for k in ("n_train", "n_val", "n_cal", "epochs")} == \
        {k: b.report[k] for k in ("n_train", "n_val", "n_cal", "epochs")}
    assert a.p_star == pytest.approx(b.p_star, rel=1e-5) and astuple(a.meta.calibration)[:3] == pytest.approx(astuple(b.meta.calibration)[:3], rel=1e-5)
    for (name, x), (_, y) in zip(a.head.state_dict().items(), b.head.state_dict().items()):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_unusable_labels_are_clear_errors(backbones, cu_data):
    calc = backbones("mace")
    with pytest.raises(LabelError, match="all 120 structures are reliable"):
        fit_probe(calc, cu_data["pool"], criterion="force_rmse", tolerance=100.0, cache_dir=False, progress=False)
    with pytest.raises(LabelError, match="unreliable"):
        fit_probe(calc, cu_data["pool"], criterion="force_rmse", tolerance=1e-9, cache_dir=False, progress=False)


def test_force_criterion_needs_reference_forces(backbones, cu_data):
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = [a.copy() for a in cu_data["pool"]]
    for a, src in zip(frames, cu_data["pool"]):
        a.calc = SinglePointCalculator(a, energy=src.get_potential_energy())  # energy only
    with pytest.raises(MissingReferenceError, match="needs reference forces"):
        fit_probe(backbones("mace"), frames, criterion="force_rmse", cache_dir=False, progress=False)
    probe = fit_probe(backbones("mace"), frames, criterion="energy", quantile=0.7, options=FitOptions(epochs=3),
                      cache_dir=False, progress=False)
    assert probe.meta.criterion == "energy"


def test_other_aux_quantiles_fit_learn_and_round_trip(backbones, cu_data, tmp_path):
    from probe_ase import Probe, ProbeCalculator

    calc = backbones("mace")
    config = HeadConfig(hidden=32, aux_quantiles=(0.5, 0.9))
    probe = fit_with(calc, cu_data["pool"], criterion="force_rmse", quantile=0.7, head=config,
                     train=TrainConfig(epochs=80, patience=15))
    assert probe.meta.config.cutoff == pytest.approx(float(calc.r_max))  # default: the backbone's own cutoff
    assert probe.meta.config.aux_quantiles == (0.5, 0.9)
    p, err = held_out_scores(calc, probe, cu_data["test_in"] + cu_data["test_out"])
    assert auroc(err > probe.meta.tau, 1 - p) >= 0.8
    probe.save(tmp_path / "probe.pt")
    loaded = Probe.load(tmp_path / "probe.pt")
    assert loaded.meta == probe.meta
    atoms = cu_data["test_out"][0].copy()
    with ProbeCalculator(calc, loaded) as wrapped:
        atoms.calc = wrapped
        assert wrapped.get_property("reliability", atoms) == pytest.approx(p[len(cu_data["test_in"])], abs=1e-5)


def test_a_head_on_vector_norms_records_its_channels_and_is_checked_for_them(backbones, cu_data, tmp_path):
    """channels="scalars+norms" on MACE: the head file says so, the calculator rebuilds that tap from it and gives
    the scores the head gave; a tap reading other channels is refused, by the calculator and by fit_probe."""
    from probe_ase import InputError, MismatchError, Probe, ProbeCalculator

    calc = backbones("mace")
    probe = fit_probe(calc, cu_data["pool"], criterion="force_rmse", quantile=0.7, cache_dir=False, progress=False,
                      options=FitOptions(channels="scalars+norms", hidden=16, epochs=40, patience=10, weight_folds=0))
    with find_tap(calc) as scalars:
        assert probe.meta.channels == "scalars+norms" and probe.meta.feature_dim > scalars.feature_dim
        with pytest.raises(MismatchError, match="reads the 'scalars\\+norms' channels.*the tap gives 'scalars'"):
            ProbeCalculator(calc, probe, tap=scalars)
        with pytest.raises(InputError, match="options.channels='scalars\\+norms' differ from the tap's 'scalars'"):
            fit_probe(scalars, cu_data["pool"], options=FitOptions(channels="scalars+norms"))
    probe.save(tmp_path / "probe.pt")
    assert Probe.load(tmp_path / "probe.pt").meta == probe.meta
    frames = cu_data["test_in"][:3] + cu_data["test_out"][:3]
    p, err = held_out_scores(calc, probe, frames)
    assert len(set(np.round(p, 6))) > 1  # a probability that moves with the frame
    with ProbeCalculator(calc, tmp_path / "probe.pt") as wrapped:
        assert wrapped.tap.channels == "scalars+norms"
        for atoms, expected in zip(frames, p):
            atoms = atoms.copy()
            atoms.calc = wrapped
            assert wrapped.get_property("reliability", atoms) == pytest.approx(expected, abs=1e-5)


def test_force_heads_regress_each_atoms_error_and_blend_it_into_the_logit(backbones, cu_data, tmp_path):
    from ase.io import read, write

    from probe_ase import Probe, ProbeCalculator, annotate
    from probe_ase.fitting.labels import atom_errors
    from probe_ase.evaluation.metrics import spearman

    calc = backbones("mace")
    probe = fit_probe(calc, cu_data["pool"], criterion="force_rmse", quantile=0.7, cache_dir=False, progress=False,
                      options=FitOptions(hidden=32, epochs=80, patience=15))
    head = probe.head
    assert probe.meta.config.atom_error is True  # auto: a force criterion with reference forces everywhere
    assert (head.error_blend > 0).all()  # every label's logit falls as the predicted error grows
    frames = cu_data["test_in"] + cu_data["test_out"]
    with probe.tap_for(calc) as tap:
        scored = list(score_frames(probe, tap, frames))
    predicted = np.array([s.info["force_error"] for s in scored])  # eV/Å
    true = np.array([np.sqrt(np.mean((s.arrays["mlip_forces"] - f.get_forces()) ** 2))
                     for s, f in zip(scored, frames)])  # the force_rmse criterion: RMS over components
    atom_predicted = np.concatenate([s.arrays["atom_force_error"] for s in scored])
    atom_true = np.concatenate([atom_errors(s.arrays["mlip_forces"], f.get_forces()) for s, f in zip(scored, frames)])
    # held-out frames: the predicted force errors rank the true ones, per structure and per atom ...
    assert spearman(predicted, true) >= 0.7
    assert spearman(atom_predicted, atom_true) >= 0.5
    # ... in eV/Å: each structure's is the RMS of its atoms', and a median-like estimate of the true errors
    np.testing.assert_allclose(predicted[0], np.sqrt(np.mean(scored[0].arrays["atom_force_error"] ** 2) / 3), rtol=1e-5)
    assert 0.2 <= np.mean(atom_true > atom_predicted) <= 0.8
    assert 0.5 <= np.median(true / predicted) <= 2.0

    probe.save(tmp_path / "probe.pt")
    loaded = Probe.load(tmp_path / "probe.pt")
    for name in ("error_shift", "error_scale", "error_blend", "error_centre"):
        torch.testing.assert_close(getattr(loaded.head, name), getattr(head, name))
    # the calculator gives the same estimates every step, and writers keep them
    atoms = frames[-1].copy()
    with ProbeCalculator(calc, loaded) as probe_calc:
        atoms.calc = probe_calc
        atoms.get_forces()
        assert {"force_error", "atom_force_error"} <= set(probe_calc.implemented_properties)
        assert probe_calc.results["force_error"] == pytest.approx(predicted[-1], rel=1e-4)
        np.testing.assert_allclose(probe_calc.results["atom_force_error"], scored[-1].arrays["atom_force_error"],
                                   rtol=1e-4)
        write(tmp_path / "frame.xyz", annotate(atoms), format="extxyz")
    back = read(tmp_path / "frame.xyz")
    assert back.info["force_error"] == pytest.approx(predicted[-1], rel=1e-4)
    np.testing.assert_allclose(back.arrays["atom_force_error"], scored[-1].arrays["atom_force_error"], rtol=1e-4)


def test_averaged_heads_are_their_members_mean_and_round_trip(backbones, cu_data, tmp_path):
    """HeadConfig(members=3): three heads (seeds 0, 1, 2) averaged; member 0 is the single head of the same seed."""
    from ase.build import sort

    from probe_ase import Probe, ProbeCalculator
    from probe_ase.fitting.data import featurize
    from probe_ase.model.graph import HeadGraph
    from probe_ase.model.head import batch_inputs

    calc = backbones("mace")
    kwargs = dict(criterion="force_rmse", quantile=0.7, atom_quantile=0.9, train=TrainConfig(epochs=30, patience=10),
                  novelty=NoveltyConfig(weight_folds=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on busy cores let training runs drift apart (test_fit_is_deterministic)
    try:
        probe = fit_with(calc, cu_data["pool"], head=HeadConfig(hidden=16, heads=2, members=3), **kwargs)
        single = fit_with(calc, cu_data["pool"], head=HeadConfig(hidden=16, heads=2), **kwargs)
    finally:
        torch.set_num_threads(threads)
    head = probe.head
    assert probe.meta.config.members == 3 and head.embed.shape[0] == 3 and single.head.embed.shape[0] == 1
    assert head.state_dict().keys() == single.head.state_dict().keys()
    for name, value in single.head.state_dict().items():  # member 0 is the single head of the same seed
        torch.testing.assert_close(head.state_dict()[name][:1] if name != "element_index" else head.element_index,
                                   value, msg=name)
    assert probe.meta.calibration != single.meta.calibration  # calibrated on the average, not on member 0
    assert not torch.equal(head.readout[-1].weight[1], head.readout[-1].weight[2])
    frames = cu_data["test_in"] + cu_data["test_out"]
    with probe.tap_for(calc) as tap:
        fs = featurize(tap, frames, cache_dir=False, progress=False)
    inputs = batch_inputs(fs.features, fs.numbers, fs.ptr, HeadGraph(probe.meta.config.cutoff).frames(frames),
                          range(len(frames)))
    with torch.no_grad():
        mean = head.all_logits(*inputs)
        members = head.member_logits(*inputs)
    for i in range(4):  # logits, importances, atom logits, predicted atom errors: the members' means
        torch.testing.assert_close(mean[i], members[i].mean(0))
    p, err = held_out_scores(calc, probe, frames)
    assert auroc(err > probe.meta.tau, 1 - p) >= 0.8
    probe.save(tmp_path / "probe.pt")
    loaded = Probe.load(tmp_path / "probe.pt")
    assert loaded.meta == probe.meta
    atoms = frames[-1].copy()
    moved = sort(atoms, tags=np.random.default_rng(0).permutation(len(atoms)))  # permuted ...
    moved.rotate(37, (1, 2, 3), rotate_cell=True)  # ... rotated and translated
    moved.translate((0.4, -1.1, 2.0))
    with ProbeCalculator(calc, loaded) as wrapped:
        atoms.calc = wrapped
        assert wrapped.get_property("reliability", atoms) == pytest.approx(p[-1], abs=1e-5)
        moved.calc = wrapped
        assert wrapped.get_property("reliability", moved) == pytest.approx(p[-1], abs=1e-5)
    assert loaded._compiled().original_name == "ProbeHead"  # the steps ran the members batched, compiled


def test_energy_heads_leave_atom_errors_out_and_refuse_them_without_forces(backbones, cu_data):
    from ase.calculators.singlepoint import SinglePointCalculator

    from probe_ase import InputError

    calc = backbones("mace")
    kwargs = dict(criterion="energy", quantile=0.7, train=TrainConfig(epochs=3))
    energy_head = fit_with(calc, cu_data["pool"], **kwargs)
    assert energy_head.meta.config.atom_error is False
    with energy_head.tap_for(calc) as tap:
        scored = next(score_frames(energy_head, tap, cu_data["test_in"][:1]))
    assert "force_error" not in scored.info and "atom_force_error" not in scored.arrays  # no estimate without it
    frames = [a.copy() for a in cu_data["pool"]]
    for a, src in zip(frames, cu_data["pool"]):
        a.calc = SinglePointCalculator(a, energy=src.get_potential_energy())  # energy only
    with pytest.raises(InputError, match="atom_error=True.*needs reference forces"):
        fit_with(calc, frames, head=HeadConfig(atom_error=True), **kwargs)


def test_a_miscompiled_head_falls_back_to_the_eager_one(backbones, probes, cu_data, monkeypatch):
    """The scripted head is checked against the eager one before use; a wrong one is refused, with a warning."""
    import copy

    from probe_ase.fitting.data import featurize
    from probe_ase.model.graph import HeadGraph

    frames = cu_data["test_out"][:3]
    with probes("mace").tap_for(backbones("mace")) as tap:
        fs = featurize(tap, frames, cache_dir=False, progress=False)
    edges = HeadGraph(probes("mace").meta.config.cutoff).frames(frames)
    right, wrong = copy.deepcopy(probes("mace")), copy.deepcopy(probes("mace"))
    right._frozen = wrong._frozen = None
    expected = right.predict(fs.features, fs.numbers, fs.ptr, edges)  # scripted, and checked
    assert isinstance(right._compiled(), torch.jit.ScriptModule)

    class Wrong(torch.nn.Module):  # what a miscompiled head might give: the right shapes, wrong numbers
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, *inputs):
            logits, *rest = self.head(*inputs)
            return (logits + 1.0, *rest)

    monkeypatch.setattr(torch.jit, "freeze", lambda module: Wrong(wrong.head))
    with pytest.warns(UserWarning, match="running it eagerly"):
        got = wrong.predict(fs.features, fs.numbers, fs.ptr, edges)
    assert wrong._compiled() is wrong.head
    np.testing.assert_allclose(got.reliability, expected.reliability, rtol=1e-5)


def test_crossfit_calibration_scores_every_structure_and_deploys_the_fold_heads_mean(backbones, cu_data, tmp_path):
    """calibration="crossfit": all structures but the grid share calibrate (4x the split's here), the head file
    holds the fold heads' mean, which ranks held-out shifted frames and round-trips; active learning's refit keeps
    the scheme; bad options are clear errors."""
    from probe_ase import InputError, Probe
    from probe_ase.al.retrain import refit_spec

    calc = backbones("mace")
    crossfit = FitOptions(hidden=16, epochs=40, patience=10, calibration="crossfit", folds=3)
    probe = fit_probe(calc, cu_data["pool"], criterion="force_rmse", quantile=0.7, options=crossfit, cache_dir=False,
                      progress=False)
    report, n = probe.report, len(cu_data["pool"])
    assert report["calibration"] == "crossfit" and report["folds"] == 3 and report["novelty_weight_folds"] == 3
    assert report["n_cal"] + report["n_grid"] == n and report["n_cal"] >= 4 * round(0.2 * n)
    assert report["certificate"]["n_accepted"] <= report["n_cal"]
    assert probe.meta.config.members == 3 and probe.head.embed.shape[0] == 3
    p, err = held_out_scores(calc, probe, cu_data["test_in"] + cu_data["test_out"])
    assert auroc(err > probe.meta.tau, 1 - p) >= 0.8
    probe.save(tmp_path / "probe.pt")
    loaded = Probe.load(tmp_path / "probe.pt")
    assert loaded.meta == probe.meta
    assert np.allclose(held_out_scores(calc, loaded, cu_data["test_in"][:4])[0], p[:4], atol=1e-6)
    refit = refit_spec(loaded.meta, head_epochs=5, seed=1).options
    assert (refit.calibration, refit.folds, refit.epochs, refit.seed) == ("crossfit", 3, 5, 1)
    with pytest.raises(InputError, match="calibration must be one of"):
        FitOptions(calibration="cross")
    with pytest.raises(InputError, match="folds must be >= 2"):
        FitOptions(calibration="crossfit", folds=1)
    with pytest.raises(InputError, match="members must be 1 or 3, got 2"):
        FitOptions(calibration="crossfit", folds=3, members=2)


def test_fallback_target_spends_the_certified_risk_on_coverage(backbones, cu_data):
    """Where 5 % cannot be certified, fallback="target" keeps the head and the certified risk but lowers p* to the
    loosest threshold whose calibration risk is <= 5 %; the default's warning says what that would accept; refit
    keeps the rule."""
    from probe_ase.al.retrain import refit_spec

    # ~100 calibration structures: room between the two rules
    options = FitOptions(hidden=16, epochs=20, patience=5, calibration="crossfit", folds=2, weight_folds=0)
    kwargs = dict(criterion="force_rmse", quantile=0.7, cache_dir=False, progress=False)
    with pytest.warns(UserWarning, match="fallback='target' would accept") as caught:
        strict = fit_probe(backbones("mace"), cu_data["pool"], options=options, **kwargs)
    assert any("cannot be certified" in str(w.message) for w in caught)
    aim = fit_probe(backbones("mace"), cu_data["pool"], options=replace(options, fallback="target"), **kwargs)
    s, a = strict.report["certificate"], aim.report["certificate"]
    assert not s["certified"] and (s["fallback"], a["fallback"]) == ("strictest", "target")
    assert a["risk"] == s["risk"] and strict.meta.calibration == aim.meta.calibration
    assert aim.p_star < strict.p_star and a["n_accepted"] > s["n_accepted"]
    assert a["n_errors"] <= 0.05 * a["n_accepted"]
    assert refit_spec(aim.meta, head_epochs=5, seed=1).options.fallback == "target"
    assert refit_spec(strict.meta, head_epochs=5, seed=1).options.fallback == "strictest"
