"""Tap for MACE models run through mace-torch's ``MACECalculator``.

Features are the scalar (``0e``) channels of each interaction layer's node
features, i.e. the outputs of ``model.products[i]``. Equivariant (l > 0)
channels are left out so that every feature is rotation invariant; with
``channels="scalars+norms"`` each of them adds its norm over its 2l + 1
components (rotation invariant too) after the scalars. For a committee
calculator only the first model is tapped.

Foundation shapes: ``ScaleShiftMACE`` (MACE-MP/OFF/MPA) is tapped like any
MACE. A multi-head model (mace-torch's multi-head fine-tuning) shares its body
between heads: the features feeding the selected head (``MACECalculator(...,
head=name)``) are the shared products, and batched passes use that head's
readout. The fingerprint includes the selected head, so a PROBE head fitted on
one readout's errors is refused for another.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from probe_ase.exceptions import BackboneError
from probe_ase.taps.base import Tap, quiet_import
from probe_ase.taps.irreps import invariants, n_norms, scalar_channels


class MaceTap(Tap):
    """Hooks on ``MACECalculator.models[0].products``."""

    kind = "mace"
    library = "mace"
    extra = "mace"
    pair_keys = ("edge_index", "positions", "shifts")
    channel_sets = ("scalars", "scalars+norms")

    def __init__(self, calc: Calculator, layers: Sequence[int] | None = None, channels: str | None = None) -> None:
        _refuse_untappable(calc)
        self._irreps = [product.linear.irreps_out for product in calc.models[0].products]
        self._scalar_index = [scalar_channels(irreps) for irreps in self._irreps]
        super().__init__(calc, layers, channels)

    @classmethod
    def accepts(cls, calc: Calculator) -> bool:
        """Whether ``calc`` is a mace-torch ``MACECalculator``."""
        try:
            MACECalculator = quiet_import("mace.calculators").MACECalculator
        except Exception:  # mace-torch absent (the mace extra), or broken against this torch or e3nn
            return False
        return isinstance(calc, MACECalculator)

    @classmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` is a mace-torch module (``MACE``, ``ScaleShiftMACE`` ...)."""
        return isinstance(model, torch.nn.Module) and type(model).__module__.split(".")[0] == "mace"

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", model: object = None) -> Calculator:
        """A ``MACECalculator`` for the ``.model`` file ``path`` (a pickled module: only load files you trust)."""
        cls.require()
        MACECalculator = quiet_import("mace.calculators").MACECalculator
        if model is None:
            quiet_import("mace.modules")  # e3nn's own torch.load must not run nested in ours
            model = torch.load(path, map_location=device, weights_only=False)
        return MACECalculator(models=model, device=device)

    def reference_features(self, atoms: Atoms) -> dict[int, np.ndarray]:
        """Every layer's channels from mace-torch's own ``MACECalculator.get_descriptors``.

        ``"scalars"``: its invariant descriptors; ``"scalars+norms"``: its full
        node features, each layer's part reduced as :meth:`invariant` does.
        """
        scalars_only = self.channels == "scalars"
        descriptors = self.calc.get_descriptors(atoms, invariants_only=scalars_only)
        if isinstance(descriptors, list):  # a committee: the first model is the one tapped
            descriptors = descriptors[0]
        widths = [self.layer_width(i) if scalars_only else irreps.dim for i, irreps in enumerate(self._irreps)]
        edges = np.cumsum([0] + widths)
        parts = {i: descriptors[:, edges[i] : edges[i + 1]] for i in self.layers}
        return parts if scalars_only else \
            {i: self.invariant(i, torch.from_numpy(part)).numpy() for i, part in parts.items()}

    @property
    def module(self) -> torch.nn.Module:
        """The calculator's first model, ``calc.models[0]`` (the only one tapped)."""
        return self.calc.models[0]

    def feature_modules(self) -> list[torch.nn.Module]:
        """The model's ``products`` blocks, one per interaction layer."""
        return list(self.module.products)

    def layer_width(self, layer: int) -> int:
        """Scalar (``0e``) channels in the output of ``products[layer]``, plus its other channels with norms."""
        scalars = len(self._scalar_index[layer])
        return scalars if self.channels == "scalars" else scalars + n_norms(self._irreps[layer])

    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """The scalar (``0e``) channels ``(n_atoms, width)`` of a product block's output (a view when contiguous),
        then, with ``"scalars+norms"``, the norm of each other channel over its components."""
        return invariants(output, self._irreps[layer], self._scalar_index[layer], self.channels != "scalars")

    def fingerprint(self) -> str:
        """The parameters' digest; for a multi-head model also the selected head, whose energies the head judges."""
        digest = super().fingerprint()
        heads = list(getattr(self.calc, "available_heads", None) or [])
        if len(heads) > 1:
            digest = hashlib.sha256(f"{digest}:head={self.calc.head}".encode()).hexdigest()
        return digest

    @property
    def cutoff(self) -> float:
        """The model's ``r_max`` (Å)."""
        return float(self.calc.r_max)

    def _pairs(self, inputs: dict) -> torch.Tensor:
        return inputs["edge_index"].flip(0)  # MACE lists (sender, receiver); the head wants (receiver, sender)

    def _vectors(self, inputs: dict) -> torch.Tensor:
        sender, receiver = inputs["edge_index"]
        positions = inputs["positions"]
        return positions[receiver] - positions[sender] + inputs["shifts"]

    @property
    def elements(self) -> tuple[int, ...]:
        """Atomic numbers in the calculator's ``z_table``."""
        return tuple(int(z) for z in self.calc.z_table.zs)

    def _predict_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        from mace import data as mace_data
        from mace.tools import torch_geometric, torch_tools

        calc = self.calc
        keyspec = mace_data.KeySpecification(info_keys={}, arrays_keys={})
        with torch_tools.default_dtype(calc.default_dtype):
            graphs = [
                mace_data.AtomicData.from_config(
                    mace_data.config_from_atoms(atoms, key_specification=keyspec, head_name=calc.head),
                    z_table=calc.z_table,
                    cutoff=calc.r_max,
                    heads=calc.available_heads,
                )
                for atoms in frames
            ]
        batch = torch_geometric.Batch.from_data_list(graphs).to(calc.device)
        dtype = next(self.module.parameters()).dtype
        data = {
            k: (v.to(dtype) if torch.is_floating_point(v) else v)
            for k, v in batch.to_dict().items()
            if torch.is_tensor(v)
        }
        out = self.module(data, compute_force=True, compute_stress=False, training=False)
        energies = out["energy"].detach().cpu().numpy() * calc.energy_units_to_eV
        forces = out["forces"].detach().cpu().numpy() * (calc.energy_units_to_eV / calc.length_units_to_A)
        offsets = np.cumsum([0] + [len(a) for a in frames])
        return energies, [forces[offsets[k] : offsets[k + 1]] for k in range(len(frames))]


def _refuse_untappable(calc: Calculator) -> None:
    """Refuse, up front and naming the fix, MACE models whose feature modules hooks cannot reach."""
    model = calc.models[0]
    if isinstance(model, torch.jit.ScriptModule):
        raise BackboneError("this MACE model is TorchScript (a *_compiled.model file); forward hooks cannot tap it: "
                            "load the uncompiled .model file instead", model=type(model).__name__)
    if getattr(calc, "use_compile", False) or hasattr(model, "_orig_mod"):
        raise BackboneError("this MACE calculator runs a torch.compile'd model, whose modules hooks cannot tap: "
                            "create it without compile_mode", model=type(model).__name__)
    if getattr(calc, "_uses_accelerated_backend", False):
        raise BackboneError("this MACE calculator converted its model to cuEquivariance/OpenEquivariance kernels "
                            "(enable_cueq / enable_oeq), whose product modules differ from the e3nn ones probe-ase "
                            "taps: create it with enable_cueq=False, enable_oeq=False",
                            enable_cueq=getattr(calc, "_enable_cueq", None),
                            enable_oeq=getattr(calc, "_enable_oeq", None))

