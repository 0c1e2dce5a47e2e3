"""Gate an ASE MD run on PROBE reliability: log every step, flag and halt when unreliable.

Runs in under a minute on 2 CPU cores with no files: a tiny MACE is trained on
EMT copper at 300 K, a head is fitted, and a Langevin run is heated until the
monitor halts it. With your own model, replace the set-up block by
``base = MACECalculator(model_paths="my.model")`` and ``probe = "probe.pt"``.

    python examples/md_gating.py [--out DIR]
"""

import argparse
from pathlib import Path

from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from probe_ase import FitOptions, ProbeCalculator, fit_probe
from probe_ase.observers import ReliabilityMonitor, ReliabilityTrajectory
from probe_ase.testing import emt_frames, train_mace

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="md-gating-example", help="output folder")
out = Path(parser.parse_args().out)
out.mkdir(exist_ok=True)

# --- set-up: a backbone and a fitted head (normally loaded from files) ---
base = train_mace(emt_frames(30, 300, seed=1), epochs=25)
pool = emt_frames(40, 300, seed=2) + emt_frames(25, 900, seed=3) + emt_frames(25, 600, strain=0.03, seed=4)
probe = fit_probe(base, pool, criterion="force_rmse", quantile=0.8, cache_dir=False,
                  options=FitOptions(epochs=60, patience=25))

# --- the two lines that gate an existing MD script ---
atoms = emt_frames(1, 300, seed=5)[0]
atoms.calc = ProbeCalculator(base, probe)
MaxwellBoltzmannDistribution(atoms, temperature_K=300)
dyn = Langevin(atoms, 2 * units.fs, temperature_K=300, friction=0.02)
with ReliabilityMonitor(dyn, action="halt", patience=3, log=out / "reliability.log",
                        flagged=out / "flagged.xyz") as monitor, \
        ReliabilityTrajectory(atoms, out / "md.xyz") as trajectory:
    dyn.attach(monitor, interval=1)
    dyn.attach(trajectory, interval=5)
    dyn.attach(lambda: dyn.set_temperature(temperature_K=300 + 5 * dyn.nsteps), interval=1)  # heat
    dyn.run(400)

print("halted" if monitor.halted else "finished", "after", dyn.nsteps, "steps")
print(monitor.summary())
print(f"last reliable state kept in monitor.last_reliable ({len(monitor.last_reliable)} atoms); files in {out}/")
