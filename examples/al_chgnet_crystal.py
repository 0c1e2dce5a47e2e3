"""Active learning from a pretrained universal potential: CHGNet 0.3.0 on copper, fine-tuned by CHGNet's own trainer.

1. The pretrained CHGNet 0.3.0 (its weights ship in its wheel) is the backbone; a PROBE head is fitted on
   labelled copper cells at 300 and 900 K.
2. A fixed set of hot cells (1 500 K) is the yardstick of every round.
3. Each round explores hot MD on the ProbeCalculator, labels the cells PROBE distrusts, fine-tunes CHGNet
   with ``chgnet.trainer.Trainer`` (``FineTuner``: the per-element reference energies aligned first) and
   refits the head on the new backbone.

The reference is ASE's EMT, not DFT: this machine cannot afford periodic DFT, and the point here is the
loop from a pretrained model, not the level of theory. EMT copper is a different potential from the PBE
data CHGNet learned, so the pretrained model is wrong on it by a margin the rounds should close.

Per round it prints CHGNet's force RMSE (meV/Å) against EMT on the fixed hot cells, how many cells were
labelled, and how many fixed cells the verdict of the round's model and head accepts, with its risk: the
share of those whose force RMSE lies above the head's tolerance tau (meV/Å).

About 3 minutes on 2 CPU cores (``--rounds 1``: about 1.5). Needs the ``chgnet`` extra:
``pip install -e ".[chgnet]"``.

    python examples/al_chgnet_crystal.py [--out DIR] [--rounds N]
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one OpenMP thread, set before torch is imported

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402

from probe_ase import ActiveLearner, FitOptions, ProbeCalculator, fit_probe, load_backbone  # noqa: E402
from probe_ase.al.finetune import FineTuner  # noqa: E402
from probe_ase.testing import emt_frames  # noqa: E402

TEMPERATURE_K = 1500.0

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="al-chgnet-crystal", help="output folder")
parser.add_argument("--rounds", type=int, default=2, help="active-learning rounds")
args = parser.parse_args()
torch.set_num_threads(1)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
clock = time.perf_counter()

base = load_backbone("chgnet-0.3.0")
pool = emt_frames(30, 300, size=1, seed=1) + emt_frames(20, 900, size=1, seed=2)  # 4-atom fcc Cu cells, EMT labels
probe = fit_probe(base, pool, quantile=0.7, cache_dir=False, progress=False,
                  options=FitOptions(hidden=32, epochs=60, patience=15))
fixed = emt_frames(8, TEMPERATURE_K, size=1, seed=9)
print(f"head fitted on {len(pool)} EMT cells: tau = {probe.meta.tau * 1000:.0f} meV/Å, p* = {probe.p_star:.2f}")


def hot_md(atoms: Atoms) -> Langevin:
    """Langevin MD at TEMPERATURE_K (K), 2 fs steps, friction 0.02 /fs, seeded."""
    return Langevin(atoms, 2 * units.fs, temperature_K=TEMPERATURE_K, friction=0.02 / units.fs,
                    rng=np.random.default_rng(len(learner.labelled())))


def evaluate(calc: ProbeCalculator) -> tuple[float, int, int]:
    """Mean force RMSE (meV/Å) on the fixed cells against EMT; cells the verdict accepts; of those, cells whose
    force RMSE exceeds the head's tau (eV/Å)."""
    errors, accepted = [], []
    for frame in fixed:
        atoms = frame.copy()
        atoms.calc = calc
        errors.append(float(np.sqrt(np.mean((atoms.get_forces() - frame.get_forces()) ** 2))))
        accepted.append(bool(calc.results["reliable"]))
    errors_arr, accepted_arr = np.array(errors), np.array(accepted)
    return 1000 * float(errors_arr.mean()), int(accepted_arr.sum()), int((errors_arr[accepted_arr] > calc.probe.meta.tau).sum())


def row(round_: int, labelled: str) -> str:
    """One line of the table for the current model and head; wall time in s."""
    error, accepted, wrong = evaluate(learner.probe_calc)
    risk = f"{wrong / accepted:.2f}" if accepted else "-"
    return (f"{round_:>5} {labelled:>9} {error:>19.0f} {f'{accepted}/{len(fixed)}':>13} {risk:>9} "
            f"{learner.probe_calc.probe.meta.tau * 1000:>11.0f} {time.perf_counter() - clock:>7.0f}")


learner = ActiveLearner(ProbeCalculator(base, probe), reference=EMT, db=out / "al.db")
trainer = FineTuner(pool, work_dir=out / "finetune", epochs=5, head_epochs=60)
header = (f"{'round':>5} {'labelled':>9} {'hot F RMSE (meV/Å)':>19} {'hot accepted':>13} {'hot risk':>9} "
          f"{'tau (meV/Å)':>11} {'wall s':>7}")
print(header)
rows = [row(0, "-")]
print(rows[-1])
for _ in range(args.rounds):
    report = learner.run_round(emt_frames(2, 300, size=1, seed=5), md=hot_md, steps=100, max_new=8,
                               min_separation=5, trainer=trainer, progress=False, checkpoint_dir=out / "rounds")
    rows.append(row(report.round, str(report.labelled)))
    print(rows[-1])

print(f"\nCHGNet 0.3.0 fine-tuned on EMT labels: force RMSE on {len(fixed)} fixed {TEMPERATURE_K:.0f} K cells, per round")
print(header)
print("\n".join(rows))
print(f"fine-tuned model: {trainer.model}; database {out / 'al.db'}: {learner.status_counts()}")
