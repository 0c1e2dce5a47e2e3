"""A tap for any torch backbone no adapter knows: hooks on the modules you name.

The contract is the one every adapter follows (:mod:`probe_ase.taps.base`):
one module per layer whose output carries per-atom features, run exactly once
per backbone pass, and a function that takes the rotation-invariant part of
that output. No neighbour list is read: the head builds its own graph.
Check a new ``ModuleTap`` with :func:`probe_ase.testing.check_tap` before you
trust it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from probe_ase.exceptions import BackboneError, InputError
from probe_ase.taps.base import Prediction, Tap

Invariant = Callable[[int, object], torch.Tensor]


def first_tensor(layer: int, output: object) -> torch.Tensor:
    """The output itself when it is a tensor, else its first element (e.g. ``q`` of ``(q, mu)``)."""
    return output if torch.is_tensor(output) else output[0]


class ModuleTap(Tap):
    """Hooks on named modules of a backbone that has no adapter.

    Args:
        calc: the backbone's ASE calculator (energy in eV, forces in eV/Å).
        modules: one module per layer whose output carries per-atom features:
            module objects or dotted names inside ``model`` (e.g.
            ``["blocks.0", "blocks.1"]``). Each must run once per backbone pass.
        cutoff: radius (Å) of the head's attention graph, typically the
            backbone's own cutoff.
        invariant: ``invariant(layer, output)`` returns the rotation-invariant
            per-atom part ``(n_atoms, width)`` of a module's output; equivariant
            channels must be left out. Default: :func:`first_tensor`.
        widths: channels each layer contributes; default read from the module
            (``Linear.out_features``, ``Embedding.embedding_dim``,
            ``LayerNorm.normalized_shape``) and checked at every pass.
        model: the backbone's torch module (default ``calc.model``): what is
            fingerprinted, and what ``modules`` names are looked up in.
        elements: atomic numbers the backbone handles (default: Z = 1-118).
        layers: which of ``modules`` the head reads (default: all).
        kind: the name head files record for this backbone.
    """

    library = "torch"

    def __init__(
        self,
        calc: Calculator,
        modules: Sequence[torch.nn.Module | str],
        cutoff: float,
        invariant: Invariant = first_tensor,
        widths: Sequence[int] | None = None,
        model: torch.nn.Module | None = None,
        elements: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        kind: str = "generic",
    ) -> None:
        model = model if model is not None else getattr(calc, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"{type(calc).__name__} has no torch module in .model: pass model=", calculator=type(calc).__name__)
        self._model = model
        self._modules = [_resolve(model, m) for m in modules]
        if not self._modules or len({id(m) for m in self._modules}) != len(self._modules):
            raise InputError("modules must name at least one module, each once (one per layer)", modules=list(modules))
        self._widths = [int(w) for w in widths] if widths is not None else [_width(m) for m in self._modules]
        if len(self._widths) != len(self._modules):
            raise InputError(f"{len(self._widths)} widths for {len(self._modules)} modules", widths=list(self._widths))
        if not cutoff > 0:
            raise InputError(f"cutoff must be a positive radius (Å), got {cutoff}", cutoff=cutoff)
        self._cutoff, self._invariant = float(cutoff), invariant
        self._elements = tuple(range(1, 119)) if elements is None else tuple(sorted(int(z) for z in elements))
        self.kind = kind
        super().__init__(calc, layers)

    @classmethod
    def accepts(cls, calc: Calculator) -> bool:
        """Never: a ModuleTap is built by hand, not found."""
        return False

    def hook_key(self) -> Hashable:
        """ModuleTaps share hooks only when they name the same modules, widths and invariant."""
        return (type(self), tuple(id(m) for m in self._modules), tuple(self._widths), self._invariant)

    @property
    def module(self) -> torch.nn.Module:
        """The backbone module given as ``model`` (default ``calc.model``)."""
        return self._model

    def feature_modules(self) -> list[torch.nn.Module]:
        """The modules named in ``modules``."""
        return self._modules

    def layer_width(self, layer: int) -> int:
        """Channels of layer ``layer`` (given or read from its module)."""
        return self._widths[layer]

    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """The user's ``invariant`` of the output, checked to be ``(n_atoms, width)``."""
        features = self._invariant(layer, output)
        if not torch.is_tensor(features) or features.dim() != 2 or features.shape[1] != self._widths[layer]:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise BackboneError(f"layer {layer}: invariant() gave {shape}, expected (n_atoms, {self._widths[layer]})",
                                layer=layer, found=shape, expected_width=self._widths[layer])
        return features

    @property
    def elements(self) -> tuple[int, ...]:
        """The ``elements`` given (default Z = 1-118)."""
        return self._elements

    @property
    def cutoff(self) -> float:
        """The ``cutoff`` given (Å)."""
        return self._cutoff

    def _pairs(self, inputs: dict) -> torch.Tensor:  # pragma: no cover - read_inputs gives None: never called
        raise BackboneError("a ModuleTap reads no neighbour list", kind=self.kind)

    _vectors = _pairs

    def _predict_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        energies, forces = [], []
        for atoms in frames:
            atoms = atoms.copy()
            atoms.calc = self.calc
            self.calc.reset()  # a pass for every frame, even one equal to the last
            energies.append(atoms.get_potential_energy())
            forces.append(np.array(atoms.get_forces()))
        return np.array(energies), forces

    def predict(self, frames: Sequence[Atoms], batch_size: int = 32) -> Iterator[Prediction]:
        """The calculator on each frame in turn (no batched pass is known); ``batch_size`` is ignored."""
        for atoms in frames:
            with self.lock:
                energies, forces = self._predict_batch([atoms])
                features = self.features()
            yield Prediction(float(energies[0]), forces[0], features)


def _resolve(model: torch.nn.Module, module: torch.nn.Module | str) -> torch.nn.Module:
    if isinstance(module, torch.nn.Module):
        if not any(module is m for m in model.modules()):
            raise InputError(f"{type(module).__name__} is not a submodule of the backbone model",
                             module=type(module).__name__)
        return module
    try:
        return model.get_submodule(module)
    except AttributeError as err:
        raise InputError(f"no module {module!r} in {type(model).__name__}: {err}", module=module) from err


def _width(module: torch.nn.Module) -> int:
    for attr in ("out_features", "embedding_dim"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    if isinstance(module, torch.nn.LayerNorm):
        return int(module.normalized_shape[-1])
    raise InputError(f"cannot read the output width of {type(module).__name__}: pass widths=",
                     module=type(module).__name__)
