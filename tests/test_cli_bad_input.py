"""Bad command lines: every subcommand answers one error line, exit status 2, before any expensive work.

Each case runs ``probe-ase`` in-process in a folder of its own (the current
directory too, so default output names land there) with the expensive stages
(fitting, scoring, MD, evaluation, the demo, active learning, any backbone
pass) replaced by a tripwire: a case passes only if it is refused before
reaching them, which also keeps it well under 5 s. Nothing in the folder (or
in the shared files) may be written, changed or left behind.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from ase.io import write

from probe_ase.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, backbones, cu_data):
    """The run's MACE as a model file (and TorchScript-compiled), a cheap head fitted by the CLI, data files."""
    root = tmp_path_factory.mktemp("cli-bad")
    model = backbones("mace").models[0]
    torch.save(model, root / "mace.model")
    from e3nn.util import jit

    torch.jit.save(jit.compile(torch.load(root / "mace.model", weights_only=False)), root / "mace_compiled.model")
    write(root / "pool.xyz", cu_data["pool"], format="extxyz")
    write(root / "test.xyz", cu_data["test_in"][:4], format="extxyz")
    assert main(["fit", "--backbone", str(root / "mace.model"), "--data", str(root / "pool.xyz"), "--quantile", "0.7",
                 "--epochs", "3", "--weight-folds", "0", "--no-cache", "-q", "-o", str(root / "probe.pt")]) == 0
    return root


def _trip(*args, **kwargs):
    raise AssertionError("a bad command line reached the expensive work")


@pytest.fixture
def tripwire(monkeypatch):
    """Every expensive stage raises: a case must be refused before any of them."""
    import probe_ase.al.learner
    import probe_ase.demo
    import probe_ase.evaluation.evaluate
    import probe_ase.fitting.pipeline
    import probe_ase.md
    import probe_ase.scoring
    from probe_ase.taps.base import Tap

    for module, name in ((probe_ase.fitting.pipeline, "fit_probe"), (probe_ase.scoring, "score_frames"),
                         (probe_ase.md, "run_gated"), (probe_ase.evaluation.evaluate, "evaluate"),
                         (probe_ase.demo, "run_demo"), (probe_ase.al.learner, "ActiveLearner"), (Tap, "predict")):
        monkeypatch.setattr(module, name, _trip)


def _files(work):
    """The work folder's own files: a malformed, an empty and a text file, a folder, random bytes, MD starts."""
    (work / "malformed.xyz").write_text("3\nLattice=\"1 0 0\" Properties=species:S:1:pos:R:3\nCu 0 0\n")
    (work / "empty.xyz").write_text("")
    (work / "notes.txt").write_text("hello, not a structure\n")
    (work / "folder").mkdir()
    (work / "random.bin").write_bytes(bytes(range(256)) * 8)
    (work / "existing.traj").write_bytes(b"precious trajectory")
    (work / "existing.log").write_text("precious log\n")


def _start(work, cu_data):
    write(work / "start.xyz", cu_data["test_in"][0])
    bare = cu_data["test_in"][0].copy()
    if bare.has("momenta"):
        del bare.arrays["momenta"]
    write(work / "bare.xyz", bare, format="extxyz")
    hot = cu_data["test_in"][0].copy()
    hot.pbc = False
    write(work / "cluster.xyz", hot, format="extxyz")


def _config(work, f, **changes) -> str:
    """An al.toml whose every file exists, with ``changes`` (``"section.key": "toml value"``) applied."""
    values = {"backbone": f'"{f / "mace.model"}"', "probe": f'"{f / "probe.pt"}"', "db": f'"{work / "al.db"}"',
              "start": f'"{work / "start.xyz"}"', "reference.calculator": '"ase.calculators.emt:EMT"',
              "explore.steps": "5"}
    values.update(changes)
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        sections.setdefault(section, []).append(f"{name} = {value}")
    text = "\n".join(sections.pop("", [])) + "\n"
    for section, lines in sections.items():
        text += f"\n[{section}]\n" + "\n".join(lines) + "\n"
    (work / "al.toml").write_text(text)
    return str(work / "al.toml")


