"""Claims, faults and the integrity check on real databases (SQLite, PostgreSQL) with real processes.

No MLIP here: the frames are written as ``pending`` rows directly and the
reference is EMT slowed down (:class:`probe_ase.testing.reference.CountingEMT`),
logging every call as it starts and as it finishes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.db import connect

from probe_ase import ALStore, InputError, check_database
from probe_ase.cli import main
from probe_ase.testing.faults import SCENARIOS


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_reference_call_is_lost_or_repeated(scenario, db_url, tmp_path):
    if scenario == "dask_worker_killed":
        pytest.importorskip("distributed")
    result = SCENARIOS[scenario](db_url, tmp_path)
    assert result.lost == 0 and result.duplicates == 0
    assert result.calls_finished == result.frames  # every frame labelled by exactly one finished call
    assert result.integrity_ok
    if result.faults:
        assert result.retried == result.faults  # the call each kill interrupted ran again ...
        assert result.calls_started == result.frames + result.faults  # ... and no other call ran twice
        assert result.recomputed == 0
    else:
        assert result.calls_started == result.frames
    assert result.processes >= 2  # two drivers (or workers) really shared the work


def pending_frames(url, n):
    db = connect(url)
    ids = []
    for k in range(n):
        atoms = bulk("Cu", cubic=True)
        atoms.rattle(0.05, seed=k)
        ids.append(db.write(atoms, status="pending", round=1))
    return ids


def labelled(atoms, scale=1.0):
    atoms = atoms.copy()
    atoms.calc = EMT()
    atoms.get_forces()
    atoms.calc.results["energy"] *= scale
    return atoms


def test_a_claim_is_taken_over_only_after_its_lease(db_url):
    ids = pending_frames(db_url, 3)
    a, b = ALStore(db_url, lease=0.5), ALStore(db_url, lease=0.5)
    assert [i for i, _ in a.claim(2)] == ids[:2]
    assert [i for i, _ in b.claim(5)] == ids[2:]  # only the unclaimed frame
    assert b.claim(5) == []
    with a.heartbeat():  # a live owner keeps its claims past the lease
        time.sleep(1.0)
        assert [i for i, _ in b.claim(5)] == ids[2:]  # b renewed nothing: only its own lapsed claim comes back
    time.sleep(0.7)  # a's leases lapse: as if a had died
    assert [i for i, _ in b.claim(5)] == ids  # a's two frames taken over (and b's own lapsed one)


def test_a_lapsed_claim_never_overwrites_the_new_owners_result(db_url):
    (row_id,) = pending_frames(db_url, 1)
    a, b = ALStore(db_url, lease=0.3), ALStore(db_url, lease=0.3)
    ((_, atoms),) = a.claim(1)
    time.sleep(0.4)
    assert [i for i, _ in b.claim(1)] == [row_id]
    assert b.finish(row_id, atoms=labelled(atoms, 2.0), status="done")
    assert not a.finish(row_id, atoms=labelled(atoms), status="done")  # a's claim had lapsed
    assert connect(db_url).get(id=row_id).energy == pytest.approx(2 * labelled(atoms).get_potential_energy())
    assert check_database(db_url).ok


def test_the_integrity_check_finds_each_problem(db_url):
    assert check_database(db_url).ok  # empty
    ids = pending_frames(db_url, 6)
    db = connect(db_url)
    store = ALStore(db_url, lease=0.2)
    store.claim(1)  # ids[0], its driver "dies"
    db.update(ids[1], atoms=labelled(db.get(id=ids[1]).toatoms()), status="done")  # a good row
    db.update(ids[2], status="done")  # done without results
    db.update(ids[3], status="failed")  # failed without an error
    db.update(ids[4], status="labelling")  # unknown status
    db.update(ids[5], source_id=ids[1])  # a region whose source is a done frame
    time.sleep(0.3)
    report = check_database(db_url)
    assert not report.ok
    assert report.counts == {"pending": 2, "done": 2, "failed": 1, "rejected": 0, "source": 0} and report.rows == 6
    problems = "\n".join(report.problems)
    assert f"row {ids[2]}: done without a finite reference energy" in problems
    assert f"row {ids[2]}: done without finite reference forces" in problems
    assert f"row {ids[3]}: failed without an error message" in problems
    assert f"row {ids[4]}: unknown status 'labelling'" in problems
    assert f"row {ids[5]}: region of row {ids[1]}, which is not a source frame" in problems
    assert f"on row {ids[0]}: lease lapsed" in problems  # orphaned claim
    assert "status counts" in problems  # 6 rows, 5 with a known status
    assert len(report.problems) == 7
    assert not any(f"row {ids[1]}" in p.split(":")[0] for p in report.problems)


def test_check_command_exit_status(db_url, tmp_path, capsys):
    config = tmp_path / "al.toml"
    config.write_text(f'backbone = "x"\nprobe = "x"\nstart = "x"\ndb = "{db_url}"\n[reference]\n'
                      'calculator = "ase.calculators.emt:EMT"\n')
    (row_id,) = pending_frames(db_url, 1)
    assert main(["al", "--check", str(config)]) == 0
    assert "integrity: ok" in capsys.readouterr().out
    connect(db_url).update(row_id, status="done")
    assert main(["al", "--check", str(config)]) == 1
    assert "done without a finite reference energy" in capsys.readouterr().out


def test_bad_store_arguments(tmp_path):
    with pytest.raises(InputError, match="lease must be a positive") as info:
        ALStore(tmp_path / "al.db", lease=0)
    assert info.value.lease == 0
    with pytest.raises(InputError, match="SQLite file or a PostgreSQL URL"):
        ALStore(tmp_path / "al.json")
    assert not np.isnan(ALStore(tmp_path / "al.db").lease)
