"""Adapter for CHGNet (``chgnet.model.dynamics.CHGNetCalculator``), a pretrained foundation model.

CHGNet's wheel carries its pretrained weights (``0.3.0``, ``0.2.0``,
``r2scan``), so ``CHGNetCalculator()`` works offline; :meth:`CHGNetTap.load`
takes them by name (``"chgnet-0.3.0"``) or a saved CHGNet file.

Features of layer ``i``: the atom features after ``model.atom_conv_layers[i]``
(64 channels in the pretrained models), all rotation invariant (CHGNet builds
its messages from distances and angles only). The last layer's are taken
before the readout's normalisation. The neighbour list is CHGNet's own atom
graph (radius ``graph_converter.atom_graph_cutoff``, 6 Å in the pretrained
models), read from the ``CrystalGraph`` the converter returns for each step.

CHGNet needs a cell: a molecule must sit in a periodic box (``pbc=True``,
vacuum around it wider than the 6 Å graph radius).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from probe_ase.exceptions import BackboneError
from probe_ase.taps.base import Tap

#: probe-ase's name of each pretrained CHGNet -> CHGNet's ``model_name``
PRETRAINED = {"chgnet-0.3.0": "0.3.0", "chgnet-0.2.0": "0.2.0", "chgnet-r2scan": "r2scan"}


class CHGNetTap(Tap):
    """Hooks on ``CHGNetCalculator.model.atom_conv_layers``."""

    kind = "chgnet"
    library = "chgnet"
    extra = "chgnet"
    pretrained = tuple(PRETRAINED)
    periodic_only = True

    @classmethod
    def accepts(cls, calc: Calculator) -> bool:
        """Whether ``calc`` is a ``CHGNetCalculator`` (False when chgnet cannot be imported)."""
        try:
            from chgnet.model.dynamics import CHGNetCalculator
        except Exception:
            return False
        return isinstance(calc, CHGNetCalculator)

    @classmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` is what ``torch.load`` returns for a saved CHGNet (``{"model": {"model_args": ...}}``)."""
        return isinstance(model, dict) and isinstance(model.get("model"), dict) and "model_args" in model["model"]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", model: object = None) -> Calculator:
        """A ``CHGNetCalculator`` for a pretrained name in :data:`PRETRAINED` or a saved CHGNet file."""
        cls.require()
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        name = os.fspath(path)
        if name in PRETRAINED:
            net = CHGNet.load(model_name=PRETRAINED[name], use_device=device, verbose=False)
        else:
            saved = model if model is not None else torch.load(name, map_location="cpu", weights_only=False)
            state = saved["model"]["state_dict"]
            # files saved by CHGNet 0.2.0 carry biases on the conv layers' output MLPs, which their model_args do
            # not record (CHGNet.load passes mlp_out_bias for that version); newer files (CHGNet's trainer) do
            kwargs = {} if "mlp_out_bias" in saved["model"]["model_args"] else {
                "mlp_out_bias": any(k.endswith("mlp_out.layers.1.bias") for k in state)}
            net = CHGNet.from_dict(saved["model"], **kwargs)
        return CHGNetCalculator(model=net, use_device=device)

    def save_backbone(self, path: str | os.PathLike) -> None:
        """Write the model in CHGNet's own format (``{"model": CHGNet.as_dict()}``, what :meth:`load` reads back;
        a pickled module would not load)."""
        torch.save({"model": self.module.as_dict()}, path)

    @property
    def module(self) -> torch.nn.Module:
        """The calculator's ``CHGNet`` model."""
        return self.calc.model

    def feature_modules(self) -> list[torch.nn.Module]:
        """The ``atom_conv_layers``, one per interaction layer."""
        return list(self.module.atom_conv_layers)

    def layer_width(self, layer: int) -> int:
        """The model's ``atom_fea_dim``: every atom conv layer has that width."""
        return int(self.module.atom_fea_dim)

    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """The layer's atom features ``(n_atoms, width)`` as they are: CHGNet's atom features are invariant."""
        return output

    @property
    def elements(self) -> tuple[int, ...]:
        """Z = 1 up to the atom embedding's row count (94 in the pretrained models)."""
        return tuple(range(1, int(self.module.atom_embedding.embedding.num_embeddings) + 1))

    @property
    def cutoff(self) -> float:
        """CHGNet's atom-graph radius (Å)."""
        return float(self.module.graph_converter.atom_graph_cutoff)

    @classmethod
    def read_inputs(cls, args: tuple, kwargs: dict) -> dict | None:
        """The atom graph of a single ``CrystalGraph`` passed to ``CHGNet.forward`` (None for a batch)."""
        graphs = args[0] if args else kwargs.get("graphs")
        if not isinstance(graphs, Sequence) or len(graphs) != 1:
            return None
        return _graph_inputs(graphs[0])

    def _extra_hooks(self, hooks) -> list:
        # CHGNetCalculator converts each structure with model.graph_converter, then calls
        # model.predict_graph -> model.forward directly (no module call, so no pre-hook on the
        # model fires): the converter's output is where the step's neighbour list is
        converter = self.module.graph_converter
        return [converter.register_forward_hook(_graph_hook(hooks, weakref.ref(converter)))]

    def _pairs(self, inputs: dict) -> torch.Tensor:
        return inputs["atom_graph"].T.long()  # (center, neighbour): the head's (destination, source)

    def _vectors(self, inputs: dict) -> torch.Tensor:
        center, neighbour = inputs["atom_graph"].T.long()
        frac = inputs["frac"]
        return (frac[neighbour] + inputs["image"] - frac[center]) @ inputs["lattice"]

    def _graphs(self, frames: Sequence[Atoms]) -> list:
        from pymatgen.io.ase import AseAtomsAdaptor

        device = next(self.module.parameters()).device
        return [self.module.graph_converter(AseAtomsAdaptor.get_structure(atoms)).to(device) for atoms in frames]

    def _predict_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        for atoms in frames:
            if not atoms.pbc.all():
                raise BackboneError("CHGNet needs a periodic cell: put the structure in a box with pbc=True",
                                    pbc=tuple(atoms.pbc))
        model = self.module
        model.eval()
        with torch.enable_grad():  # forces are autograd derivatives of the energy
            out = model(self._graphs(frames), task="ef")
        n_atoms = np.array([len(a) for a in frames])
        energies = out["e"].detach().cpu().numpy().reshape(-1) * (n_atoms if model.is_intensive else 1)
        return energies, [f.detach().cpu().numpy() for f in out["f"]]

    def reference_features(self, atoms: Atoms) -> dict[int, np.ndarray]:
        """Every layer's atom features from CHGNet's own modules, called in ``CHGNet._compute``'s order.

        Anchored to the library: the next-to-last layer must equal what
        ``CHGNet.forward(..., return_atom_feas=True)`` returns, and the energy
        read out from the last layer must equal the model's.
        """
        from chgnet.model.model import BatchedGraph

        model = self.module
        (graph,) = self._graphs([atoms])
        g = BatchedGraph.from_graphs([graph], bond_basis_expansion=model.bond_basis_expansion,
                                     angle_basis_expansion=model.angle_basis_expansion, compute_stress=False)
        with torch.no_grad():
            atom = model.atom_embedding(g.atomic_numbers - 1)
            bond = model.bond_embedding(g.bond_bases_ag)
            weights_ag, weights_bg = model.bond_weights_ag(g.bond_bases_ag), model.bond_weights_bg(g.bond_bases_bg)
            angle = model.angle_embedding(g.angle_bases) if len(g.angle_bases) else None
            layers = []
            for k, atom_layer in enumerate(model.atom_conv_layers):
                atom = atom_layer(atom_feas=atom, bond_feas=bond, bond_weights=weights_ag,
                                  atom_graph=g.batched_atom_graph, directed2undirected=g.directed2undirected)
                layers.append(atom)
                if k == len(model.atom_conv_layers) - 1 or angle is None:
                    continue
                if model.bond_conv_layers[k] is not None:
                    bond = model.bond_conv_layers[k](atom_feas=atom, bond_feas=bond, bond_weights=weights_bg,
                                                     angle_feas=angle, bond_graph=g.batched_bond_graph)
                    if model.angle_layers[k] is not None:
                        angle = model.angle_layers[k](atom_feas=atom, bond_feas=bond, angle_feas=angle,
                                                      bond_graph=g.batched_bond_graph)
            library = model.forward([graph], task="e", return_atom_feas=True)
            readout = model.readout_norm(layers[-1]) if model.readout_norm is not None else layers[-1]
            if model.mlp_first:
                energy = model.pooling(model.mlp(readout), g.atom_owners).view(-1)
            else:
                energy = model.mlp(model.pooling(readout, g.atom_owners)).view(-1) * len(atoms)
            energy = energy / len(atoms) if model.is_intensive else energy
            if model.composition_model is not None:
                energy = energy + model.composition_model([graph])
        if not torch.allclose(layers[-2], library["atom_fea"][0], atol=1e-5) or \
                not torch.allclose(energy, library["e"], atol=1e-5):
            raise BackboneError("the reference computation no longer follows CHGNet._compute (chgnet changed?)",
                                kind=self.kind)
        return {i: layers[i].cpu().numpy() for i in self.layers}


def _graph_inputs(graph) -> dict:
    return {"atom_graph": graph.atom_graph, "image": graph.neighbor_image,
            "frac": graph.atom_frac_coord.detach(), "lattice": graph.lattice.detach()}


def _graph_hook(hooks, owner: weakref.ref):
    """Keep the neighbour list of the ``CrystalGraph`` the converter just made (this thread's step)."""

    def hook(module: torch.nn.Module, inputs: tuple, output: object) -> None:
        if module is owner():
            hooks.capture.inputs = _graph_inputs(output)

    return hook