def _cases():
    """(case, what the one error line must name, argv builder taking (work folder, shared files))."""

    def fit(w, f, *extra, data=None):
        return ["fit", "--backbone", str(f / "mace.model"), "--data", data or str(f / "pool.xyz"), "--no-cache",
                "-o", str(w / "out.pt"), *extra]

    def score(w, f, *extra, frames=None, probe=None):
        return ["score", frames or str(f / "test.xyz"), "--probe", probe or str(f / "probe.pt"),
                "-o", str(w / "out.xyz"), *extra]

    def md(w, f, *extra, start=None):
        return ["md", *([start or str(w / "start.xyz")] if start != "" else []), "--probe", str(f / "probe.pt"),
                "--steps", "2", "--trajectory", str(w / "out.traj"), *extra]

    def evaluate(w, f, *extra):
        return ["evaluate", str(f / "test.xyz"), "--probe", str(f / "probe.pt"), "--report", str(w / "report"),
                *extra]

    return [
        # fit: the backbone
        ("fit-backbone-missing", "no such backbone file", lambda w, f: fit(w, f) + ["--backbone", str(w / "no.model")]),
        ("fit-companion-missing", "(--companion; pretrained names",
         lambda w, f: fit(w, f, "--companion", str(w / "no.model"))),
        ("fit-backbone-folder", "is a folder", lambda w, f: fit(w, f) + ["--backbone", str(w / "folder")]),
        ("fit-backbone-random-bytes", "is not a torch model file",
         lambda w, f: fit(w, f) + ["--backbone", str(w / "random.bin")]),
        ("fit-backbone-empty", "is empty", lambda w, f: fit(w, f) + ["--backbone", str(w / "empty.xyz")]),
        ("fit-backbone-compiled", "load the uncompiled model file",
         lambda w, f: fit(w, f) + ["--backbone", str(f / "mace_compiled.model")]),
        ("fit-device-gpu", "'gpu' is not a torch device; use cpu, cuda or cuda:N",
         lambda w, f: fit(w, f, "--device", "gpu")),
        ("fit-device-cuda-index", "CUDA GPU", lambda w, f: fit(w, f, "--device", "cuda:99")),
        # fit: the data and the output
        ("fit-data-malformed", "cannot read structures from",
         lambda w, f: fit(w, f, data=str(w / "malformed.xyz"))),
        ("fit-data-empty", "is empty", lambda w, f: fit(w, f, data=str(w / "empty.xyz"))),
        ("fit-data-text", "cannot read structures from", lambda w, f: fit(w, f, data=str(w / "notes.txt"))),
        ("fit-data-folder", "is a folder", lambda w, f: fit(w, f, data=str(w / "folder"))),
        ("fit-data-missing", "no such structure file", lambda w, f: fit(w, f, data=str(w / "absent.xyz"))),
        ("fit-reference-data-missing", "no such structure file",
         lambda w, f: fit(w, f, "--reference-data", str(w / "absent.xyz"))),
        ("fit-output-folder", "is a folder; pass a file name", lambda w, f: fit(w, f, "-o", str(w / "folder"))),
        ("fit-output-no-parent", "does not exist", lambda w, f: fit(w, f, "-o", str(w / "no" / "out.pt"))),
        ("fit-output-is-data", "must differ", lambda w, f: fit(w, f, "-o", str(w / "data.xyz"),
                                                               data=str(w / "data.xyz"))),
        ("fit-cache-dir-file", "is a file, not a folder",
         lambda w, f: [a for a in fit(w, f) if a != "--no-cache"] + ["--cache-dir", str(w / "notes.txt")]),
        # fit: numbers
        ("fit-batch-size-zero", "--batch-size must be >= 1, got 0", lambda w, f: fit(w, f, "--batch-size", "0")),
        ("fit-negative-tolerance", "--tolerance must be positive", lambda w, f: fit(w, f, "--tolerance", "-1")),
        ("fit-negative-threshold-alias", "--tolerance must be positive", lambda w, f: fit(w, f, "--threshold", "-1")),
        ("fit-negative-atom-tolerance", "--atom-tolerance must be positive",
         lambda w, f: fit(w, f, "--atom-tolerance", "0")),
        ("fit-quantile-above-one", "--quantile must lie in (0, 1), got 1.5", lambda w, f: fit(w, f, "--quantile", "1.5")),
        ("fit-atom-quantile-zero", "--atom-quantile must lie in (0, 1)", lambda w, f: fit(w, f, "--atom-quantile", "0")),
        ("fit-target-risk-zero", "--target-risk must lie in (0, 1)", lambda w, f: fit(w, f, "--target-risk", "0")),
        ("fit-delta-one", "--delta must lie in (0, 1)", lambda w, f: fit(w, f, "--delta", "1")),
        ("fit-support-quantile-zero", "--support-quantile must lie in (0, 1]",
         lambda w, f: fit(w, f, "--support-quantile", "0")),
        ("fit-zero-members", "--members must be >= 1", lambda w, f: fit(w, f, "--members", "0")),
        ("fit-crossfit-members", "--members must be 1 or 5, got 2",
         lambda w, f: fit(w, f, "--calibration", "crossfit", "--members", "2")),
        ("fit-one-fold", "--folds must be >= 2", lambda w, f: fit(w, f, "--folds", "1")),
        ("fit-one-weight-fold", "--weight-folds must be 0", lambda w, f: fit(w, f, "--weight-folds", "1")),
        ("fit-zero-epochs", "--epochs must be >= 1", lambda w, f: fit(w, f, "--epochs", "0")),
        ("fit-zero-patience", "--patience must be >= 1", lambda w, f: fit(w, f, "--patience", "0")),
        ("fit-zero-hidden", "--hidden must be >= 1", lambda w, f: fit(w, f, "--hidden", "0")),
        ("fit-negative-cutoff", "--cutoff must be positive (Å)", lambda w, f: fit(w, f, "--cutoff", "-2")),
        ("fit-negative-layer", "--layers must be >= 0", lambda w, f: fit(w, f, "--layers", "-1")),
        ("fit-not-a-number", "argument --epochs: invalid int value: 'x'", lambda w, f: fit(w, f, "--epochs", "x")),
        ("fit-unknown-criterion", "argument --criterion: invalid choice",
         lambda w, f: fit(w, f, "--criterion", "energy_rmse")),
        ("fit-tolerance-and-quantile", "not allowed with argument",
         lambda w, f: fit(w, f, "--tolerance", "0.1", "--quantile", "0.5")),
        # score
        ("score-malformed", "cannot read structures from", lambda w, f: score(w, f, frames=str(w / "malformed.xyz"))),
        ("score-empty", "is empty", lambda w, f: score(w, f, frames=str(w / "empty.xyz"))),
        ("score-frames-folder", "is a folder", lambda w, f: score(w, f, frames=str(w / "folder"))),
        ("score-output-folder", "is a folder; pass a file name", lambda w, f: score(w, f, "-o", str(w / "folder"))),
        ("score-output-no-parent", "does not exist", lambda w, f: score(w, f, "-o", str(w / "no" / "o.xyz"))),
        ("score-output-is-input", "must differ", lambda w, f: score(w, f, "-o", str(f / "test.xyz"))),
        ("score-batch-size-zero", "--batch-size must be >= 1, got 0", lambda w, f: score(w, f, "--batch-size", "0")),
        ("score-probe-random-bytes", "is not a head file", lambda w, f: score(w, f, probe=str(w / "random.bin"))),
        ("score-probe-is-a-model", "is not a head file written by 'probe-ase fit'",
         lambda w, f: score(w, f, probe=str(f / "mace.model"))),
        ("score-probe-missing", "no such head file", lambda w, f: score(w, f, probe=str(w / "absent.pt"))),
        ("score-backbone-folder", "is a folder", lambda w, f: score(w, f, "--backbone", str(w / "folder"))),
        ("score-device-gpu", "is not a torch device", lambda w, f: score(w, f, "--device", "gpu")),
        # md
        ("md-empty", "is empty", lambda w, f: md(w, f, start=str(w / "empty.xyz"))),
        ("md-text", "cannot read structures from", lambda w, f: md(w, f, start=str(w / "notes.txt"))),
        ("md-folder", "is a folder", lambda w, f: md(w, f, start=str(w / "folder"))),
        ("md-negative-temperature", "--temperature must be >= 0 K", lambda w, f: md(w, f, "--temperature", "-5")),
        ("md-zero-timestep", "--timestep must be positive (fs)", lambda w, f: md(w, f, "--timestep", "0")),
        ("md-negative-friction", "--friction must be positive (1/fs)", lambda w, f: md(w, f, "--friction", "-0.01")),
        ("md-negative-steps", "--steps must be >= 1, got -5", lambda w, f: md(w, f, "--steps", "-5")),
        ("md-min-reliability-above-one", "--min-reliability must lie in [0, 1], got 1.5",
         lambda w, f: md(w, f, "--min-reliability", "1.5")),
        ("md-threshold-alias-above-one", "--min-reliability must lie in [0, 1], got 1.5",
         lambda w, f: md(w, f, "--threshold", "1.5")),
        ("md-min-atom-reliability-above-one", "--min-atom-reliability must lie in [0, 1]",
         lambda w, f: md(w, f, "--min-atom-reliability", "2")),
        ("md-min-atom-reliability-global-head", "needs a head with per-atom reliability",
         lambda w, f: md(w, f, "--min-atom-reliability", "auto")),
        ("md-zero-patience", "--patience must be >= 1", lambda w, f: md(w, f, "--patience", "0")),
        ("md-zero-traj-interval", "--traj-interval must be >= 1", lambda w, f: md(w, f, "--traj-interval", "0")),
        ("md-existing-trajectory", "exists; pass --append",
         lambda w, f: md(w, f, "--trajectory", str(w / "existing.traj"))),
        ("md-existing-log", "--log", lambda w, f: md(w, f, "--log", str(w / "existing.log"))),
        ("md-trajectory-folder", "is a folder; pass a file name", lambda w, f: md(w, f, "--trajectory", str(w / "folder"))),
        ("md-log-is-trajectory", "must differ", lambda w, f: md(w, f, "--log", str(w / "out.traj"))),
        ("md-no-start", "give a starting STRUCTURE or --restart", lambda w, f: md(w, f, start="")),
        ("md-start-and-restart", "give a starting STRUCTURE or --restart",
         lambda w, f: md(w, f, "--restart", str(w / "start.xyz"))),
        ("md-restart-without-momenta", "has no momenta", lambda w, f: md(w, f, "--restart", str(w / "bare.xyz"),
                                                                         start="")),
        ("md-restart-into-its-log", "--restart and --log must differ",
         lambda w, f: md(w, f, "--restart", str(w / "start.xyz"), "--log", str(w / "start.xyz"), "--append", start="")),
        ("md-npt-cluster", "--dynamics npt needs a periodic cell",
         lambda w, f: md(w, f, "--dynamics", "npt", start=str(w / "cluster.xyz"))),
        ("md-unknown-dynamics", "argument --dynamics: invalid choice", lambda w, f: md(w, f, "--dynamics", "nph")),
        ("md-device-cuda-index", "CUDA GPU", lambda w, f: md(w, f, "--device", "cuda:99")),
        ("md-companion-missing", "(--companion; pretrained names",
         lambda w, f: md(w, f, "--companion", str(w / "absent.model"))),
        ("md-companion-every-zero", "--companion-every must be >= 1",
         lambda w, f: md(w, f, "--companion", str(f / "mace.model"), "--companion-every", "0")),
        ("md-vouch-above-one", "--vouch must lie in [0, 1]",
         lambda w, f: md(w, f, "--companion", str(f / "mace.model"), "--vouch", "1.5")),
        ("md-vouch-without-companion", "need a --companion model", lambda w, f: md(w, f, "--vouch", "0.5")),
        ("md-companion-is-the-backbone", "a second opinion needs a second model",
         lambda w, f: md(w, f, "--companion", str(f / "mace.model"))),
        # evaluate
        ("evaluate-report-is-a-file", "--report", lambda w, f: evaluate(w, f, "--report", str(w / "notes.txt"))),
        ("evaluate-report-no-parent", "does not exist",
         lambda w, f: evaluate(w, f, "--report", str(w / "no" / "report"))),
        ("evaluate-frames-text", "cannot read structures from",
         lambda w, f: evaluate(w, f)[:1] + [str(w / "notes.txt")] + evaluate(w, f)[2:]),
        ("evaluate-ensemble-missing", "no such model file",
         lambda w, f: evaluate(w, f, "--ensemble", str(f / "mace.model"), str(w / "absent.model"))),
        ("evaluate-negative-importance", "--importance must be >= 0", lambda w, f: evaluate(w, f, "--importance", "-1")),
        ("evaluate-batch-size-zero", "--batch-size must be >= 1", lambda w, f: evaluate(w, f, "--batch-size", "0")),
        # demo
        ("demo-out-is-a-file", "is a file, not a folder", lambda w, f: ["demo", "--out", str(w / "notes.txt")]),
        ("demo-out-no-parent", "does not exist", lambda w, f: ["demo", "--out", str(w / "no" / "demo")]),
        ("demo-negative-seed", "--seed must be >= 0", lambda w, f: ["demo", "--out", str(w / "d"), "--seed", "-1"]),
        # al
        ("al-config-missing", "no such config file", lambda w, f: ["al", str(w / "absent.toml")]),
        ("al-config-folder", "is a folder", lambda w, f: ["al", str(w / "folder")]),
        ("al-config-not-toml", "cannot read config", lambda w, f: ["al", str(w / "notes.txt")]),
        ("al-unknown-key", "unknown keys ['bogus']", lambda w, f: ["al", _config(w, f, **{"explore.bogus": "1"})]),
        ("al-missing-start", "lacks ['start']", lambda w, f: ["al", _config(w, f, start=None)]),
        ("al-negative-steps", "explore.steps in", lambda w, f: ["al", _config(w, f, **{"explore.steps": "-5"})]),
        ("al-steps-not-a-number", "must be a whole number",
         lambda w, f: ["al", _config(w, f, **{"explore.steps": '"many"'})]),
        ("al-p-hi-above-one", "explore.p_hi", lambda w, f: ["al", _config(w, f, **{"explore.p_hi": "1.5"})]),
        ("al-p-lo-above-p-hi", "explore.p_lo",
         lambda w, f: ["al", _config(w, f, **{"explore.p_lo": "0.6", "explore.p_hi": "0.2"})]),
        ("al-region-buffer-zero", "explore.region_buffer",
         lambda w, f: ["al", _config(w, f, **{"explore.region_buffer": "0"})]),
        ("al-reference-options-not-table", "reference.options",
         lambda w, f: ["al", _config(w, f, **{"reference.options": "3"})]),
        ("al-unknown-ensemble", "explore.ensemble", lambda w, f: ["al", _config(w, f, **{"explore.ensemble": '"nph"'})]),
        ("al-zero-workers", "label.workers", lambda w, f: ["al", _config(w, f, **{"label.workers": "0"})]),
        ("al-vouch-without-companion", "need explore.companion",
         lambda w, f: ["al", _config(w, f, **{"explore.vouch": "0.5"})]),
        ("al-start-missing", "no such structure file",
         lambda w, f: ["al", _config(w, f, start=f'"{w / "absent.xyz"}"')]),
        ("al-probe-random-bytes", "is not a head file",
         lambda w, f: ["al", _config(w, f, probe=f'"{w / "random.bin"}"')]),
        ("al-backbone-missing", "no such backbone file",
         lambda w, f: ["al", _config(w, f, backbone=f'"{w / "absent.model"}"')]),
        ("al-db-folder", "is a folder", lambda w, f: ["al", _config(w, f, db=f'"{w / "folder"}"')]),
        ("al-reference-unimportable", "cannot import reference calculator",
         lambda w, f: ["al", _config(w, f, **{"reference.calculator": '"no_such_module:Calc"'})]),
        ("al-retrain-data-missing", "retrain.train_data",
         lambda w, f: ["al", _config(w, f, **{"retrain.train_data": f'"{w / "absent.xyz"}"',
                                              "retrain.fit_data": f'"{f / "pool.xyz"}"'})]),
        ("al-device-gpu", "is not a torch device", lambda w, f: ["al", _config(w, f), "--device", "gpu"]),
        ("al-check-db-missing", "no such database", lambda w, f: ["al", "--check", _config(w, f)]),
    ]


