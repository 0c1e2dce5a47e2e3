"""The code in the README, docs/getting-started.md and the tutorials runs, in order, and does what the page says.

What runs. Each page's fenced code blocks at the start of a line, top to
bottom, in a fresh temporary working directory, with one namespace per page:

- every ```python block, executed as written;
- in every ```bash block, each command line that starts with ``probe-ase``
  (backslash continuations joined), run in a subprocess with the same working
  directory (``python -c "...probe_ase.cli.main..."``, so the code under test
  is the one on ``sys.path``); a heredoc ``cat > FILE <<'TAG'`` writes FILE.
  Everything else (``pip``, ``python3 -m venv``, ``python -m pytest``,
  ``mkdocs``, ``ruff``, comments) is shown to readers but not run. A
  ``probe-ase`` command that exits non-zero fails the test.

A user's files. Where a page reads files the reader brings (the README's
``my.model``, ``held_out_dft.xyz``, ``start.xyz``), the page declares them in
an HTML comment, invisible on the rendered page::

    <!-- test-setup: my.model held_out_dft.xyz start.xyz -->

and the test writes small stand-ins under those names first, from
:mod:`probe_ase.testing` (:data:`STAND_INS`: a tiny MACE trained on EMT copper,
EMT frames never trained on); the blocks' text is never edited.

Shorter runs. A page may mark named constants on one line each with the
comment ``# fewer in the test suite`` (e.g. ``EPOCHS = 20  # fewer in the test
suite``); the test sets them to the values in :data:`OVERRIDES` and fails when
a marked line it expects is missing. A ``probe-ase`` command skipped here for
its cost (the demo, which has its own tests) is listed in :data:`SKIP_COMMANDS`.

Each page's test then asserts what the page promises (a head file that
:meth:`Probe.load` reads, a reliability in [0, 1], a halted monitor, ...).
Every page takes longer than 10 s and is marked ``slow``: the file takes about
8-9 minutes on 2 shared CPU cores (measured 2026-12-05: active learning 172 s,
with three MACE fine-tunes and head refits; fit on DFT 128 s, two fits; big
cell 74 s; gate MD 70 s; README 50 s; getting started 27 s).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SETUP = re.compile(r"<!--\s*test-setup:([^(]*?)\s*(?:\(.*?)?-->", re.S)  # file names, then an optional (remark)
MARK = "fewer in the test suite"  # the end of a marked line's comment
CLI = "import sys; from probe_ase.cli import main; sys.exit(main(sys.argv[1:]))"
#: probe-ase command lines shown but not run here (each has its own tests)
SKIP_COMMANDS = ("probe-ase demo",)
#: page -> {constant: value in the test suite}, for lines marked with MARK
OVERRIDES: dict[str, dict[str, object]] = {
    # mace_run_train fine-tuning epochs (Python and al.toml), and one round of the command-line loop, not two
    "docs/tutorials/active-learning.md": {"EPOCHS": 2, "epochs": 2, "rounds": 1},
}


def _stand_in_model(path: Path) -> None:
    import torch

    torch.save(_backbone().models[0], path)


_CACHE: dict = {}


def _backbone():
    """A tiny MACE trained on 300 K EMT copper: the reader's 'my.model'."""
    if "mace" not in _CACHE:
        from probe_ase.testing import emt_frames, train_mace

        _CACHE["mace"] = train_mace(emt_frames(40, 300, seed=1), epochs=30, seed=0)
    return _CACHE["mace"]


def _write_frames(frames):
    def write(path: Path) -> None:
        from ase.io import write as ase_write

        ase_write(path, frames(), format="extxyz")
    return write


def _held_out():
    from probe_ase.testing import emt_frames

    return emt_frames(60, 300, seed=2) + emt_frames(30, 900, seed=3) + emt_frames(30, 600, strain=0.03, seed=4)


def _start():
    from probe_ase.testing import emt_frames

    return emt_frames(1, 300, seed=5)[0]


#: file name a page may declare -> how the test writes a stand-in for it
STAND_INS = {
    "my.model": _stand_in_model,
    "held_out_dft.xyz": _write_frames(_held_out),
    "start.xyz": _write_frames(_start),
}


def blocks(page: Path) -> list[tuple[str, str]]:
    """The page's fenced ``python`` and ``bash`` blocks, in order, as (language, text)."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text()) if m.group(1) in ("python", "bash")]


def stand_ins(page: Path) -> list[str]:
    return [name for m in SETUP.finditer(page.read_text()) for name in m.group(1).split()]


def override(source: str, values: dict[str, object]) -> str:
    """``source`` with each ``NAME = ...  # fewer in the test suite`` line of ``values`` set to the test's value."""
    for name, value in values.items():
        pattern = re.compile(rf"^(\s*{name}\s*=\s*)[^#\n]+?(\s*#[^\n]*{re.escape(MARK)})", re.M)
        source = pattern.sub(lambda m, value=value: f"{m.group(1)}{value!r}{m.group(2)}", source)
    return source


