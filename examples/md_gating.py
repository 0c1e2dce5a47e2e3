"""Gate an ASE MD run on PROBE reliability: log every step, flag and halt when unreliable.

With no files it runs in under a minute on 2 CPU cores: a tiny MACE is trained
on EMT copper at 300 K, a head is fitted, and a Langevin run is heated until
the monitor halts it. With your own files it gates your model's MD:

    python examples/md_gating.py [--out DIR]
    python examples/md_gating.py --model my.model --fit held_out_dft.xyz --start start.xyz \\
        --temperature 600 --steps 5000 --heat 0 --out my-run
    python examples/md_gating.py --model my.model --probe probe.pt --start start.xyz

``--fit`` takes labelled frames the model was not trained on (extxyz with
energies in eV and forces in eV/Å) and writes the head to ``OUT/probe.pt``;
``--probe`` reads a head you fitted before (``probe-ase fit``).
"""

import argparse
from pathlib import Path

from ase import units
from ase.io import read
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from probe_ase import FitOptions, Probe, ProbeCalculator, fit_probe
from probe_ase.observers import ReliabilityMonitor, ReliabilityTrajectory
from probe_ase.testing import emt_frames, train_mace

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="md-gating-example", help="output folder")
parser.add_argument("--model", help="your MACE model file (default: a tiny MACE trained on EMT copper here)")
parser.add_argument("--fit", help="labelled frames to fit the head on (extxyz; eV, eV/Å), with --model")
parser.add_argument("--probe", help="a head file fitted for --model, instead of --fit")
parser.add_argument("--start", help="the MD's start structure, with --model")
parser.add_argument("--temperature", type=float, default=300.0, help="Langevin temperature at the start, K")
parser.add_argument("--heat", type=float, default=5.0, help="temperature added per step, K (0: constant)")
parser.add_argument("--steps", type=int, default=400, help="MD steps (2 fs each)")
parser.add_argument("--epochs", type=int, default=60, help="most head-training epochs of --fit")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(exist_ok=True)
if args.model and not (args.start and (args.fit or args.probe)):
    parser.error("--model needs --start and one of --fit or --probe")

# --- set-up: a backbone and a fitted head ---
if args.model:
    from mace.calculators import MACECalculator

    base = MACECalculator(model_paths=args.model, device="cpu")
    atoms = read(args.start)
    if args.probe:
        probe = Probe.load(args.probe)
    else:
        probe = fit_probe(base, args.fit, cache_dir=False, options=FitOptions(epochs=args.epochs))
        probe.save(out / "probe.pt")
else:  # stand-ins made here: EMT copper
    base = train_mace(emt_frames(30, 300, seed=1), epochs=25)
    pool = emt_frames(40, 300, seed=2) + emt_frames(25, 900, seed=3) + emt_frames(25, 600, strain=0.03, seed=4)
    probe = fit_probe(base, pool, criterion="force_rmse", quantile=0.8, cache_dir=False,
                      options=FitOptions(epochs=args.epochs, patience=25))
    atoms = emt_frames(1, 300, seed=5)[0]

# --- the two lines that gate an existing MD script ---
atoms.calc = ProbeCalculator(base, probe)
MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature)
dyn = Langevin(atoms, 2 * units.fs, temperature_K=args.temperature, friction=0.02)
with ReliabilityMonitor(dyn, action="halt", patience=3, log=out / "reliability.log",
                        flagged=out / "flagged.xyz") as monitor, \
        ReliabilityTrajectory(atoms, out / "md.xyz") as trajectory:
    dyn.attach(monitor, interval=1)
    dyn.attach(trajectory, interval=5)
    if args.heat:
        dyn.attach(lambda: dyn.set_temperature(temperature_K=args.temperature + args.heat * dyn.nsteps), interval=1)
    dyn.run(args.steps)

print("halted" if monitor.halted else "finished", "after", dyn.nsteps, "steps")
print(monitor.summary())
if monitor.last_reliable is not None:
    print(f"last reliable state kept in monitor.last_reliable ({len(monitor.last_reliable)} atoms); files in {out}/")
