"""The ``probe-ase`` command: one small module per subcommand.

Each subcommand module defines ``HELP``, ``add_arguments(parser)``,
``check(args)`` and ``run(args)``. ``add_arguments`` imports nothing heavy
(``probe-ase --help`` never loads torch); ``check`` validates every value,
input file and output path before ``run`` does any expensive work. A bad value
is one line on stderr and exit status 2 (argparse's errors too); a deprecated
option spelling is one warning line and still works.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from probe_ase.cli import al, demo, evaluate, fit, md, score
from probe_ase.cli.options import add_quiet

COMMANDS = {"al": al, "demo": demo, "evaluate": evaluate, "fit": fit, "md": md, "score": score}


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``PROG: error: ...``) and exit status 2."""

    def error(self, message: str):
        """Print ``message`` as one line with a pointer to ``--help`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def _version() -> str:
    from probe_ase import __version__

    return f"probe-ase {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The ``probe-ase`` argument parser, with one subparser per module in ``COMMANDS``."""
    parser = Parser(
        prog="probe-ase",
        description="Per-step reliability of machine-learned interatomic potentials (PROBE) for ASE. "
                    "Units: Å, eV, eV/Å, K, fs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    add_quiet(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        add_quiet(command)  # after the command too; SUPPRESS keeps a global --quiet
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, 130 when interrupted)."""
    from probe_ase.exceptions import ProbeError

    args = build_parser().parse_args(argv)
    module = COMMANDS[args.command]
    prefix = f"probe-ase {args.command}"
    try:
        module.check(args)
        return module.run(args) or 0
    except ProbeError as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"{prefix}: error: {lines[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
