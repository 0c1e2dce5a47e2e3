"""``probe-ase demo``: the whole pipeline on generated data, no files or network needed."""

from __future__ import annotations

import argparse

HELP = "run the embedded demo: EMT copper data, tiny MACE, PROBE head, table and plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase demo``'s arguments: ``--out`` and ``--seed``."""
    parser.add_argument("--out", default="probe-ase-demo", metavar="DIR",
                        help="folder for the model, head, scored frames, table and plot (default: probe-ase-demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Run the embedded demo into ``args.out`` with library warnings silenced; returns 0."""
    import logging
    import warnings

    logging.getLogger().setLevel(logging.ERROR)  # mace-torch logs dtype notices at WARNING
    for category in (UserWarning, FutureWarning):  # library notices that would bury the table
        warnings.filterwarnings("ignore", category=category)
    from ..demo import run_demo

    run_demo(args.out, seed=args.seed)
    return 0
