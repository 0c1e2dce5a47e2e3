"""Load a backbone calculator from a model file or a pretrained name (for the command line).

Every adapter in :data:`probe_ase.taps.ADAPTERS` says which files are its
(:meth:`~probe_ase.taps.base.Tap.owns`) and how to load them. Model files of
MACE and SchNetPack are whole pickled torch modules, so loading one runs code
from it: only load files you trust (the libraries themselves do the same).
"""

from __future__ import annotations

import os

import torch
from ase.calculators.calculator import Calculator

from .exceptions import BackboneError, InputError
from .taps import ADAPTERS, adapter


def backbone_types() -> list[str]:
    """The CLI's ``--backbone-type`` choices: ``auto`` and every adapter's kind."""
    return ["auto", *ADAPTERS]


def pretrained_names() -> list[str]:
    """Names :func:`load_backbone` takes instead of a file (weights shipped with a backbone's library)."""
    return [name for cls in ADAPTERS.values() for name in cls.pretrained]


def _require(cls) -> None:
    if not cls.available():
        extra = f'pip install "probe-ase[{cls.extra}]"' if cls.extra else f"pip install {cls.library}"
        raise BackboneError(f"the {cls.kind} backbone needs the {cls.library} package: {extra}", kind=cls.kind)


def load_backbone(path: str | os.PathLike, kind: str = "auto", device: str = "cpu") -> Calculator:
    """An ASE calculator (energies in eV, forces in eV/Å) for a model file or pretrained name.

    ``path`` is a model file, or a name an adapter ships weights for (e.g.
    ``chgnet-0.3.0``). ``kind`` is an adapter's kind, or ``auto`` to ask each
    adapter whether the file is its.
    """
    name = os.fspath(path)
    for cls in ADAPTERS.values():
        if name in cls.pretrained and kind in ("auto", cls.kind):
            _require(cls)
            return cls.load(name, device)
    if not os.path.exists(name):
        raise InputError(f"no such backbone file: {name} (pretrained names: {', '.join(pretrained_names())})",
                         path=name)
    wanted = None if kind == "auto" else adapter(kind)
    if wanted is not None:
        _require(wanted)
    if ADAPTERS["mace"].available():
        # import e3nn (through mace) before unpickling: e3nn loads its constants with
        # torch.load at import, and a torch.load nested in another one fails
        import mace.modules  # noqa: F401
    model = torch.load(name, map_location=device, weights_only=False)
    owner = next((cls for cls in ADAPTERS.values() if cls.available() and cls.owns(model)), None)
    if wanted is not None and owner is not wanted:
        found = owner.kind if owner else f"{type(model).__module__}.{type(model).__name__}"
        raise BackboneError(f"{name} holds a {found} model, not {kind}", path=name, expected=kind, found=found)
    if owner is not None:
        return owner.load(name, device, model=model)
    what = f"{type(model).__module__}.{type(model).__name__}"
    raise BackboneError(f"{name} holds a {what}, which no adapter ({', '.join(ADAPTERS)}) owns; "
                        "load it yourself and tap it with ModuleTap", path=name, found=what)
