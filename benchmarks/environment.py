"""What a benchmark ran on: package versions, git commit, machine; and model file digests.

Benchmarks store :func:`environment` in their JSON, so a number that moves
between runs can be traced to a changed package, commit or trained model
(the reruns of 2026-11-26, commit 6b3d35c, found the benchmark members had
changed with the resolved environment, unrecorded). The CPU is recorded too: with the same packages,
seeds and data, mace-torch's 20-epoch training picks a different best epoch
on a different CPU (2026-12-02, commit da0c180: one machine's AVX-512 kernels, or the same
machine limited to AVX2, gave three different acac members 0), so members
are reproducible per CPU kind, not across kinds.
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


def cpu() -> dict:
    """The CPU's model name, its vector extensions and the set torch's kernels dispatch to (all move trained members)."""
    name, flags = None, set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except OSError:
        pass
    try:
        import torch
        capability = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        capability = None
    vector = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
    return {"model": name or platform.processor() or None, "vector_extensions": vector, "torch_capability": capability}


def environment(models: Iterable[str | os.PathLike] = ()) -> dict:
    """Python, machine, installed versions of :data:`PACKAGES` (None: absent), git commit and model digests."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"python": platform.python_version(), "machine": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu(),
            "packages": versions, "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "models": {Path(m).name: file_digest(m) for m in models}}
