"""A companion model's second opinion: results, the every-k schedule, the verdict, companion labels, bad input.

Backbone and companion are two tiny MACE models trained on the same EMT copper with different seeds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.verlet import VelocityVerlet

from probe_ase import InputError, Probe, ProbeCalculator, ReliabilityMonitor, annotate, fit_probe
from probe_ase.companion import Companion, companion_labels, measure
from probe_ase.fitting.spec import FitOptions
from probe_ase.testing import emt_frames, train_mace
from probe_ase.verdict import judge


@pytest.fixture(scope="module")
def companion(cu_data):
    """A second tiny MACE: same data, another seed."""
    return train_mace(cu_data["train"], epochs=30, seed=1)


def with_tau(probe: Probe, tau: float) -> Probe:
    """``probe`` with another tolerance (eV/Å), to force or forbid disagreement."""
    return Probe(probe.head, dataclasses.replace(probe.meta, tau=tau), probe.novelty)


def predictions(calc, atoms):
    copy = atoms.copy()
    copy.calc = calc
    return copy.get_potential_energy(), copy.get_forces()


def test_results_are_the_two_models_disagreement(backbones, probes, companion, cu_data):
    atoms = cu_data["test_out"][0].copy()
    e_b, f_b = predictions(backbones("mace"), atoms)
    e_c, f_c = predictions(companion, atoms)
    with ProbeCalculator(backbones("mace"), probes("mace")) as alone:
        atoms.calc = alone
        atoms.get_potential_energy()
        without = dict(alone.results)
    with ProbeCalculator(backbones("mace"), probes("mace"), companion=companion) as calc:
        atoms.calc = calc
        atoms.get_potential_energy()
        r = calc.results
    np.testing.assert_allclose(r["atom_disagreement"], np.linalg.norm(f_b - f_c, axis=1), rtol=1e-6)
    assert r["force_disagreement"] == pytest.approx(np.sqrt(np.mean((f_b - f_c) ** 2)), rel=1e-6)
    assert r["energy_disagreement"] == pytest.approx(abs(e_b - e_c) / len(atoms), rel=1e-6)
    assert r["force_disagreement"] > 0 and r["disagreement_age"] == 0
    for key in ("reliability", "novelty", "energy"):  # the head and the backbone are untouched by the companion
        assert r[key] == pytest.approx(without[key])
    assert {"atom_disagreement", "force_disagreement", "disagreement_age"} <= set(calc.implemented_properties)
    assert "force_disagreement" not in alone.implemented_properties


def test_every_k_schedule_carries_the_last_disagreement_with_its_age(backbones, probes, companion, cu_data):
    atoms = cu_data["test_in"][0].copy()
    with ProbeCalculator(backbones("mace"), probes("mace"), companion=companion, companion_every=3) as calc:
        atoms.calc = calc
        seen = []
        dyn = VelocityVerlet(atoms, timestep=2.0)
        dyn.attach(lambda: seen.append((calc.results["disagreement_age"], calc.results["force_disagreement"],
                                        predictions(companion, atoms)[1], np.array(calc.results["forces"]))))
        dyn.run(7)
        assert calc.companion.runs == 3  # steps 0, 3, 6 of 8 evaluations
    assert [age for age, *_ in seen] == [0, 1, 2, 0, 1, 2, 0, 1]
    for age, value, f_c, f_b in seen:
        if age == 0:  # measured now: the disagreement of this very step
            assert value == pytest.approx(np.sqrt(np.mean((f_b - f_c) ** 2)), rel=1e-6)
    assert seen[1][1] == seen[0][1] and seen[2][1] == seen[0][1] and seen[4][1] == seen[3][1]


def test_disagreement_beyond_the_tolerance_is_its_own_reason(backbones, probes, companion, cu_data):
    frames = cu_data["test_in"][:6]
    probe = probes("mace")
    plain = []
    with ProbeCalculator(backbones("mace"), probe) as calc:
        for atoms in frames:
            calc.calculate(atoms.copy())
            plain.append((calc.results["reliable"], calc.results["reason"]))
    with ProbeCalculator(backbones("mace"), with_tau(probe, 1e-9), companion=companion) as strict:
        for atoms in frames:
            strict.calculate(atoms.copy())
            assert (strict.results["reliable"], strict.results["reason"]) == (False, "models_disagree")
    with ProbeCalculator(backbones("mace"), with_tau(probe, 1e9), companion=companion, vouch=0) as loose:
        for atoms, expected in zip(frames, plain):  # models that agree leave the head's verdict as it was
            loose.calculate(atoms.copy())
            assert (loose.results["reliable"], loose.results["reason"]) == expected


def test_vouch_accepts_agreement_outside_the_support_only(backbones, probes, companion, cu_data):
    atoms = cu_data["test_out"][0].copy()
    probe = with_tau(probes("mace"), 1e9)
    kwargs = dict(companion=companion, max_novelty=0.0)  # every structure outside the support
    with ProbeCalculator(backbones("mace"), probe, vouch=0, **kwargs) as calc:
        calc.calculate(atoms)
        assert calc.results["reason"] == "out_of_support"
    with ProbeCalculator(backbones("mace"), probe, vouch=0.5, **kwargs) as calc:
        calc.calculate(atoms)
        assert calc.results["reason"] == "ok" and calc.results["reliable"]
    with ProbeCalculator(backbones("mace"), probe, **kwargs) as default:  # fail safe: the head's abstention stands
        default.calculate(atoms)
        assert default.vouch == 0.0 and default.results["reason"] == "out_of_support"
    # the rule itself: vouched only outside the support and within vouch x tolerance
    verdict = judge(np.array([0.1, 0.1, 0.9, 0.1]), np.array([2.0, 2.0, 0.5, 0.5]), 0.5, 1.0,
                    np.array([0.04, 0.06, 0.04, 0.04]), tolerance=0.1, vouch=0.5)
    assert verdict.reason.tolist() == ["ok", "out_of_support", "ok", "low_probability"]


def test_disagreement_is_invariant(backbones, probes, companion, cu_data):
    atoms = cu_data["test_out"][1].copy()
    with ProbeCalculator(backbones("mace"), probes("mace"), companion=companion) as calc:
        calc.calculate(atoms.copy())
        before = calc.results["force_disagreement"], np.array(calc.results["atom_disagreement"])
        moved = atoms.copy()
        moved.rotate(37, (1, 2, 3), rotate_cell=True)
        moved.translate((0.3, -0.2, 0.1))
        order = np.random.default_rng(0).permutation(len(atoms))
        moved = moved[order]
        calc.calculate(moved)
        assert calc.results["force_disagreement"] == pytest.approx(before[0], rel=1e-4)
        np.testing.assert_allclose(calc.results["atom_disagreement"], before[1][order], rtol=1e-3, atol=1e-6)


def test_annotate_and_monitor_carry_the_second_opinion(backbones, probes, companion, cu_data, tmp_path):
    atoms = cu_data["test_in"][2].copy()
    with ProbeCalculator(backbones("mace"), with_tau(probes("mace"), 1e-9), companion=companion) as calc:
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=1.0)
        with ReliabilityMonitor(dyn, action="log", log=tmp_path / "log", threshold=0.0) as monitor:
            dyn.attach(monitor)
            dyn.run(3)
        # the monitor's own threshold judges again, with the companion: still models_disagree
        assert monitor.summary()["models_disagree_steps"] == monitor.summary()["steps_seen"] == 4
        frame = annotate(atoms.copy(), calc.results)
    assert frame.info["reason"] == "models_disagree" and frame.info["force_disagreement"] > 0
    np.testing.assert_allclose(frame.arrays["atom_disagreement"], calc.results["atom_disagreement"])


def test_bad_companions_are_clear_errors(backbones, probes, companion, cu_data):
    base, probe = backbones("mace"), probes("mace")
    aluminium = train_mace(emt_frames(8, 300, seed=9, symbol="Al"), epochs=2, seed=0)
    with pytest.raises(InputError, match="does not know Cu"):
        ProbeCalculator(base, probe, companion=aluminium)
    for every in (0, -2, 1.5, True):
        with pytest.raises(InputError, match="companion_every"):
            ProbeCalculator(base, probe, companion=companion, companion_every=every)
    with pytest.raises(InputError, match="second model"):
        ProbeCalculator(base, probe, companion=base)
    with pytest.raises(InputError, match="vouch"):
        ProbeCalculator(base, probe, vouch=0.5)
    with pytest.raises(InputError, match="vouch"):
        ProbeCalculator(base, probe, companion=companion, vouch=2.0)
    with pytest.raises(InputError, match="ASE calculator"):
        Companion("7net-0")
    copper = bulk("Cu", cubic=True) * (2, 1, 1)
    with pytest.raises(InputError, match="the companion"):
        companion_labels([bulk("Au")], companion, progress=False)
    assert len(companion_labels([copper], EMT(), progress=False)) == 1  # a calculator no adapter knows: unchecked


def test_companion_labels_blend_and_the_head_file_records_them(backbones, companion, cu_data, tmp_path):
    pool = cu_data["pool"]  # reference energies and forces in a SinglePointCalculator
    unlabelled = [atoms.copy() for atoms in pool[::2]]  # half the pool without them (a copy drops the calculator)
    data = companion_labels(unlabelled + pool[1::2], companion, name="mace-seed1", progress=False)
    assert [a.info["label_source"] for a in data].count("companion mace-seed1") == len(unlabelled)
    for atoms in data[: len(unlabelled)]:
        energy, forces = predictions(companion, atoms)
        assert atoms.info["energy"] == pytest.approx(energy)
        np.testing.assert_allclose(atoms.arrays["forces"], forces)
    for atoms, original in zip(data[len(unlabelled):], pool[1::2]):  # the reference kept where there is one
        np.testing.assert_allclose(atoms.arrays["forces"], original.get_forces())
    options = FitOptions(hidden=32, epochs=40, patience=10, weight_folds=0)
    blend = fit_probe(backbones("mace"), data, quantile=0.7, cache_dir=False, progress=False, options=options)
    assert blend.meta.labels == {"companion mace-seed1": len(unlabelled), "reference": len(pool) - len(unlabelled)}
    assert blend.meta.label_source == "blend"
    agree = fit_probe(backbones("mace"), companion_labels(pool, companion, replace=True, progress=False),
                      quantile=0.7, cache_dir=False, progress=False, options=options)
    agree.save(tmp_path / "agree.pt")
    loaded = Probe.load(tmp_path / "agree.pt")
    assert loaded.meta.labels == {"companion MACECalculator": len(pool)} and loaded.meta.label_source == "companion"
    # its tau is the disagreement's 0.7 quantile: the labels were the two models' disagreement
    gaps = [measure(*predictions(backbones("mace"), a), *predictions(companion, a)).force for a in pool]
    assert loaded.meta.tau == pytest.approx(np.quantile(gaps, 0.7), rel=1e-4)


def test_active_learning_selects_on_disagreement(backbones, probes, companion, cu_data, tmp_path):
    from probe_ase.al.learner import ActiveLearner
    from probe_ase.testing.reference import CountingEMT

    probe = probes("mace")
    tau = probe.meta.tau
    with ProbeCalculator(backbones("mace"), probe, companion=companion, vouch=0.5) as calc:
        learner = ActiveLearner(calc, CountingEMT, db=tmp_path / "bands.db", p_lo=0.2, p_hi=0.6, novelty_hi=2.0,
                                disagreement_hi=3.0)
        inside, outside = 0.5, 1.5
        # DP-GEN's trust levels: beyond tau a candidate, beyond 3 tau failed, whatever the head says
        assert [learner.bands.band(0.9, inside, d * tau) for d in (0.5, 1.5, 3.5)] == ["reliable", "candidate", "failed"]
        assert learner.bands.band(0.1, inside, 1.5 * tau) == "failed"  # the worse of the two bands
        # outside the support, agreement within vouch x tau is reliable, as the calculator's verdict
        assert [learner.bands.band(0.1, outside, d * tau) for d in (0.4, 0.8)] == ["reliable", "candidate"]
        with pytest.raises(InputError, match="disagreement_hi"):
            ActiveLearner(calc, CountingEMT, db=tmp_path / "x.db", disagreement_hi=0.5)
    strict = with_tau(probe, 1e-9)  # every step's models disagree: every stored frame says so
    with ProbeCalculator(backbones("mace"), strict, companion=companion, companion_every=2) as calc:
        learner = ActiveLearner(calc, CountingEMT, db=tmp_path / "al.db", disagreement_hi=1e12)
        counts = learner.explore(cu_data["test_in"][:1], md=lambda a: VelocityVerlet(a, timestep=1.0), steps=6,
                                 max_new=3, min_separation=2, progress=False)
        rows = list(learner.db.select(status="pending"))
        new = learner.retrain(lambda frames, round, current: ProbeCalculator(backbones("mace"), probe))
        assert new.companion.calc is companion and new.companion.every == 2  # the second opinion stays
        new.close()
    assert counts["candidates"] == 7 and len(rows) == 3
    assert all(r.reason == "models_disagree" and r.disagreement > 0 for r in rows)
