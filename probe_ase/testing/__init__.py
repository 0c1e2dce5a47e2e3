"""Small real backbones and data for tests, examples and the demo.

Everything here runs on a CPU in seconds and needs no files or network:
:func:`emt_frames` makes labelled frames with ASE's EMT potential and
:func:`train_mace` trains a tiny MACE on them (the ``mace`` extra). The SchNetPack counterparts live
in :mod:`probe_ase.testing.schnetpack` (needs the ``schnetpack`` extra).
:func:`check_tap` is the conformance suite every backbone adapter passes.
"""

from __future__ import annotations

from probe_ase.testing.conformance import check_tap
from probe_ase.testing.data import emt_frames, hot_spot_frames
from probe_ase.testing.invariance import assert_invariant

try:  # mace-torch is the mace extra: without it the rest of this package works, and train_mace says what to install
    import mace  # noqa: F401
except ModuleNotFoundError:

    def train_mace(*args: object, **kwargs: object) -> None:
        """Train a tiny MACE (eV, eV/Å): needs mace-torch, so here a BackboneError naming its extra, ``mace``."""
        from probe_ase.taps import MaceTap

        MaceTap.require()
else:
    from probe_ase.testing.mace import train_mace

__all__ = ["assert_invariant", "check_tap", "emt_frames", "hot_spot_frames", "train_mace"]
