"""The small interface every backbone tap implements.

A tap attaches torch forward hooks to the per-atom feature modules of a
backbone held by an ASE calculator. Whenever the backbone runs its own
energy/force pass, the hooks keep the invariant (scalar) part of each tapped
layer's output, detached and in the backbone's dtype. No second forward pass is
ever made to get features.

Taps also offer :meth:`Tap.predict`, a batched backbone pass over many
structures (energies, forces and features together) used to build training
data and to score trajectories.

One set of hooks per backbone module: every tap on the same module (two
``ProbeCalculator`` wrappers, a guard and a monitor, NEB images sharing one
model) shares it, refcounted, and what a pass captured is kept *per thread*,
so a tap only ever reads the features of a pass made by its own thread. The
shared :attr:`Tap.lock` serialises the backbone calculator's pass with reading
its results and features (ASE calculators keep their results in one place);
``ProbeCalculator`` holds it for each step.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from ..exceptions import BackboneError, InputError


@dataclass(frozen=True)
class Prediction:
    """Backbone output for one structure (energy in eV, forces in eV/Å)."""

    energy: float
    forces: np.ndarray
    features: torch.Tensor


class _Capture(threading.local):
    """What the hooks kept from the last backbone pass made by the current thread."""

    def __init__(self) -> None:
        self.layers: dict[int, torch.Tensor] = {}  # invariant features per layer
        self.inputs: dict | None = None  # the backbone's input dict (its neighbour list)
        self.scratch: dict[int, torch.Tensor] = {}  # adapter state between a layer's pre-hook and hook
        self.count = 0  # passes seen


class _Hooks:
    """The one set of hooks on a backbone module, shared (refcounted) by every tap on it."""

    def __init__(self, tap: Tap) -> None:
        self.capture = _Capture()
        self.lock = threading.RLock()
        self.users = 0
        modules = tap.feature_modules()
        self.handles = [m.register_forward_hook(_feature_hook(self, weakref.ref(m), i, tap.invariant))
                        for i, m in enumerate(modules)]
        self.handles += tap._extra_hooks(self)
        self.handles.append(tap.module.register_forward_pre_hook(
            _input_hook(self, weakref.ref(tap.module), tap.pair_keys), with_kwargs=True))


# hooks are closures, not bound methods: deepcopy treats functions as atomic, so a tapped
# backbone can still be deep-copied; a copy's passes are ignored (the module check)
def _feature_hook(hooks: _Hooks, owner: weakref.ref, layer: int, invariant):
    def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
        if module is owner():
            if layer == 0:
                hooks.capture.count += 1
            # a copy: a slice view would keep the whole output (l > 0 channels included) alive
            hooks.capture.layers[layer] = invariant(layer, output).detach().clone()

    return hook


def _input_hook(hooks: _Hooks, owner: weakref.ref, keys: tuple[str, ...]):
    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module is owner():
            inputs = args[0] if args else kwargs.get("data")
            hooks.capture.inputs = {k: inputs[k].detach() for k in keys if k in inputs}  # references, no copies

    return pre_hook


#: the hooks of every tapped backbone module (weak: a dropped backbone drops its entry)
_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, _Hooks] = weakref.WeakKeyDictionary()
_HOOKS_LOCK = threading.Lock()


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
        self.feature_dim = sum(self.layer_width(i) for i in self.layers)
        with _HOOKS_LOCK:
            hooks = _HOOKS.get(self.module)
            if hooks is None:
                hooks = _HOOKS[self.module] = _Hooks(self)
            hooks.users += 1
        self._hooks: _Hooks | None = hooks
        self._loops: torch.Tensor | None = None  # self loops (2, n_atoms) of the last graph

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

    def _extra_hooks(self, hooks: _Hooks) -> list[torch.utils.hooks.RemovableHandle]:
        """Further hooks an adapter needs (e.g. pre-hooks), writing into ``hooks.capture.scratch``."""
        return []

    # ---- shared machinery --------------------------------------------------
    def _live(self) -> _Hooks:
        if self._hooks is None:
            raise BackboneError(f"this {self.kind} tap is closed: its hooks were removed")
        return self._hooks

    @property
    def _capture(self) -> _Capture:
        return self._live().capture

    @property
    def lock(self) -> threading.RLock:
        """Lock shared by every tap on this backbone: hold it around a pass and the reading of its results."""
        return self._live().lock

    @property
    def n_forward(self) -> int:
        """Backbone passes this thread has made since the backbone was first tapped (0 once closed)."""
        return 0 if self._hooks is None else self._hooks.capture.count

    def neighbour_graph(self, cutoff: float) -> torch.Tensor | None:
        """The head's graph ``(2, n_atoms + n_pairs)`` from the backbone's own neighbour list of the last pass.

        Self loops first, then every pair closer than ``cutoff`` (Å), so it
        equals :func:`probe_ase.graph.radius_graph` as a set of edges. None when
        ``cutoff`` exceeds the list's (it would miss pairs) or no pass has been
        seen: the caller then builds the graph itself.
        """
        seen = self._capture.inputs
        if seen is None or len(seen) < len(self.pair_keys) or cutoff > self.list_cutoff + 1e-9:
            return None
        pairs = self._pairs(seen)
        if cutoff < self.list_cutoff - 1e-9:  # a shorter radius than the list's: drop the far pairs
            pairs = pairs[:, (self._vectors(seen) ** 2).sum(1) < cutoff**2]
        n = next(iter(self._capture.layers.values())).shape[0]
        if self._loops is None or self._loops.shape[1] != n or self._loops.device != pairs.device:
            self._loops = torch.arange(n, device=pairs.device).expand(2, n)
        return torch.cat([self._loops, pairs], dim=1)

    def _transform(self, layer_outputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Hook for adapters whose layer features are sums of hooked outputs."""
        return layer_outputs

    def features(self) -> torch.Tensor:
        """Features of every atom in this thread's last forward pass, ``(n_atoms, feature_dim)``."""
        captured = self._capture.layers
        if any(i not in captured for i in self.layers):
            raise BackboneError(f"no {self.kind} forward pass has been captured in this thread yet")
        layers = self._transform(captured)
        return torch.cat([layers[i] for i in self.layers], dim=-1)

    def predict(self, frames: Sequence[Atoms], batch_size: int = 32) -> Iterator[Prediction]:
        """Run the backbone over ``frames`` in batches; yield one :class:`Prediction` each."""
        for start in range(0, len(frames), batch_size):
            chunk = frames[start : start + batch_size]
            energies, forces = self._predict_batch(chunk)
            feats = self.features()  # this thread's pass: no lock needed, the calculator is not used
            offsets = np.cumsum([0] + [len(a) for a in chunk])
            for k, _atoms in enumerate(chunk):
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
        """Release the hooks (removed with the last tap on the backbone, which is then left as it was)."""
        hooks, self._hooks = self._hooks, None
        if hooks is None:
            return
        with _HOOKS_LOCK:
            hooks.users -= 1
            if hooks.users == 0:
                for handle in hooks.handles:
                    handle.remove()
                hooks.handles.clear()
                if _HOOKS.get(self.module) is hooks:
                    del _HOOKS[self.module]

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
