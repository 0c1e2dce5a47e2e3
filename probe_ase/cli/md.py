"""``probe-ase md``: molecular dynamics gated by PROBE reliability."""

from __future__ import annotations

import argparse

from probe_ase.cli import checks
from probe_ase.exceptions import InputError
from probe_ase.cli.options import (ACTIONS, DYNAMICS, add_alias, add_backbone, add_companion, add_probe,
                                   check_probe_and_backbone, load_probe_and_backbone)

HELP = "run MD with a backbone and head; log, flag or halt on reliability"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase md``'s arguments: start, head and backbone, dynamics, gating, output files, advanced."""
    essential = parser.add_argument_group("essential")
    essential.add_argument("structure", nargs="?",
                           help="starting structure (any file ASE reads; the last frame is used); velocities are "
                                "drawn at --temperature")
    essential.add_argument("--restart", metavar="TRAJ",
                           help="instead of STRUCTURE: continue from this trajectory's last frame with its positions "
                                "and momenta (velocities), e.g. the --trajectory of an earlier run")
    add_probe(essential)
    add_backbone(essential, required=False)
    essential.add_argument("--dynamics", choices=DYNAMICS, default="nvt",
                           help="NVE (velocity Verlet), NVT (Langevin) or NPT (Berendsen) (default: nvt)")
    add_alias(essential, "--ensemble", "--dynamics", "dynamics", choices=DYNAMICS)
    essential.add_argument("--temperature", type=float, default=300.0, metavar="K",
                           help="temperature in K, >= 0 (default: 300)")
    essential.add_argument("--timestep", type=float, default=1.0, metavar="FS", help="timestep in fs, > 0 "
                                                                                     "(default: 1.0)")
    essential.add_argument("--steps", type=int, default=1000, metavar="N", help="MD steps, >= 1 (default: 1000)")

    gate = parser.add_argument_group("gating", "what an unreliable step does")
    gate.add_argument("--action", choices=ACTIONS, default="halt",
                      help="log reliability; also flag unreliable frames; also halt the run (default: halt)")
    gate.add_argument("--min-reliability", type=float, metavar="P",
                      help="a step is unreliable below this reliability (a probability, 0-1; default: the head's "
                           "certified p*)")
    add_alias(gate, "--threshold", "--min-reliability", "min_reliability", type=float)
    gate.add_argument("--patience", type=int, default=3, metavar="N",
                      help="consecutive unreliable steps before halting, >= 1 (default: 3)")
    gate.add_argument("--min-atom-reliability", type=_atom_threshold, metavar="P|auto",
                      help="also judge atoms (heads fitted with --atom-tolerance): a step is unreliable when any "
                           "atom's reliability is below P (0-1; 'auto': the head's atom p*); the log lists them "
                           "(default: structure only)")

    add_second_opinion(parser)
    add_outputs(parser)

    adv = parser.add_argument_group("advanced")
    adv.add_argument("--friction", type=float, default=0.01, metavar="PER_FS",
                     help="Langevin friction in 1/fs, > 0 (default: 0.01)")
    adv.add_argument("--pressure", type=float, default=0.0, metavar="GPA", help="NPT pressure in GPa (default: 0)")
    adv.add_argument("--compressibility", type=float, default=0.01, metavar="PER_GPA",
                     help="NPT compressibility in 1/GPa, > 0 (default: 0.01)")
    adv.add_argument("--seed", type=int, default=0, help="seed for velocities and thermostat, >= 0 (default: 0)")


def add_second_opinion(parser: argparse.ArgumentParser) -> None:
    """``probe-ase md``'s companion-model arguments."""
    second = parser.add_argument_group("second opinion", "a companion model's force disagreement in the verdict")
    add_companion(second)
    second.add_argument("--companion-every", type=int, default=1, metavar="K",
                        help="run the companion every K-th step, >= 1 (default: 1, every step; between runs the last "
                             "disagreement counts). A step whose disagreement exceeds the head's tolerance (its "
                             "criterion's unit, e.g. eV/Å) is unreliable, reason models_disagree")
    second.add_argument("--vouch", type=float, metavar="F",
                        help="outside the novelty support, two models agreeing within F x the head's tolerance make "
                             "the step reliable (0-1; default: 0, never: the fail-safe verdict)")


def add_outputs(parser: argparse.ArgumentParser) -> None:
    """``probe-ase md``'s output-file arguments."""
    out = parser.add_argument_group("output files", "an existing file is refused unless --append is given")
    out.add_argument("--trajectory", default="md.traj", metavar="PATH",
                     help="trajectory with reliability per frame (.traj, or extxyz for other suffixes; positions "
                          "in Å, energies in eV, forces in eV/Å; default: md.traj)")
    out.add_argument("--traj-interval", type=int, default=1, metavar="N",
                     help="write every N-th step to the trajectory, >= 1 (default: 1)")
    add_alias(out, "--interval", "--traj-interval", "traj_interval", type=int)
    out.add_argument("--append", action="store_true",
                     help="add to existing --trajectory, --log and --flagged files instead of refusing them")
    out.add_argument("--log", default="reliability.log", metavar="PATH",
                     help="reliability log, one line per step (default: reliability.log)")
    out.add_argument("--flagged", default="flagged.xyz", metavar="PATH",
                     help="extxyz of unreliable frames (default: flagged.xyz)")
    out.add_argument("--max-flagged", type=int, default=100, metavar="N",
                     help="most flagged frames written, >= 0 (default: 100)")


