"""Tap for SchNetPack 2.x models run through ``schnetpack.interfaces.SpkCalculator``.

The features of layer ``i`` are the scalar atom representation the
representation module holds after interaction ``i`` (the ``i``-th entry of what
it would finally store as ``scalar_representation``):

* **SchNet** updates ``x = x + v`` inside ``SchNet.forward``, so no module
  outputs the running sum. Each ``interactions[i]`` gets a forward *pre*-hook
  that keeps its input ``x`` and the usual forward hook adds the block's output
  ``v``: the feature is ``x + v``, bit for bit the value ``SchNet.forward``
  computes (electronic embeddings included, as they are already in ``x``).
* **PaiNN**: ``mixing[i]`` returns ``(q, mu)`` with ``q`` the scalar
  representation after layer ``i``; only ``q`` (squeezed from ``(n, 1, F)``)
  is kept, the equivariant vector ``mu`` never enters.

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
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from ..exceptions import BackboneError
from ..graph import radius_graph
from .base import Tap


class SchNetPackTap(Tap):
    """Hooks on ``SpkCalculator.model.representation`` (SchNet or PaiNN)."""

    kind = "schnetpack"
    pair_keys = ("_idx_i", "_idx_j", "_positions", "_offsets")  # schnetpack.properties idx_i, idx_j, R, offsets

    def __init__(self, calc: Calculator, layers: Sequence[int] | None = None) -> None:
        self._rep, self._arch = _find_representation(calc.model)
        self._converter = None  # built on first batched pass
        super().__init__(calc, layers)

    @classmethod
    def accepts(cls, calc: Calculator) -> bool:
        """Whether ``calc`` is a SchNetPack ``SpkCalculator`` (False when schnetpack cannot be imported)."""
        try:
            from schnetpack.interfaces import SpkCalculator
        except Exception:  # schnetpack absent, or broken against this torch
            return False
        return isinstance(calc, SpkCalculator)

    @property
    def module(self) -> torch.nn.Module:
        """The calculator's whole model, ``calc.model`` (representation and output modules)."""
        return self.calc.model

    def feature_modules(self) -> list[torch.nn.Module]:
        """SchNet's ``interactions`` or PaiNN's ``mixing`` blocks, one per layer."""
        return list(self._rep.interactions if self._arch == "schnet" else self._rep.mixing)

    def layer_width(self, layer: int) -> int:
        """The representation's ``n_atom_basis``: every layer has that width."""
        return int(self._rep.n_atom_basis)

    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """Layer features ``(n_atoms, width)``: SchNet's block input plus output ``x + v``, PaiNN's ``q``."""
        if self._arch == "schnet":
            return self._block_inputs.scratch.pop(layer) + output
        q = output[0]
        return q.squeeze(1)

    @property
    def cutoff(self) -> float:
        """The representation's cutoff (Å)."""
        return float(self._rep.cutoff)

    @property
    def list_cutoff(self) -> float:
        """The cutoff (Å) of the calculator's converter's neighbour list (the representation's when there is none)."""
        nl = getattr(getattr(self.calc, "converter", None), "neighbor_list", None)
        return float(getattr(nl, "_cutoff", self.cutoff))

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
            raise BackboneError(f"cannot tell which elements the embedding {type(emb).__name__} handles")
        return tuple(range(1, int(max_z)))

    def _predict_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        from schnetpack import properties

        calc = self.calc
        inputs = self._batch_converter()(list(frames))  # the converter insists on a plain list
        default = torch.get_default_dtype()
        # PaiNN makes its vector features with the *default* dtype, which fails
        # against a float32 model once something (a test, older mace-torch) set float64
        torch.set_default_dtype(inputs[properties.R].dtype)
        try:
            with torch.enable_grad():  # forces are autograd derivatives of the energy
                out = calc.model(inputs)
        finally:
            torch.set_default_dtype(default)
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

    def _extra_hooks(self, hooks) -> list:
        if self._arch != "schnet":
            return []
        self._block_inputs = hooks.capture  # kept by this (the hooks' first) tap even after it closes
        return [m.register_forward_pre_hook(_block_input_hook(hooks, weakref.ref(m), i))
                for i, m in enumerate(self.feature_modules())]


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
    :func:`probe_ase.graph.radius_graph`.
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


def _find_representation(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The SchNet or PaiNN module inside ``model`` and its kind."""
    from schnetpack.representation import PaiNN, SchNet

    rep = getattr(model, "representation", None)
    if not isinstance(rep, (SchNet, PaiNN)):
        found = [m for m in model.modules() if isinstance(m, (SchNet, PaiNN))]
        if len(found) != 1:
            what = type(rep).__name__ if rep is not None else f"{len(found)} SchNet/PaiNN modules"
            raise BackboneError(
                f"unsupported SchNetPack representation ({what}) in {type(model).__name__}; "
                "probe-ase taps schnetpack.representation.SchNet and PaiNN"
            )
        rep = found[0]
    arch = "schnet" if isinstance(rep, SchNet) else "painn"
    layers = list(rep.interactions if arch == "schnet" else rep.mixing)
    if len({id(m) for m in layers}) != len(layers):
        raise BackboneError(
            f"SchNetPack {type(rep).__name__} with shared interaction weights cannot be tapped per layer"
        )
    return rep, arch


def spk_calculator(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Calculator:
    """An ``SpkCalculator`` for a saved SchNetPack model trained in eV and Å.

    The neighbour-list cutoff (Å) is read from the model's representation.
    """
    import schnetpack.transform as trn
    from schnetpack.interfaces import SpkCalculator

    model = torch.load(path, map_location="cpu", weights_only=False)
    rep, _ = _find_representation(model)
    return SpkCalculator(
        model_file=os.fspath(path),
        neighbor_list=trn.ASENeighborList(cutoff=float(rep.cutoff)),
        energy_unit="eV",
        position_unit="Ang",
        device=device,
        dtype=dtype,
    )
