"""``probe-ase evaluate``: metrics, plots and a report of a head on labelled data."""

from __future__ import annotations

import argparse

from probe_ase.cli import checks
from probe_ase.cli.options import add_backbone, add_batch_size, add_probe, check_probe_and_backbone, load_probe_and_backbone

HELP = "evaluate a head (and optionally a MACE ensemble) on labelled structures; writes a report folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase evaluate``'s arguments: frames, head, report folder, ensemble, importance, backbone."""
    essential = parser.add_argument_group("essential")
    essential.add_argument("frames", help="labelled structures (reference energy in eV, forces in eV/Å)")
    add_probe(essential)
    essential.add_argument("--report", required=True, metavar="DIR",
                           help="folder for report.md, metrics.json and the PNG figures (created; files in it "
                                "replaced atomically)")
    essential.add_argument("--ensemble", nargs="+", metavar="PATH",
                           help="MACE model files of an ensemble to compare against (force std in eV/Å, "
                                "energy std in eV/atom)")
    adv = parser.add_argument_group("advanced")
    adv.add_argument("--importance", type=int, default=3, metavar="N",
                     help="render atom importances of the N least reliable structures, >= 0 (default: 3)")
    add_backbone(adv, required=False)
    add_batch_size(adv)


def check(args: argparse.Namespace) -> None:
    """The numbers, the frames (their first one read), the report folder, the ensemble files, head and backbone."""
    checks.at_least(args.importance, "--importance", 0)
    checks.at_least(args.batch_size, "--batch-size", 1)
    checks.structures(args.frames, "FRAMES")
    checks.output_folder(args.report, "--report")
    for path in args.ensemble or ():
        checks.input_file(path, "--ensemble", "model file")
    check_probe_and_backbone(args)


def run(args: argparse.Namespace) -> int:
    """Evaluate the head (and the ensemble, if given), write the report folder, print the metrics; returns 0."""
    import json

    from probe_ase.backbones import load_backbone
    from probe_ase.evaluation.evaluate import evaluate

    probe, calc = load_probe_and_backbone(args)
    committee = None
    if args.ensemble:
        from mace.calculators import MACECalculator

        members = [load_backbone(path, "mace", args.device).models[0] for path in args.ensemble]
        committee = MACECalculator(models=members, device=args.device)
    results = evaluate(probe, calc, args.frames, args.report, committee, args.importance, args.batch_size)
    print(json.dumps({k: v for k, v in results.items() if isinstance(v, dict)}, indent=2))
    print(f"report: {args.report}/report.md")
    return 0
