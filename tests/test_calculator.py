"""ProbeCalculator on real backbones: results, invariance, MD, optimisers, mixing, bad input."""

from __future__ import annotations

import numpy as np
import torch
import pytest
from ase import Atoms, units
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator
from ase.calculators.mixing import SumCalculator
from ase.io import read, write
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from probe_ase import (
    EmptyStructureError,
    MismatchError,
    NonFiniteError,
    ProbeCalculator,
    UnknownElementError,
    annotate,
    featurize,
)
from probe_ase.model.graph import HeadGraph
from probe_ase.testing import assert_invariant, train_mace

from conftest import SLOW_BACKBONES


@pytest.fixture
def probe_calc(backbone_name, backbones, probes):
    calc = ProbeCalculator(backbones(backbone_name), probes(backbone_name))
    yield calc
    calc.close()


def batched_scores(probe, tap, frame):
    """What ``Probe.predict`` gives ``frame`` from one batched backbone pass and a fresh neighbour graph: the path
    of fitting and ``score_frames``, not the calculator's per-step one."""
    fs = featurize(tap, [frame], cache_dir=False, progress=False)
    return probe.predict(fs.features, fs.numbers, fs.ptr, HeadGraph(probe.meta.config.cutoff).frames([frame]))


def tolerance(calc) -> dict:
    """float32 backbones (CHGNet) give features a batched pass rounds differently; float64 ones agree to ~1e-7."""
    float32 = next(calc.tap.module.parameters()).dtype == torch.float32
    return dict(rtol=1e-3, atol=1e-4) if float32 else dict(rtol=1e-5, atol=1e-6)


def test_results_pass_through_and_add_reliability(probe_calc, cu_data):
    frame = cu_data["test_in"][0]
    atoms = frame.copy()
    atoms.calc = probe_calc
    energy = atoms.get_potential_energy()
    results = probe_calc.results
    assert energy == pytest.approx(probe_calc.base.results["energy"])
    np.testing.assert_allclose(results["forces"], probe_calc.base.results["forces"])
    assert results["forces"].shape == (len(atoms), 3)
    assert type(results["reliability"]) is float and 0.0 <= results["reliability"] <= 1.0
    assert type(results["reliable"]) is bool and type(results["novelty"]) is float
    assert results["reliable"] == (results["reliability"] >= probe_calc.threshold and results["novelty"] <= 1)
    assert results["reason"] == ("ok" if results["reliable"] else
                                 "out_of_support" if results["novelty"] > 1 else "low_probability")
    assert results["atom_novelty"].shape == (len(atoms),) and results["atom_novelty"].max() == results["novelty"]
    assert results["atom_novelty"].dtype == results["atom_importance"].dtype == np.float64
    assert results["atom_importance"].shape == (len(atoms),) and (results["atom_importance"] >= 0).all()
    assert results["atom_importance"].sum() == pytest.approx(1.0, abs=1e-5)
    # a force head regresses each atom's |ΔF_i| (eV/Å); the structure's estimate is their RMS over components
    assert probe_calc.probe.head.atom_error and "atom_reliability" not in results
    assert results["atom_force_error"].shape == (len(atoms),) and (results["atom_force_error"] > 0).all()
    assert results["force_error"] == pytest.approx(np.sqrt(np.mean(results["atom_force_error"] ** 2) / 3), rel=1e-5)
    assert probe_calc.get_property("reliability", atoms) == results["reliability"]
    assert "reliability" in probe_calc.implemented_properties
    assert "reliability" not in type(probe_calc).implemented_properties
    # the per-step results are Probe.predict's scores on these atoms, key by key
    expected = batched_scores(probe_calc.probe, probe_calc.tap, frame)
    tol = tolerance(probe_calc)
    for key, value in (("reliability", expected.reliability[0]), ("novelty", expected.novelty[0]),
                       ("force_error", expected.force_error[0]), ("atom_novelty", expected.atom_novelty),
                       ("atom_importance", expected.importance), ("atom_force_error", expected.atom_force_error)):
        np.testing.assert_allclose(results[key], value, **tol, err_msg=key)


def test_reliability_is_invariant(probe_calc, cu_data):
    # float32 backbones (CHGNet) move features by ~1e-6 under rotation; the novelty's Mahalanobis distance
    # (and the reliability through the novelty weight) carries that at ~1e-5-1e-4
    float32 = next(probe_calc.tap.module.parameters()).dtype == torch.float32
    assert_invariant(probe_calc, cu_data["test_out"][0], tol=3e-4 if float32 else 1e-5)


