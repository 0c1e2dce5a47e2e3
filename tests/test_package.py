"""The package surface: cheap import, every public name resolves, one exception tree."""

from __future__ import annotations

import subprocess
import sys

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


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        probe_ase.nope  # noqa: B018
