"""``probe-ase fit``: fit a PROBE head for a backbone on labelled structures."""

from __future__ import annotations

import argparse
import json
import os

from probe_ase.cli import checks
from probe_ase.exceptions import InputError
from probe_ase.cli.options import (CALIBRATION, CHANNELS, CRITERIA, FALLBACKS, add_alias, add_backbone,
                                   add_batch_size, add_companion, add_reference_keys)

HELP = "fit a PROBE head on labelled structures (reference energies in eV, forces in eV/Å)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase fit``'s arguments in three groups: essential, certificate, advanced (one-to-one FitOptions)."""
    essential = parser.add_argument_group("essential")
    add_backbone(essential)
    essential.add_argument("--data", required=True, metavar="PATH",
                           help="labelled structures (energies in eV, forces in eV/Å): extxyz, ASE trajectory or "
                                "ase.db; never the backbone's training data")
    essential.add_argument("-o", "--output", default="probe.pt", metavar="PATH",
                           help="head file to write, atomically (default: probe.pt)")
    essential.add_argument("--criterion", default="force_rmse", choices=CRITERIA,
                           help="error criterion: force_rmse / force_max in eV/Å, energy_per_atom in eV/atom, "
                                "energy in eV (default: force_rmse)")
    tol = essential.add_mutually_exclusive_group()
    tol.add_argument("--tolerance", type=float, metavar="TAU",
                     help="tolerance tau on the criterion, in its unit (eV/Å, eV/atom or eV); > 0")
    tol.add_argument("--quantile", type=float, metavar="Q",
                     help="... or tau as this quantile (0-1) of the observed errors (default: 0.8)")
    add_alias(tol, "--threshold", "--tolerance", "tolerance", type=float)
    atom = essential.add_mutually_exclusive_group()
    atom.add_argument("--atom-tolerance", type=float, metavar="TAU_ATOM",
                      help="also a per-atom reliability: tolerance on each atom's force error norm, in eV/Å; > 0")
    atom.add_argument("--atom-quantile", type=float, metavar="Q",
                      help="... or the atom tolerance as this quantile (0-1) of all atoms' force errors (eV/Å)")
    add_alias(atom, "--atom-threshold", "--atom-tolerance", "atom_tolerance", type=float)

    data = parser.add_argument_group("data and cache")
    add_reference_keys(data)
    data.add_argument("--cache-dir", metavar="DIR", help="feature cache folder (default: ~/.cache/probe-ase)")
    data.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    add_companion(data)
    data.add_argument("--companion-labels", choices=("missing", "all"), default="missing",
                      help="with --companion: label the structures without a reference energy by the companion "
                           "(missing: a blend where some have one) or every structure (all). The head then "
                           "predicts agreement with the companion, not accuracy against reference data "
                           "(default: missing)")

    cert = parser.add_argument_group("certificate", "what the certified threshold p* promises")
    cert.add_argument("--target-risk", type=float, default=0.05, metavar="R",
                      help="largest fraction (0-1) of accepted structures allowed to be beyond tau (default: 0.05)")
    cert.add_argument("--delta", type=float, default=0.1,
                      help="p* keeps --target-risk with probability >= 1 - delta over the calibration draw "
                           "(0-1; default: 0.1)")
    cert.add_argument("--reference-data", metavar="PATH",
                      help="the backbone's own training structures (extxyz, ASE trajectory or ase.db; no labels "
                           "needed): structures like them count as inside the novelty support")

    add_advanced(parser)


def add_advanced(parser: argparse.ArgumentParser) -> None:
    """The advanced group: one option per :class:`~probe_ase.fitting.spec.FitOptions` field, with its default."""
    adv = parser.add_argument_group("advanced", "training and head settings (probe_ase.FitOptions); the "
                                                "defaults are what the published numbers were measured with")
    adv.add_argument("--layers", type=int, nargs="+", metavar="I", help="interaction layers to tap (default: all)")
    adv.add_argument("--channels", choices=CHANNELS,
                     help="invariant channels of each layer: the scalars, or beside them the norm of each vector "
                          "channel (default: the adapter's: scalars+norms for PaiNN, scalars for the others)")
    adv.add_argument("--cutoff", type=float, metavar="Å",
                     help="attention neighbourhood radius in Å (default: the backbone's own cutoff)")
    adv.add_argument("--hidden", type=int, default=64, metavar="N", help="width of the head's per-atom encoding "
                                                                         "(default: 64)")
    adv.add_argument("--members", type=int, default=1, metavar="K",
                     help="average K heads trained with seeds SEED..SEED+K-1 (K times the fit time and the head's "
                          "per-step time; default: 1)")
    adv.add_argument("--calibration", choices=CALIBRATION, default="split",
                     help="split: one head, calibrated and certified on a held-out 20 %% (exact guarantee); "
                          "crossfit: FOLDS heads each trained without one fold, every structure calibrates once "
                          "(approximate guarantee; default: split)")
    adv.add_argument("--folds", type=int, default=5, metavar="K", help="fold heads of --calibration crossfit "
                                                                       "(>= 2; default: 5)")
    adv.add_argument("--fallback", choices=FALLBACKS, default="strictest",
                     help="where --target-risk cannot be certified: the strictest threshold certified at a larger "
                          "risk (default), or the loosest whose calibration risk is at most --target-risk")
    adv.add_argument("--support-quantile", type=float, default=0.9, metavar="Q",
                     help="novelty support edge: this quantile (0-1] of held-out fit structures' novelty "
                          "(default: 0.9)")
    adv.add_argument("--weight-folds", type=int, default=5, metavar="K",
                     help="fold heads whose out-of-fold logits fit the novelty weight (0 or >= 2; default: 5; "
                          "3: about half their time, as good on the benchmarks' MACE rows; 2 and 0, the "
                          "validation split with no extra heads, ranked worse)")
    adv.add_argument("--epochs", type=int, default=150, metavar="N", help="most training epochs (default: 150)")
    adv.add_argument("--patience", type=int, default=20, metavar="N",
                     help="epochs without validation improvement before stopping (default: 20)")
    adv.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_batch_size(adv)
    adv.add_argument("--workers", type=int, default=1, metavar="N",
                     help="processes that train the heads (fold heads, the deployed head) and fit the novelty mixtures side "
                          "by side, one thread each: up to N times faster on idle cores, the same head (>= 1; default: 1)")


