"""Option definitions shared by several subcommands."""

from __future__ import annotations

import argparse


def add_backbone(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--backbone PATH``, ``--backbone-type`` and ``--device``."""
    from ..backbones import backbone_types, pretrained_names

    parser.add_argument("--backbone", required=required, metavar="PATH",
                        help="model file (MACE .model, SchNetPack, CHGNet) or a pretrained name: "
                             + ", ".join(pretrained_names()))
    parser.add_argument("--backbone-type", choices=backbone_types(), default="auto",
                        help="backbone adapter (default: detected from the file)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def add_batch_size(parser: argparse.ArgumentParser) -> None:
    """``--batch-size N``: structures per backbone pass."""
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="structures per backbone pass (default: 32)")


def add_reference_keys(parser: argparse.ArgumentParser) -> None:
    """``--energy-key`` and ``--forces-key``: where the reference energy (eV) and forces (eV/Å) are stored."""
    parser.add_argument("--energy-key", default="energy",
                        help="info key of the reference energy in eV (default: energy; calculator results also read)")
    parser.add_argument("--forces-key", default="forces",
                        help="arrays key of the reference forces in eV/Å (default: forces; calculator results also read)")


def load_probe_and_backbone(args: argparse.Namespace):
    """The head in ``--probe`` and a calculator for ``--backbone`` (default: the file the head was fitted with)."""
    from ..backbones import load_backbone
    from ..exceptions import InputError
    from ..probe import Probe

    probe = Probe.load(args.probe)
    backbone = args.backbone or probe.meta.backbone_path
    if backbone is None:
        raise InputError(f"{args.probe} records no backbone file; pass --backbone PATH", probe=args.probe)
    return probe, load_backbone(backbone, args.backbone_type, args.device)
