"""The scripts in examples/ run to completion and do what they say."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_backbone

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [name, *args])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


@pytest.mark.slow
def test_md_gating_example(monkeypatch, tmp_path, capsys):
    ns = run_example("md_gating.py", monkeypatch, "--out", str(tmp_path))
    assert ns["monitor"].halted
    assert (tmp_path / "reliability.log").stat().st_size > 0
    assert "halted after" in capsys.readouterr().out


@pytest.mark.slow
def test_md_gating_example_on_your_own_files(monkeypatch, tmp_path, capsys):
    """--model/--fit/--start: a user's model file, labelled frames and start structure; the head is written."""
    import torch
    from ase.io import write

    from probe_ase import Probe
    from probe_ase.testing import emt_frames, train_mace

    base = train_mace(emt_frames(30, 300, seed=1), epochs=25)
    torch.save(base.models[0], tmp_path / "my.model")
    write(tmp_path / "dft.xyz", emt_frames(40, 300, seed=2) + emt_frames(30, 900, seed=3))
    write(tmp_path / "start.xyz", emt_frames(1, 300, seed=5)[0])
    out = tmp_path / "run"
    ns = run_example("md_gating.py", monkeypatch, "--model", str(tmp_path / "my.model"), "--fit",
                     str(tmp_path / "dft.xyz"), "--start", str(tmp_path / "start.xyz"), "--steps", "30", "--heat", "0",
                     "--epochs", "20", "--out", str(out))
    assert Probe.load(out / "probe.pt").meta.fingerprint == ns["probe"].meta.fingerprint
    assert ns["dyn"].nsteps >= 3 and (out / "reliability.log").read_text().count("\n") >= 3
    assert "after" in capsys.readouterr().out


@pytest.mark.slow
def test_optimisation_guard_example(monkeypatch, capsys):
    ns = run_example("optimisation_guard.py", monkeypatch)
    report = ns["report"]
    assert report.converged and report.handover_step is not None
    assert report.final_fmax < 0.05
    assert "handed over at step" in capsys.readouterr().out


@pytest.mark.slow
def test_active_learning_xtb_example(tmp_path):
    """Shortened xTB loop; a subprocess, because tblite needs OMP_NUM_THREADS=1 before torch loads."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / "active_learning_xtb.py"), "--out", str(tmp_path),
                           "--quick", "--rounds", "1"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("1 ")][0]
    # RoundReport.row(): round explored selected labelled failed rejected before after
    selected, labelled, failed, before, after = int(summary[2]), int(summary[3]), int(summary[4]), \
        float(summary[6]), float(summary[7])
    assert selected == labelled > 0 and failed == 0
    assert after < before
    assert (tmp_path / "round1.xyz").exists() and (tmp_path / "al.db").exists()


ETHANOL = EXAMPLES.parent.parent / "shared" / "data" / "ethanol"  # the shared data set, never in the repository


@pytest.mark.slow
@pytest.mark.pyscf
@pytest.mark.skipif(not (ETHANOL / "train.xyz").exists(), reason=f"ethanol data set not at {ETHANOL}")
def test_al_dft_ethanol_example(tmp_path):
    """Shortened DFT loop (one round, --quick): PySCF labels the selected frames, the MACE is fine-tuned."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / "al_dft_ethanol.py"), "--data", str(ETHANOL),
                           "--out", str(tmp_path), "--quick", "--rounds", "1"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # table rows: round labelled failed hot-force-RMSE accepted hot-risk labelled-risk tau wall
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[-4:] if line.strip()[:1].isdigit()}
    assert set(rows) == {"0", "1"}
    assert int(rows["1"][1]) >= 2 and int(rows["1"][2]) == 0
    assert 0 < float(rows["1"][3]) < 1000  # meV/Å against PySCF on the fixed hot frames
    assert (tmp_path / "finetune" / "round1_probe.pt").exists() and (tmp_path / "al.db").exists()


@pytest.mark.slow
@pytest.mark.chgnet
def test_al_chgnet_crystal_example(tmp_path):
    """One round from the pretrained CHGNet: EMT labels the selected cells, CHGNet's own trainer fine-tunes it and
    its force error on the fixed hot cells falls; the round's checkpoint holds the fine-tuned model."""
    require_backbone("chgnet")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / "al_chgnet_crystal.py"), "--out", str(tmp_path),
                           "--rounds", "1"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # table rows: round labelled hot-force-RMSE hot-accepted hot-risk tau wall
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[-4:] if line.strip()[:1].isdigit()}
    assert set(rows) == {"0", "1"} and int(rows["1"][1]) >= 2
    assert float(rows["1"][2]) < float(rows["0"][2])  # meV/Å against EMT on the fixed hot cells
    assert (tmp_path / "finetune" / "round1.chgnet").exists() and (tmp_path / "rounds" / "round1_backbone.model").exists()


@pytest.mark.slow
def test_large_cell_example(monkeypatch, tmp_path, capsys):
    """The structure verdict passes the 4 092-atom defective cell; the per-atom map finds the defect."""
    ns = run_example("large_cell_local.py", monkeypatch, "--out", str(tmp_path))
    summary = ns["summary"]
    assert summary["n_atoms"] >= 4000 and summary["structure_verdict"]
    assert summary["atom_auroc"] >= 0.9 and summary["flagged_within_5_A_of_defect"] >= 1
    assert summary["unreliable_within_5_A"] >= 1
    assert "atom_reliability" in read_columns(tmp_path / "large_cell.xyz")
    assert (tmp_path / "large_cell.png").stat().st_size > 0
    assert "per-atom AUROC" in capsys.readouterr().out


@pytest.mark.slow
def test_generic_adapter_example(monkeypatch, capsys):
    """A backbone with no adapter: ModuleTap passes check_tap, and the head fitted through it separates 1200 K."""
    ns = run_example("generic_adapter.py", monkeypatch)
    report, summary = ns["report"], ns["summary"]
    assert "equal the reference" in report["layers"] and report["neighbour_graph"].startswith("not read")
    assert summary["auroc"] >= 0.8
    assert summary["mean_reliability_300K"] > summary["mean_reliability_1200K"]
    assert "check_tap on the in-house MLIP" in capsys.readouterr().out


def read_columns(path):
    from ase.io import read

    return set(read(path).arrays)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_say_how_to_run_them(name):
    assert f"python examples/{name}" in (EXAMPLES / name).read_text()
