"""Head training (:mod:`probe_ase.fitting.train`): auxiliary quantile labels, the atoms' force-error regression,
averaged members, and the out-of-fold logits of fold heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fit_with
from helpers import held_out_scores

from probe_ase import FitOptions, InputError, LabelError, featurize, find_tap, fit_probe
from probe_ase.fitting.train import TrainConfig, out_of_fold_logits
from probe_ase.model.graph import HeadGraph
from probe_ase.model.head import HeadConfig
from probe_ase.model.novelty import NoveltyConfig
from probe_ase.evaluation.metrics import auroc
from probe_ase.scoring import score_frames


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
    torch.set_num_threads(1)  # two threads on busy cores let training runs drift apart (test_fitting_pipeline.py)
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


def test_out_of_fold_logits_rank_structures_their_heads_never_saw(backbones, cu_data):
    """Fold heads' logits come back in the structures' order and rank held-out force errors; folds are checked."""
    pool = cu_data["pool"]
    with find_tap(backbones("mace")) as tap:
        data = featurize(tap, pool, cache_dir=False, progress=False)
        cutoff = tap.cutoff
    errors = data.error("force_rmse")
    labels = (errors <= np.quantile(errors, 0.7)).astype(np.int64)
    edges = HeadGraph(cutoff).frames(pool)
    structures = np.arange(len(pool))[::-1]  # any order: the logits follow it
    elements = sorted(set(data.numbers.tolist()))
    config, train = HeadConfig(hidden=32, cutoff=cutoff), TrainConfig(epochs=60, patience=10)
    z = out_of_fold_logits(data, edges, labels, structures, elements, 4, config, train, progress=False, errors=errors)
    assert z.shape == (len(pool), 1 + len(config.aux_quantiles)) and np.isfinite(z).all()
    assert auroc(labels[structures] == 0, -z[:, 0]) >= 0.75
    with pytest.raises(LabelError, match="out-of-fold"):
        out_of_fold_logits(data, edges, labels, structures[:8], elements, 5, config, train, progress=False,
                           errors=errors)
    with pytest.raises(InputError, match="weight_folds"):
        NoveltyConfig(weight_folds=1)


def test_workers_in_a_daemonic_process_are_a_clear_error(backbones, cu_data, monkeypatch):
    """A multiprocessing.Pool worker is daemonic and may not start processes: workers > 1 there is an InputError
    before any head trains; workers=1 fits."""
    import multiprocessing

    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)
    assert multiprocessing.current_process().daemon
    options = dict(hidden=8, epochs=2, weight_folds=2)
    with pytest.raises(InputError, match="daemonic process") as info:
        fit_probe(backbones("mace"), cu_data["pool"], cache_dir=False, progress=False,
                  options=FitOptions(**options, workers=2))
    assert info.value.workers == 2
    probe = fit_probe(backbones("mace"), cu_data["pool"], cache_dir=False, progress=False,
                      options=FitOptions(**options, workers=1))
    assert probe.report["novelty_weight_folds"] == 2
