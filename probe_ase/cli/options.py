"""Option definitions and choices shared by several subcommands.

Building the parser must stay cheap (``probe-ase --help`` answers in well under
a second): nothing here imports torch, ASE or a backbone library. The choices
below mirror constants of heavier modules; ``tests/test_cli_parser.py`` checks
that each still equals its source.
"""

from __future__ import annotations

import argparse
import sys

#: ``--backbone-type``: ``auto`` and every adapter's kind (:data:`probe_ase.taps.ADAPTERS`)
BACKBONE_TYPES = ("auto", "mace", "schnet", "painn", "chgnet", "sevenn")
#: names an adapter loads instead of a file (``Tap.pretrained`` of each adapter)
PRETRAINED = ("chgnet-0.3.0", "chgnet-0.2.0", "chgnet-r2scan",
              "7net-0", "7net-0_22may2024", "7net-l3i5", "7net-mf-0-pbe", "7net-mf-0-r2scan")
#: :data:`probe_ase.fitting.labels.CRITERIA`
CRITERIA = ("force_rmse", "force_max", "energy_per_atom", "energy")
#: :data:`probe_ase.fitting.certify.FALLBACKS`
FALLBACKS = ("strictest", "target")
#: :data:`probe_ase.fitting.train.CALIBRATION`
CALIBRATION = ("split", "crossfit")
#: invariant channel sets an adapter may offer (``Tap.channel_sets``)
CHANNELS = ("scalars", "scalars+norms")
#: :data:`probe_ase.md.Ensemble`
DYNAMICS = ("nve", "nvt", "npt")
#: :data:`probe_ase.observers.Action`
ACTIONS = ("log", "flag", "halt")


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores like the new one and warns once on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        """Warn that ``option_string`` is deprecated (one line on stderr) and store ``values`` like the new option."""
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_alias(parser, old: str, new: str, dest: str, **kwargs) -> None:
    """Add ``old`` as a hidden, deprecated spelling of the option ``new`` (same ``dest``, same type)."""
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def add_backbone(group, required: bool = True) -> None:
    """``--backbone PATH``, ``--backbone-type`` and ``--device``."""
    default = "" if required else " (default: the file the head was fitted with)"
    group.add_argument("--backbone", required=required, metavar="PATH",
                       help="model file (MACE .model, SchNetPack, CHGNet, SevenNet checkpoint) or a pretrained name: "
                            + ", ".join(PRETRAINED) + default)
    group.add_argument("--backbone-type", choices=BACKBONE_TYPES, default="auto",
                       help="backbone adapter (default: detected from the file)")
    add_device(group)


def add_companion(group) -> None:
    """``--companion PATH``: a second model (file or pretrained name)."""
    group.add_argument("--companion", metavar="PATH",
                       help="a second model for a second opinion: model file or pretrained name (e.g. 7net-l3i5), "
                            "loaded like --backbone")


def add_device(group) -> None:
    """``--device``: where the backbone and head run."""
    group.add_argument("--device", default="cpu",
                       help="torch device: cpu, cuda or cuda:N (default: cpu)")


def add_probe(group) -> None:
    """``--probe PATH``: the head file."""
    group.add_argument("--probe", required=True, metavar="PATH", help="head file written by 'probe-ase fit'")


def add_batch_size(group) -> None:
    """``--batch-size N``: structures per backbone pass."""
    group.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="structures per backbone pass, >= 1 (default: 32; memory grows with N x atoms)")


def add_reference_keys(group) -> None:
    """``--energy-key`` and ``--forces-key``: where the reference energy (eV) and forces (eV/Å) are stored."""
    group.add_argument("--energy-key", default="energy", metavar="KEY",
                       help="info key of the reference energy in eV (default: energy; calculator results also read)")
    group.add_argument("--forces-key", default="forces", metavar="KEY",
                       help="arrays key of the reference forces in eV/Å (default: forces; calculator results "
                            "also read)")


def add_quiet(parser, default=argparse.SUPPRESS) -> None:
    """``-q/--quiet``: no progress bars (on the top-level parser and on each subcommand)."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars; only results and errors")


def check_probe_and_backbone(args: argparse.Namespace) -> None:
    """Check ``--device``, read the head in ``--probe`` into ``args.head`` and check the backbone source: ``--backbone``,
    or else the file the head records."""
    from probe_ase.cli import checks
    from probe_ase.exceptions import InputError

    checks.device(args.device)
    if args.backbone:
        checks.backbone_source(args.backbone)
    args.head = checks.load_head(args.probe)
    if not args.backbone:
        recorded = args.head.meta.backbone_path
        if recorded is None:
            raise InputError(f"{args.probe} records no backbone file; pass --backbone PATH", probe=args.probe)
        checks.backbone_source(recorded, f"the backbone {args.probe} records; override it with --backbone")


def load_probe_and_backbone(args: argparse.Namespace):
    """The head (read by :func:`check_probe_and_backbone`) and a calculator for ``--backbone`` (default: the file the
    head was fitted with)."""
    from probe_ase.backbones import load_backbone

    if getattr(args, "head", None) is None:
        check_probe_and_backbone(args)
    probe = args.head
    return probe, load_backbone(args.backbone or probe.meta.backbone_path, args.backbone_type, args.device)
