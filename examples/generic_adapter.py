"""PROBE on a backbone probe-ase has no adapter for: name its feature modules with ModuleTap.

The backbone here is an in-house MLIP written in this file (``TinyMLIP``: a
two-block invariant message-passing network with its own ASE calculator),
trained on EMT copper at 300 K. Nothing in probe-ase knows it. The script

1. builds a ``ModuleTap`` on its two message-passing blocks (each returns the
   atoms' invariant features, ``(n_atoms, width)``),
2. runs the adapter conformance suite ``check_tap`` against the model's own
   hook-free ``layer_features``,
3. fits a head with ``fit_probe(tap, ...)`` (the tap itself in place of the
   calculator) and scores 300 K and 1200 K frames with
   ``ProbeCalculator(calc, probe, tap=tap)``.

Runs in about half a minute on 2 CPU cores, with no files or network.

    python examples/generic_adapter.py
"""

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import neighbor_list

from probe_ase import FitOptions, ModuleTap, ProbeCalculator, fit_probe
from probe_ase.evaluation.metrics import auroc
from probe_ase.testing import check_tap, emt_frames

CUTOFF = 4.0  # Å


class Block(torch.nn.Module):
    """One message-passing block: ``h_i + MLP(sum_j rbf(r_ij) * W h_j)``, invariant by construction."""

    def __init__(self, width: int, n_rbf: int) -> None:
        super().__init__()
        self.filter = torch.nn.Linear(n_rbf, width)
        self.update = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, width))

    def forward(self, h, rbf, i, j):
        messages = torch.zeros_like(h).index_add_(0, i, self.filter(rbf) * h[j])
        return h + self.update(messages)


class TinyMLIP(torch.nn.Module):
    """Energy (eV) as a sum of per-atom terms of Gaussian radial features passed through two blocks."""

    def __init__(self, width: int = 32, n_rbf: int = 16) -> None:
        super().__init__()
        self.register_buffer("centres", torch.linspace(1.5, CUTOFF, n_rbf))
        self.embed = torch.nn.Linear(n_rbf, width)
        self.blocks = torch.nn.ModuleList([Block(width, n_rbf), Block(width, n_rbf)])
        self.readout = torch.nn.Linear(width, 1)

    def layer_features(self, positions, i, j, shifts):
        """Each block's output ``(n_atoms, width)``: the model's own intermediate states (no hooks)."""
        r = (positions[j] - positions[i] + shifts).norm(dim=1, keepdim=True)
        envelope = 0.5 * (torch.cos(torch.pi * r / CUTOFF) + 1)
        rbf = torch.exp(-4.0 * (r - self.centres) ** 2) * envelope
        h = self.embed(torch.zeros(len(positions), rbf.shape[1]).index_add_(0, i, rbf))  # radial density
        layers = []
        for block in self.blocks:
            h = block(h, rbf, i, j)
            layers.append(h)
        return layers

    def forward(self, positions, i, j, shifts):
        return self.readout(self.layer_features(positions, i, j, shifts)[-1]).sum()


def graph(atoms):
    i, j, shift = neighbor_list("ijS", atoms, CUTOFF)
    shifts = torch.tensor(shift @ atoms.cell.array, dtype=torch.float32)
    return torch.tensor(i), torch.tensor(j), shifts


class TinyCalculator(Calculator):
    """The in-house MLIP's ASE calculator: energy in eV, forces in eV/Å."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, model: TinyMLIP) -> None:
        super().__init__()
        self.model = model

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        positions = torch.tensor(self.atoms.positions, dtype=torch.float32, requires_grad=True)
        energy = self.model(positions, *graph(self.atoms))
        (grad,) = torch.autograd.grad(energy, positions)
        self.results = {"energy": float(energy), "forces": -grad.numpy().astype(float)}


def train(frames, epochs: int = 60) -> TinyCalculator:
    """Energy + force matching on EMT frames (per-atom energy offset fitted first)."""
    torch.manual_seed(0)
    model = TinyMLIP()
    offset = np.mean([a.get_potential_energy() / len(a) for a in frames])
    with torch.no_grad():
        model.readout.bias.fill_(offset)
    data = [(torch.tensor(a.positions, dtype=torch.float32), graph(a), a.get_potential_energy(),
             torch.tensor(a.get_forces(), dtype=torch.float32)) for a in frames]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for positions, g, energy, forces in data:
            positions = positions.clone().requires_grad_(True)
            predicted = model(positions, *g)
            (grad,) = torch.autograd.grad(predicted, positions, create_graph=True)
            loss = ((predicted - energy) / len(positions)) ** 2 + ((-grad - forces) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return TinyCalculator(model)


def reference(atoms):
    """check_tap's hook-free reference: the model's own layer_features."""
    with torch.no_grad():
        layers = calc.model.layer_features(torch.tensor(atoms.positions, dtype=torch.float32), *graph(atoms))
    return {k: layer.numpy() for k, layer in enumerate(layers)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    calc = train(emt_frames(30, 300, seed=1))

    def make_tap():
        return ModuleTap(calc, modules=["blocks.0", "blocks.1"], widths=[32, 32], cutoff=CUTOFF, elements=[29],
                         kind="tiny-mlip")

    crystal = emt_frames(1, 300, seed=9)[0]
    report = check_tap(calc, crystal, make_tap=make_tap, reference=reference)
    print("check_tap on the in-house MLIP:")
    for check, what in report.items():
        print(f"  {check:16s} {what}")

    pool = emt_frames(40, 300, seed=2) + emt_frames(30, 900, seed=3) + emt_frames(30, 600, strain=0.03, seed=4)
    with make_tap() as tap:
        probe = fit_probe(tap, pool, criterion="force_rmse", quantile=0.7, cache_dir=False, progress=False,
                          options=FitOptions(epochs=60, patience=25))
        frames = emt_frames(20, 300, seed=5) + emt_frames(20, 1200, seed=6)
        reliability, errors = [], []
        with ProbeCalculator(calc, probe, tap=tap) as probe_calc:
            for atoms in frames:
                reference_forces = atoms.get_forces()
                atoms = atoms.copy()
                atoms.calc = probe_calc
                errors.append(np.sqrt(np.mean((atoms.get_forces() - reference_forces) ** 2)))
                reliability.append(probe_calc.results["reliability"])
    reliability, errors = np.array(reliability), np.array(errors)
    bad = errors > probe.meta.tau
    summary = {"mean_reliability_300K": float(reliability[:20].mean()),
               "mean_reliability_1200K": float(reliability[20:].mean()),
               "auroc": float(auroc(bad, 1 - reliability)) if 0 < bad.sum() < len(bad) else float("nan")}
    print(f"head on the in-house MLIP (tau = {probe.meta.tau * 1000:.0f} meV/Å): mean reliability "
          f"{summary['mean_reliability_300K']:.2f} at 300 K, {summary['mean_reliability_1200K']:.2f} at 1200 K; "
          f"AUROC {summary['auroc']:.3f} on {len(frames)} held-out frames ({bad.sum()} outside tolerance)")
