"""``probe-ase fit``: fit a PROBE head for a backbone on labelled structures."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..certify import FALLBACKS
from ..fit import CALIBRATION
from ..labels import CRITERIA
from .options import add_backbone, add_batch_size, add_reference_keys

HELP = "fit a PROBE head on labelled structures (reference energies in eV, forces in eV/Å)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase fit``'s arguments: backbone, data, criterion and tolerances, training options."""
    add_backbone(parser)
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="labelled structures: extxyz, ASE trajectory or ase.db (never used for backbone training)")
    parser.add_argument("-o", "--output", default="probe.pt", metavar="PATH", help="head file to write (default: probe.pt)")
    parser.add_argument("--criterion", default="force_rmse",
                        choices=CRITERIA,
                        help="error criterion: force_rmse / force_max in eV/Å, energy_per_atom in eV/atom, energy in eV")
    tol = parser.add_mutually_exclusive_group()
    tol.add_argument("--threshold", type=float, metavar="TAU",
                     help="absolute tolerance in the criterion's unit (eV/Å, eV/atom or eV)")
    tol.add_argument("--quantile", type=float, metavar="Q",
                     help="tolerance as this quantile (0-1) of the observed errors (default: 0.8)")
    atom = parser.add_mutually_exclusive_group()
    atom.add_argument("--atom-threshold", type=float, metavar="TAU_ATOM",
                      help="also a per-atom reliability: tolerance on each atom's force error norm, in eV/Å")
    atom.add_argument("--atom-quantile", type=float, metavar="Q",
                      help="... or the atom tolerance as this quantile (0-1) of all atoms' force errors")
    parser.add_argument("--target-risk", type=float, default=0.05,
                        help="largest fraction of accepted structures allowed to be unreliable (default: 0.05)")
    parser.add_argument("--delta", type=float, default=0.1,
                        help="p* keeps --target-risk with probability >= 1 - delta over the calibration draw "
                             "(0-1; default: 0.1)")
    parser.add_argument("--fallback", choices=FALLBACKS, default="strictest",
                        help="where --target-risk cannot be certified, which threshold certified at the larger risk "
                             "p* is: the strictest (default) or the loosest whose calibration risk is at most "
                             "--target-risk (more coverage, less margin under shift)")
    parser.add_argument("--reference-data", metavar="PATH",
                        help="the backbone's own training structures (extxyz, ASE trajectory or ase.db; no labels "
                             "needed): structures like them count as inside the novelty support")
    parser.add_argument("--support-quantile", type=float, metavar="Q",
                        help="novelty support edge: this quantile (0-1] of held-out fit structures' novelty "
                             "(default: 0.9)")
    parser.add_argument("--weight-folds", type=int, metavar="K",
                        help="fold heads whose out-of-fold logits fit the novelty weight (default: 5; 0: the "
                             "validation split, no extra heads, several times faster)")
    parser.add_argument("--layers", type=int, nargs="+", metavar="I", help="interaction layers to tap (default: all)")
    parser.add_argument("--channels", choices=("scalars", "scalars+norms"),
                        help="invariant channels of each layer to read: the scalars, or beside them the norm of each "
                             "vector channel (PaiNN, MACE; default: scalars+norms for PaiNN, scalars for the others)")
    parser.add_argument("--epochs", type=int, default=200, help="most training epochs (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--cutoff", type=float, default=None,
                        help="attention neighbourhood radius in Å (default: the backbone's own cutoff)")
    parser.add_argument("--members", type=int, default=1, metavar="K",
                        help="average K heads trained with seeds SEED..SEED+K-1 (K times the fit time and the head's "
                             "per-step time; default: 1)")
    parser.add_argument("--calibration", choices=CALIBRATION, default="split",
                        help="split: one head, calibrated and certified on a held-out 20 %% (exact guarantee); "
                             "crossfit: FOLDS heads each trained without one fold, every structure calibrates once "
                             "(85 %% of the data), the head file holds their mean (approximate guarantee; default: "
                             "split)")
    parser.add_argument("--folds", type=int, default=5, metavar="K",
                        help="fold heads of --calibration crossfit (default: 5)")
    parser.add_argument("--cache-dir", metavar="DIR", help="feature cache folder (default: ~/.cache/probe-ase)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    add_batch_size(parser)
    add_reference_keys(parser)


def run(args: argparse.Namespace) -> int:
    """Fit a head, record the backbone's absolute path (or pretrained name) in it, save it and print its summary; returns 0."""
    from ..backbones import load_backbone
    from ..fit import TrainConfig, fit_probe
    from ..head import HeadConfig
    from ..novelty import NoveltyConfig

    novelty = {k: v for k, v in (("support_quantile", args.support_quantile), ("weight_folds", args.weight_folds))
               if v is not None}
    calc = load_backbone(args.backbone, args.backbone_type, args.device)
    probe = fit_probe(
        calc, args.data, criterion=args.criterion, threshold=args.threshold, quantile=args.quantile,
        atom_threshold=args.atom_threshold, atom_quantile=args.atom_quantile, target_risk=args.target_risk,
        delta=args.delta, fallback=args.fallback, reference_data=args.reference_data, novelty=NoveltyConfig(**novelty),
        layers=args.layers, channels=args.channels, config=HeadConfig(cutoff=args.cutoff, members=args.members),
        train=TrainConfig(epochs=args.epochs, seed=args.seed, calibration=args.calibration, folds=args.folds),
        energy_key=args.energy_key,
        forces_key=args.forces_key, batch_size=args.batch_size,
        cache_dir=False if args.no_cache else args.cache_dir,
    )
    source = Path(args.backbone)  # a file: its absolute path; a pretrained name: the name
    probe.meta = dataclasses.replace(probe.meta, backbone_path=str(source.resolve()) if source.exists() else args.backbone)
    probe.save(args.output)
    m = probe.meta
    print(f"wrote {args.output}: {m.backbone} backbone ({m.channels}), criterion {m.criterion}, tau = {m.tau:.4g}, "
          f"p* = {m.p_star:.3f}, coverage {m.coverage:.1%} at target risk {m.target_risk:.1%}")
    if m.local:
        print(f"per-atom reliability: atom tolerance {m.atom_tau:.4g} eV/Å, atom p* = {m.atom_p_star:.3f} "
              f"(calibration atoms: AUROC {m.report['atoms']['auroc']:.3f})")
    print(json.dumps({k: v for k, v in m.report.items() if k != "train"}, indent=2))
    return 0
