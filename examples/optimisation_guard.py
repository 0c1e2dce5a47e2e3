"""Guard a geometry optimisation: hand over to a reference calculator when PROBE loses trust.

A compressed copper cell lies outside the MLIP's training data; the guarded
BFGS starts on the cheap MLIP and continues on the reference (here EMT,
standing in for DFT) once reliability drops. Under a minute on 2 CPU cores.

    python examples/optimisation_guard.py
"""

from ase.calculators.emt import EMT

from probe_ase import FitOptions, ProbeCalculator, fit_probe
from probe_ase.guard import guarded_optimize
from probe_ase.testing import emt_frames, train_mace

# --- set-up: a backbone and a fitted head (normally loaded from files) ---
base = train_mace(emt_frames(30, 300, seed=1), epochs=25)
pool = emt_frames(40, 300, seed=2) + emt_frames(25, 900, seed=3) + emt_frames(25, 600, strain=0.03, seed=4)
probe = fit_probe(base, pool, criterion="force_rmse", quantile=0.8, cache_dir=False,
                  options=FitOptions(epochs=60, patience=25))

atoms = emt_frames(1, 300, seed=6)[0]
atoms.set_cell(atoms.cell * 0.94, scale_atoms=True)  # 6 % compression: out of distribution
atoms.rattle(0.05, seed=1)
atoms.calc = ProbeCalculator(base, probe)

report = guarded_optimize(atoms, reference=EMT(), fmax=0.05, steps=300)
print(f"converged: {report.converged}; handed over at step {report.handover_step}; "
      f"{report.mlip_steps} MLIP steps, {report.reference_steps} reference steps; "
      f"final fmax {report.final_fmax:.3f} eV/Å")
