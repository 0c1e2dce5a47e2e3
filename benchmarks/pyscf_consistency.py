"""PySCF against a data set's stored labels: energy offset per frame, force errors, seconds per frame.

Recomputes seeded frames of a data set (default: ten of ``train.xyz``) with the PySCF reference of
:mod:`probe_ase.al.dft` (PBE/def2-SVP by default, the level of the ethanol set) and compares with the stored
energies (eV) and forces (eV/Å): the offset E_PySCF - E_stored of every frame and the offsets' spread (a
constant offset is a different energy zero, not a different surface), the force RMSE and largest component
difference, and the seconds each frame took. The per-element offsets that align the two
(:func:`~probe_ase.al.dft.fit_energy_offsets`) are fitted on the same frames, and the isolated atoms of
``isolated_atoms.xyz`` are recomputed too (ground-state multiplicities) for the isolated-atom alternative.

    python -m benchmarks.pyscf_consistency --data ../shared/data/ethanol   # ~7 s per frame on one thread
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and PySCF load their thread pools

import numpy as np  # noqa: E402
from ase.io import read  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from benchmarks.environment import environment  # noqa: E402
from probe_ase.al.dft import fit_energy_offsets, pyscf_reference  # noqa: E402

#: ground-state spin multiplicities of the isolated atoms recomputed
MULTIPLICITY = {"H": 2, "C": 3, "N": 4, "O": 3}


def label(atoms, reference) -> tuple[float, np.ndarray, float, float]:
    """PySCF energy (eV), forces (eV/Å), CPU and wall seconds of one frame, from a fresh calculator.

    The CPU seconds (this process's) are the cost: on a loaded machine the wall time counts others' work too.
    """
    atoms = atoms.copy()
    atoms.calc = reference()
    start, wall = time.process_time(), time.perf_counter()
    forces = atoms.get_forces()
    cpu, wall = time.process_time() - start, time.perf_counter() - wall
    return float(atoms.get_potential_energy()), np.asarray(forces), cpu, wall


def compare(frames: list, indices: list[int], reference) -> list[dict]:
    """One row per frame: stored and PySCF energies (eV), their offset, force RMSE and max |ΔF| (eV/Å), CPU and
    wall seconds."""
    rows = []
    for index, atoms in zip(indices, frames):
        energy, forces, seconds, wall = label(atoms, reference)
        stored_f = atoms.get_forces()
        diff = forces - stored_f
        stored_e = atoms.get_potential_energy()
        rows.append({"index": index, "formula": atoms.get_chemical_formula(), "stored_energy": stored_e,
                     "pyscf_energy": energy, "offset": energy - stored_e,
                     "force_rmse": float(np.sqrt(np.mean(diff ** 2))), "force_max": float(np.abs(diff).max()),
                     "stored_force_rms": float(np.sqrt(np.mean(stored_f ** 2))), "seconds": seconds,
                     "wall_seconds": wall})
        print(f"{index:>6} {rows[-1]['offset'] * 1000:>12.2f} {rows[-1]['force_rmse'] * 1000:>14.2f} "
              f"{rows[-1]['force_max'] * 1000:>13.2f} {seconds:>8.1f}", flush=True)
    return rows


def isolated_atoms(path: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Stored and PySCF energies (eV) of each isolated atom in ``path`` (ground-state multiplicity, UKS)."""
    result = {}
    for atoms in read(path, ":"):
        symbol = atoms.get_chemical_symbols()[0]
        if symbol not in args.elements:
            continue
        reference = pyscf_reference(xc=args.xc, basis=args.basis, multiplicity=MULTIPLICITY[symbol],
                                    threads=args.threads)
        energy, _, seconds, _ = label(atoms, reference)
        stored = atoms.get_potential_energy()
        result[symbol] = {"stored_energy": stored, "pyscf_energy": energy, "offset": energy - stored,
                          "seconds": seconds}
    return result


def summarise(rows: list[dict], frames: list) -> dict:
    """Offsets' mean and spread (eV), pooled force RMSE and max (eV/Å), seconds per frame, fitted offsets."""
    offsets = np.array([row["offset"] for row in rows])
    element_offsets = fit_energy_offsets(frames, [r["pyscf_energy"] for r in rows], [r["stored_energy"] for r in rows])
    aligned = [r["pyscf_energy"] + sum(element_offsets[s] for s in atoms.get_chemical_symbols()) - r["stored_energy"]
               for r, atoms in zip(rows, frames)]
    return {"frames": len(rows), "offset_mean": float(offsets.mean()), "offset_std": float(offsets.std(ddof=1)),
            "offset_range": float(np.ptp(offsets)),
            "force_rmse": float(np.sqrt(np.mean([r["force_rmse"] ** 2 for r in rows]))),
            "force_max": float(max(r["force_max"] for r in rows)),
            "stored_force_rms": float(np.sqrt(np.mean([r["stored_force_rms"] ** 2 for r in rows]))),
            "seconds_per_frame_median": float(np.median([r["seconds"] for r in rows])),
            "seconds_per_frame_mean": float(np.mean([r["seconds"] for r in rows])),
            "wall_seconds_per_frame_median": float(np.median([r["wall_seconds"] for r in rows])),
            "element_offsets": element_offsets, "aligned_energy_rmse": float(np.sqrt(np.mean(np.square(aligned))))}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print a table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="data folder (e.g. ../shared/data/ethanol)")
    parser.add_argument("--file", default="train.xyz", help="frames file in --data (default train.xyz)")
    parser.add_argument("--frames", type=int, default=10, help="frames compared (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frame choice (default 0)")
    parser.add_argument("--xc", default="PBE")
    parser.add_argument("--basis", default="def2-SVP")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per PySCF call (default 1)")
    parser.add_argument("--no-atoms", action="store_true", help="skip the isolated atoms")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pyscf-consistency.json"))
    args = parser.parse_args(argv)
    everything = read(args.data / args.file, ":")
    indices = sorted(int(i) for i in np.random.default_rng(args.seed).choice(len(everything), args.frames,
                                                                             replace=False))
    frames = [everything[i] for i in indices]
    args.elements = {s for atoms in frames for s in atoms.get_chemical_symbols()}
    reference = pyscf_reference(xc=args.xc, basis=args.basis, threads=args.threads)
    print(f"PySCF {args.xc}/{args.basis} against {args.data / args.file}: frames {indices}")
    print(f"{'frame':>6} {'offset meV':>12} {'F-RMSE meV/Å':>14} {'max meV/Å':>13} {'CPU s':>8}")
    rows = compare(frames, indices, reference)
    summary = summarise(rows, frames)
    atoms = {} if args.no_atoms else isolated_atoms(args.data / "isolated_atoms.xyz", args)
    print(f"offset {summary['offset_mean'] * 1000:.2f} meV (std {summary['offset_std'] * 1000:.2f}, range "
          f"{summary['offset_range'] * 1000:.2f} meV); force RMSE {summary['force_rmse'] * 1000:.2f} meV/Å, max "
          f"{summary['force_max'] * 1000:.2f} meV/Å; {summary['seconds_per_frame_median']:.1f} CPU s per frame (median)")
    print(f"per-element offsets (eV per atom, minimum norm): {summary['element_offsets']}")
    for symbol, row in atoms.items():
        print(f"isolated {symbol}: offset {row['offset'] * 1000:.2f} meV ({row['seconds']:.1f} CPU s)")
    write_json(args.out, {"command": " ".join(["python -m benchmarks.pyscf_consistency", *sys.argv[1:]]),
                          "date": time.strftime("%Y-%m-%d", time.gmtime()),
                          "settings": {"xc": args.xc, "basis": args.basis, "threads": args.threads,
                                       "file": args.file, "seed": args.seed, "indices": indices},
                          "pyscf": version("pyscf"), "summary": summary, "frames": rows, "isolated_atoms": atoms,
                          "environment": environment()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