def commands(bash: str, cwd: Path, values: dict[str, object]) -> list[list[str]]:
    """The ``probe-ase`` command lines of a bash block; heredocs into files are written to ``cwd`` on the way
    (their marked lines overridden with ``values`` too: a TOML key is such a constant)."""
    lines, out = bash.splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        heredoc = re.match(r"\s*cat\s*>\s*(\S+)\s*<<\s*'?(\w+)'?\s*$", line)
        if heredoc:
            end = lines.index(heredoc.group(2), i)
            (cwd / heredoc.group(1)).write_text(override("\n".join(lines[i:end]) + "\n", values))
            i = end + 1
            continue
        if line.strip().startswith("probe-ase") and not line.strip().startswith(SKIP_COMMANDS):
            out.append(shlex.split(line, comments=True))
    return out


def run_page(name: str, cwd: Path, monkeypatch) -> tuple[dict, str]:
    """Run page ``name`` (relative to the repository root) in ``cwd``; its namespace and everything it printed."""
    page = ROOT / name
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PROBE_ASE_CACHE", str(cwd / ".feature-cache"))  # not the user's cache
    for file in stand_ins(page):
        assert file in STAND_INS, f"{name} declares a stand-in the test cannot make: {file}"
        STAND_INS[file](cwd / file)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    namespace: dict = {"__name__": "__docs__"}
    printed = io.StringIO()
    for number, (language, text) in enumerate(blocks(page), 1):
        where = f"{name}, code block {number}"
        if language == "python":
            source = override(text, OVERRIDES.get(name, {}))
            with contextlib.redirect_stdout(printed):
                exec(compile(source, where, "exec"), namespace)  # noqa: S102
        else:
            for argv in commands(text, cwd, OVERRIDES.get(name, {})):
                done = subprocess.run([sys.executable, "-c", CLI, *argv[1:]], cwd=cwd, env=env,
                                      capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, \
                    f"{where}: {shlex.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}"
                printed.write(done.stdout)
    for marked in OVERRIDES.get(name, {}):
        assert any(re.search(rf"^\s*{marked}\s*=[^\n]*#[^\n]*{re.escape(MARK)}", t, re.M) for _, t in blocks(page)), \
            f"{name}: no line '{marked} = ...  {MARK}' to shorten"
    return namespace, printed.getvalue()


def _load_head(path):
    from probe_ase import Probe

    assert Path(path).exists(), f"{path} not written"
    return Probe.load(path)


def _in_unit_interval(value) -> bool:
    return bool(np.all((np.asarray(value) >= 0) & (np.asarray(value) <= 1)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["README.md", "docs/getting-started.md"])
def test_quickstart(name, tmp_path, monkeypatch):
    """Fit on the reader's held-out frames, save, score a structure; the README also gates MD from the CLI."""
    from probe_ase.verdict import REASONS

    ns, printed = run_page(name, tmp_path, monkeypatch)
    head = _load_head(tmp_path / "probe.pt")
    assert head.p_star == pytest.approx(ns["probe"].p_star)
    assert head.meta.tau == pytest.approx(0.1)                      # tolerance=0.1 reached the head file
    results = ns["atoms"].calc.results
    assert _in_unit_interval(results["reliability"]) and results["reason"] in REASONS
    assert results["reliable"] == (results["reason"] == "ok")
    if name == "README.md":
        assert results["atom_force_error"].shape == (len(ns["atoms"]),)
        assert "certified" in ns["probe"].report["certificate"]
        log = (tmp_path / "reliability.log").read_text().splitlines()
        assert len(log) > 1 and re.search(r"halted at step \d+|ran \d+ steps", printed)
    else:
        from probe_ase import __version__

        assert __version__ in printed                                # probe-ase --version


@pytest.mark.slow
def test_gate_md_tutorial(tmp_path, monkeypatch):
    """CLI fit and gated MD, then the same from Python: every run halts at 1500 K and writes its files."""
    ns, printed = run_page("docs/tutorials/gate-md.md", tmp_path, monkeypatch)
    _load_head(tmp_path / "probe.pt")
    assert "halted at step" in printed                                 # the CLI run
    for file in ("md.traj", "reliability.log", "flagged.xyz", "py-md.traj", "py-reliability.log", "py-flagged.xyz",
                 "md2.traj"):
        assert (tmp_path / file).stat().st_size > 0, file
    assert ns["monitor"].halted and ns["monitor"].summary()["halted"]
    safe, atoms = ns["safe"], ns["monitor"].atoms  # a detached copy of the last reliable step, before the halt
    assert safe is not atoms and safe.calc is None and len(safe) == len(atoms)
    assert np.abs(safe.get_momenta()).sum() > 0 and not np.allclose(safe.positions, atoms.positions)
    assert all(_in_unit_interval(frame.info["reliability"]) for frame in ns["frames"])


@pytest.mark.slow
def test_fit_on_dft_tutorial(tmp_path, monkeypatch):
    """Fit with reference data, read the report, refit from the stored spec, evaluate into a report folder."""
    ns, printed = run_page("docs/tutorials/fit-on-dft.md", tmp_path, monkeypatch)
    probe, report = ns["probe"], ns["report"]
    assert _load_head(tmp_path / "probe.pt").spec == probe.spec
    assert ns["probe2"].spec == probe.spec
    assert report["n_reference"] > 0                                   # reference_data was used
    assert set(report["certificate"]) >= {"certified", "risk", "delta", "frames_needed"}
    assert 0.5 < report["auroc"] <= 1
    for file in ("report.md", "metrics.json", "roc.png", "scatter.png"):
        assert (tmp_path / "report" / file).stat().st_size > 0, file


@pytest.mark.slow
def test_big_cell_tutorial(tmp_path, monkeypatch):
    """The 4 092-atom cell passes as a structure; its least reliable atom sits at the vacancy cluster.

    "At": within 6 Å of the removed centre atom, i.e. in the first shell around the four vacancies (the cell
    is about 29 x 29 x 58 Å, so an atom picked at random almost never is).
    """
    from ase.geometry import get_distances
    from ase.io import read

    ns, printed = run_page("docs/tutorials/big-cell.md", tmp_path, monkeypatch)
    atoms, r = ns["atoms"], ns["r"]
    assert len(atoms) == 4092 and r["reliable"] and r["reason"] == "ok"
    assert _in_unit_interval(r["atom_reliability"]) and r["atom_reliability"].shape == (4092,)
    worst = int(np.argmin(r["atom_reliability"]))
    distance = get_distances(atoms.positions[worst], ns["defect"], cell=atoms.cell, pbc=True)[1][0, 0]
    assert distance < 6.0, f"least reliable atom {worst} is {distance:.1f} Å from the defect"
    written = read(tmp_path / "large_cell.xyz")
    assert "atom_reliability" in written.arrays and len(written) == 4092


@pytest.mark.slow
def test_active_learning_tutorial(tmp_path, monkeypatch):
    """Explore, label, export and retrain in Python, one round of run_round, one round and a check from the CLI."""
    from ase.io import read

    from probe_ase import ProbeCalculator, check_database

    ns, printed = run_page("docs/tutorials/active-learning.md", tmp_path, monkeypatch)
    assert len(ns["done"]) > 0                                         # labelled rows read back from al.db
    labelled = read(tmp_path / "round1.xyz", ":")
    assert labelled and all(frame.get_forces().shape == (len(frame), 3) for frame in labelled)
    new_calc, probe = ns["new_calc"], ns["probe"]
    assert isinstance(new_calc, ProbeCalculator) and new_calc.base is not ns["base"]
    # a retrained backbone gets a refitted head, with the old head's settings: its atom tolerance (eV/Å) absolute
    refit = new_calc.probe
    assert refit.meta.fingerprint != probe.meta.fingerprint and refit.meta.local
    assert refit.spec.atom_tolerance == pytest.approx(probe.meta.atom_tau) == refit.meta.atom_tau
    assert (refit.spec.criterion, refit.spec.target_risk, refit.spec.delta) == \
        (probe.spec.criterion, probe.spec.target_risk, probe.spec.delta)
    assert ns["report"].labelled > 0 and ns["report"].row() in printed
    assert check_database(tmp_path / "al-cli.db").ok                  # what `probe-ase al --check` checked
    assert re.search(r"^\s*1\s+\d+", printed, re.M)                   # the command line's table row of round 1


def test_api_page_lists_every_public_name():
    """docs/reference/api.md says everything under "Public names" is importable from probe_ase: keep it true."""
    import probe_ase
    import probe_ase.exceptions

    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    public = page.split("## Public names", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^::: probe_ase\.([\w.]+)", public, re.M)
    names = {entry.rsplit(".", 1)[-1] for entry in entries if entry != "exceptions"}
    exceptions = {name for name in vars(probe_ase.exceptions) if name[0].isupper()
                  and isinstance(getattr(probe_ase.exceptions, name), type)
                  and issubclass(getattr(probe_ase.exceptions, name), BaseException)
                  and getattr(probe_ase.exceptions, name).__module__ == "probe_ase.exceptions"}
    assert "exceptions" in entries
    assert names <= set(probe_ase.__all__), f"not importable from probe_ase: {names - set(probe_ase.__all__)}"
    assert set(probe_ase.__all__) <= names | exceptions, \
        f"public names missing from the API page: {set(probe_ase.__all__) - names - exceptions}"
    for entry in entries:
        if entry != "exceptions":
            assert getattr(probe_ase, entry.rsplit(".", 1)[-1]) is not None