def check(args: argparse.Namespace) -> None:
    """Every value, the data and reference files, the backbone file and the output path, before the backbone runs."""
    checks.positive(args.tolerance, "--tolerance", " (in the criterion's unit: eV/Å, eV/atom or eV)")
    checks.fraction(args.quantile, "--quantile")
    checks.positive(args.atom_tolerance, "--atom-tolerance", " (eV/Å)")
    checks.fraction(args.atom_quantile, "--atom-quantile")
    checks.fraction(args.target_risk, "--target-risk")
    checks.fraction(args.delta, "--delta")
    checks.fraction(args.support_quantile, "--support-quantile", open_high=False)
    for value, flag in ((args.hidden, "--hidden"), (args.members, "--members"), (args.epochs, "--epochs"),
                        (args.patience, "--patience"), (args.batch_size, "--batch-size"), (args.workers, "--workers")):
        checks.at_least(value, flag, 1)
    checks.at_least(args.folds, "--folds", 2)
    checks.at_least(args.seed, "--seed", 0)
    checks.positive(args.cutoff, "--cutoff", " (Å)")
    for layer in args.layers or ():
        checks.at_least(layer, "--layers", 0)
    if args.weight_folds < 0 or args.weight_folds == 1:
        raise InputError(f"--weight-folds must be 0 (the validation split) or >= 2, got {args.weight_folds}",
                                flag="--weight-folds", value=args.weight_folds)
    if args.calibration == "crossfit" and args.members not in (1, args.folds):
        raise InputError(f"--calibration crossfit deploys the mean of its {args.folds} fold heads: --members "
                                f"must be 1 or {args.folds}, got {args.members}", members=args.members,
                                folds=args.folds)
    checks.device(args.device)
    checks.backbone_source(args.backbone)
    if args.companion is not None:
        checks.backbone_source(args.companion, "--companion")
    checks.structures(args.data, "--data")
    if args.reference_data is not None:
        checks.structures(args.reference_data, "--reference-data")
    checks.output_file(args.output, "-o/--output")
    for path, flag in ((args.data, "--data"), (args.reference_data, "--reference-data")):
        if path is not None:
            checks.distinct(path, args.output, f"{flag} and -o/--output")
    if args.cache_dir is not None and not args.no_cache:
        checks.output_folder(args.cache_dir, "--cache-dir")


def options(args: argparse.Namespace):
    """The advanced group as :class:`~probe_ase.fitting.spec.FitOptions` (one field per option)."""
    from probe_ase.fitting.spec import FitOptions

    return FitOptions(layers=args.layers, channels=args.channels, cutoff=args.cutoff, hidden=args.hidden,
                      members=args.members, calibration=args.calibration, folds=args.folds, fallback=args.fallback,
                      support_quantile=args.support_quantile, weight_folds=args.weight_folds, epochs=args.epochs,
                      patience=args.patience, seed=args.seed, batch_size=args.batch_size, workers=args.workers)


def run(args: argparse.Namespace) -> int:
    """Fit a head, record the backbone's absolute path (or pretrained name) in it, save it and print its summary; returns 0."""
    import dataclasses

    from probe_ase.backbones import load_backbone
    from probe_ase.fitting.pipeline import fit_probe

    advanced = options(args)
    calc = load_backbone(args.backbone, args.backbone_type, args.device)
    data = args.data
    if args.companion is not None:
        from probe_ase.companion import companion_labels

        data = companion_labels(args.data, load_backbone(args.companion, device=args.device), name=args.companion,
                                replace=args.companion_labels == "all", keys=(args.energy_key, args.forces_key),
                                progress=not args.quiet)
    probe = fit_probe(calc, data, criterion=args.criterion, tolerance=args.tolerance, quantile=args.quantile,
                      atom_tolerance=args.atom_tolerance, atom_quantile=args.atom_quantile,
                      target_risk=args.target_risk, delta=args.delta, reference_data=args.reference_data,
                      label_keys=(args.energy_key, args.forces_key), cache_dir=False if args.no_cache else args.cache_dir,
                      progress=not args.quiet, options=advanced)
    source = args.backbone  # a file: its absolute path; a pretrained name: the name
    probe.meta = dataclasses.replace(probe.meta, backbone_path=os.path.realpath(source) if os.path.exists(source)
                                     else source)
    probe.save(args.output)
    m = probe.meta
    print(f"wrote {args.output}: {m.backbone} backbone ({m.channels}), criterion {m.criterion}, tau = {m.tau:.4g}, "
          f"p* = {m.p_star:.3f}, coverage {m.coverage:.1%} at target risk {m.target_risk:.1%}")
    if m.label_source != "reference":
        print(f"labels: {', '.join(f'{n} from {source}' for source, n in m.labels.items())}: the head predicts "
              "agreement with the companion where its labels came from it, not accuracy against reference data")
    if m.local:
        print(f"per-atom reliability: atom tolerance {m.atom_tau:.4g} eV/Å, atom p* = {m.atom_p_star:.3f} "
              f"(calibration atoms: AUROC {m.report['atoms']['auroc']:.3f})")
    print(json.dumps(m.report, indent=2))
    return 0
