"""Load a backbone calculator from a model file or a pretrained name (for the command line).

Every adapter in :data:`probe_ase.taps.ADAPTERS` says which files are its
(:meth:`~probe_ase.taps.base.Tap.owns`) and how to load them. Every backbone
library is a pip extra of probe-ase: where the one a name or file needs is
missing, the error is a :class:`~probe_ase.exceptions.BackboneError` naming it
(``pip install "probe-ase[sevenn]"``). Model files of MACE and SchNetPack are
whole pickled torch modules, so loading one runs code from it: only load files
you trust (the libraries themselves do the same).
"""

from __future__ import annotations

import os
import warnings

import torch
from ase.calculators.calculator import Calculator

from probe_ase.exceptions import BackboneError, InputError
from probe_ase.taps import ADAPTERS, adapter
from probe_ase.taps.base import quiet_import


def backbone_types() -> list[str]:
    """The CLI's ``--backbone-type`` choices: ``auto`` and every adapter's kind."""
    return ["auto", *ADAPTERS]


def pretrained_names() -> list[str]:
    """Names :func:`load_backbone` takes instead of a file (weights shipped with a backbone's library)."""
    return [name for cls in ADAPTERS.values() for name in cls.pretrained]


def _torch_load(name: str, device: str):
    """``torch.load`` a whole pickled model, or a :class:`BackboneError` naming the file when it is not one."""
    import pickle
    import zipfile

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript.*")  # reported below, with the fix
            return torch.load(name, map_location=device, weights_only=False)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as err:
        raise BackboneError(f"{name} is not a torch model file ({type(err).__name__}); pass a MACE .model, a "
                            "SchNetPack or CHGNet model file, a SevenNet checkpoint, or a pretrained name",
                            path=name) from None
    except RuntimeError as err:
        if "PytorchStreamReader" in str(err) or "zip archive" in str(err) or "invalid load key" in str(err):
            raise BackboneError(f"{name} is not a torch model file (a damaged or truncated archive?); pass a MACE "
                                ".model, a SchNetPack or CHGNet model file or a SevenNet checkpoint",
                                path=name) from None
        raise
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        extra = next((cls.extra for cls in ADAPTERS.values() if cls.library == top and cls.extra), None)
        fix = f': pip install "probe-ase[{extra}]"' if extra else ""
        raise BackboneError(f"{name} holds a model of the {err.name} package, which is not installed here{fix}",
                            path=name, missing=err.name, extra=extra) from None


def load_backbone(path: str | os.PathLike, kind: str = "auto", device: str = "cpu") -> Calculator:
    """An ASE calculator (energies in eV, forces in eV/Å) for a model file or pretrained name.

    ``path`` is a model file, or a name an adapter ships weights for (e.g.
    ``chgnet-0.3.0``, ``7net-0``). ``kind`` is an adapter's kind, or ``auto`` to
    ask each adapter whether the file is its. A missing backbone library is a
    :class:`BackboneError` naming the extra that installs it.
    """
    name = os.fspath(path)
    for cls in ADAPTERS.values():
        if name in cls.pretrained and kind in ("auto", cls.kind):
            cls.require()
            return cls.load(name, device)
    if not os.path.exists(name):
        raise InputError(f"no such backbone file: {name} (pretrained names: {', '.join(pretrained_names())})",
                         path=name)
    if os.path.isdir(name):
        raise InputError(f"backbone {name} is a folder; pass a model file or a pretrained name", path=name)
    wanted = None if kind == "auto" else adapter(kind)
    if wanted is not None:
        wanted.require()
    if ADAPTERS["mace"].available():
        # import e3nn (through mace) before unpickling: e3nn loads its constants with
        # torch.load at import, and a torch.load nested in another one fails
        quiet_import("mace.modules")
    model = _torch_load(name, device)
    if isinstance(model, torch.jit.ScriptModule):
        raise BackboneError(f"{name} is a TorchScript model (e.g. a MACE *_compiled.model); forward hooks cannot tap "
                            "it: load the uncompiled model file instead", path=name, found=type(model).__name__)
    owner = next((cls for cls in ADAPTERS.values() if cls.owns(model)), None)  # needs only what unpickling imported
    if wanted is not None and owner is not wanted:
        found = owner.kind if owner else f"{type(model).__module__}.{type(model).__name__}"
        raise BackboneError(f"{name} holds a {found} model, not {kind}", path=name, expected=kind, found=found)
    if owner is not None:
        owner.require()
        return owner.load(name, device, model=model)
    what = f"{type(model).__module__}.{type(model).__name__}"
    raise BackboneError(f"{name} holds a {what}, which no adapter ({', '.join(ADAPTERS)}) owns; "
                        "load it yourself and tap it with ModuleTap", path=name, found=what)