def test_recomputes_only_when_atoms_change(probe_calc, cu_data):
    atoms = cu_data["test_in"][2].copy()
    atoms.calc = probe_calc
    atoms.get_potential_energy()
    runs = probe_calc.tap.n_forward
    atoms.get_forces()
    probe_calc.get_property("reliability", atoms)
    assert probe_calc.tap.n_forward == runs  # one backbone pass served energy, forces, reliability
    atoms.positions[0] += 0.05
    atoms.get_forces()
    assert probe_calc.tap.n_forward == runs + 1


def test_backbone_cache_does_not_starve_the_head(backbones, probes, cu_data):
    """If the backbone already holds results for these atoms, the head still gets fresh features."""
    base = backbones("mace")
    atoms = cu_data["test_in"][3].copy()
    atoms.calc = base
    atoms.get_forces()
    with ProbeCalculator(base, probes("mace")) as calc:
        atoms.calc = calc
        runs = calc.tap.n_forward
        atoms.get_forces()
        assert calc.tap.n_forward == runs + 1  # the backbone ran again, so the hooks saw these atoms
        expected = batched_scores(calc.probe, calc.tap, cu_data["test_in"][3])
        assert calc.results["reliability"] == pytest.approx(expected.reliability[0], rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(calc.results["atom_novelty"], expected.atom_novelty, rtol=1e-5, atol=1e-6)


def test_md_and_optimiser_run_with_reliability(backbones, probes, cu_data):
    atoms = cu_data["test_in"][4].copy()
    with ProbeCalculator(backbones("mace"), probes("mace")) as calc:
        atoms.calc = calc
        seen = []
        dyn = VelocityVerlet(atoms, 1.0 * units.fs)
        dyn.attach(lambda: seen.append(calc.results["reliability"]), interval=1)
        dyn.run(5)
        assert len(seen) == 6 and all(0 <= p <= 1 for p in seen)
        assert len(set(seen)) == 6  # a fresh score every step, not the first one repeated
        assert calc.tap.n_forward == 6  # one backbone pass per MD step, nothing extra
        opt = BFGS(atoms, logfile=None)
        opt.run(fmax=0.5, steps=5)
        assert opt.nsteps >= 1 and calc.tap.n_forward > 6
        # what the calculator holds after the optimiser is the score of where it left the atoms
        final = atoms.copy()
        final.calc = SinglePointCalculator(final, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        expected = batched_scores(calc.probe, calc.tap, final)
        assert calc.results["reliability"] == pytest.approx(expected.reliability[0], rel=1e-5, abs=1e-6)


def test_wraps_a_sum_calculator(backbones, probes, cu_data):
    """ProbeCalculator(SumCalculator([mlip, dispersion])) taps the backbone inside the sum."""
    base = backbones("mace")
    lj = LennardJones(sigma=2.3, epsilon=0.005, rc=5.0)
    atoms = cu_data["test_in"][5].copy()
    with ProbeCalculator(SumCalculator([base, lj]), probes("mace")) as calc:
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        p_sum = calc.results["reliability"]
    atoms_lj, atoms_mlip = atoms.copy(), atoms.copy()
    atoms_lj.calc = LennardJones(sigma=2.3, epsilon=0.005, rc=5.0)
    with ProbeCalculator(base, probes("mace")) as plain:
        atoms_mlip.calc = plain
        assert energy == pytest.approx(atoms_mlip.get_potential_energy() + atoms_lj.get_potential_energy())
        assert p_sum == pytest.approx(plain.results["reliability"], abs=1e-6)


def test_backbone_inside_a_sum_runs_once_per_step(backbone_name, backbones, probes, cu_data):
    """Even SpkCalculator, which stores only what it was asked for, runs once per step inside a sum."""
    lj = LennardJones(sigma=2.3, epsilon=0.005, rc=5.0)
    atoms = cu_data["test_in"][7].copy()
    with ProbeCalculator(SumCalculator([backbones(backbone_name), lj]), probes(backbone_name)) as calc:
        atoms.calc = calc
        for step in range(3):
            atoms.positions[0, 0] += 0.01
            atoms.get_potential_energy()
            atoms.get_forces()
            assert calc.tap.n_forward == step + 1


def test_annotated_results_survive_extxyz(probe_calc, cu_data, tmp_path):
    atoms = cu_data["test_in"][6].copy()
    atoms.calc = probe_calc
    atoms.get_forces()
    write(tmp_path / "frame.xyz", annotate(atoms), format="extxyz")
    back = read(tmp_path / "frame.xyz")
    assert back.info["reliability"] == pytest.approx(probe_calc.results["reliability"])
    assert back.info["reliable"] == probe_calc.results["reliable"]
    np.testing.assert_allclose(back.arrays["atom_importance"], probe_calc.results["atom_importance"], atol=1e-6)
    np.testing.assert_allclose(back.get_forces(), probe_calc.results["forces"], atol=1e-6)


def test_bad_structures_are_clear_errors(backbones, probes, cu_data):
    with ProbeCalculator(backbones("mace"), probes("mace")) as calc:
        nan = cu_data["test_in"][0].copy()
        nan.positions[3, 1] = np.nan
        with pytest.raises(NonFiniteError, match="atom indices \\[3\\]"):
            calc.get_property("reliability", nan)
        with pytest.raises(EmptyStructureError):
            calc.get_property("reliability", Atoms(cell=[5, 5, 5], pbc=True))
        gold = cu_data["test_in"][0].copy()
        gold.symbols[0] = "Au"
        with pytest.raises(UnknownElementError, match="Au"):
            calc.get_property("reliability", gold)


def test_head_refuses_another_backbone(probes, cu_data):
    other = train_mace(cu_data["train"][:10], epochs=1, seed=7)
    with pytest.raises(MismatchError, match="different or retrained"):
        ProbeCalculator(other, probes("mace"))
    with pytest.raises(MismatchError, match="layers"):
        from probe_ase.model.probe import Probe
        import dataclasses

        probe = probes("mace")
        ProbeCalculator(other, Probe(probe.head, dataclasses.replace(probe.meta, layers=(0,)), probe.novelty))


def test_uncertified_head_warns_when_its_p_star_is_the_threshold(backbones, probes):
    import dataclasses
    import warnings

    from probe_ase.model.probe import Probe

    probe = probes("mace")

    def wrap(certified_risk: float, **kwargs) -> ProbeCalculator:
        meta = dataclasses.replace(probe.meta, spec=dataclasses.replace(probe.spec, target_risk=0.05),
                                   certified_risk=certified_risk)
        return ProbeCalculator(backbones("mace"), Probe(probe.head, meta, probe.novelty), **kwargs)

    with pytest.warns(UserWarning, match=r"certified at risk 23\.8% only, not its target 5\.0%"):
        wrap(0.238).close()
    with pytest.warns(UserWarning, match="accepts nothing, so every verdict is False"):
        wrap(1.0).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # certified, or a threshold the user chose: nothing to say
        wrap(0.05).close()
        wrap(0.238, threshold=0.9).close()


def _cells(n_steps: int, repeat: int, seed: int) -> list[Atoms]:
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    frames = []
    for _ in range(n_steps):
        atoms = base.copy()
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def _run(calc, frames) -> list[tuple]:
    out = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        forces = atoms.get_forces()
        r = calc.results
        out.append((r["energy"], forces.copy(), r["reliability"], r["novelty"], r["atom_importance"].copy()))
    return out


def test_wrappers_sharing_a_backbone_across_threads_match_single_threaded(backbone_name, backbones, probes):
    """Two wrappers on one backbone calculator, one shared Probe, stepped from two threads at once."""
    import threading

    base, probe = backbones(backbone_name), probes(backbone_name)
    steps = 10 if backbone_name in SLOW_BACKBONES else 40
    jobs = [_cells(steps, 2, seed=11), _cells(steps, 3, seed=12)]  # 32- and 108-atom cells
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base_module.modules())  # noqa: E731
    with ProbeCalculator(base, probe) as single:
        base_module = single.tap.module
        one = hooks()
        expected = [_run(single, frames) for frames in jobs]
    wrappers = [ProbeCalculator(base, probe), ProbeCalculator(base, probe)]
    assert hooks() == one  # one set of hooks per backbone, shared by both wrappers
    got: list = [None, None]
    errors: list = []

    def work(k: int) -> None:
        try:
            got[k] = _run(wrappers[k], jobs[k])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # equal up to float32 reduction order (torch's intra-op threads may split sums differently
    # when two Python threads use them); another pass's features would differ by far more
    for k in range(2):
        assert len(got[k]) == len(expected[k])
        for row, row0 in zip(got[k], expected[k]):
            for value, value0 in zip(row, row0):
                np.testing.assert_allclose(value, value0, rtol=1e-5, atol=1e-6)
    wrappers[0].close()
    assert hooks() == one  # the other wrapper still holds them
    wrappers[1].close()
    assert hooks() == 0
