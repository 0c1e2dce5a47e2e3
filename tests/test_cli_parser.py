"""The probe-ase parser: cheap to build, grouped help, --version, --quiet, choices that match the library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import probe_ase
from probe_ase.cli import COMMANDS, build_parser, main

ROOT = str(Path(probe_ase.__file__).resolve().parents[1])


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_building_the_parser_and_help_import_no_heavy_library():
    """`probe-ase --help` and `probe-ase fit --help` answer without torch, ASE, numpy or a backbone library."""
    heavy = ("torch", "ase", "numpy", "scipy", "mace", "e3nn", "tqdm")
    code = ("import sys\nfrom probe_ase.cli import build_parser\nparser = build_parser()\n"
            "for argv in (['--help'], ['fit', '--help'], ['md', '--help']):\n"
            "    try:\n        parser.parse_args(argv)\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"probe-ase {probe_ase.__version__}"


def test_fit_help_is_grouped_and_names_units(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for group in ("essential:", "certificate:", "advanced:"):
        assert group in text
    assert "eV/Å" in text and "eV/atom" in text and "--tolerance TAU" in text
    assert "--threshold" not in text and "--atom-threshold" not in text  # deprecated spellings are hidden
    assert text.index("essential:") < text.index("certificate:") < text.index("advanced:")


def test_md_help_names_the_renamed_options(capsys):
    with pytest.raises(SystemExit):
        main(["md", "--help"])
    text = capsys.readouterr().out
    for option in ("--dynamics", "--min-reliability", "--traj-interval", "--append", "--restart"):
        assert option in text
    assert "--ensemble" not in text and "--threshold" not in text
    assert " K" in text and "fs" in text


def test_fit_advanced_group_is_fit_options_one_to_one():
    """Each option of fit's advanced group is a FitOptions field, each field an option, with the same default."""
    import dataclasses

    from probe_ase.cli import fit

    from probe_ase import FitOptions
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["fit"]
    group = next(g for g in sub._action_groups if g.title == "advanced")
    dests = {a.dest: a.default for a in group._group_actions}
    fields = {f.name: f.default for f in dataclasses.fields(FitOptions)}
    assert dests == fields
    args = parser.parse_args(["fit", "--backbone", "m", "--data", "d", "--layers", "0", "1", "--epochs", "7"])
    assert fit.options(args) == FitOptions(layers=(0, 1), epochs=7)


def test_choices_match_the_library():
    from probe_ase.cli import options
    from probe_ase.fitting.certify import FALLBACKS
    from probe_ase.fitting.labels import CRITERIA
    from probe_ase.fitting.train import CALIBRATION
    from probe_ase.taps import ADAPTERS

    assert options.BACKBONE_TYPES == ("auto", *ADAPTERS)
    assert options.PRETRAINED == tuple(name for cls in ADAPTERS.values() for name in cls.pretrained)
    assert options.CRITERIA == tuple(CRITERIA) and options.FALLBACKS == tuple(FALLBACKS)
    assert options.CALIBRATION == tuple(CALIBRATION)
    assert set(options.CHANNELS) == {c for cls in ADAPTERS.values() for c in cls.channel_sets}


def test_quiet_is_global_or_per_command():
    parser = build_parser()
    assert parser.parse_args(["--quiet", "demo"]).quiet is True
    assert parser.parse_args(["demo", "-q"]).quiet is True
    assert parser.parse_args(["demo"]).quiet is False
    for name in COMMANDS:
        assert "-q, --quiet" in next(a for a in parser._actions if a.dest == "command").choices[name].format_help()


def test_usage_errors_are_one_line_exit_2():
    result = _python("import sys\nfrom probe_ase.cli import main\nsys.exit(main(sys.argv[1:]))",
                     "fit", "--backbone", "m", "--data", "d", "--epochs", "x")
    assert result.returncode == 2
    assert result.stderr == ("probe-ase fit: error: argument --epochs: invalid int value: 'x' "
                             "(see 'probe-ase fit --help')\n")
