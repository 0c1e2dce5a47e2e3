"""``probe-ase md``: molecular dynamics gated by PROBE reliability."""

from __future__ import annotations

import argparse

from .options import add_backbone, load_probe_and_backbone

HELP = "run MD with a backbone and head; log, flag or halt on reliability"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase md``'s arguments: structure, head, backbone, dynamics, gating and output files."""
    parser.add_argument("structure", help="starting structure (any file ASE reads; the last frame is used)")
    parser.add_argument("--probe", required=True, metavar="PATH", help="head file written by 'probe-ase fit'")
    add_backbone(parser, required=False)
    parser.add_argument("--ensemble", choices=["nve", "nvt", "npt"], default="nvt",
                        help="NVE (velocity Verlet), NVT (Langevin) or NPT (Berendsen) (default: nvt)")
    parser.add_argument("--temperature", type=float, default=300.0, metavar="K", help="temperature in K (default: 300)")
    parser.add_argument("--timestep", type=float, default=1.0, metavar="FS", help="timestep in fs (default: 1.0)")
    parser.add_argument("--steps", type=int, default=1000, help="MD steps (default: 1000)")
    parser.add_argument("--friction", type=float, default=0.01, metavar="PER_FS",
                        help="Langevin friction in 1/fs (default: 0.01)")
    parser.add_argument("--pressure", type=float, default=0.0, metavar="GPA", help="NPT pressure in GPa (default: 0)")
    parser.add_argument("--compressibility", type=float, default=0.01, metavar="PER_GPA",
                        help="NPT compressibility in 1/GPa (default: 0.01)")
    parser.add_argument("--action", choices=["log", "flag", "halt"], default="halt",
                        help="log reliability; also flag unreliable frames; also halt the run (default: halt)")
    parser.add_argument("--patience", type=int, default=3, help="consecutive unreliable steps before halting (default: 3)")
    parser.add_argument("--threshold", type=float, help="reliability threshold, 0-1 (default: the head's p*)")
    parser.add_argument("--min-atom-reliability", type=_atom_threshold, metavar="P|auto",
                        help="also judge atoms (heads fitted with --atom-threshold): a step is unreliable when any "
                             "atom's reliability is below P (0-1; 'auto': the head's atom p*); the log lists them "
                             "(default: structure only)")
    parser.add_argument("--trajectory", default="md.traj", metavar="PATH",
                        help="trajectory to append (.traj, or extxyz for other suffixes; default: md.traj)")
    parser.add_argument("--interval", type=int, default=1, help="write every N-th step to the trajectory (default: 1)")
    parser.add_argument("--log", default="reliability.log", metavar="PATH", help="reliability log to append")
    parser.add_argument("--flagged", default="flagged.xyz", metavar="PATH", help="extxyz of unreliable frames to append")
    parser.add_argument("--max-flagged", type=int, default=100, help="most flagged frames written (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed for velocities and thermostat (default: 0)")


def _atom_threshold(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in 0-1 or 'auto', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Run gated MD from the structure's last frame and print the monitor's summary; returns 0."""
    import json

    from ase.io import read

    from ..calculator import ProbeCalculator
    from ..exceptions import InputError
    from ..md import make_dynamics, run_gated

    probe, backbone = load_probe_and_backbone(args)
    try:
        atoms = read(args.structure, index=-1)
    except FileNotFoundError as err:
        raise InputError(f"no such file: {args.structure}", path=args.structure) from err
    atoms.calc = ProbeCalculator(backbone, probe, threshold=args.threshold)
    dyn = make_dynamics(atoms, args.ensemble, args.temperature, args.timestep, args.friction,
                        args.pressure, args.compressibility, args.seed)
    monitor = run_gated(dyn, args.steps, trajectory=args.trajectory, interval=args.interval,
                        action=args.action, threshold=args.threshold, patience=args.patience,
                        log=args.log, flagged=args.flagged, max_flagged=args.max_flagged,
                        min_atom_reliability=args.min_atom_reliability)
    atoms.calc.close()
    summary = monitor.summary()
    verdict = f"halted at step {summary['halt_step']}" if monitor.halted else f"ran {dyn.nsteps} steps"
    print(f"{verdict}; trajectory {args.trajectory}, log {args.log}")
    print(json.dumps(summary, indent=2))
    return 0
