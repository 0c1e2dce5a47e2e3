"""``probe-ase demo``: the whole pipeline on generated data, no files or network needed."""

from __future__ import annotations

import argparse

from probe_ase.cli import checks

HELP = "run the embedded demo: EMT copper data, tiny MACE, PROBE head, table and plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase demo``'s arguments: ``--out`` and ``--seed``."""
    essential = parser.add_argument_group("essential")
    essential.add_argument("--out", default="probe-ase-demo", metavar="DIR",
                           help="folder for the model, head, scored frames, table and plot (default: probe-ase-demo)")
    essential.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default: 0)")


def check(args: argparse.Namespace) -> None:
    """``--seed`` and the ``--out`` folder (writable, or creatable in a writable folder)."""
    checks.at_least(args.seed, "--seed", 0)
    checks.output_folder(args.out, "--out")


def run(args: argparse.Namespace) -> int:
    """Run the embedded demo into ``args.out`` with library notices silenced for its duration; returns 0."""
    import logging
    import warnings

    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        for category in (UserWarning, FutureWarning):  # library notices that would bury the table
            warnings.filterwarnings("ignore", category=category)
        root.setLevel(logging.ERROR)  # mace-torch logs dtype notices at WARNING
        try:
            from probe_ase.demo import run_demo

            run_demo(args.out, seed=args.seed)
        finally:
            root.setLevel(level)
    return 0
