"""Adapter for SevenNet (``sevenn.calculator.SevenNetCalculator``), pretrained universal potentials.

The ``sevenn`` wheel carries its pretrained checkpoints; :meth:`SevenNetTap.load`
takes them by name from the wheel's own files (:data:`PRETRAINED`: ``7net-0``,
``7net-0_22may2024``, ``7net-l3i5``, and the multi-fidelity ``7net-mf-0`` as
``7net-mf-0-pbe`` or ``7net-mf-0-r2scan``) or a SevenNet checkpoint file, and
never downloads anything.

Features of block ``i``: the node features ``x`` the module
``{i}_equivariant_gate`` leaves in the model's data (irreps
``128x0e+64x1e+32x2e`` in blocks 0-3 of 7net-0, ``128x0e`` in the last). The
head reads their ``0e`` scalars; ``channels="scalars+norms"`` adds the norm of
each l > 0 channel over its 2l + 1 components (rotation invariant too). The
neighbour list is SevenNet's own graph (radius: the model's cutoff, 5 Å in the
pretrained models), read from the data the calculator hands the model:
``edge_index`` (destination, source) and ``edge_vec`` (Å).

A multi-fidelity model runs one fidelity, chosen when its calculator is built
(``SevenNetCalculator(..., modal="PBE")``); the fingerprint includes it, so a
head fitted on one fidelity's errors is refused for another. Batched passes
use the model's batch mode (as sevenn's own inference does), switched on for
the pass under the tap's lock and then restored, in passes of at most
:data:`PASS_ATOMS` atoms. Accelerated tensor products (cuEquivariance,
FlashTP, OpenEquivariance) replace the convolutions' e3nn modules; probe-ase
has not verified its taps on them (they need a GPU), so they are refused up
front.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from probe_ase.exceptions import BackboneError
from probe_ase.taps.base import Prediction, Tap, quiet_import
from probe_ase.taps.irreps import invariants, n_norms, scalar_channels

#: probe-ase's name of each pretrained SevenNet -> (its checkpoint's constant in ``sevenn._const``, fidelity)
PRETRAINED: dict[str, tuple[str, str | None]] = {
    "7net-0": ("SEVENNET_0_11Jul2024", None),
    "7net-0_22may2024": ("SEVENNET_0_22May2024", None),
    "7net-l3i5": ("SEVENNET_l3i5", None),
    "7net-mf-0-pbe": ("SEVENNET_MF_0", "PBE"),
    "7net-mf-0-r2scan": ("SEVENNET_MF_0", "R2SCAN"),
}
#: atoms per batched pass (a larger structure gets a pass alone). On one CPU thread, 7net-0 ran CH4 molecules ~5x and
#: 4-atom Cu cells ~1.5x faster per structure in passes of 128 atoms than alone, 64-atom Si cells no faster in passes
#: of 2 and ~1.4x slower in passes of 8 (their intermediates outgrow the caches)
PASS_ATOMS = 128
_GATE = re.compile(r"(\d+)_equivariant_gate")
_QUIET = ".*tensor product accelerator.*"  # sevenn's notice at every calculator built without cuEquivariance & co


class SevenNetTap(Tap):
    """Hooks on the ``{i}_equivariant_gate`` blocks of ``SevenNetCalculator.model``."""

    kind = "sevenn"
    library = "sevenn"
    extra = "sevenn"
    pretrained = tuple(PRETRAINED)
    pair_keys = ("edge_index", "edge_vec")
    channel_sets = ("scalars", "scalars+norms")

    def __init__(self, calc: Calculator, layers: Sequence[int] | None = None, channels: str | None = None) -> None:
        _refuse_untappable(calc)
        self._gates = _gates(calc.model)
        self._irreps = [gate.gate.irreps_out for gate in self._gates]
        self._scalar_index = [scalar_channels(irreps) for irreps in self._irreps]
        super().__init__(calc, layers, channels)

    @classmethod
    def accepts(cls, calc: Calculator) -> bool:
        """Whether ``calc`` is a ``SevenNetCalculator`` (False when sevenn cannot be imported)."""
        try:
            calculator = quiet_import("sevenn.calculator").SevenNetCalculator
        except Exception:  # sevenn absent (the sevenn extra), or broken against this torch or e3nn
            return False
        return isinstance(calc, calculator)

    @classmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` is what ``torch.load`` gives for a SevenNet checkpoint (with ``model_state_dict``)."""
        return isinstance(model, dict) and "model_state_dict" in model and isinstance(model.get("config"), dict)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", model: object = None) -> Calculator:
        """A ``SevenNetCalculator`` (eV, eV/Å) for a name in :data:`PRETRAINED` (the wheel's file) or a checkpoint.

        Nothing is downloaded: a pretrained name whose file the installed wheel
        lacks is a :class:`BackboneError`. A multi-fidelity checkpoint file needs
        its fidelity: build ``SevenNetCalculator(path, modal=...)`` yourself.
        """
        cls.require()
        name, modal = os.fspath(path), None
        if name == "7net-mf-0":
            raise BackboneError("7net-mf-0 is multi-fidelity: name a fidelity, 7net-mf-0-pbe or 7net-mf-0-r2scan",
                                path=name, choices=["7net-mf-0-pbe", "7net-mf-0-r2scan"])
        if name in PRETRAINED:
            constant, modal = PRETRAINED[name]
            name = getattr(quiet_import("sevenn._const"), constant, "")
            if not os.path.isfile(name):
                raise BackboneError(f"the installed sevenn wheel lacks the {path} checkpoint ({name or constant}); "
                                    'probe-ase never downloads weights: pip install "probe-ase[sevenn]"',
                                    path=os.fspath(path), checkpoint=name or constant)
        elif not os.path.isfile(name):  # sevenn itself would try to download a name it knows (7net-omni, ...)
            raise BackboneError(f"no SevenNet checkpoint file {name}; probe-ase never downloads weights "
                                f"(pretrained names: {', '.join(PRETRAINED)})", path=name)
        calculator = quiet_import("sevenn.calculator").SevenNetCalculator
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_QUIET)
            try:
                return calculator(name, device=device, modal=modal)
            except ValueError as err:  # sevenn's refusal of a multi-fidelity checkpoint without its modal
                raise BackboneError(f"{name}: {err}; build SevenNetCalculator({name!r}, modal=...) yourself",
                                    path=name) from None

    @property
    def module(self) -> torch.nn.Module:
        """The calculator's ``AtomGraphSequential`` model."""
        return self.calc.model

    def feature_modules(self) -> list[torch.nn.Module]:
        """The ``{i}_equivariant_gate`` modules, one per interaction block."""
        return list(self._gates)

    def layer_width(self, layer: int) -> int:
        """Scalar (``0e``) channels of block ``layer``'s features, plus its other channels with norms."""
        scalars = len(self._scalar_index[layer])
        return scalars if self.channels == "scalars" else scalars + n_norms(self._irreps[layer])

    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """The ``0e`` channels ``(n_atoms, width)`` of the node features ``x`` a gate block outputs, then, with
        ``"scalars+norms"``, the norm of each other channel over its components."""
        return invariants(output["x"], self._irreps[layer], self._scalar_index[layer], self.channels != "scalars")

    def fingerprint(self) -> str:
        """The parameters' digest; for a multi-fidelity model also the fidelity (``modal``) the calculator runs."""
        digest = super().fingerprint()
        modal = getattr(self.calc, "modal", None)
        return hashlib.sha256(f"{digest}:modal={modal}".encode()).hexdigest() if modal else digest

    @property
    def elements(self) -> tuple[int, ...]:
        """Atomic numbers in the calculator's ``type_map`` (89 in the pretrained models)."""
        return tuple(sorted(int(z) for z in self.calc.type_map))

    @property
    def cutoff(self) -> float:
        """The model's cutoff radius (Å), also the radius of the neighbour list the calculator builds."""
        return float(self.calc.cutoff)

    @classmethod
    def read_inputs(cls, args: tuple, kwargs: dict) -> dict | None:
        """``edge_index`` and ``edge_vec`` of the ``AtomGraphData`` passed to the model (None when absent)."""
        data = args[0] if args else next(iter(kwargs.values()), None)
        try:
            return {key: data[key].detach() for key in cls.pair_keys}
        except (KeyError, TypeError, AttributeError):
            return None

    def _pairs(self, inputs: dict) -> torch.Tensor:
        return inputs["edge_index"]  # SevenNet gathers messages from edge_index[1] onto edge_index[0]

    def _vectors(self, inputs: dict) -> torch.Tensor:
        return inputs["edge_vec"]  # positions[edge_index[1]] - positions[edge_index[0]] + the periodic shift

    def _graph(self, atoms: Atoms):
        """The ``AtomGraphData`` ``SevenNetCalculator.calculate`` builds for ``atoms`` (on the model's device)."""
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, self.cutoff, with_shift=False))
        if getattr(self.calc, "modal", None):
            data[quiet_import("sevenn._keys").DATA_MODALITY] = self.calc.modal
        return data.to(next(self.module.parameters()).device)

    def predict(self, frames: Sequence[Atoms], batch_size: int = 32) -> Iterator[Prediction]:
        """Energies (eV), forces (eV/Å) and features of ``frames``, one :class:`Prediction` each, from batched passes
        of at most ``batch_size`` structures and :data:`PASS_ATOMS` atoms (a larger structure gets a pass alone)."""
        start = 0
        while start < len(frames):
            stop, n_atoms = start + 1, len(frames[start])
            while stop < len(frames) and stop - start < batch_size and n_atoms + len(frames[stop]) <= PASS_ATOMS:
                n_atoms, stop = n_atoms + len(frames[stop]), stop + 1
            yield from super().predict(frames[start:stop], batch_size=stop - start)
            start = stop

    def _predict_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        from torch_geometric.data import Batch

        keys = quiet_import("sevenn._keys")
        batch = Batch.from_data_list([self._graph(atoms) for atoms in frames])
        model = self.module
        with self.lock:  # the batch mode is a switch on the shared model: no calculator step may run meanwhile
            single = not model.is_batch_data
            model.set_is_batch_data(True)
            try:
                with torch.enable_grad():  # forces are autograd derivatives of the energy
                    out = model(batch)
            finally:
                model.set_is_batch_data(not single)
        energies = out[keys.PRED_TOTAL_ENERGY].detach().cpu().numpy().reshape(-1)
        forces = out[keys.PRED_FORCE].detach().cpu().numpy()
        offsets = np.cumsum([0] + [len(a) for a in frames])
        return energies, [forces[offsets[k] : offsets[k + 1]] for k in range(len(frames))]

    def reference_features(self, atoms: Atoms) -> dict[int, np.ndarray]:
        """Every block's features from the model's own modules, run in ``AtomGraphSequential.forward``'s order
        through their ``forward`` (so no hook fires), up to the energy.

        Anchored to the library: the energy (eV) so computed must equal the
        model's own forward pass on the same graph.
        """
        keys = quiet_import("sevenn._keys")
        model = self.module
        gates = {id(gate): i for i, gate in enumerate(self._gates)}
        layers: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            data = model._preprocess(self._graph(atoms))
            for name, module in model._modules.items():
                if name == "force_output":  # forces and stress: autograd of the energy, not needed here
                    continue
                data = module.forward(data)
                if id(module) in gates:
                    layers[gates[id(module)]] = self.invariant(gates[id(module)], data)
        with torch.enable_grad():
            library = model(self._graph(atoms))[keys.PRED_TOTAL_ENERGY]
        if not torch.allclose(data[keys.PRED_TOTAL_ENERGY], library.detach(), atol=1e-5):
            raise BackboneError("the reference computation no longer follows AtomGraphSequential.forward "
                                "(sevenn changed?)", kind=self.kind)
        return {i: layers[i].detach().cpu().numpy() for i in self.layers}


