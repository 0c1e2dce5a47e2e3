"""The package surface: cheap import, every public name resolves, one exception tree."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import probe_ase


def test_import_loads_no_heavy_dependency():
    code = "import sys, probe_ase; print(sorted(m for m in ('torch', 'sklearn', 'scipy', 'mace') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", probe_ase.__all__)
def test_every_public_name_resolves(name):
    assert getattr(probe_ase, name) is not None
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

    from probe_ase.labels import make_labels
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


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        probe_ase.nope  # noqa: B018


def test_library_calls_leave_global_state_alone(backbones, cu_data, tmp_path):
    """fit_probe and the plots change neither torch's global RNG nor matplotlib's backend."""
    import matplotlib
    import torch

    from probe_ase import TrainConfig, fit_probe
    from probe_ase.report import plot_evaluation

    base = backbones("mace")  # trained (and seeded) before the RNG is watched
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's choice that the library must not switch to Agg
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe = fit_probe(base, cu_data["pool"][:60], quantile=0.7, train=TrainConfig(epochs=3),
                      cache_dir=False, progress=False)
    assert torch.equal(torch.rand(3), expected)
    rng = np.random.default_rng(0)
    err = rng.uniform(0, 0.1, 40)
    try:
        written = plot_evaluation({"PROBE": err}, 1 - err, err, err <= 0.05, 0.05, probe.p_star, "force_rmse", tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert len(written) == 4 and all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in written)
