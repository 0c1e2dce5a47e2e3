"""Helpers the fitting tests share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import numpy as np

from probe_ase.scoring import score_frames


def held_out_scores(calc, probe, frames):
    """The reliability ``probe`` gives each of ``frames`` (batched scoring) and the frame's true force RMSE (eV/Å)."""
    with probe.tap_for(calc) as tap:
        scored = list(score_frames(probe, tap, frames))
    p = np.array([f.info["reliability"] for f in scored])
    err = np.array([np.sqrt(np.mean((f.arrays["mlip_forces"] - f.get_forces()) ** 2)) for f in scored])
    return p, err
