"""Small real backbones and data for tests, examples and the demo.

Everything here runs on a CPU in seconds and needs no files or network:
:func:`emt_frames` makes labelled frames with ASE's EMT potential and
:func:`train_mace` trains a tiny MACE on them. The SchNetPack counterparts live
in :mod:`probe_ase.testing.schnetpack` (needs the ``schnetpack`` extra).
:func:`check_tap` is the conformance suite every backbone adapter passes.
"""

from __future__ import annotations

from probe_ase.testing.conformance import check_tap
from probe_ase.testing.data import emt_frames, hot_spot_frames
from probe_ase.testing.invariance import assert_invariant
from probe_ase.testing.mace import train_mace

__all__ = ["assert_invariant", "check_tap", "emt_frames", "hot_spot_frames", "train_mace"]
