"""``probe-ase score``: write per-frame reliability and per-atom importance into extxyz."""

from __future__ import annotations

import argparse

from .options import add_backbone, add_batch_size, load_probe_and_backbone

HELP = "score structures with a fitted head; writes extxyz with reliability and atom_importance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase score``'s arguments: frames, head, output file, backbone, batch size."""
    parser.add_argument("frames", help="structures to score (any file ASE reads; streamed)")
    parser.add_argument("--probe", required=True, metavar="PATH", help="head file written by 'probe-ase fit'")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="extxyz file to write (atomically)")
    add_backbone(parser, required=False)
    add_batch_size(parser)


def run(args: argparse.Namespace) -> int:
    """Score the frames into an extxyz written atomically and print a summary; returns 0."""
    import os

    import numpy as np
    from ase.io import write
    from tqdm.auto import tqdm

    from ..dataset import iter_frames
    from ..exceptions import InputError
    from ..fileio import atomic_path
    from ..scoring import score_frames

    if not os.path.exists(args.frames):
        raise InputError(f"no such file: {args.frames}", path=args.frames)
    if os.path.abspath(args.frames) == os.path.abspath(args.output):
        raise InputError("--output must differ from the input file", path=args.frames, output=args.output)
    probe, calc = load_probe_and_backbone(args)
    reliabilities, verdicts = [], []
    with probe.tap_for(calc) as tap, atomic_path(args.output) as tmp:
        probe.check_backbone(tap)
        probe.to(args.device)
        with open(tmp, "w") as handle:
            frames = tqdm(iter_frames(args.frames), desc="score", unit="frame")
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