def _atom_threshold(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in 0-1 or 'auto', got {text!r}") from None


def check(args: argparse.Namespace) -> None:
    """Every value, the start file, the output files and the head, before the backbone is loaded.

    Sets ``args.start`` (the starting Atoms) and ``args.head`` (the Probe).
    """
    checks.at_least(args.temperature, "--temperature", 0, " K")
    checks.positive(args.timestep, "--timestep", " (fs)")
    checks.at_least(args.steps, "--steps", 1)
    checks.positive(args.friction, "--friction", " (1/fs)")
    checks.positive(args.compressibility, "--compressibility", " (1/GPa)")
    checks.at_least(args.patience, "--patience", 1)
    checks.fraction(args.min_reliability, "--min-reliability", open_low=False, open_high=False)
    if args.min_atom_reliability != "auto":
        checks.fraction(args.min_atom_reliability, "--min-atom-reliability", open_low=False, open_high=False)
    checks.at_least(args.traj_interval, "--traj-interval", 1)
    checks.at_least(args.max_flagged, "--max-flagged", 0)
    checks.at_least(args.seed, "--seed", 0)
    checks.at_least(args.companion_every, "--companion-every", 1)
    checks.fraction(args.vouch, "--vouch", open_low=False, open_high=False)
    if args.companion is not None:
        checks.backbone_source(args.companion, "--companion")
    elif args.vouch is not None or args.companion_every != 1:
        raise InputError("--companion-every and --vouch need a --companion model", companion=None)
    if (args.structure is None) == (args.restart is None):
        raise InputError("give a starting STRUCTURE or --restart TRAJ (one of them)",
                                structure=args.structure, restart=args.restart)
    outputs = {"--trajectory": args.trajectory, "--log": args.log, "--flagged": args.flagged}
    for flag, path in outputs.items():
        checks.output_file(path, flag, exists_ok=args.append,
                           fix="pass --append to add to it, or choose another file")
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            checks.distinct(outputs[first], outputs[second], f"{first} and {second}")
    if args.restart is not None:
        start = checks.structures(args.restart, "--restart", index=-1)
        if not start.has("momenta"):
            raise InputError(f"--restart {args.restart}: its last frame has no momenta (velocities); start "
                                    "from it as a STRUCTURE instead (velocities drawn at --temperature)",
                                    path=args.restart)
        for flag in ("--log", "--flagged"):
            checks.distinct(args.restart, outputs[flag], f"--restart and {flag}")
        if not args.append:
            checks.distinct(args.restart, args.trajectory, "--restart and --trajectory (or pass --append)")
    else:
        start = checks.structures(args.structure, "STRUCTURE", index=-1)
        for flag, path in outputs.items():
            checks.distinct(args.structure, path, f"STRUCTURE and {flag}")
    if args.dynamics == "npt" and not start.pbc.all():
        raise InputError(f"--dynamics npt needs a periodic cell in all three directions; the start frame "
                                f"has pbc {start.pbc.tolist()}", pbc=start.pbc.tolist())
    args.start = start
    check_probe_and_backbone(args)
    if args.min_atom_reliability is not None and not args.head.meta.local:
        raise InputError(f"--min-atom-reliability needs a head with per-atom reliability; {args.probe} has "
                                "none (refit it with --atom-tolerance or --atom-quantile)", probe=args.probe)


def run(args: argparse.Namespace) -> int:
    """Run gated MD from the start frame and print the monitor's summary; returns 0."""
    import json

    from probe_ase.calculator import ProbeCalculator
    from probe_ase.md import make_dynamics, run_gated

    from probe_ase.backbones import load_backbone

    probe, backbone = load_probe_and_backbone(args)
    companion = None if args.companion is None else load_backbone(args.companion, device=args.device)
    atoms = args.start
    atoms.calc = ProbeCalculator(backbone, probe, threshold=args.min_reliability, companion=companion,
                                 companion_every=args.companion_every, vouch=args.vouch or 0.0)
    dyn = make_dynamics(atoms, args.dynamics, args.temperature, args.timestep, args.friction,
                        args.pressure, args.compressibility, args.seed, keep_momenta=args.restart is not None)
    monitor = run_gated(dyn, args.steps, trajectory=args.trajectory, interval=args.traj_interval,
                        progress=not args.quiet, action=args.action, threshold=args.min_reliability,
                        patience=args.patience, log=args.log, flagged=args.flagged, max_flagged=args.max_flagged,
                        min_atom_reliability=args.min_atom_reliability)
    atoms.calc.close()
    summary = monitor.summary()
    verdict = f"halted at step {summary['halt_step']}" if monitor.halted else f"ran {dyn.nsteps} steps"
    print(f"{verdict}; trajectory {args.trajectory}, log {args.log}")
    print(json.dumps(summary, indent=2))
    return 0
