"""``probe-ase score``: write per-frame reliability and per-atom importance into extxyz."""

from __future__ import annotations

import argparse

from probe_ase.cli import checks
from probe_ase.cli.options import add_backbone, add_batch_size, add_probe, check_probe_and_backbone, load_probe_and_backbone

HELP = "score structures with a fitted head; writes extxyz with reliability and atom_importance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase score``'s arguments: frames, head, output file, backbone, batch size."""
    essential = parser.add_argument_group("essential")
    essential.add_argument("frames", help="structures to score (any file ASE reads; streamed)")
    add_probe(essential)
    essential.add_argument("-o", "--output", required=True, metavar="PATH",
                           help="extxyz file to write, atomically (positions in Å; reliability 0-1 per frame, "
                                "atom_importance per atom)")
    adv = parser.add_argument_group("advanced")
    add_backbone(adv, required=False)
    add_batch_size(adv)


def check(args: argparse.Namespace) -> None:
    """The batch size, the frames (their first one read), the output path, the head and the backbone source."""
    checks.at_least(args.batch_size, "--batch-size", 1)
    checks.structures(args.frames, "FRAMES")
    checks.output_file(args.output, "-o/--output")
    checks.distinct(args.frames, args.output, "FRAMES and -o/--output")
    check_probe_and_backbone(args)


def run(args: argparse.Namespace) -> int:
    """Score the frames into an extxyz written atomically and print a summary; returns 0."""
    import numpy as np
    from ase.io import write
    from tqdm.auto import tqdm

    from probe_ase.exceptions import InputError
    from probe_ase.fileio import atomic_path
    from probe_ase.fitting.data import iter_frames
    from probe_ase.scoring import score_frames

    probe, calc = load_probe_and_backbone(args)
    reliabilities, verdicts = [], []
    with probe.tap_for(calc) as tap, atomic_path(args.output) as tmp:
        probe.check_backbone(tap)
        probe.to(args.device)
        with open(tmp, "w") as handle:
            frames = tqdm(iter_frames(args.frames), desc="score", unit="frame", disable=args.quiet)
            for scored in score_frames(probe, tap, frames, batch_size=args.batch_size):
                write(handle, scored, format="extxyz")
                reliabilities.append(scored.info["reliability"])
                verdicts.append(scored.info["reason"])
            if not reliabilities:
                raise InputError(f"no structures in {args.frames}", path=args.frames)
    p = np.asarray(reliabilities)
    print(f"wrote {args.output}: {len(p)} frames, {verdicts.count('ok')} reliable at p* = {probe.p_star:.3f} "
          f"(certified risk {probe.meta.certified_risk:.1%}), {verdicts.count('out_of_support')} out of support, "
          f"{verdicts.count('low_probability')} below p*; reliability min {p.min():.3f}, median {np.median(p):.3f}")
    return 0
