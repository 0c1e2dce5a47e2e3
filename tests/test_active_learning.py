"""Active learning with a real MLIP, a real reference (EMT), a real ase.db (SQLite and PostgreSQL)."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.db import connect
from ase.io import read
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from probe_ase import InputError, ProbeCalculator
from probe_ase.al.label import label_pending
from probe_ase.al.learner import ActiveLearner
from probe_ase.al.select import Candidate
from probe_ase.fitting.labels import mean_force_rmse
from probe_ase.testing.reference import CountingEMT, geometry_hash


@pytest.fixture
def probe_calc(backbones, probes):
    with ProbeCalculator(backbones("mace"), probes("mace")) as calc:
        yield calc


def hot_md(atoms):
    MaxwellBoltzmannDistribution(atoms, temperature_K=2000, rng=np.random.default_rng(0))
    return Langevin(atoms, 2 * units.fs, temperature_K=2000, friction=0.02, rng=np.random.default_rng(1))


@pytest.fixture(scope="module")
def explored_template(backbones, probes, cu_data, tmp_path_factory):
    """One exploration round (two hot trajectories), stored in a template database."""
    path = tmp_path_factory.mktemp("al") / "al.db"
    with ProbeCalculator(backbones("mace"), probes("mace")) as calc:
        learner = ActiveLearner(calc, CountingEMT, db=path, p_lo=0.02, novelty_hi=4.0)  # 2000 K leaves the support fast
        counts = learner.explore(cu_data["test_in"][:2], md=hot_md, steps=80, max_new=6, min_separation=4,
                                 progress=False)
    return path, counts


def copy_rows(source, target) -> None:
    with connect(target) as db:
        for row in connect(source).select():
            db.write(row.toatoms(), data=row.data, **row.key_value_pairs)


@pytest.fixture
def explored(explored_template, probe_calc, db_url):
    """A fresh copy of the explored database for each test, on each backend (leases of 1 s)."""
    template, counts = explored_template
    copy_rows(template, db_url)
    return ActiveLearner(probe_calc, CountingEMT, db=db_url, p_lo=0.02, novelty_hi=4.0, lease=1.0), counts


def test_exploration_stores_the_selected_band(explored):
    learner, counts = explored
    rows = list(learner.db.select())
    pending = [r for r in rows if r.status == "pending"]
    assert 0 < len(pending) == counts["selected"] <= 6
    assert all((learner.p_lo <= r.reliability < learner.p_hi) if r.novelty <= 1 else r.novelty <= learner.novelty_hi
               for r in pending)
    assert all(r.band == "candidate" and r.round == 1 and r.get("energy") is None for r in pending)
    for traj in {r.trajectory for r in pending}:
        steps = sorted(r.step for r in pending if r.trajectory == traj)
        assert all(b - a >= 4 for a, b in zip(steps, steps[1:]))
    rejected = [r for r in rows if r.status == "rejected"]
    assert all(r.reliability < learner.p_lo if r.novelty <= 1 else r.novelty > learner.novelty_hi for r in rejected)
    assert all(r.data["atom_importance"].shape == (r.natoms,) for r in pending)


def test_select_takes_the_least_reliable_within_limits(probe_calc, tmp_path):
    learner = ActiveLearner(probe_calc, CountingEMT, db=tmp_path / "sel.db")
    frame = bulk("Cu", cubic=True)
    cands = [Candidate(frame, p, 0.5, "candidate", traj, step, np.array([1.0, float(k)]))
             for k, (p, traj, step) in enumerate([(0.30, 0, 0), (0.10, 0, 2), (0.20, 0, 20), (0.15, 1, 2),
                                                  (0.12, 0, 9), (0.25, 1, 30)])]
    cands.append(Candidate(frame, 0.05, 0.5, "candidate", 2, 0, np.array([1.0, 1.0 + 1e-6])))  # duplicate of k=1
    chosen = learner.select(cands, max_new=3, min_separation=10)
    # by reliability: 0.05 taken; 0.10 is a near-duplicate of it (fingerprints 1e-6 apart): skipped;
    # 0.12 (trajectory 0, nothing chosen there yet) taken; 0.15 taken; max_new=3 reached
    assert [(c.reliability, c.trajectory, c.step) for c in chosen] == [(0.05, 2, 0), (0.12, 0, 9), (0.15, 1, 2)]


def test_bands_follow_the_documented_rule(probe_calc, tmp_path):
    learner = ActiveLearner(probe_calc, CountingEMT, db=tmp_path / "bands.db", p_lo=0.2, p_hi=0.6, novelty_hi=2.0)
    inside, outside, far = 0.5, 1.5, 2.5
    assert [learner.bands.band(p, inside) for p in (0.9, 0.6, 0.3, 0.2, 0.1)] == \
        ["reliable", "reliable", "candidate", "candidate", "failed"]
    # outside the support the probability is not trusted: the band is by novelty alone
    assert [learner.bands.band(p, outside) for p in (0.99, 0.01)] == ["candidate", "candidate"]
    assert [learner.bands.band(p, far) for p in (0.99, 0.01)] == ["failed", "failed"]
    frame = bulk("Cu", cubic=True)
    cands = [Candidate(frame, 0.3, inside, "candidate", 0, 0, np.array([1.0, 0.0])),
             Candidate(frame, 0.95, outside, "candidate", 1, 0, np.array([1.0, 1.0]))]
    assert [c.trajectory for c in learner.select(cands, max_new=1, min_separation=1)] == [1]  # out of support first
    with pytest.raises(InputError, match="inside the support"):
        ActiveLearner(probe_calc, CountingEMT, db=tmp_path / "bad.db", novelty_hi=0.5)


def test_run_round_passes_the_explore_keywords_through(probe_calc, cu_data, tmp_path):
    learner = ActiveLearner(probe_calc, CountingEMT, db=tmp_path / "round.db", p_lo=0.0, p_hi=1.0)  # all candidates
    with pytest.raises(TypeError, match="stepz"):
        learner.run_round(cu_data["test_in"][:2], stepz=6)
    assert learner.store.rounds() == [] and learner.db.count() == 0  # refused before exploring
    report = learner.run_round(cu_data["test_in"][:2], steps=6, max_new=3, min_separation=3, progress=False)
    assert (report.round, report.explored) == (1, 2 * 7) and 1 <= report.selected <= 3
    rows = list(learner.db.select(round=1))
    assert len(rows) == report.selected and {r.status for r in rows} == {"done"}
    for traj in {r.trajectory for r in rows}:
        steps = sorted(r.step for r in rows if r.trajectory == traj)
        assert all(b - a >= 3 for a, b in zip(steps, steps[1:]))


def test_labelling_fills_the_db(explored, tmp_path):
    learner, counts = explored
    result = learner.label(progress=False)
    assert result == {"done": counts["selected"], "failed": 0}
    assert learner.status_counts()["pending"] == 0
    for row in learner.db.select(status="done"):
        atoms = row.toatoms()
        exact = atoms.copy()
        exact.calc = CountingEMT()
        assert row.energy == pytest.approx(exact.get_potential_energy())
        np.testing.assert_allclose(row.forces, exact.get_forces())
        assert row.data["mlip_forces"].shape == (row.natoms, 3)
    n = learner.export(tmp_path / "round1.xyz")
    frames = read(tmp_path / "round1.xyz", ":")
    assert n == len(frames) == counts["selected"]
    assert frames[0].get_forces().shape == (len(frames[0]), 3)


def test_failing_reference_is_recorded_and_the_loop_goes_on(explored, tmp_path):
    learner, _ = explored
    xs = sorted(row.toatoms().positions[0, 0] for row in learner.db.select(status="pending"))
    cut = xs[len(xs) // 2]
    log = tmp_path / "calls.txt"
    learner.reference = functools.partial(CountingEMT, log=log, fail_above_x=cut)
    result = learner.label(progress=False)
    failed = list(learner.db.select(status="failed"))
    assert result["failed"] == len(failed) == sum(x > cut for x in xs) > 0
    assert result["done"] == len(xs) - len(failed)
    assert all("reference failed" in row.error and row.attempts == 2 for row in failed)  # retried once


def test_killed_labelling_resumes_without_repeats(explored, tmp_path):
    learner, counts = explored
    log = tmp_path / "calls.txt"
    script = (
        "import functools\n"
        "from probe_ase.al.label import label_pending\n"
        "from probe_ase.testing.reference import CountingEMT\n"
        f"label_pending({str(learner.db_path)!r}, functools.partial(CountingEMT, log={str(log)!r}, delay=0.4),"
        " progress=False, lease=1.0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while connect(learner.db_path).count(status="done") < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {geometry_hash(r.toatoms()) for r in connect(learner.db_path).select(status="done")}
    assert 2 <= len(done_before) < counts["selected"]  # really interrupted mid-way
    calls_before = log.read_text().split()
    learner.reference = functools.partial(CountingEMT, log=log)
    learner.resume(progress=False)
    calls_after = log.read_text().split()[len(calls_before):]
    assert not done_before & set(calls_after)  # nothing finished was recomputed
    rows = list(connect(learner.db_path).select())
    assert sum(r.status == "done" for r in rows) == counts["selected"]  # nothing lost
    assert learner.status_counts()["pending"] == 0


def test_dask_executor_gives_the_same_db(explored, tmp_path):
    distributed = pytest.importorskip("distributed")
    learner, _ = explored
    copy = tmp_path / "copy.db"
    copy_rows(learner.db_path, copy)
    learner.label(progress=False)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        label_pending(str(copy), CountingEMT, executor=client.get_executor(), progress=False)
    serial = {geometry_hash(r.toatoms()): r for r in learner.db.select(status="done")}
    dask = {geometry_hash(r.toatoms()): r for r in connect(copy).select(status="done")}
    assert serial.keys() == dask.keys() and serial
    for key, row in serial.items():
        assert dask[key].energy == pytest.approx(row.energy)
        np.testing.assert_allclose(dask[key].forces, row.forces)


def test_separation_applies_within_a_trajectory(probe_calc, tmp_path):
    learner = ActiveLearner(probe_calc, CountingEMT, db=tmp_path / "sep.db")
    frame = bulk("Cu", cubic=True)
    cands = [Candidate(frame, p, 0.5, "candidate", 0, step, np.array([1.0, float(step)]))
             for p, step in [(0.1, 10), (0.2, 15), (0.3, 21), (0.4, 5)]]
    chosen = learner.select(cands, max_new=10, min_separation=6)
    assert [c.step for c in chosen] == [10, 21]  # 15 and 5 are closer than 6 steps to step 10


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # retraining never touches the database backend
def test_retraining_lowers_the_error_on_new_frames(explored, cu_data, tmp_path):
    from probe_ase.al.retrain import MaceTrainer

    learner, counts = explored
    learner.label(progress=False)
    new = learner.labelled()
    assert len(new) == counts["selected"]

    old = learner.probe_calc.base
    trainer = MaceTrainer(cu_data["train"], cu_data["pool"], work_dir=tmp_path / "retrain", epochs=8)
    new_calc = learner.retrain(trainer)
    held_out = trainer.held_out  # new frames the retrained model never saw
    assert 0 < len(held_out) < len(new)
    before, after = mean_force_rmse(old, held_out), mean_force_rmse(new_calc.base, held_out)
    assert after < 0.7 * before
    assert learner.probe_calc is new_calc and (tmp_path / "retrain" / "round1_probe.pt").exists()
    assert 0 <= new_calc.get_property("reliability", new[0].copy()) <= 1
