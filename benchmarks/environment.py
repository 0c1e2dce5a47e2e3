"""What a benchmark ran on: package versions, git commit, machine; and model file digests.

Benchmarks store :func:`environment` in their JSON, so a number that moves
between runs can be traced to a changed package, commit or trained model
(session 14 found its benchmark members had changed with the resolved
environment, unrecorded).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

#: distributions whose versions can move a benchmark's numbers
PACKAGES = ("probe-ase", "torch", "mace-torch", "e3nn", "schnetpack", "pytorch-lightning", "chgnet", "ase",
            "numpy", "scipy", "scikit-learn", "tblite")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def file_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of a file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def environment(models: Iterable[str | os.PathLike] = ()) -> dict:
    """Python, machine, installed versions of :data:`PACKAGES` (None: absent), git commit and model digests."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"python": platform.python_version(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "packages": versions, "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "models": {Path(m).name: file_digest(m) for m in models}}
