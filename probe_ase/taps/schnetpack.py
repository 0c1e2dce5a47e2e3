"""Two adapters, SchNet and PaiNN, for SchNetPack 2.x models run through ``schnetpack.interfaces.SpkCalculator``.

The features of layer ``i`` are the scalar atom representation the
representation module holds after interaction ``i`` (the ``i``-th entry of what
it would finally store as ``scalar_representation``):

* **SchNet** updates ``x = x + v`` inside ``SchNet.forward``, so no module
  outputs the running sum. Each ``interactions[i]`` gets a forward *pre*-hook
  that keeps its input ``x`` and the usual forward hook adds the block's output
  ``v``: the feature is ``x + v``, bit for bit the value ``SchNet.forward``
  computes (electronic embeddings included, as they are already in ``x``).
* **PaiNN**: ``mixing[i]`` returns ``(q, mu)`` with ``q`` the scalar
  representation after layer ``i``. By default (``channels="scalars+norms"``)
  the feature is ``q`` (squeezed from ``(n, 1, F)``) followed by the norm of
  each of the ``F`` vector channels of ``mu`` ``(n, 3, F)`` over x, y, z:
  ``2F`` rotation-invariant numbers per atom. ``channels="scalars"`` keeps
  ``q`` alone, as head files written before version 8 did. The default was
  chosen on the benchmark fit pools' own cross-fitted folds (README,
  "Averaging heads"), never on evaluation files.

Only one module per layer carries the base class's forward hook, so
``n_forward`` still counts one per backbone pass; SchNet's block inputs go
into the shared hooks' per-thread scratch. Representations with
``shared_interactions=True`` reuse one module for every layer, which per-module
hooks cannot tell apart; they are refused with :class:`BackboneError`.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from probe_ase.exceptions import BackboneError
from probe_ase.model.graph import radius_graph
from probe_ase.taps.base import Tap


class _SchNetPackTap(Tap):
    """What the SchNet and PaiNN adapters share: hooks on ``SpkCalculator.model.representation``."""

    library = "schnetpack"
    extra = "schnetpack"
    aliases = ("schnetpack",)  # head files written before SchNet and PaiNN were two adapters
    pair_keys = ("_idx_i", "_idx_j", "_positions", "_offsets")  # schnetpack.properties idx_i, idx_j, R, offsets
    #: the representation class's name in ``schnetpack.representation``
    representation: str

    def __init__(self, calc: Calculator, layers: Sequence[int] | None = None, channels: str | None = None) -> None:
        self._rep = _find_representation(calc.model)
        self._converter = None  # built on first batched pass
        super().__init__(calc, layers, channels)

    @classmethod
    def _is_mine(cls, model: object) -> bool:
        if not isinstance(model, torch.nn.Module) or type(model).__module__.split(".")[0] != "schnetpack":
            return False
        try:
            return type(_find_representation(model)).__name__ == cls.representation
        except BackboneError:
            return False

    @classmethod
    def accepts(cls, calc: Calculator) -> bool:
        """Whether ``calc`` is a SchNetPack ``SpkCalculator`` of this representation (False without schnetpack)."""
        try:
            from schnetpack.interfaces import SpkCalculator
        except Exception:  # schnetpack absent, or broken against this torch
            return False
        return isinstance(calc, SpkCalculator) and cls._is_mine(calc.model)

    @classmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` is a SchNetPack model with this representation."""
        return cls._is_mine(model)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", model: object = None) -> Calculator:
        """An ``SpkCalculator`` for the saved model ``path`` (trained in eV and Å; see :func:`spk_calculator`)."""
        cls.require()
        return spk_calculator(path, device=device)

    @property
    def module(self) -> torch.nn.Module:
        """The calculator's whole model, ``calc.model`` (representation and output modules)."""
        return self.calc.model

    def layer_width(self, layer: int) -> int:
        """The representation's ``n_atom_basis`` (twice that with ``"scalars+norms"``): every layer has that width."""
        return int(self._rep.n_atom_basis) * (1 if self.channels == "scalars" else 2)

    @property
    def cutoff(self) -> float:
        """The representation's cutoff (Å)."""
        return float(self._rep.cutoff)

    @property
    def list_cutoff(self) -> float:
        """The cutoff (Å) of the calculator's converter's neighbour list (the representation's when there is none)."""
        nl = getattr(getattr(self.calc, "converter", None), "neighbor_list", None)
        return float(getattr(nl, "_cutoff", self.cutoff))

    def reference_features(self, atoms: Atoms) -> dict[int, np.ndarray]:
        """Layer ``i``: the ``scalar_representation`` of a copy of the representation cut after interaction ``i``."""
        inputs = self.calc.converter(atoms)
        for module in self.calc.model.input_modules:
            inputs = module(inputs)
        reference = {}
        for i in self.layers:
            cut = copy.copy(self._rep)  # shares the weights; only its layer lists are shortened
            cut._modules = dict(self._rep._modules)
            for name in self._layer_lists:
                cut._modules[name] = torch.nn.ModuleList(list(getattr(self._rep, name))[: i + 1])
            cut.n_interactions = i + 1
            with torch.no_grad(), _default_dtype(inputs["_positions"].dtype):
                out = cut({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
            reference[i] = self._reference_layer(out).detach().cpu().numpy()
        return reference

    def _reference_layer(self, out: dict) -> torch.Tensor:
        """A layer's features from the representation's own outputs (its scalar representation)."""
        return out["scalar_representation"]

    def _pairs(self, inputs: dict) -> torch.Tensor:
        return torch.stack([inputs["_idx_i"], inputs["_idx_j"]])

    def _vectors(self, inputs: dict) -> torch.Tensor:
        positions = inputs["_positions"]
        return positions[inputs["_idx_j"]] - positions[inputs["_idx_i"]] + inputs["_offsets"]

    @property
    def elements(self) -> tuple[int, ...]:
        """The model's ``trained_elements`` when recorded, else Z = 1 up to the embedding's row count minus one."""
        trained = getattr(self.module, "trained_elements", None)
        if trained is not None:
            return tuple(sorted(int(z) for z in trained))
        emb = self._rep.embedding
        if isinstance(emb, torch.nn.Embedding):
            max_z = emb.num_embeddings
        elif hasattr(emb, "element_embedding"):  # schnetpack.nn.embedding.NuclearEmbedding
            max_z = emb.element_embedding.shape[0]
        else:
            raise BackboneError(f"cannot tell which elements the embedding {type(emb).__name__} handles",
                                embedding=type(emb).__name__)
        return tuple(range(1, int(max_z)))

    def _predict_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        from schnetpack import properties

        calc = self.calc
        inputs = self._batch_converter()(list(frames))  # the converter insists on a plain list
        with _default_dtype(inputs[properties.R].dtype), torch.enable_grad():  # forces: autograd of the energy
            out = calc.model(inputs)
        energies = out[calc.energy_key].detach().cpu().numpy().reshape(-1) * calc.property_units["energy"]
        forces = out[calc.force_key].detach().cpu().numpy() * calc.property_units["forces"]
        offsets = np.cumsum([0] + [len(a) for a in frames])
        return energies, [forces[offsets[k] : offsets[k + 1]] for k in range(len(frames))]

    def _batch_converter(self):
        """The calculator's converter, its ``ASENeighborList`` swapped for :class:`MatscipyNeighbourList`.

        ASE's list costs ~20 ms for a 15-atom molecule, far more than a batched
        SchNet pass over 32 of them; matscipy's gives the same pairs. The
        calculator itself is left unchanged.
        """
        if self._converter is None:
            from schnetpack.transform import ASENeighborList

            self._converter = copy.copy(self.calc.converter)
            self._converter.transforms = [
                MatscipyNeighbourList(t._cutoff) if type(t) is ASENeighborList else t for t in self.calc.converter.transforms
            ]
        return self._converter


class SchNetTap(_SchNetPackTap):
    """SchNet: layer ``i`` is the running ``x + v`` after ``interactions[i]`` (module docstring)."""

    kind = "schnet"
    representation = "SchNet"
    _layer_lists = ("interactions",)

    def feature_modules(self) -> list[torch.nn.Module]:
        """SchNet's ``interactions`` blocks, one per layer."""
        return list(self._rep.interactions)

    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """Layer features ``(n_atoms, width)``: the block's input plus its output, ``x + v``."""
        return self._block_inputs.scratch.pop(layer) + output

    def _extra_hooks(self, hooks) -> list:
        self._block_inputs = hooks.capture  # kept by this (the hooks' first) tap even after it closes
        return [m.register_forward_pre_hook(_block_input_hook(hooks, weakref.ref(m), i))
                for i, m in enumerate(self.feature_modules())]


class PaiNNTap(_SchNetPackTap):
    """PaiNN: layer ``i`` is the scalar ``q`` returned by ``mixing[i]`` and the norms of its vectors ``mu``
    (module docstring)."""

    kind = "painn"
    representation = "PaiNN"
    _layer_lists = ("interactions", "mixing")
    channel_sets = ("scalars+norms", "scalars")
    default_channels = "scalars+norms"

    def feature_modules(self) -> list[torch.nn.Module]:
        """PaiNN's ``mixing`` blocks, one per layer."""
        return list(self._rep.mixing)

    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """Layer features ``(n_atoms, width)``: the scalar ``q`` of ``(q, mu)``, squeezed from ``(n, 1, F)``,
        then (``"scalars+norms"``) the norm over x, y, z of each channel of ``mu`` ``(n, 3, F)``."""
        return _painn_features(output[0], output[1], self.channels)

    def _reference_layer(self, out: dict) -> torch.Tensor:
        """``scalar_representation`` ``(n, F)`` and the norms of ``vector_representation`` ``(n, 3, F)``."""
        return _painn_features(out["scalar_representation"], out["vector_representation"], self.channels)


def _painn_features(q: torch.Tensor, mu: torch.Tensor, channels: str) -> torch.Tensor:
    """PaiNN's scalars ``q`` (``(n, F)`` or ``(n, 1, F)``) and, for ``"scalars+norms"``, the norms of ``mu``."""
    q = q.reshape(q.shape[0], -1)
    return q if channels == "scalars" else torch.cat([q, torch.linalg.vector_norm(mu, dim=1)], dim=-1)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """PaiNN makes its vector features with the *default* dtype, which fails against a float32 model once
    something (a test, older mace-torch) set float64: run it with the model's dtype, then restore the default."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def _block_input_hook(hooks, owner: weakref.ref, layer: int):
    """Keep a SchNet interaction block's input ``x`` (this thread's pass) for the feature ``x + v``."""

    def pre_hook(module: torch.nn.Module, args: tuple) -> None:
        if module is owner():
            hooks.capture.scratch[layer] = args[0].detach()

    return pre_hook


class MatscipyNeighbourList:
    """A SchNetPack input transform listing neighbour pairs with matscipy.

    Drop-in for ``schnetpack.transform.ASENeighborList`` in an
    ``AtomsConverter``: the same pairs (``_idx_i``, ``_idx_j``) and periodic
    offsets (``_offsets``, Å) within ``cutoff`` (Å), from
    :func:`probe_ase.model.graph.radius_graph`.
    """

    def __init__(self, cutoff: float) -> None:
        self.cutoff = float(cutoff)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set ``inputs``' pairs within ``cutoff`` (``_idx_i``, ``_idx_j``; no self pairs) and ``_offsets`` (Å)."""
        from schnetpack import properties

        positions = inputs[properties.R]
        atoms = Atoms(numbers=inputs[properties.Z].numpy(), positions=positions.numpy(),
                      cell=inputs[properties.cell].view(3, 3).numpy(), pbc=inputs[properties.pbc].view(3).numpy())
        dst, src, offsets = radius_graph(atoms, self.cutoff, shifts=True)
        n = len(atoms)  # radius_graph lists self loops first; SchNetPack wants none
        inputs[properties.idx_i] = torch.from_numpy(dst[n:])
        inputs[properties.idx_j] = torch.from_numpy(src[n:])
        inputs[properties.offsets] = torch.from_numpy(offsets[n:]).to(positions.dtype)
        return inputs


def _find_representation(model: torch.nn.Module) -> torch.nn.Module:
    """The SchNet or PaiNN module inside ``model``."""
    from schnetpack.representation import PaiNN, SchNet

    rep = getattr(model, "representation", None)
    if not isinstance(rep, (SchNet, PaiNN)):
        found = [m for m in model.modules() if isinstance(m, (SchNet, PaiNN))]
        if len(found) != 1:
            what = type(rep).__name__ if rep is not None else f"{len(found)} SchNet/PaiNN modules"
            raise BackboneError(
                f"unsupported SchNetPack representation ({what}) in {type(model).__name__}; "
                "probe-ase taps schnetpack.representation.SchNet and PaiNN",
                found=what, model=type(model).__name__,
            )
        rep = found[0]
    layers = list(rep.interactions if isinstance(rep, SchNet) else rep.mixing)
    if len({id(m) for m in layers}) != len(layers):
        raise BackboneError(
            f"SchNetPack {type(rep).__name__} with shared interaction weights cannot be tapped per layer",
            representation=type(rep).__name__,
        )
    return rep


def spk_calculator(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Calculator:
    """An ``SpkCalculator`` for a saved SchNetPack model trained in eV and Å.

    The neighbour-list cutoff (Å) is read from the model's representation.
    """
    import schnetpack.transform as trn
    from schnetpack.interfaces import SpkCalculator

    model = torch.load(path, map_location="cpu", weights_only=False)
    rep = _find_representation(model)
    return SpkCalculator(
        model_file=os.fspath(path),
        neighbor_list=trn.ASENeighborList(cutoff=float(rep.cutoff)),
        energy_unit="eV",
        position_unit="Ang",
        device=device,
        dtype=dtype,
    )
