"""fit_probe end to end (:mod:`probe_ase.fitting.pipeline`): a head that learns a real signal, on every backbone,
deterministically, and checked against the channels its tap reads."""

from __future__ import annotations

from dataclasses import astuple

import numpy as np
from scipy.stats import binom
import pytest
import torch

from conftest import fit_with
from helpers import held_out_scores

from probe_ase import FitOptions, find_tap, fit_probe
from probe_ase.fitting.train import TrainConfig
from probe_ase.model.head import HeadConfig
from probe_ase.evaluation.metrics import auroc
from probe_ase.taps import ADAPTERS


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


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["split", "crossfit"])
def test_heads_trained_in_worker_processes_are_the_heads_trained_here(backbones, cu_data, calibration):
    """FitOptions(workers=2): the fold heads (of the novelty weight, or of cross-fitted calibration) train, and the
    novelty mixtures are fitted, in two spawned processes of one thread each; the head, the novelty model, the
    calibration and p* are bit for bit the serial fit's on one thread."""
    options = dict(hidden=16, epochs=4, weight_folds=3, calibration=calibration, folds=3, members=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fits = [fit_probe(backbones("mace"), cu_data["pool"], criterion="energy_per_atom", quantile=0.7,
                          cache_dir=False, progress=False, options=FitOptions(**options, workers=workers))
                for workers in (1, 2)]
    finally:
        torch.set_num_threads(threads)
    serial, parallel = fits
    assert parallel.meta.spec.options.workers == 2 and serial.meta.spec.options.workers == 1
    assert parallel.p_star == serial.p_star and parallel.meta.calibration == serial.meta.calibration
    assert parallel.report["epochs"] == serial.report["epochs"]
    for (name, x), (_, y) in zip(serial.head.state_dict().items(), parallel.head.state_dict().items()):
        assert torch.equal(x, y), name
    for (name, x), (_, y) in zip(serial.novelty.state_dict().items(), parallel.novelty.state_dict().items()):
        assert torch.equal(x, y), name


def test_a_fit_on_given_features_is_the_fit_on_the_frames(backbones, cu_data):
    """``fit_spec(..., features=...)`` (a subset of a larger pass: the backbone does not run again) fits the head the
    frames themselves fit; features of other frames are refused."""
    from probe_ase import InputError, featurize, find_tap
    from probe_ase.fitting.pipeline import Configs, fit_spec
    from probe_ase.fitting.spec import FitSpec
    from probe_ase.model.novelty import NoveltyConfig

    frames = cu_data["pool"]
    spec, configs = FitSpec(quantile=0.7), Configs(HeadConfig(hidden=16, heads=2), TrainConfig(epochs=5, seed=3),
                                                   NoveltyConfig(weight_folds=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with find_tap(backbones("mace")) as tap:
            whole = featurize(tap, [*frames, *frames[:5]], cache_dir=False, progress=False)
            given = fit_spec(tap, frames, spec, configs=configs, progress=False,
                             features=whole.subset(range(len(frames))))
            plain = fit_spec(tap, frames, spec, configs=configs, progress=False, cache_dir=False)
            with pytest.raises(InputError, match="not those of these"):
                fit_spec(tap, frames, spec, configs=configs, progress=False, features=whole.subset(range(5)))
    finally:
        torch.set_num_threads(threads)
    assert given.meta.tau == pytest.approx(plain.meta.tau, rel=1e-5)
    assert given.report["certificate"] == plain.report["certificate"]
    # the backbone batches the frames differently in the two passes: features agree to float32 rounding, which five
    # epochs of training carry into the weights at ~1e-4
    for (name, x), (_, y) in zip(given.head.state_dict().items(), plain.head.state_dict().items()):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-3, atol=2e-3, err_msg=name)


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
