"""The package surface: cheap import, every public name resolves, one exception tree."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import probe_ase
from probe_ase.fitting.train import TrainConfig
from probe_ase.model.head import HeadConfig
from probe_ase.model.novelty import NoveltyConfig


def test_import_loads_no_heavy_dependency():
    code = "import sys, probe_ase; print(sorted(m for m in ('torch', 'sklearn', 'scipy', 'mace') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", probe_ase.__all__)
def test_every_public_name_resolves(name):
    import importlib

    value = getattr(probe_ase, name)
    home = importlib.import_module(f"probe_ase.{probe_ase._LAZY.get(name, 'exceptions')}")
    assert getattr(home, name) is value  # the defining module's own object, under its own name
    assert isinstance(value, dict) or value.__name__ == name
    assert name in dir(probe_ase)


def test_every_exception_is_in_the_tree():
    tree = probe_ase.exceptions.__doc__
    errors = [v for v in vars(probe_ase.exceptions).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(errors) >= 11
    for err in errors:
        assert issubclass(err, probe_ase.ProbeError)
        assert err.__name__ in tree
        assert getattr(probe_ase, err.__name__) is err


def test_errors_carry_the_offending_values(tmp_path):
    from ase import Atoms

    from probe_ase.fitting.labels import make_labels
    from probe_ase.validate import check_atoms

    with pytest.raises(probe_ase.UnknownElementError) as info:
        check_atoms(Atoms("CuAuAu", positions=[[0, 0, 0], [2, 0, 0], [4, 0, 0]]), [29], where="frame 3")
    assert info.value.unknown == [79] and info.value.known == [29] and info.value.where == "frame 3"
    assert info.value.details == {"where": "frame 3", "unknown": [79], "known": [29]}
    with pytest.raises(probe_ase.LabelError) as info:
        make_labels([0.1, 0.2], tau=1.0)
    assert (info.value.n, info.value.n_reliable, info.value.tau) == (2, 2, 1.0)
    with pytest.raises(probe_ase.HeadFileError) as info:
        probe_ase.Probe.load(tmp_path / "absent.pt")
    assert info.value.path == str(tmp_path / "absent.pt")
    assert probe_ase.ProbeError("plain").details == {}


def _bulk_cu():
    from ase.build import bulk

    return bulk("Cu", "fcc", a=3.6, cubic=True)


def _certify(target_risk, fallback="strictest"):
    from probe_ase.fitting.certify import certify

    return certify(np.zeros(10), np.zeros(10, dtype=bool), np.zeros(5), target_risk, 0.1, fallback=fallback)


def _make_dynamics(pbc: bool = True, **kwargs):
    from probe_ase.md import make_dynamics

    atoms = _bulk_cu()
    atoms.pbc = pbc
    return make_dynamics(atoms, **kwargs)


def _active_learner(tmp_path, **kwargs):
    from ase.calculators.emt import EMT

    return probe_ase.ActiveLearner(None, EMT, db=tmp_path / "al.db", **kwargs)


def _resolve_tolerance(**kwargs):
    from probe_ase.fitting.labels import resolve_tolerance

    return resolve_tolerance(np.linspace(0, 1, 5), **kwargs)


#: (call given tmp_path, error class, offending values it must carry as attributes)
DELIBERATE_ERRORS = {
    "fit-options-members": (lambda tmp: probe_ase.FitOptions(members=0), probe_ase.InputError, {"members": 0}),
    "fit-options-crossfit": (lambda tmp: probe_ase.FitOptions(calibration="crossfit", members=2), probe_ase.InputError,
                             {"members": 2, "folds": 5}),
    "fit-options-channels": (lambda tmp: probe_ase.FitOptions(channels="vectors"), probe_ase.InputError,
                             {"channels": "vectors"}),
    "fit-spec-criterion": (lambda tmp: probe_ase.FitSpec(criterion="forces"), probe_ase.InputError,
                           {"criterion": "forces"}),
    "fit-spec-both": (lambda tmp: probe_ase.FitSpec(tolerance=0.1, quantile=0.5), probe_ase.InputError,
                      {"tolerance": 0.1, "quantile": 0.5}),
    "fit-spec-tolerance": (lambda tmp: probe_ase.FitSpec(tolerance=-1.0), probe_ase.InputError, {"tolerance": -1.0}),
    "fit-spec-risk": (lambda tmp: probe_ase.FitSpec(target_risk=0.0), probe_ase.InputError,
                      {"target_risk": 0.0, "delta": 0.1}),
    "head-heads": (lambda tmp: HeadConfig(heads=0), probe_ase.InputError,
                   {"hidden": 64, "heads": 0, "blocks": 1}),
    "head-divisible": (lambda tmp: HeadConfig(hidden=10, heads=4), probe_ase.InputError,
                       {"hidden": 10, "heads": 4}),
    "head-cutoff": (lambda tmp: HeadConfig(cutoff=-1.0), probe_ase.InputError, {"cutoff": -1.0}),
    "train-epochs": (lambda tmp: TrainConfig(epochs=0), probe_ase.InputError,
                     {"epochs": 0, "patience": 20, "batch_size": 32}),
    "train-fractions": (lambda tmp: TrainConfig(val_fraction=0.5, cal_fraction=0.6), probe_ase.InputError,
                        {"val_fraction": 0.5, "cal_fraction": 0.6}),
    "novelty-folds": (lambda tmp: NoveltyConfig(folds=1), probe_ase.InputError,
                      {"components": 2, "folds": 1}),
    "novelty-quantile": (lambda tmp: NoveltyConfig(support_quantile=0.0), probe_ase.InputError,
                         {"support_quantile": 0.0}),
    "md-temperature": (lambda tmp: _make_dynamics(temperature_K=-5.0), probe_ase.InputError, {"temperature_K": -5.0}),
    "md-npt-molecule": (lambda tmp: _make_dynamics(ensemble="npt", pbc=False), probe_ase.InputError,
                        {"pbc": [False, False, False]}),
    "regions-buffer": (lambda tmp: probe_ase.extract_regions(_bulk_cu(), [0], buffer=0.0), probe_ase.InputError,
                       {"buffer": 0.0}),
    "certify-risk": (lambda tmp: _certify(1.5), probe_ase.InputError, {"target_risk": 1.5, "delta": 0.1}),
    "certify-fallback": (lambda tmp: _certify(0.05, fallback="loosest"), probe_ase.InputError, {"fallback": "loosest"}),
    "labels-quantile": (lambda tmp: _resolve_tolerance(quantile=1.5), probe_ase.InputError, {"quantile": 1.5}),
    "read-frames": (lambda tmp: probe_ase.read_frames(tmp / "absent.xyz"), probe_ase.InputError,
                    {"path": "{tmp}/absent.xyz"}),
    "al-band": (lambda tmp: _active_learner(tmp, p_lo=0.9, p_hi=0.1), probe_ase.InputError,
                {"p_lo": 0.9, "p_hi": 0.1}),
    "load-backbone": (lambda tmp: probe_ase.load_backbone(tmp / "absent.model"), probe_ase.InputError,
                      {"path": "{tmp}/absent.model"}),
}


@pytest.mark.parametrize("case", DELIBERATE_ERRORS)
def test_every_deliberate_error_names_its_values(case, tmp_path):
    call, error, expected = DELIBERATE_ERRORS[case]
    with pytest.raises(error) as info:
        call(tmp_path)
    err = info.value
    assert err.details
    for name, value in expected.items():
        value = value.format(tmp=tmp_path) if isinstance(value, str) else value
        assert getattr(err, name) == value and err.details[name] == value, name


#: raises of classes outside the ProbeError tree, (file, class) -> why
NOT_PROBE_ERRORS = {
    ("__init__.py", "AttributeError"): "module __getattr__ protocol: an unknown public name",
    ("cli/md.py", "argparse.ArgumentTypeError"): "argparse's type-converter protocol",
    ("fitting/spec.py", "KeyError"): "the Mapping protocol: a FitSpec unpacks as fit_probe's keywords",
    ("taps/base.py", "NotImplementedError"): "an optional adapter method; check_tap skips it on this error",
    ("testing/conformance.py", "AssertionError"): "check_tap is a test assertion for pytest",
    ("testing/invariance.py", "AssertionError"): "an invariance check is a test assertion for pytest",
    ("testing/faults.py", "RuntimeError"): "fault harness: a driver subprocess it started failed",
    ("testing/faults.py", "TimeoutError"): "fault harness: a condition never came within its timeout",
    ("testing/postgres.py", "FileNotFoundError"): "test server helper: PostgreSQL binaries are not installed",
    ("testing/reference.py", "RuntimeError"): "stands in for a foreign reference calculator crashing",
}


def test_every_raise_is_a_probe_error_with_details():
    """Static: each ``raise X(...)`` in probe_ase/ is a ProbeError with keyword details, or allow-listed."""
    tree = {n for n, v in vars(probe_ase.exceptions).items() if isinstance(v, type) and issubclass(v, Exception)}
    root = Path(probe_ase.__file__).parent
    bare, foreign = [], set()
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                error = ast.unparse(node.exc.func)
                if error not in tree:
                    foreign.add((name, error))
                elif not node.exc.keywords:
                    bare.append(f"{name}:{node.lineno} {error}")
    assert not bare, f"ProbeErrors raised without the offending values: {bare}"
    assert foreign <= set(NOT_PROBE_ERRORS), f"not ProbeErrors: {sorted(foreign - set(NOT_PROBE_ERRORS))}"


def test_modules_and_functions_stay_small():
    """Static: no module in probe_ase/ over 400 lines, no function over 60 (docstring included)."""
    root = Path(probe_ase.__file__).parent
    long_modules, long_functions = [], []
    for path in sorted(root.rglob("*.py")):
        name, text = path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 400:
            long_modules.append(f"{name} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_modules, f"modules over 400 lines: {long_modules}"
    assert not long_functions, f"functions over 60 lines: {long_functions}"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        probe_ase.nope  # noqa: B018


def test_library_calls_leave_global_state_alone(backbones, cu_data, tmp_path):
    """fit_probe and the plots change neither torch's global RNG nor matplotlib's backend."""
    import matplotlib
    import torch

    from probe_ase import FitOptions, fit_probe
    from probe_ase.evaluation.report import plot_evaluation

    base = backbones("mace")  # trained (and seeded) before the RNG is watched
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's choice that the library must not switch to Agg
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe = fit_probe(base, cu_data["pool"][:60], quantile=0.7, options=FitOptions(epochs=3), cache_dir=False,
                      progress=False)
    assert torch.equal(torch.rand(3), expected)
    rng = np.random.default_rng(0)
    err = rng.uniform(0, 0.1, 40)
    try:
        written = plot_evaluation({"PROBE": err}, 1 - err, err, err <= 0.05, 0.05, probe.p_star, "force_rmse", tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert len(written) == 4 and all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in written)
