"""The probe-ase command, run in-process on real files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.io import read, write

from probe_ase.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, backbones, cu_data):
    root = tmp_path_factory.mktemp("cli")
    torch.save(backbones("mace").models[0], root / "mace.model")
    write(root / "pool.xyz", cu_data["pool"], format="extxyz")
    write(root / "test.xyz", cu_data["test_in"][:10] + cu_data["test_out"][:10], format="extxyz")
    return root


def test_fit_then_score(files, capsys):
    head = files / "probe.pt"
    code = main(["fit", "--backbone", str(files / "mace.model"), "--data", str(files / "pool.xyz"),
                 "--quantile", "0.7", "--epochs", "30", "--no-cache", "-o", str(head)])
    assert code == 0 and head.exists()
    assert "p* =" in capsys.readouterr().out
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
    args = ["md", str(work / "start.xyz"), "--probe", str(files / "probe.pt"), "--ensemble", "nve",
            "--temperature", "3000", "--timestep", "2", "--steps", "300", "--patience", "2",
            "--trajectory", str(work / "md.traj"), "--log", str(work / "r.log"), "--flagged", str(work / "f.xyz")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "halted at step" in out
    frames = read(work / "md.traj", ":")
    assert 1 < len(frames) < 301 and "reliability" in frames[-1].info
    assert len(np.loadtxt(work / "r.log", comments="#")) == len(frames)
    assert main(args[:-6] + ["--ensemble", "npt", "--steps", "3", "--action", "log",
                             "--trajectory", str(work / "npt.xyz"), "--log", str(work / "npt.log")]) == 0
    assert len(read(work / "npt.xyz", ":")) == 4
