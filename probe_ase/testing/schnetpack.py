"""Train a tiny SchNetPack potential for tests (needs the ``schnetpack`` extra).

Units throughout: energies in eV, forces in eV/Å, lengths in Å.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from probe_ase.exceptions import InputError


def train_schnetpack(
    frames: Sequence[Atoms],
    representation: str = "schnet",
    cutoff: float = 4.0,
    n_atom_basis: int = 16,
    n_interactions: int = 2,
    epochs: int = 40,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 16,
    lr: float = 5e-3,
    model_file: str | os.PathLike | None = None,
):
    """Fit a small SchNet or PaiNN ``NeuralNetworkPotential`` to ``frames``; return an ``SpkCalculator``.

    ``frames`` carry reference energies (eV) and forces (eV/Å), e.g. through a
    ``SinglePointCalculator``. Per-element reference energies (eV/atom, a
    least-squares fit of energy on composition) are subtracted before training
    and added back by an ``AddOffsets`` post-processor, so the network learns
    only the residual. Training is a plain Adam loop (``epochs`` passes over
    minibatches of ``batch_size`` frames) on per-atom energy MSE + force MSE in
    float32, single-threaded, bit-for-bit deterministic for a given ``seed``;
    the global RNG state, thread count and default dtype are left as found.

    The model, which records the elements it saw in ``model.trained_elements``,
    is saved with ``torch.save`` to ``model_file`` (a temporary file, removed
    again, when None) and loaded back by ``SpkCalculator(model_file=...,
    energy_unit="eV", position_unit="Ang")`` with an ``ASENeighborList(cutoff)``.
    """
    from schnetpack.interfaces import SpkCalculator

    from probe_ase.taps.schnetpack import spk_calculator

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)  # reproducible, and far faster than contended threads on small CPUs
        torch.set_default_dtype(torch.float32)
        try:
            torch.manual_seed(seed)
            model = _fit(list(frames), representation, cutoff, n_atom_basis, n_interactions,
                         epochs, seed, device, batch_size, lr)
        finally:
            torch.set_num_threads(threads)
            torch.set_default_dtype(dtype)

    def make_calc(path: str) -> SpkCalculator:
        torch.save(model.cpu(), path)
        return spk_calculator(path, device=device)

    if model_file is not None:
        return make_calc(os.fspath(model_file))
    with tempfile.TemporaryDirectory() as tmp:
        return make_calc(os.path.join(tmp, "model.pt"))


def _fit(frames, representation, cutoff, n_atom_basis, n_interactions, epochs, seed, device, batch_size, lr):
    """Build and train the model (energies in eV, forces in eV/Å); returns it in eval mode."""
    import schnetpack.transform as trn
    from schnetpack.interfaces import AtomsConverter

    energies = np.array([a.get_potential_energy() for a in frames], dtype=float)
    forces = [np.asarray(a.get_forces(), dtype=float) for a in frames]
    elements = sorted({int(z) for a in frames for z in a.numbers})
    counts = np.array([[np.sum(a.numbers == z) for z in elements] for a in frames], dtype=float)
    refs = np.linalg.lstsq(counts, energies, rcond=None)[0]  # eV per atom of each element
    residual = energies - counts @ refs

    model = _build_model(representation, cutoff, n_atom_basis, n_interactions)
    atomref = torch.zeros(100)
    atomref[elements] = torch.tensor(refs, dtype=torch.float32)
    model.postprocessors[0].atomref = atomref  # AddOffsets(atomrefs=tensor) itself fails on `tensor or ...`
    model.trained_elements = elements
    model.to(device)

    converter = AtomsConverter(trn.ASENeighborList(cutoff=cutoff), device=device, dtype=torch.float32)
    batches = []
    for s in range(0, len(frames), batch_size):
        chunk = slice(s, s + batch_size)
        e_ref = torch.tensor(residual[chunk], dtype=torch.float32, device=device)
        f_ref = torch.tensor(np.concatenate(forces[chunk]), dtype=torch.float32, device=device)
        n_atoms = torch.tensor([len(a) for a in frames[chunk]], dtype=torch.float32, device=device)
        batches.append((converter(frames[chunk]), e_ref, f_ref, n_atoms))

    model.do_postprocessing = False  # train on the residual energy
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(batches), generator=order).tolist():
            inputs, e_ref, f_ref, n_atoms = batches[b]
            out = model(dict(inputs))  # the model writes into its input dict
            loss = torch.mean(((out["energy"] - e_ref) / n_atoms) ** 2) + torch.mean((out["forces"] - f_ref) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.do_postprocessing = True
    return model.eval()


def _build_model(representation: str, cutoff: float, n_atom_basis: int, n_interactions: int):
    """An untrained ``NeuralNetworkPotential`` with energy (eV) and forces (eV/Å) outputs."""
    import schnetpack as spk
    import schnetpack.transform as trn

    radial = spk.nn.GaussianRBF(n_rbf=20, cutoff=cutoff)
    cutoff_fn = spk.nn.CosineCutoff(cutoff)
    if representation == "schnet":
        rep = spk.representation.SchNet(n_atom_basis, n_interactions, radial, cutoff_fn)
    elif representation == "painn":
        rep = spk.representation.PaiNN(n_atom_basis, n_interactions, radial, cutoff_fn)
    else:
        raise InputError(f"representation must be 'schnet' or 'painn', not {representation!r}",
                         representation=representation)
    return spk.model.NeuralNetworkPotential(
        representation=rep,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[
            spk.atomistic.Atomwise(n_in=n_atom_basis, output_key="energy"),
            spk.atomistic.Forces(energy_key="energy", force_key="forces"),
        ],
        postprocessors=[trn.AddOffsets("energy", add_mean=False, add_atomrefs=True)],
    )
