"""Fine-tuning through each library's own trainer (probe_ase.al.finetune): the force error (eV/Å) on labelled
frames falls, the fine-tuned file loads back as a different backbone, the old head is refused on it and the
trainer callable, in a round of the loop, refits one that fits it; a backbone without a route is refused by name."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from ase import units
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin

from probe_ase import ActiveLearner, ALStore, ProbeCalculator, fit_probe
from probe_ase.al.finetune import FineTuner, fine_tune, fine_tune_chgnet
from probe_ase.backbones import load_backbone
from probe_ase.exceptions import BackboneError, InputError, MismatchError
from probe_ase.fitting.labels import mean_force_rmse
from probe_ase.fitting.spec import FitOptions
from probe_ase.taps import find_tap
from probe_ase.testing import emt_frames

from conftest import require_backbone

#: a small head: these tests check the refit's wiring, not its quality
HEAD = FitOptions(hidden=16, epochs=40, patience=10, weight_folds=0)


def hot_md(atoms):
    """Langevin at 1200 K, 2 fs steps, seeded: exploration that leaves the head's support."""
    return Langevin(atoms, 2 * units.fs, temperature_K=1200, friction=0.02, rng=np.random.default_rng(0))


def fingerprint(calc) -> str:
    with find_tap(calc) as tap:
        return tap.fingerprint()


def energy_error(calc, frames) -> float:
    """Mean |E - E_ref| per atom (eV/atom) of ``calc`` on ``frames``."""
    errors = []
    for atoms in frames:
        mlip = atoms.copy()
        mlip.calc = calc
        errors.append(abs(mlip.get_potential_energy() - atoms.get_potential_energy()) / len(atoms))
    return float(np.mean(errors))


def test_a_backbone_without_a_route_is_refused(tmp_path):
    frames = emt_frames(2, 300, size=1, seed=0)
    with pytest.raises(BackboneError, match="no fine-tuning route for a schnet backbone"):
        fine_tune(SimpleNamespace(kind="schnet"), frames, tmp_path, "r1")
    with pytest.raises(InputError, match="chgnet takes none"):
        fine_tune(SimpleNamespace(kind="chgnet"), frames, tmp_path, "r1", extra_args=["--lr=0.1"])
    with pytest.raises(InputError, match="holdout"):
        FineTuner(frames, holdout=1.0)


@pytest.mark.chgnet
@pytest.mark.slow
def test_chgnet_fine_tune_lowers_its_force_error(tmp_path):
    require_backbone("chgnet")
    base = load_backbone("chgnet-0.3.0")
    frames = emt_frames(6, 600, size=1, seed=3)  # six 4-atom Cu cells; EMT's zero of energy is not CHGNet's
    before, offset = mean_force_rmse(base, frames), energy_error(base, frames)
    start = time.perf_counter()
    path = fine_tune_chgnet(base.model, frames, tmp_path / "cu.chgnet", epochs=5, learning_rate=1e-3)
    seconds = time.perf_counter() - start
    tuned = load_backbone(path)
    after = mean_force_rmse(tuned, frames)
    print(f"CHGNet on 6 EMT Cu cells: force RMSE {before:.3f} -> {after:.3f} eV/Å, energy error "
          f"{offset:.3f} -> {energy_error(tuned, frames):.4f} eV/atom, {seconds:.1f} s")
    assert after < 0.6 * before
    assert offset > 1.0 and energy_error(tuned, frames) < 0.02  # the reference offset is aligned away
    assert mean_force_rmse(base, frames) == before  # the pretrained model is left as it was
    assert fingerprint(tuned) != fingerprint(base)
    assert (tmp_path / "cu.chgnet.log").read_text().count("Epoch: [4]") >= 1  # CHGNet's own trainer ran 5 epochs