def _gates(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``{i}_equivariant_gate`` modules of a SevenNet model, by block."""
    found = {int(m.group(1)): module for name, module in model.named_children() if (m := _GATE.fullmatch(name))}
    if not found or sorted(found) != list(range(len(found))):
        raise BackboneError(f"no equivariant gate blocks 0_equivariant_gate ... in this {type(model).__name__}: "
                            "probe-ase taps SevenNet's e3nn models", model=type(model).__name__, found=sorted(found))
    return [found[i] for i in range(len(found))]


def _refuse_untappable(calc: Calculator) -> None:
    """Refuse, up front and naming the fix, SevenNet models whose blocks hooks cannot read as e3nn features."""
    if isinstance(calc.model, torch.jit.ScriptModule):
        raise BackboneError("this SevenNet model is TorchScript (a deployed model); forward hooks cannot tap it: "
                            "load its checkpoint instead", model=type(calc.model).__name__)
    # the model itself says what it runs (a checkpoint's config may name a backend the calculator converted away)
    accelerated = [name for name, module in calc.model.named_children() if name.endswith("_convolution")
                   and not type(getattr(module, "convolution", None)).__module__.startswith("e3nn")]
    if accelerated:
        raise BackboneError(f"this SevenNet model runs accelerated tensor products ({', '.join(accelerated)}: "
                            "cuEquivariance, FlashTP or OpenEquivariance), which probe-ase has not verified its taps "
                            "on: create the calculator with enable_cueq=False, enable_flash=False, enable_oeq=False "
                            "(and no SEVENNET_ENABLE_* variable set)", accelerated=accelerated)
