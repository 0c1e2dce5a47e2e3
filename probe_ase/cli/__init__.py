"""The ``probe-ase`` command: one small module per subcommand.

Each subcommand module defines ``HELP``, ``add_arguments(parser)`` and
``run(args)``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import al, demo, evaluate, fit, md, score

COMMANDS = {"al": al, "demo": demo, "evaluate": evaluate, "fit": fit, "md": md, "score": score}


def build_parser() -> argparse.ArgumentParser:
    """The ``probe-ase`` argument parser, with one subparser per module in ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="probe-ase",
        description="Per-step reliability of machine-learned interatomic potentials (PROBE) for ASE.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a probe-ase error)."""
    from ..exceptions import ProbeError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except ProbeError as err:
        print(f"probe-ase {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
