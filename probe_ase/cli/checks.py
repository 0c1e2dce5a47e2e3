"""Checks of the command line's values, run before any expensive work.

Each check raises :class:`~probe_ase.exceptions.InputError` (or another
:class:`~probe_ase.exceptions.ProbeError`) with a one-line message naming the
option, the value and the fix, and the values as details; ``probe-ase`` prints
that line and exits with status 2. Only the stdlib is imported at module level.
"""

from __future__ import annotations

import os
import re
import zipfile

from probe_ase.exceptions import HeadFileError, InputError

STRUCTURE_FORMATS = "extxyz, an ASE trajectory, an ase.db or any file ASE reads"


# ---- numbers -----------------------------------------------------------------------------------------------
def at_least(value: float | None, flag: str, low: float, unit: str = "") -> None:
    """``value >= low`` (None: not given, fine)."""
    if value is not None and not value >= low:
        raise InputError(f"{flag} must be >= {low}{unit}, got {value}", flag=flag, value=value, low=low)


def positive(value: float | None, flag: str, unit: str = "") -> None:
    """``value > 0`` (None: not given, fine)."""
    if value is not None and not value > 0:
        raise InputError(f"{flag} must be positive{unit}, got {value}", flag=flag, value=value)


def fraction(value: float | None, flag: str, *, open_low: bool = True, open_high: bool = True) -> None:
    """``value`` in 0-1, each end excluded unless ``open_low`` / ``open_high`` is False (None: fine)."""
    if value is None:
        return
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        span = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise InputError(f"{flag} must lie in {span}, got {value}", flag=flag, value=value)


# ---- devices -----------------------------------------------------------------------------------------------
def device(name: str, flag: str = "--device") -> None:
    """A torch device that exists here: ``cpu``, ``cuda``/``cuda:N`` with a GPU, ``mps`` on Apple silicon."""
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if match is None:
        raise InputError(f"{flag} {name!r} is not a torch device; use cpu, cuda or cuda:N", flag=flag, device=name)
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return
    import torch  # the parser is built without torch; a run imports it anyway

    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{flag} {name}: torch sees no CUDA GPU here; use {flag} cpu", flag=flag, device=name)
        if index is not None and int(index) >= count:
            raise InputError(f"{flag} {name}: torch sees {count} CUDA GPU(s), cuda:0-cuda:{count - 1}",
                             flag=flag, device=name, count=count)
    elif not torch.backends.mps.is_available():
        raise InputError(f"{flag} {name}: torch has no MPS device here; use {flag} cpu", flag=flag, device=name)


# ---- input files -------------------------------------------------------------------------------------------
def input_file(path: str, flag: str, what: str = "file") -> None:
    """``path`` exists, is a readable, non-empty regular file (not a folder)."""
    if not os.path.exists(path):
        raise InputError(f"no such {what}: {path} ({flag})", flag=flag, path=path)
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder; pass a {what}", flag=flag, path=path)
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {flag} {path}: permission denied", flag=flag, path=path)
    if os.path.getsize(path) == 0:
        raise InputError(f"{flag} {path} is empty; pass a {what} with content", flag=flag, path=path)


def structures(path: str, flag: str, index: int = 0):
    """Check that ``path`` holds structures ASE can read; return its frame ``index`` (the first by default).

    ASE databases are read through ASE too; a bad file gives one line naming it and the formats that work.
    """
    input_file(path, flag, "structure file")
    from ase.io import read

    try:
        atoms = read(path, index=index)
    except Exception as err:  # ASE raises anything from StopIteration to ValueError on a foreign file
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
        raise InputError(f"cannot read structures from {path} ({flag}; {detail}); pass {STRUCTURE_FORMATS}",
                         flag=flag, path=path) from None
    if isinstance(atoms, list):  # pragma: no cover - an int index gives one Atoms
        atoms = atoms[index]
    if len(atoms) == 0:
        raise InputError(f"{flag} {path}: its frame {index} has no atoms", flag=flag, path=path, index=index)
    return atoms


def backbone_source(name: str, flag: str = "--backbone") -> None:
    """A pretrained name, or a readable non-empty model file (what is in it is checked by ``load_backbone``)."""
    from probe_ase.cli.options import PRETRAINED

    if name in PRETRAINED:
        return
    if not os.path.exists(name):
        raise InputError(f"no such backbone file: {name} ({flag}; pretrained names: {', '.join(PRETRAINED)})",
                         flag=flag, path=name)
    input_file(name, flag, "model file")


def head_file(path: str, flag: str = "--probe") -> None:
    """A readable head file: a torch archive (what 'probe-ase fit' writes)."""
    input_file(path, flag, "head file")
    if not zipfile.is_zipfile(path):
        raise HeadFileError(f"{flag} {path} is not a head file (not a torch archive); pass the file "
                            "'probe-ase fit -o' wrote", flag=flag, path=path)


def load_head(path: str, flag: str = "--probe"):
    """The :class:`~probe_ase.Probe` in ``path``, or one line saying why it is not a head file."""
    from probe_ase.model.probe import Probe

    head_file(path, flag)
    try:
        return Probe.load(path)
    except HeadFileError as err:
        message = str(err)
        if "\n" in message or "Weights only load failed" in message:  # torch's advice is not ours to give
            raise HeadFileError(f"{flag} {path} is not a head file written by 'probe-ase fit' (a model file?)",
                                flag=flag, path=path) from None
        raise


# ---- output paths ------------------------------------------------------------------------------------------
def _writable_folder(folder: str, flag: str, path: str) -> None:
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: folder {folder} does not exist; create it first", flag=flag, path=path,
                         folder=folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: folder {folder} is not writable", flag=flag, path=path, folder=folder)


def output_file(path: str, flag: str, *, exists_ok: bool = True, fix: str = "") -> None:
    """``path`` can be written: not a folder, its folder exists and is writable; refused if it exists and not
    ``exists_ok`` (``fix`` says what to do then)."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder; pass a file name", flag=flag, path=path)
    _writable_folder(os.path.dirname(os.path.abspath(path)), flag, path)
    if os.path.exists(path):
        if not exists_ok:
            raise InputError(f"{flag} {path} exists{'; ' + fix if fix else ''}", flag=flag, path=path)
        if not os.access(path, os.W_OK):
            raise InputError(f"{flag} {path} exists and is not writable", flag=flag, path=path)


def output_folder(path: str, flag: str) -> None:
    """``path`` is a writable folder, or can be created in a writable folder."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise InputError(f"{flag} {path} is a file, not a folder; pass a folder name", flag=flag, path=path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: folder is not writable", flag=flag, path=path)
        return
    _writable_folder(os.path.dirname(os.path.abspath(path)), flag, path)


def distinct(first: str, second: str, flags: str) -> None:
    """Two paths that must not be the same file (an input and the output that would replace it)."""
    if os.path.abspath(first) == os.path.abspath(second):
        raise InputError(f"{flags} must differ: both are {first}", path=first, output=second)
