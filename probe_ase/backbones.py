"""Load a backbone calculator from a model file (for the command line).

Model files of MACE and SchNetPack are whole pickled torch modules, so loading
one runs code from it: only load files you trust (the libraries themselves
do the same).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from ase.calculators.calculator import Calculator

from .exceptions import BackboneError, InputError

BackboneKind = Literal["auto", "mace", "schnetpack"]


def detect_kind(model: torch.nn.Module) -> str:
    """``"mace"`` or ``"schnetpack"`` from the library that defines ``model``."""
    library = type(model).__module__.split(".")[0]
    if library not in ("mace", "schnetpack"):
        raise BackboneError(f"{type(model).__module__}.{type(model).__name__} is neither a MACE nor a SchNetPack model")
    return library


def load_backbone(path: str | os.PathLike, kind: BackboneKind = "auto", device: str = "cpu") -> Calculator:
    """An ASE calculator for the model in ``path`` (energies in eV, forces in eV/Å)."""
    if not os.path.exists(path):
        raise InputError(f"no such backbone file: {path}")
    if kind in ("auto", "mace"):
        # import e3nn (through mace) before unpickling: e3nn loads its constants with
        # torch.load at import, and a torch.load nested in another one fails
        import mace.modules  # noqa: F401
    model = torch.load(path, map_location=device, weights_only=False)
    found = detect_kind(model)
    if kind != "auto" and kind != found:
        raise BackboneError(f"{path} holds a {found} model, not {kind}")
    if found == "mace":
        from mace.calculators import MACECalculator

        return MACECalculator(models=model, device=device)
    from .taps.schnetpack import spk_calculator

    return spk_calculator(path, device=device)
