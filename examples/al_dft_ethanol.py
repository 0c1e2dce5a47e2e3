"""Active learning on real DFT: a small MACE on ethanol, PySCF (PBE/def2-SVP) as the reference, fine-tuned by mace-torch.

1. A small MACE is trained on a few hundred frames of the ethanol set's ``train.xyz``
   (PBE/def2-SVP, computed with ORCA) and a PROBE head fitted on held-out labelled frames
   (``test_MD.xyz``, never training frames).
2. Short hot Langevin MD runs (1000 K, 30 fs) on the MLIP give a fixed set of hot frames, labelled once
   with PySCF at the data set's level: the yardstick of every round.
3. Each round explores hot MD on the ProbeCalculator, sends the frames PROBE distrusts to PySCF,
   fine-tunes the MACE with mace-torch's own trainer (``FineTuner``: the training frames plus the new
   ones) and refits the head.

Per round it prints the model's force RMSE (meV/Å) against PySCF on the fixed hot frames, how many
frames were labelled, and, on the fixed frames and on the round's labelled ones, how many the verdict of
the round's model and head accepts and its risk: the share of those whose force RMSE lies above the
head's tolerance tau (meV/Å). PySCF's energies sit 7.05 meV per molecule above the stored
ones (docs/how-to/pyscf-reference.md): the per-element offsets measured there are applied, so new
labels and training frames share one energy zero.

About 8 minutes on 2 shared CPU cores (``--quick``: about 4, ``--quick --rounds 1``: about 2); PySCF
takes ~7 s of CPU per frame. Needs the ``mace`` and ``pyscf`` extras: ``pip install -e ".[mace,pyscf]"``.

    python examples/al_dft_ethanol.py --data ../shared/data/ethanol [--out DIR] [--rounds N] [--quick]
"""

import os

# one OpenMP thread per process for torch and PySCF alike, set before either is imported
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.io import read  # noqa: E402
from ase.neighborlist import NeighborList, natural_cutoffs  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution  # noqa: E402
from scipy.sparse.csgraph import connected_components  # noqa: E402

from probe_ase import FitOptions, ProbeCalculator, fit_probe  # noqa: E402
from probe_ase.al.dft import pyscf_reference  # noqa: E402
from probe_ase.al.finetune import FineTuner  # noqa: E402
from probe_ase.al.learner import ActiveLearner  # noqa: E402
from probe_ase.exceptions import SCFNotConvergedError  # noqa: E402
from probe_ase.testing import train_mace  # noqa: E402

#: eV per atom added to PySCF's energies: measured on ten frames of the set (docs/how-to/pyscf-reference.md)
ENERGY_OFFSETS = {"H": -0.001031, "C": -0.000344, "O": -0.000172}
TEMPERATURE_K = 1000.0
TIMESTEP_FS = 0.5

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True, help="folder with the ethanol set's train.xyz and test_MD.xyz")
parser.add_argument("--out", default="al-dft-ethanol", help="output folder")
parser.add_argument("--rounds", type=int, default=3, help="active-learning rounds")
parser.add_argument("--quick", action="store_true", help="a shortened run (for tests): fewer frames and epochs")
args = parser.parse_args()
torch.set_num_threads(1)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
n_train, n_fit, n_hot, per_round, epochs, md_steps = (150, 120, 4, 4, 40, 150) if args.quick \
    else (300, 200, 8, 6, 80, 300)
reference = pyscf_reference(xc="PBE", basis="def2-SVP", threads=1, energy_offsets=ENERGY_OFFSETS)
clock = time.perf_counter()

rng = np.random.default_rng(0)
train_all = read(Path(args.data) / "train.xyz", ":")
train = [train_all[k] for k in sorted(rng.choice(len(train_all), n_train, replace=False))]
held_out_all = read(Path(args.data) / "test_MD.xyz", ":")
fit_frames = [held_out_all[k] for k in sorted(rng.choice(len(held_out_all), n_fit, replace=False))]
print(f"training a MACE (16 channels, r_max 5 Å) on {n_train} frames of train.xyz, {epochs} epochs ...")
base = train_mace(train, channels=16, r_max=5.0, epochs=epochs)
probe = fit_probe(base, fit_frames, criterion="force_rmse", quantile=0.7, cache_dir=False, progress=False,
                  options=FitOptions(epochs=100, patience=25))
print(f"head fitted on {n_fit} frames of test_MD.xyz: tau = {probe.meta.tau * 1000:.0f} meV/Å, "
      f"p* = {probe.p_star:.2f}")


def hot_md(atoms: Atoms, seed: int) -> Langevin:
    """Langevin MD at TEMPERATURE_K (K), TIMESTEP_FS (fs) steps, friction 0.02 /fs, seeded."""
    md_rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE_K, rng=md_rng)
    return Langevin(atoms, TIMESTEP_FS * units.fs, temperature_K=TEMPERATURE_K, friction=0.02 / units.fs,
                    rng=md_rng)


