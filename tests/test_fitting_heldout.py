"""Held-out scores (:mod:`probe_ase.fitting.heldout`): cross-fitted fold heads score every structure but the
grid's, and their mean is the deployed head."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import held_out_scores

from probe_ase import FitOptions, fit_probe
from probe_ase.evaluation.metrics import auroc


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
