"""Invariant channels of e3nn irreps features (MACE, SevenNet): the ``0e`` scalars and the norm of every other channel.

Plain functions of e3nn ``Irreps`` objects and tensors: importing this module
imports no backbone library.
"""

from __future__ import annotations

import torch


def is_scalar(ir: object) -> bool:
    """Whether an e3nn ``Irrep`` is a true scalar, ``0e``."""
    return ir.l == 0 and ir.p == 1


def scalar_channels(irreps: object) -> list[int]:
    """Column indices of the ``0e`` channels of an e3nn ``Irreps``."""
    index: list[int] = []
    for (_mul, ir), sl in zip(irreps, irreps.slices()):
        if is_scalar(ir):
            index.extend(range(sl.start, sl.stop))
    return index


def n_norms(irreps: object) -> int:
    """How many channels of an e3nn ``Irreps`` are not ``0e`` (one norm each)."""
    return sum(mul for mul, ir in irreps if not is_scalar(ir))


def invariants(x: torch.Tensor, irreps: object, index: list[int], norms: bool) -> torch.Tensor:
    """The ``0e`` channels ``index`` of features ``x`` ``(n_atoms, irreps.dim)`` (a view when contiguous), then,
    with ``norms``, the norm of each other channel over its 2l + 1 components (dimensionless, like ``x``)."""
    contiguous = index == list(range(index[0], index[-1] + 1))
    scalars = x[:, index[0] : index[-1] + 1] if contiguous else x[:, index]
    if not norms:
        return scalars
    rest = [torch.linalg.vector_norm(x[:, part].reshape(-1, mul, ir.dim), dim=-1)
            for (mul, ir), part in zip(irreps, irreps.slices()) if not is_scalar(ir)]
    return torch.cat([scalars, *rest], dim=-1)