def hot_frames(n: int, seed: int) -> list:
    """``n`` hot frames labelled by PySCF: each the end of a short (60 steps, 30 fs) 1000 K MD on the starting
    MACE from its own training frame; a frame whose molecule broke apart or whose SCF failed is replaced."""
    frames, skipped = [], 0
    for k in range(seed, seed + 10 * n):
        atoms = train_all[k].copy()
        atoms.calc = base
        hot_md(atoms, k).run(60)
        frame = atoms.copy()
        frame.calc = reference()
        if not in_one_piece(frame):
            skipped += 1
            continue
        try:
            frame.calc = SinglePointCalculator(frame, energy=frame.get_potential_energy(), forces=frame.get_forces())
        except SCFNotConvergedError:
            skipped += 1
            continue
        frames.append(frame)
        if len(frames) == n:
            break
    print(f"{len(frames)} fixed hot frames labelled, {skipped} skipped (broken molecule or SCF not converged)")
    return frames


def in_one_piece(atoms: Atoms) -> bool:
    """Whether the covalent bonds (natural cutoffs) join all atoms into one molecule."""
    nl = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=True)
    nl.update(atoms)
    return connected_components(nl.get_connectivity_matrix(sparse=True), directed=False)[0] == 1


def evaluate(calc: ProbeCalculator, frames: list) -> tuple[float, int, int]:
    """Mean force RMSE (meV/Å) of ``calc`` against the frames' labels; frames the verdict accepts; of those,
    frames whose force RMSE exceeds the head's tau (eV/Å)."""
    errors, accepted = [], []
    for frame in frames:
        atoms = frame.copy()
        atoms.calc = calc
        errors.append(float(np.sqrt(np.mean((atoms.get_forces() - frame.get_forces()) ** 2))))
        accepted.append(bool(calc.results["reliable"]))
    errors_arr, accepted_arr = np.array(errors), np.array(accepted)
    tau = calc.probe.meta.tau
    return 1000 * float(errors_arr.mean()), int(accepted_arr.sum()), int((errors_arr[accepted_arr] > tau).sum())


def risk(accepted: int, wrong: int) -> str:
    """The share of accepted frames outside tolerance, or "-" when the verdict accepts none."""
    return f"{wrong / accepted:.2f}" if accepted else "-"


print(f"labelling {n_hot} fixed hot frames ({TEMPERATURE_K:.0f} K MD on the starting MACE) with PySCF ...")
fixed = hot_frames(n_hot, seed=500)
learner = ActiveLearner(ProbeCalculator(base, probe), reference, db=out / "al.db")
trainer = FineTuner(fit_frames, train_data=train, work_dir=out / "finetune", epochs=30, learning_rate=1e-3,
                    head_epochs=100, holdout=0.25)  # mace-torch's default lr, 0.01, first undoes the model
seeds = iter(range(1000, 10**6))  # a fresh, reproducible seed for every trajectory
starts = train[:: max(1, n_train // 2)][:2]
header = (f"{'round':>5} {'labelled':>9} {'failed':>6} {'hot F RMSE (meV/Å)':>19} {'hot accepted':>12} "
          f"{'hot risk':>8} {'labelled accepted':>17} {'labelled risk':>13} {'tau (meV/Å)':>11} {'wall s':>7}")


def row(round_: int, new: list) -> str:
    """One line of the table: the current model and head on the fixed hot frames and on ``new``, this round's
    labelled frames; wall time in s."""
    error, accepted, wrong = evaluate(learner.probe_calc, fixed)
    new_accepted, new_risk = "-", "-"
    if new:
        _, n_accepted, n_wrong = evaluate(learner.probe_calc, new)
        new_accepted, new_risk = f"{n_accepted}/{len(new)}", risk(n_accepted, n_wrong)
    labelled, failed = (str(len(new)), str(learner.db.count(status="failed", round=round_))) if round_ else ("-", "-")
    return (f"{round_:>5} {labelled:>9} {failed:>6} {error:>19.0f} {f'{accepted}/{n_hot}':>12} "
            f"{risk(accepted, wrong):>8} {new_accepted:>17} {new_risk:>13} "
            f"{learner.probe_calc.probe.meta.tau * 1000:>11.0f} {time.perf_counter() - clock:>7.0f}")


print(header)
rows = [row(0, [])]
print(rows[-1])
for _ in range(args.rounds):
    report = learner.run_round(starts, md=lambda atoms: hot_md(atoms, next(seeds)), steps=md_steps,
                               max_new=per_round, min_separation=10, trainer=trainer, progress=False)
    rows.append(row(report.round, learner.labelled(report.round)))
    print(rows[-1])

print(f"\nforce RMSE against PySCF (PBE/def2-SVP) on {n_hot} fixed hot frames ({TEMPERATURE_K:.0f} K), per round")
print(header)
print("\n".join(rows))
print(f"database {out / 'al.db'}: {learner.status_counts()}")
