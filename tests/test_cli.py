"""The probe-ase command, run in-process on real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.io import read, write

from probe_ase import Probe
from probe_ase.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, backbones, cu_data):
    root = tmp_path_factory.mktemp("cli")
    torch.save(backbones("mace").models[0], root / "mace.model")
    write(root / "pool.xyz", cu_data["pool"], format="extxyz")
    write(root / "test.xyz", cu_data["test_in"][:10] + cu_data["test_out"][:10], format="extxyz")
    assert main(["fit", "--backbone", str(root / "mace.model"), "--data", str(root / "pool.xyz"),
                          "--quantile", "0.7", "--epochs", "30", "--no-cache", "-o", str(root / "probe.pt")]) == 0
    return root


def test_fit_then_score(files, capsys):
    head = files / "probe.pt"
    assert head.exists()
    out = files / "scored.xyz"
    assert main(["score", "--probe", str(head), str(files / "test.xyz"), "-o", str(out), "--batch-size", "7"]) == 0
    scored = read(out, ":")
    originals = read(files / "test.xyz", ":")
    assert len(scored) == 20
    for s, o in zip(scored, originals):
        assert 0 <= s.info["reliability"] <= 1
        assert s.arrays["atom_importance"].sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(s.get_forces(), o.get_forces())  # reference data kept
    assert "20 frames" in capsys.readouterr().out


def test_score_refuses_to_overwrite_its_input(files, capsys):
    head = files / "probe.pt"
    before = (files / "test.xyz").read_bytes()
    code = main(["score", "--probe", str(head), str(files / "test.xyz"), "-o", str(files / "test.xyz")])
    assert code == 2
    assert "must differ" in capsys.readouterr().err
    assert (files / "test.xyz").read_bytes() == before


def test_failed_score_leaves_existing_output_intact(files, capsys):
    bad = read(files / "test.xyz", ":")[:3]
    bad[1].positions[0, 0] = np.nan
    write(files / "bad.xyz", bad, format="extxyz")
    out = files / "keep.xyz"
    out.write_text("precious\n")
    assert main(["score", "--probe", str(files / "probe.pt"), str(files / "bad.xyz"), "-o", str(out)]) == 2
    assert "frame 1 has NaN or inf positions" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".keep")) == []


def test_fit_options_for_the_verdict_reach_the_head_file(files, cu_data):
    """--delta, --reference-data, --support-quantile, --weight-folds, --members and --channels end up in the head the
    CLI writes."""
    write(files / "train.xyz", cu_data["train"], format="extxyz")
    head = files / "options.pt"
    assert main(["fit", "--backbone", str(files / "mace.model"), "--data", str(files / "pool.xyz"), "--quantile", "0.7",
                 "--epochs", "5", "--no-cache", "--delta", "0.2", "--reference-data", str(files / "train.xyz"),
                 "--support-quantile", "0.95", "--weight-folds", "2", "--members", "2",
                 "--channels", "scalars+norms", "-o", str(head)]) == 0
    meta = Probe.load(head).meta
    assert meta.channels == "scalars+norms" and Probe.load(files / "probe.pt").meta.channels == "scalars"
    assert meta.config.members == 2 and Probe.load(head).head.embed.shape[0] == 2
    assert (meta.delta, meta.novelty.support_quantile, meta.novelty.weight_folds) == (0.2, 0.95, 2)
    assert meta.report["certificate"]["delta"] == 0.2 and meta.report["novelty_weight_folds"] == 2
    assert meta.report["n_reference"] == sum(len(a) for a in cu_data["train"])  # atoms of the training frames
    assert Probe.load(files / "probe.pt").meta.novelty.weight_folds == 5  # the default when not given


def test_fit_can_cross_fit_its_calibration(files):
    """--calibration crossfit --folds 2 --fallback target: the head file holds the two fold heads' mean, calibrated on
    all but the grid, and the fallback rule; evaluate's report names both."""
    head = files / "crossfit.pt"
    assert main(["fit", "--backbone", str(files / "mace.model"), "--data", str(files / "pool.xyz"), "--quantile", "0.7",
                 "--epochs", "5", "--no-cache", "--calibration", "crossfit", "--folds", "2", "--fallback", "target",
                 "-o", str(head)]) == 0
    meta = Probe.load(head).meta
    assert (meta.report["calibration"], meta.report["folds"], meta.config.members) == ("crossfit", 2, 2)
    assert (meta.spec.options.calibration, meta.spec.options.folds, meta.spec.options.fallback) == ("crossfit", 2, "target")
    assert meta.report["certificate"]["fallback"] == "target"
    default = Probe.load(files / "probe.pt")
    assert (default.report["calibration"], default.report["certificate"]["fallback"]) == ("split", "strictest")
    report = files / "crossfit-report"
    assert main(["evaluate", str(files / "test.xyz"), "--probe", str(head), "--report", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert (metrics["calibration"], metrics["fallback"]) == ("crossfit", "target")
    text = (report / "report.md").read_text()
    assert "(cross-fitted calibration: approximately)" in text
    assert ("(fallback 'target')" in text) == (meta.certified_risk > meta.target_risk)


def test_fit_errors_are_reported_not_raised(files, capsys):
    code = main(["fit", "--backbone", str(files / "absent.model"), "--data", str(files / "pool.xyz")])
    assert code == 2
    assert "no such backbone file" in capsys.readouterr().err


def test_help_names_units(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "eV/Å" in text and "eV/atom" in text


def test_md_command_halts_a_hot_run(files, capsys, cu_data):
    work = files / "md"
    work.mkdir()
    write(work / "start.xyz", cu_data["test_in"][0])
    args = ["md", str(work / "start.xyz"), "--probe", str(files / "probe.pt"), "--dynamics", "nve",
            "--temperature", "3000", "--timestep", "2", "--steps", "300", "--patience", "2",
            "--trajectory", str(work / "md.traj"), "--log", str(work / "r.log"), "--flagged", str(work / "f.xyz")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "halted at step" in out
    frames = read(work / "md.traj", ":")
    assert 1 < len(frames) < 301 and "reliability" in frames[-1].info
    assert len(np.loadtxt(work / "r.log", comments="#", usecols=range(7))) == len(frames)
    assert main(args[:-6] + ["--dynamics", "npt", "--steps", "3", "--action", "log", "--trajectory",
                             str(work / "npt.xyz"), "--log", str(work / "npt.log"), "--flagged", str(work / "n.xyz")]) == 0
    assert len(read(work / "npt.xyz", ":")) == 4


def test_md_appends_only_when_asked_writes_every_nth_step_and_restarts_with_momenta(files, capsys, cu_data):
    """An existing trajectory is refused (untouched) without --append; --traj-interval 3 writes steps 0, 3, 6, 9;
    --restart continues from the last frame's positions and momenta, appended to the same file."""
    work = files / "md-append"
    work.mkdir()
    write(work / "start.xyz", cu_data["test_in"][0])
    traj, log, flagged = work / "md.traj", work / "md.log", work / "f.xyz"
    base = ["--probe", str(files / "probe.pt"), "--action", "log", "--dynamics", "nve", "-q", "--trajectory", str(traj),
            "--log", str(log), "--flagged", str(flagged)]
    assert main(["md", str(work / "start.xyz"), "--steps", "9", "--traj-interval", "3", *base]) == 0
    frames = read(traj, ":")
    assert len(frames) == 4 and len(np.loadtxt(log, comments="#", usecols=range(7))) == 10
    before = traj.read_bytes(), log.read_bytes()
    capsys.readouterr()
    assert main(["md", str(work / "start.xyz"), "--steps", "2", *base]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--trajectory {traj} exists; pass --append" in err
    assert (traj.read_bytes(), log.read_bytes()) == before
    assert main(["md", "--restart", str(traj), "--steps", "2", "--append", *base]) == 0
    restarted = read(traj, ":")
    assert len(restarted) == 4 + 3  # the restart frame again, then steps 1 and 2
    np.testing.assert_allclose(restarted[4].positions, frames[-1].positions)
    np.testing.assert_allclose(restarted[4].get_momenta(), frames[-1].get_momenta())  # not drawn anew
    assert len(np.loadtxt(log, comments="#", usecols=range(7))) == 10 + 3


@pytest.fixture(scope="module")
def al_probe(files):
    """The CLI head refitted with ``--weight-folds 0``: each AL round's refit then trains one head, not six."""
    path = files / "probe-al.pt"
    assert main(["fit", "--backbone", str(files / "mace.model"), "--data", str(files / "pool.xyz"), "--quantile", "0.7",
                 "--epochs", "30", "--no-cache", "--weight-folds", "0", "-o", str(path)]) == 0
    return path


def al_config(files, probe, work, db, rounds: int, steps: int, epochs: int, reference: str, label: str = ""):
    """Write ``work/al.toml``: explore hot (2000 K) from two test frames, label with ``reference``, retrain."""
    config = work / "al.toml"
    config.write_text(f"""
backbone = "{files / 'mace.model'}"
probe = "{probe}"
db = "{db}"
start = "{work / 'start.xyz'}"
rounds = {rounds}

[reference]
{reference}

[explore]
temperature = 2000
timestep = 2.0
steps = {steps}
max_new = 4
min_separation = 5
p_lo = 0.0

{label}

[retrain]
train_data = "{work / 'train.xyz'}"
fit_data = "{files / 'pool.xyz'}"
epochs = {epochs}
work_dir = "{work / 'retrain'}"
""")
    return config


@pytest.mark.slow
def test_al_command_runs_a_round(files, al_probe, capsys, cu_data):
    work = files / "al"
    work.mkdir()
    write(work / "start.xyz", cu_data["test_in"][:2])
    write(work / "train.xyz", cu_data["train"])
    config = al_config(files, al_probe, work, work / "al.db", rounds=1, steps=60, epochs=3,
                       reference='calculator = "ase.calculators.emt:EMT"')
    assert main(["al", str(config)]) == 0
    out = capsys.readouterr().out
    assert "F-RMSE before" in out and "'pending': 0" in out
    from ase.db import connect

    assert 0 < connect(work / "al.db").count(status="done") <= 4
    config.write_text(config.read_text() + "\n[bogus]\n")
    assert main(["al", str(config)]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


@pytest.mark.slow
def test_al_command_resumes_after_a_kill_from_the_retrained_model(files, al_probe, capsys, cu_data):
    """kill -9 ``probe-ase al`` in round 2; the restart finishes round 2 from round 1's model and head."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from collections import Counter
    from pathlib import Path

    from ase.db import connect

    import probe_ase
    from probe_ase.al.store import ALStore

    work = files / "al-resume"
    work.mkdir()
    write(work / "start.xyz", cu_data["test_in"][:2])
    write(work / "train.xyz", cu_data["train"])
    db, log, started = work / "al.db", work / "finished.txt", work / "started.txt"
    config = al_config(files, al_probe, work, db, rounds=2, steps=80, epochs=2, label="[label]\nlease = 1.0",
                       reference='calculator = "probe_ase.testing.reference:CountingEMT"\n'
                                 f'options = {{ log = "{log}", start_log = "{started}", delay = 0.5 }}')
    root = str(Path(probe_ase.__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from probe_ase.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", "al", str(config)],
                            env={**os.environ, "PYTHONPATH": root}, stdout=subprocess.DEVNULL)

    def in_round_2_call() -> bool:  # round 1 finished, round 2 explored, a reference call of round 2 running
        if not db.exists() or not started.exists():
            return False
        rounds = ALStore(db).rounds()
        lines = started.read_text().split("\n")
        finished = log.read_text().split() if log.exists() else []
        return len(rounds) == 2 and rounds[0].finished is not None and len([x for x in lines if x]) > len(finished)

    deadline = time.time() + 300
    while not in_round_2_call():
        assert proc.poll() is None and time.time() < deadline, "probe-ase al ended before round 2's labelling"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    round1 = ALStore(db).rounds()[0]
    assert round1.model and Path(round1.model).exists() and Path(round1.probe).exists()
    explored_round2 = connect(db).count(round=2)
    assert main(["al", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"resuming after round 1: backbone {round1.model}, head {round1.probe}" in out
    rounds = ALStore(db).rounds()
    assert [r.round for r in rounds] == [1, 2] and all(r.finished is not None for r in rounds)
    assert connect(db).count(round=2) == explored_round2  # round 2 finished, not explored again
    assert connect(db).count(round=3) == 0 and connect(db).count(status="pending") == 0
    assert rounds[1].model is None or Path(rounds[1].model).exists()
    calls = Counter(log.read_text().split())
    assert calls and max(calls.values()) == 1  # no frame labelled twice across the kill
    assert sum(calls.values()) == connect(db).count(status="done")
    assert main(["al", str(config)]) == 0
    assert "all 2 rounds are finished" in capsys.readouterr().out
    assert main(["al", "--check", str(config)]) == 0


def test_evaluate_writes_every_promised_file(files, capsys, backbones, cu_data):
    from probe_ase.testing import train_mace

    members = []
    for seed in (1, 2):
        path = files / f"member{seed}.model"
        torch.save(train_mace(cu_data["train"][:20], epochs=3, seed=seed).models[0], path)
        members.append(str(path))
    report = files / "report"
    code = main(["evaluate", str(files / "test.xyz"), "--probe", str(files / "probe.pt"), "--report", str(report),
                 "--ensemble", str(files / "mace.model"), *members, "--importance", "2"])
    assert code == 0
    expected = {"report.md", "metrics.json", "roc.png", "risk_coverage.png", "scatter.png",
                "reliability_diagram.png"}
    names = {p.name for p in report.iterdir()}
    assert expected <= names and len([n for n in names if n.startswith("importance_")]) == 2
    results = json.loads((report / "metrics.json").read_text())
    assert set(results["probe"]) >= {"auroc", "spearman", "aurc", "excess_aurc", "risk_at_80", "ece", "brier"}
    assert "ensemble_force_std" in results and 0 <= results["ensemble_force_std"]["auroc"] <= 1
    assert results["probe"]["excess_aurc"] >= -1e-12  # nothing beats the oracle
    text = (report / "report.md").read_text()
    assert "| auroc |" in text and "![roc.png](roc.png)" in text
    # a force head predicts force errors (eV/Å): they rank the true ones and sit near them
    agreement = results["force_error"]
    assert agreement["structures"]["spearman"] >= 0.5 and agreement["atoms"]["spearman"] >= 0.3
    assert 0.1 <= agreement["atoms"]["fraction_above"] <= 0.9
    assert "## Predicted force errors" in text and "| median true / predicted |" in text
    assert all((report / n).read_bytes()[:4] == b"\x89PNG" for n in names if n.endswith(".png"))


def test_md_and_fit_take_a_companion(files, capsys, cu_data):
    from probe_ase.testing.mace import train_mace

    work = files / "second"
    work.mkdir()
    torch.save(train_mace(cu_data["train"], epochs=10, seed=1).models[0], work / "second.model")
    write(work / "start.xyz", cu_data["test_in"][0])
    assert main(["md", str(work / "start.xyz"), "--probe", str(files / "probe.pt"), "--steps", "4", "--action", "log",
                 "--companion", str(work / "second.model"), "--companion-every", "2", "--trajectory",
                 str(work / "md.traj"), "--log", str(work / "r.log"), "--flagged", str(work / "f.xyz")]) == 0
    frames = read(work / "md.traj", ":")
    assert [f.info["disagreement_age"] for f in frames] == [0, 1, 0, 1, 0]
    assert all(f.info["force_disagreement"] > 0 for f in frames)
    assert '"models_disagree_steps"' in capsys.readouterr().out
    assert main(["fit", "--backbone", str(files / "mace.model"), "--data", str(files / "pool.xyz"), "--companion",
                 str(work / "second.model"), "--companion-labels", "all", "--quantile", "0.7", "--epochs", "10",
                 "--no-cache", "-o", str(work / "agree.pt")]) == 0
    assert "the head predicts agreement with the companion" in capsys.readouterr().out
    meta = Probe.load(work / "agree.pt").meta
    assert meta.labels == {f"companion {work / 'second.model'}": len(cu_data["pool"])}
