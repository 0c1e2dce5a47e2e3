"""The small interface every backbone tap implements.

A tap attaches torch forward hooks to the per-atom feature modules of a
backbone held by an ASE calculator. Whenever the backbone runs its own
energy/force pass, the hooks keep the invariant (scalar) part of each tapped
layer's output, detached and in the backbone's dtype. No second forward pass is
ever made to get features.

Taps also offer :meth:`Tap.predict`, a batched backbone pass over many
structures (energies, forces and features together) used to build training
data and to score trajectories.
"""

from __future__ import annotations

import copy
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from ..exceptions import InputError


@dataclass(frozen=True)
class Prediction:
    """Backbone output for one structure (energy in eV, forces in eV/Å)."""

    energy: float
    forces: np.ndarray
    features: torch.Tensor


class Tap(ABC):
    """Hooks on one backbone's feature modules.

    Subclasses name the backbone (``kind``), say which calculators they accept,
    list the modules to hook and how to take the invariant part of each output.
    """

    kind: ClassVar[str]

    def __init__(self, calc: Calculator, layers: Sequence[int] | None = None) -> None:
        self.calc = calc
        modules = self.feature_modules()
        n = len(modules)
        chosen = tuple(range(n)) if layers is None else tuple(int(i) for i in layers)
        bad = [i for i in chosen if not -n <= i < n]
        if not chosen or bad:
            raise InputError(f"layers {list(chosen)} invalid for a {self.kind} backbone with {n} tappable layers (0..{n - 1})")
        self.layers = tuple(sorted({i % n for i in chosen}))
        self._captured: dict[int, torch.Tensor] = {}
        self.n_forward = 0
        self._handles = [
            modules[i].register_forward_hook(self._make_hook(i)) for i in self.layers
        ]
        self._inputs_seen: dict | None = None  # the backbone's input dict of the last pass (its neighbour list)
        self._loops: torch.Tensor | None = None  # self loops (2, n_atoms) of the last graph
        self._handles.append(self.module.register_forward_pre_hook(self._make_input_hook(), with_kwargs=True))
        self.feature_dim = sum(self.layer_width(i) for i in self.layers)

    # ---- what a backbone adapter provides ---------------------------------
    @classmethod
    @abstractmethod
    def accepts(cls, calc: Calculator) -> bool:
        """Whether ``calc`` is a calculator of this backbone."""

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The backbone ``torch.nn.Module`` whose parameters define it."""

    @abstractmethod
    def feature_modules(self) -> list[torch.nn.Module]:
        """Modules, one per interaction layer, whose outputs carry atom features."""

    @abstractmethod
    def layer_width(self, layer: int) -> int:
        """Number of invariant channels a layer contributes."""

    @abstractmethod
    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """The invariant per-atom part ``(n_atoms, width)`` of a hooked output."""

    @property
    @abstractmethod
    def elements(self) -> tuple[int, ...]:
        """Atomic numbers the backbone knows."""

    @property
    @abstractmethod
    def cutoff(self) -> float:
        """The backbone's interaction radius (Å)."""

    @property
    def list_cutoff(self) -> float:
        """Radius (Å) of the neighbour list the calculator hands the backbone (at least :attr:`cutoff`)."""
        return self.cutoff

    #: keys of the backbone's input dict that :meth:`_pairs` reads
    pair_keys: ClassVar[tuple[str, ...]]

    @abstractmethod
    def _pairs(self, inputs: dict) -> torch.Tensor:
        """Neighbour pairs ``(2, n_pairs)`` (destination, source) of a backbone input dict."""

    @abstractmethod
    def _vectors(self, inputs: dict) -> torch.Tensor:
        """Pair vectors ``(n_pairs, 3)`` in Å, source minus destination, periodic images included."""

    @abstractmethod
    def _predict_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One backbone pass over ``frames``: energies (eV) and forces (eV/Å)."""

    # ---- shared machinery --------------------------------------------------
    def _make_hook(self, layer: int):
        def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
            if layer == self.layers[0]:
                self.n_forward += 1
            self._captured[layer] = self.invariant(layer, output).detach()

        return hook

    def _make_input_hook(self):
        # a closure, like the feature hooks: deepcopy treats functions as atomic, so a
        # tapped backbone can still be deep-copied (a bound method would drag the tap along)
        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else kwargs.get("data")
            self._inputs_seen = {k: inputs[k].detach() for k in self.pair_keys if k in inputs}  # references, no copies

        return pre_hook

    def neighbour_graph(self, cutoff: float) -> torch.Tensor | None:
        """The head's graph ``(2, n_atoms + n_pairs)`` from the backbone's own neighbour list of the last pass.

        Self loops first, then every pair closer than ``cutoff`` (Å), so it
        equals :func:`probe_ase.graph.radius_graph` as a set of edges. None when
        ``cutoff`` exceeds the list's (it would miss pairs) or no pass has been
        seen: the caller then builds the graph itself.
        """
        if self._inputs_seen is None or len(self._inputs_seen) < len(self.pair_keys) or cutoff > self.list_cutoff + 1e-9:
            return None
        pairs = self._pairs(self._inputs_seen)
        if cutoff < self.list_cutoff - 1e-9:  # a shorter radius than the list's: drop the far pairs
            pairs = pairs[:, (self._vectors(self._inputs_seen) ** 2).sum(1) < cutoff**2]
        n = next(iter(self._captured.values())).shape[0]
        if self._loops is None or self._loops.shape[1] != n or self._loops.device != pairs.device:
            self._loops = torch.arange(n, device=pairs.device).expand(2, n)
        return torch.cat([self._loops, pairs], dim=1)

    def _transform(self, layer_outputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Hook for adapters whose layer features are sums of hooked outputs."""
        return layer_outputs

    def features(self) -> torch.Tensor:
        """Features of every atom in the last forward pass, ``(n_atoms, feature_dim)``."""
        if len(self._captured) != len(self.layers):
            raise RuntimeError(f"no {self.kind} forward pass has been captured yet")
        layers = self._transform(self._captured)
        return torch.cat([layers[i] for i in self.layers], dim=-1)

    def predict(self, frames: Sequence[Atoms], batch_size: int = 32) -> Iterator[Prediction]:
        """Run the backbone over ``frames`` in batches; yield one :class:`Prediction` each."""
        for start in range(0, len(frames), batch_size):
            chunk = frames[start : start + batch_size]
            energies, forces = self._predict_batch(chunk)
            feats = self.features()
            offsets = np.cumsum([0] + [len(a) for a in chunk])
            for k, atoms in enumerate(chunk):
                yield Prediction(float(energies[k]), forces[k], feats[offsets[k] : offsets[k + 1]])

    def fingerprint(self) -> str:
        """SHA-256 of the backbone's parameters and buffers (dtype-independent)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.module.state_dict().items()):
            digest.update(name.encode())
            t = tensor.detach().cpu()
            if t.is_floating_point():
                t = t.to(torch.float32)
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save_backbone(self, path: str | os.PathLike) -> None:
        """``torch.save`` a hook-free copy of the backbone module (hooks are not picklable)."""
        clone = copy.deepcopy(self.module)
        for module in clone.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        torch.save(clone, path)

    def close(self) -> None:
        """Remove the hooks; the backbone is left exactly as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()
        self._inputs_seen = None

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
