"""The scripts in examples/ run to completion and do what they say."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [name, *args])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_md_gating_example(monkeypatch, tmp_path, capsys):
    ns = run_example("md_gating.py", monkeypatch, "--out", str(tmp_path))
    assert ns["monitor"].halted
    assert (tmp_path / "reliability.log").stat().st_size > 0
    assert "halted after" in capsys.readouterr().out


def test_optimisation_guard_example(monkeypatch, capsys):
    ns = run_example("optimisation_guard.py", monkeypatch)
    report = ns["report"]
    assert report.converged and report.handover_step is not None
    assert report.final_fmax < 0.05
    assert "handed over at step" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["md_gating.py", "optimisation_guard.py"])
def test_examples_say_how_to_run_them(name):
    assert f"python examples/{name}" in (EXAMPLES / name).read_text()
