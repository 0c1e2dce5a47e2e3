"""``probe-ase evaluate``: metrics, plots and a report of a head on labelled data."""

from __future__ import annotations

import argparse

from .options import add_backbone, add_batch_size, load_probe_and_backbone

HELP = "evaluate a head (and optionally a MACE ensemble) on labelled structures; writes a report folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase evaluate``'s arguments: frames, head, report folder, ensemble, importance, backbone."""
    parser.add_argument("frames", help="labelled structures (reference energy in eV, forces in eV/Å)")
    parser.add_argument("--probe", required=True, metavar="PATH", help="head file written by 'probe-ase fit'")
    parser.add_argument("--report", required=True, metavar="DIR",
                        help="folder for report.md, metrics.json and the PNG figures")
    parser.add_argument("--ensemble", nargs="+", metavar="PATH",
                        help="MACE model files of an ensemble to compare against (force std in eV/Å, "
                             "energy std in eV/atom)")
    parser.add_argument("--importance", type=int, default=3, metavar="N",
                        help="render atom importances of the N least reliable structures (default: 3)")
    add_backbone(parser, required=False)
    add_batch_size(parser)


def run(args: argparse.Namespace) -> int:
    """Evaluate the head (and the ensemble, if given), write the report folder, print the metrics; returns 0."""
    import json

    from ..backbones import load_backbone
    from ..evaluate import evaluate

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
