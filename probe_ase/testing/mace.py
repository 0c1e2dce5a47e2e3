"""Train a tiny MACE in seconds (for tests and the demo, not production)."""

from __future__ import annotations

from collections.abc import Sequence

import mace  # noqa: F401  (sets torch.load defaults e3nn needs; import before e3nn)
import numpy as np
import torch
from ase import Atoms
from e3nn import o3
from mace import data as mace_data
from mace import modules
from mace.calculators import MACECalculator
from mace.tools import torch_geometric, utils


def train_mace(
    frames: Sequence[Atoms],
    channels: int = 16,
    max_ell: int = 1,
    num_interactions: int = 2,
    r_max: float = 4.0,
    correlation: int = 2,
    dtype: str = "float32",
    epochs: int = 60,
    batch_size: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
) -> MACECalculator:
    """Train a small MACE on ``frames`` (energy in eV, forces in eV/Å) and return its calculator.

    Uses a plain Adam loop on an energy + force loss (``dtype`` float32 by
    default, for speed): seconds for ~50 frames of 32 atoms on 2 CPU cores. Per-element reference
    energies are fitted by least squares first, so the network learns only the
    interaction energy. Deterministic for a given ``seed``.
    """
    torch.manual_seed(seed)
    zs = sorted({int(z) for atoms in frames for z in atoms.numbers})
    z_table = utils.AtomicNumberTable(zs)
    counts = np.array([[np.sum(a.numbers == z) for z in zs] for a in frames], dtype=float)
    energies = np.array([a.get_potential_energy() for a in frames])
    e0 = np.linalg.lstsq(counts, energies, rcond=None)[0]
    previous = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            model = modules.ScaleShiftMACE(
                atomic_inter_scale=1.0, atomic_inter_shift=0.0,
                r_max=r_max, num_bessel=8, num_polynomial_cutoff=5, max_ell=max_ell,
                interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                num_interactions=num_interactions, num_elements=len(zs),
                hidden_irreps=o3.Irreps(f"{channels}x0e + {channels}x1o" if max_ell else f"{channels}x0e"),
                MLP_irreps=o3.Irreps("16x0e"), gate=torch.nn.functional.silu, atomic_energies=e0,
                avg_num_neighbors=_avg_neighbours(frames, r_max), atomic_numbers=zs, correlation=correlation,
            )
            graphs = _graphs(frames, z_table, r_max, getattr(torch, dtype))
        finally:
            torch.set_default_dtype(previous)
    loader = torch_geometric.dataloader.DataLoader(
        graphs, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    for _ in range(epochs):
        for batch in loader:
            optimiser.zero_grad()
            out = model(batch.to_dict(), training=True, compute_force=True)
            n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(out["energy"])
            loss = torch.mean(((out["energy"] - batch.energy_ref) / n_atoms) ** 2)
            loss = loss + 10.0 * torch.mean((out["forces"] - batch.forces_ref) ** 2)
            loss.backward()
            optimiser.step()
        schedule.step()
    model.eval()
    return MACECalculator(models=model, device="cpu", default_dtype=dtype)


def _graphs(frames: Sequence[Atoms], z_table, r_max: float, dtype: torch.dtype) -> list:
    """mace-torch's graphs of ``frames`` carrying their reference energy (eV) and forces (eV/Å)."""
    keyspec = mace_data.KeySpecification(info_keys={}, arrays_keys={})
    graphs = []
    for atoms in frames:
        config = mace_data.config_from_atoms(atoms, key_specification=keyspec)
        graph = mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=r_max)
        graph.energy_ref = torch.tensor([atoms.get_potential_energy()], dtype=dtype)
        graph.forces_ref = torch.as_tensor(atoms.get_forces(), dtype=dtype)
        graphs.append(graph)
    return graphs


def foundation_shaped_mace(
    heads: Sequence[str] = ("pt_head", "Default"),
    atomic_numbers: Sequence[int] = (29,),
    channels: int = 16,
    r_max: float = 4.0,
    seed: int = 0,
) -> torch.nn.Module:
    """An untrained multi-head ``ScaleShiftMACE`` shaped like a fine-tuned foundation model (float32).

    One shared body, one readout, scale/shift and set of reference energies
    (-3 eV, -3.5 eV, ... per atom) per head: the structure mace-torch's
    multi-head fine-tuning leaves. Pick a head with
    ``MACECalculator(models=model, head=name)``. For tests of the tap's
    mechanics, not for physics.
    """
    n = len(heads)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = modules.ScaleShiftMACE(
            atomic_inter_scale=[1.0 / (k + 1) for k in range(n)], atomic_inter_shift=[0.1 * k for k in range(n)],
            r_max=r_max, num_bessel=8, num_polynomial_cutoff=5, max_ell=1,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=2, num_elements=len(atomic_numbers),
            hidden_irreps=o3.Irreps(f"{channels}x0e + {channels}x1o"), MLP_irreps=o3.Irreps("16x0e"),
            gate=torch.nn.functional.silu,
            atomic_energies=np.array([[-3.0 - 0.5 * k] * len(atomic_numbers) for k in range(n)]),
            avg_num_neighbors=20.0, atomic_numbers=list(atomic_numbers), correlation=2, heads=list(heads),
        ).float()
    return model.eval()


def _avg_neighbours(frames: Sequence[Atoms], r_max: float) -> float:
    from ase.neighborlist import neighbor_list

    return float(np.mean([len(neighbor_list("i", a, r_max)) / len(a) for a in frames[:5]]))