CASES = _cases()


@pytest.mark.parametrize("case,message,argv", CASES, ids=[c for c, _, _ in CASES])
def test_bad_input_is_one_clear_line_exit_2_and_writes_nothing(inputs, cu_data, tripwire, tmp_path, monkeypatch,
                                                              capsys, case, message, argv):
    if case == "fit-output-is-data":
        shutil.copy(inputs / "pool.xyz", tmp_path / "data.xyz")
    _files(tmp_path)
    _start(tmp_path, cu_data)
    args = argv(tmp_path, inputs)
    monkeypatch.chdir(tmp_path)  # default output names (reliability.log, flagged.xyz, probe.pt ...) land here
    shared = {p.name: p.read_bytes() for p in inputs.iterdir() if p.is_file()}
    before = {p.relative_to(tmp_path): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    err = captured.err
    errors = [line for line in err.splitlines() if "error:" in line]
    others = [line for line in err.splitlines() if "error:" not in line and "warning:" not in line]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert errors[0].startswith("probe-ase") and "Traceback" not in err and not others, err
    after = {p.relative_to(tmp_path): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert after == before  # nothing written, changed or left behind
    assert {p.name: p.read_bytes() for p in inputs.iterdir() if p.is_file()} == shared


def test_deprecated_spellings_warn_once_and_still_work(inputs, capsys):
    """--threshold (fit) and --ensemble / --threshold / --interval (md) still parse, each with one warning line."""
    from probe_ase.cli import build_parser

    args = build_parser().parse_args(["fit", "--backbone", "m", "--data", "d", "--threshold", "0.2",
                                      "--atom-threshold", "0.3"])
    assert (args.tolerance, args.atom_tolerance) == (0.2, 0.3)
    args = build_parser().parse_args(["md", "s.xyz", "--probe", "p", "--ensemble", "nve", "--threshold", "0.4",
                                      "--interval", "3"])
    assert (args.dynamics, args.min_reliability, args.traj_interval) == ("nve", 0.4, 3)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 5 and all("is deprecated" in w and "; use --" in w for w in warnings)
    assert "--ensemble is deprecated and will be removed in the next release; use --dynamics" in warnings[2]


def test_loading_a_mace_file_prints_no_import_notices(inputs):
    """e3nn's torch.load warnings and mace's cuequivariance print are silenced where probe-ase imports them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import probe_ase

    code = ("import sys\nfrom probe_ase.backbones import load_backbone\nload_backbone(sys.argv[1])\n"
            "import warnings\nwarnings.warn('after the import, warnings are shown again')")
    result = subprocess.run([sys.executable, "-c", code, str(inputs / "mace.model")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(Path(probe_ase.__file__).parents[1])})
    assert result.returncode == 0, result.stderr
    assert "cuequivariance" not in result.stdout + result.stderr
    assert "weights_only" not in result.stderr and "WEIGHTS_ONLY" not in result.stderr
    assert "after the import, warnings are shown again" in result.stderr  # nothing filtered globally
