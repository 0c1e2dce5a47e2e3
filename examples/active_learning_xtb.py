"""A complete active-learning loop on ethanol with GFN2-xTB (tblite) as the reference.

1. xTB Langevin MD gives labelled ethanol frames at 300 K (backbone training)
   and at 300 K + 800 K (head fit pool).
2. A tiny MACE is trained and a PROBE head fitted.
3. Each round explores hot MD (1000 K) with the MLIP, sends the candidates
   PROBE distrusts to xTB (an ase.db keeps every frame and its status),
   exports them, fine-tunes the MACE with mace-torch's own trainer and
   refits the head.

A few minutes on 2 CPU cores (``--quick``: about one). Needs the ``xtb``
extra: ``pip install -e ".[xtb]"``.

    python examples/active_learning_xtb.py [--out DIR] [--rounds N] [--quick]
"""

import os

# tblite's OpenMP runtime clashes with torch's once both run threads in one
# process (its SCF then fails to converge): keep OpenMP single-threaded, set
# before torch or tblite are imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase import units  # noqa: E402
from ase.build import molecule  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution  # noqa: E402
from tblite.ase import TBLite  # noqa: E402

from probe_ase import FitOptions, ProbeCalculator, fit_probe  # noqa: E402
from probe_ase.al.learner import ActiveLearner, RoundReport  # noqa: E402
from probe_ase.al.retrain import MaceTrainer  # noqa: E402
from probe_ase.testing import train_mace  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="al-xtb-example", help="output folder")
parser.add_argument("--rounds", type=int, default=2, help="active-learning rounds")
parser.add_argument("--quick", action="store_true", help="a shortened run (for tests)")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(exist_ok=True)
scale = 0.5 if args.quick else 1.0
xtb = functools.partial(TBLite, method="GFN2-xTB", verbosity=0)  # picklable reference factory


def xtb_md(n: int, temperature_K: float, seed: int) -> list:
    """``n`` xTB-labelled ethanol frames from Langevin MD (energy eV, forces eV/Å)."""
    atoms = molecule("CH3CH2OH")
    atoms.calc = xtb()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature_K, friction=0.05 / units.fs, rng=rng)
    frames = []
    for _ in range(n):
        dyn.run(10)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)
    return frames


print("generating xTB data ...")
train = xtb_md(int(60 * scale), 300, seed=1)
pool = xtb_md(int(60 * scale), 300, seed=2) + xtb_md(int(60 * scale), 800, seed=3)
base = train_mace(train, r_max=4.0, epochs=int(80 * scale))
probe = fit_probe(base, pool, criterion="force_rmse", quantile=0.7, cache_dir=False, progress=False,
                  options=FitOptions(epochs=100, patience=25))
print(f"head fitted: tau = {probe.meta.tau * 1000:.0f} meV/Å, p* = {probe.p_star:.2f}")


MD_SEEDS = iter(range(1000, 10**6))  # a fresh, reproducible seed for every trajectory


def hot_md(atoms):
    rng = np.random.default_rng(next(MD_SEEDS))
    MaxwellBoltzmannDistribution(atoms, temperature_K=1000, rng=rng)
    return Langevin(atoms, 0.5 * units.fs, temperature_K=1000, friction=0.02 / units.fs, rng=rng)


db = out / "al.db"
learner = ActiveLearner(ProbeCalculator(base, probe), xtb, db=db)
trainer = MaceTrainer(train, pool, work_dir=out / "retrain", epochs=20)
starts = [f for f in train[:: max(1, len(train) // 3)]][:3]
print(RoundReport.HEADER)
for _ in range(args.rounds):
    # explore, label with xTB, export, fine-tune on 70 % of the new frames; the force RMSE is on the other 30 %
    report = learner.run_round(starts, md=hot_md, steps=int(300 * scale), max_new=20, min_separation=10,
                               trainer=trainer, export=out / "round{round}.xyz", progress=False)
    print(report.row())
print(f"database {db}: {learner.status_counts()}")