@pytest.mark.chgnet
@pytest.mark.slow
def test_a_chgnet_round_fine_tunes_it_and_refits_the_head(tmp_path):
    require_backbone("chgnet")
    base = load_backbone("chgnet-0.3.0")
    pool = emt_frames(24, 300, size=1, seed=1) + emt_frames(16, 900, size=1, seed=2)
    old = ProbeCalculator(base, fit_probe(base, pool, quantile=0.7, cache_dir=False, progress=False, options=HEAD))
    learner = ActiveLearner(old, reference=EMT, db=tmp_path / "al.db")
    trainer = FineTuner(pool, work_dir=tmp_path, epochs=5, head_epochs=40)
    start = time.perf_counter()
    report = learner.run_round(emt_frames(2, 300, size=1, seed=5), md=hot_md, steps=100, max_new=8,
                               min_separation=5, trainer=trainer, progress=False, checkpoint_dir=tmp_path / "ckpt")
    seconds = time.perf_counter() - start
    print(f"CHGNet round: {report.labelled} labelled, force RMSE on {len(trainer.held_out)} held out "
          f"{report.force_rmse_before:.3f} -> {report.force_rmse_after:.3f} eV/Å, {seconds:.1f} s")
    assert report.labelled >= 2 and trainer.held_out
    assert report.force_rmse_after < 0.6 * report.force_rmse_before
    assert trainer.model == tmp_path / "round1.chgnet"
    reloaded = load_backbone(trainer.model)
    assert fingerprint(reloaded) == learner.probe_calc.probe.meta.fingerprint != old.probe.meta.fingerprint
    checkpoint = ALStore(tmp_path / "al.db").checkpoint()  # what a restarted loop loads: CHGNet's own format
    assert checkpoint.round == 1 and fingerprint(load_backbone(checkpoint.model)) == fingerprint(reloaded)
    with pytest.raises(MismatchError, match="refit the head"):
        ProbeCalculator(reloaded, old.probe)
    atoms = trainer.held_out[0].copy()
    atoms.calc = ProbeCalculator(reloaded, tmp_path / "round1_probe.pt")
    assert 0 <= atoms.calc.get_property("reliability", atoms) <= 1


@pytest.mark.sevenn
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:target risk")  # a head on 24 frames: here only its fingerprint matters
def test_sevenn_fine_tune_lowers_its_force_error_and_the_old_head_is_refused(tmp_path):
    require_backbone("sevenn")
    base = load_backbone("7net-0")
    frames = emt_frames(6, 600, size=1, seed=3)  # six 4-atom Cu cells; EMT's zero of energy is not 7net-0's
    old = fit_probe(base, emt_frames(16, 300, size=1, seed=1) + emt_frames(8, 900, size=1, seed=2), quantile=0.7,
                    cache_dir=False, progress=False, options=HEAD)
    before, offset = mean_force_rmse(base, frames), energy_error(base, frames)
    start = time.perf_counter()
    with find_tap(base) as tap:
        path = fine_tune(tap, frames, tmp_path, "cu", epochs=5)  # sevenn's Trainer, lr 1e-4
    seconds = time.perf_counter() - start
    tuned = load_backbone(path)
    after = mean_force_rmse(tuned, frames)
    print(f"7net-0 on 6 EMT Cu cells: force RMSE {before:.3f} -> {after:.3f} eV/Å, energy error "
          f"{offset:.3f} -> {energy_error(tuned, frames):.4f} eV/atom, {seconds:.1f} s")
    assert path == tmp_path / "cu.pth"
    assert after < 0.6 * before
    assert offset > 1.0 and energy_error(tuned, frames) < 0.02  # the per-element shift is aligned
    assert mean_force_rmse(base, frames) == before  # the pretrained model is left as it was
    assert fingerprint(tuned) != fingerprint(base) == old.meta.fingerprint
    assert (tmp_path / "cu.pth.log").read_text().count("epoch 5/5") == 1  # sevenn's Trainer ran 5 epochs
    with pytest.raises(MismatchError, match="refit the head"):
        ProbeCalculator(tuned, old)


@pytest.mark.slow
def test_mace_fine_tune_from_its_own_model_lowers_the_error_on_new_frames(tmp_path):
    from probe_ase.testing import train_mace

    base = train_mace(emt_frames(20, 300, seed=1), epochs=30, seed=0)
    pool = emt_frames(20, 300, seed=2) + emt_frames(20, 900, seed=3)
    old = ProbeCalculator(base, fit_probe(base, pool, quantile=0.7, cache_dir=False, progress=False, options=HEAD))
    labelled = emt_frames(10, 900, interval=20, seed=4)  # hotter than the backbone's training frames
    trainer = FineTuner(pool, work_dir=tmp_path, epochs=10, head_epochs=40)  # mace-torch's lr, 0.01
    start = time.perf_counter()
    new = trainer(labelled, 1, old)
    seconds = time.perf_counter() - start
    before, after = mean_force_rmse(base, trainer.held_out), mean_force_rmse(new.base, trainer.held_out)
    print(f"MACE fine-tuned on {len(labelled) - len(trainer.held_out)} hot frames: force RMSE on "
          f"{len(trainer.held_out)} held out {before:.3f} -> {after:.3f} eV/Å, round {seconds:.1f} s")
    assert after < 0.6 * before
    reloaded = load_backbone(trainer.model)
    assert fingerprint(reloaded) == new.probe.meta.fingerprint != old.probe.meta.fingerprint
    with pytest.raises(MismatchError, match="refit the head"):
        ProbeCalculator(reloaded, old.probe)
