"""Fit a PROBE head: labelled frames run through the stages of :mod:`probe_ase.fitting`.

1. Features (:mod:`~probe_ase.fitting.data`): the backbone's per-atom features of every frame (cached).
2. Labels (:mod:`~probe_ase.fitting.labels`): each structure reliable iff its error is at most ``tau``
   (and, with an atom tolerance, each atom iff its force-error norm is at most the atom tolerance).
3. Held-out scores (:mod:`~probe_ase.fitting.heldout`): a split (train / validation / calibration,
   :mod:`~probe_ase.fitting.split`) or cross-fitted fold heads; the head is trained
   (:mod:`~probe_ase.fitting.train`) and the novelty model fitted (:mod:`~probe_ase.fitting.novelty`)
   on structures the calibration never sees.
4. Calibration (:mod:`~probe_ase.fitting.calibrate`): the novelty weight and the temperature of the
   score formula (:class:`~probe_ase.model.calibration.Calibration`), fitted on held-out scores.
5. Certificate (:mod:`~probe_ase.fitting.certify`): ``p*``, the loosest threshold whose verdict has risk
   <= ``target_risk`` with probability >= 1 - ``delta`` (Learn-then-Test), or a fallback where the data
   cannot certify it.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from probe_ase.companion import LABEL_SOURCE
from probe_ase.evaluation import metrics
from probe_ase.exceptions import InputError
from probe_ase.fitting.calibrate import FLAT_SPREAD, calibrate, calibrate_atoms
from probe_ase.fitting.certify import Certificate, certify_threshold
from probe_ase.fitting.data import (FeatureSet, FrameFile, Frames, featurize, features_only, frame_source,
                                    read_frames)
from probe_ase.fitting.heldout import HeldOut, held_out_crossfit, held_out_split
from probe_ase.fitting.labels import Criterion, make_structure_labels, needs_forces
from probe_ase.fitting.spec import FitOptions, FitSpec
from probe_ase.fitting.store import Graphs
from probe_ase.fitting.timing import timed
from probe_ase.fitting.train import TrainConfig
from probe_ase.model.calibration import Calibration
from probe_ase.model.head import HeadConfig, structure_ptr, structure_rows
from probe_ase.model.headfile import HeadMeta
from probe_ase.model.novelty import NoveltyConfig
from probe_ase.model.probe import Probe
from probe_ase.taps import Tap, find_tap


def fit_probe(
    calc: Calculator | Tap,
    data: Frames,
    *,
    criterion: Criterion = "force_rmse",
    tolerance: float | None = None,
    quantile: float | None = None,
    atom_tolerance: float | None = None,
    atom_quantile: float | None = None,
    target_risk: float = 0.05,
    delta: float = 0.1,
    reference_data: Frames | None = None,
    label_keys: tuple[str, str] = ("energy", "forces"),
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
    options: FitOptions | None = None,
) -> Probe:
    """Fit a PROBE head for the backbone in ``calc`` on labelled ``data``.

    Args:
        calc: a backbone calculator an adapter knows (MACE, SchNet, PaiNN,
            CHGNet; possibly inside a SumCalculator), or a
            :class:`~probe_ase.taps.Tap` you built on one (it stays open).
        data: extxyz / ase.db path (read again on each pass, never held
            whole) or list of Atoms with reference energy (eV) and, for force
            criteria, forces (eV/Å). Never the backbone's training frames:
            their errors are not honest.
        criterion: ``force_rmse`` or ``force_max`` (eV/Å), ``energy_per_atom``
            (eV/atom) or ``energy`` (eV).
        tolerance: tau, the largest error (criterion's unit) still reliable ...
        quantile: ... or tau as this quantile (0-1) of the observed errors
            (default when neither is given: 0.8).
        atom_tolerance: per-atom tolerance on each atom's force-error norm
            ``|ΔF_i|`` (eV/Å) ... (needs reference forces)
        atom_quantile: ... or as this quantile (0-1) of all atoms' errors.
            Either adds ``results["atom_reliability"]``, P(|ΔF_i| <= atom tolerance).
        target_risk: largest fraction (0-1) of the structures the verdict
            accepts that may be unreliable.
        delta: the certificate holds with probability >= 1 - delta (0-1) over
            the calibration draw, for structures like the calibration ones.
        reference_data: the backbone's own training frames (no labels needed):
            structures like them count as inside the novelty support.
        label_keys: ``info`` key of the reference energy (eV) and ``arrays``
            key of the reference forces (eV/Å).
        cache_dir: feature cache folder (None: the default, False: off).
        progress: show progress bars.
        options: advanced settings (:class:`FitOptions`).

    Returns:
        a :class:`~probe_ase.model.probe.Probe`; ``.save(path)`` writes the
        head file, ``.spec`` holds these settings. Warns when ``target_risk``
        cannot be certified (``meta.certified_risk`` says at which risk p* is)
        and when the calibrated probability carries no information.
    """
    spec = FitSpec(criterion=criterion, tolerance=tolerance, quantile=quantile, atom_tolerance=atom_tolerance,
                   atom_quantile=atom_quantile, target_risk=target_risk, delta=delta, label_keys=label_keys,
                   options=FitOptions() if options is None else options)
    return fit_spec(calc, data, spec, reference_data=reference_data, cache_dir=cache_dir, progress=progress)


def fit_spec(
    calc: Calculator | Tap, data: Frames, spec: FitSpec, *, reference_data: Frames | None = None,
    cache_dir: str | os.PathLike | None | bool = None, progress: bool = True, configs: Configs | None = None,
    features: FeatureSet | None = None,
) -> Probe:
    """The stages of :func:`fit_probe` for a validated ``spec`` (module docstring).

    ``configs`` replaces the head, training and novelty configurations the
    spec's options give (the studies in ``benchmarks/`` vary them).
    ``features``: what :func:`~probe_ase.fitting.data.featurize` gave for
    ``data`` with this backbone (e.g. :meth:`FeatureSet.subset` of a larger
    pass), so the backbone does not run again.
    """
    frames, seconds = frame_source(data), {}  # a file is read again on each pass, never held whole
    configs = internal_configs(spec) if configs is None else configs
    with timed(seconds, "featurise"):
        features, reference, backbone = tap_features(calc, frames, spec, reference_data, cache_dir, progress,
                                                     features)
    labels = make_structure_labels(features, spec)
    config = complete_config(configs.head, backbone, features, spec)
    edges = Graphs.build(frames, config.cutoff, Graphs.cache_beside(features, config.cutoff))
    held_out = held_out_crossfit if configs.train.calibration == "crossfit" else held_out_split
    head, epochs, density, held = held_out(features, edges, labels.y, labels.errors, labels.atom_y, backbone.elements,
                                           config, configs.train, configs.novelty, reference, progress)
    with timed(seconds, "calibrate"):
        calibration, z_grid, z_cal = calibrate(held, labels, head.config, configs.novelty, features.ptr)
    y_cal = labels.y[held.cal]
    with timed(seconds, "certify"):
        cert, p_star = certify_threshold(z_cal, z_grid, y_cal, held, calibration, spec)
    p = calibration.probability(z_cal)
    accepted = (z_cal >= cert.threshold) & (held.novelty_cal <= 1)
    report = fit_report(p, y_cal, labels.errors[held.cal], accepted, held, calibration, cert, spec)
    report |= {"calibration": configs.train.calibration, "fraction_reliable": float(labels.y.mean()),
               "epochs": epochs, "n_reference": 0 if reference is None else int(reference[0].shape[0]),
               "seconds": seconds | held.seconds}
    atom_p_star = None
    if spec.local:
        cal_rows = structure_rows(features.ptr, held.cal)
        atom_p_star, report["atoms"] = calibrate_atoms(
            held.z_atom_cal / calibration.atom_temperature, labels.atom_y[cal_rows] == 1,
            features.atom_errors[cal_rows], held.atom_novelty_cal, held.importance_cal,
            structure_ptr(features.ptr, held.cal), spec.target_risk)
        report["atoms"]["temperature"] = calibration.atom_temperature
    meta = HeadMeta(
        backbone=backbone.kind, fingerprint=backbone.fingerprint, layers=backbone.layers, channels=backbone.channels,
        feature_dim=features.features.shape[1], elements=backbone.elements, tau=labels.tau, p_star=p_star,
        coverage=float(accepted.mean()), spec=spec, config=head.config, report=report, certified_risk=cert.risk,
        novelty=configs.novelty, atom_tau=labels.atom_tau, atom_p_star=atom_p_star, calibration=calibration,
        labels=label_sources(frames))
    return Probe(head, meta, density)


def label_sources(frames: Iterable[Atoms]) -> dict[str, int]:
    """How many ``frames`` took their labels from each source (``info["label_source"]``, else ``"reference"``)."""
    counts = Counter(str(atoms.info.get(LABEL_SOURCE, "reference")) for atoms in frames)
    return {source: counts[source] for source in sorted(counts)}


@dataclass(frozen=True)
class Configs:
    """The head, training and novelty configurations one fit runs with."""

    head: HeadConfig
    train: TrainConfig
    novelty: NoveltyConfig


def internal_configs(spec: FitSpec) -> Configs:
    """The configurations ``spec``'s options give; everything else at the head's, training's and novelty's defaults."""
    o = spec.options
    return Configs(HeadConfig(hidden=o.hidden, cutoff=o.cutoff, members=o.members),
                   TrainConfig(epochs=o.epochs, patience=o.patience, seed=o.seed, calibration=o.calibration,
                               folds=o.folds, workers=o.workers),
                   NoveltyConfig(support_quantile=o.support_quantile, weight_folds=o.weight_folds))


def complete_config(config: HeadConfig, backbone: Backbone, features: FeatureSet, spec: FitSpec) -> HeadConfig:
    """``config`` with what the data decide: the backbone's cutoff, the per-atom logit, the atom-error regression."""
    if config.atom_logit and not spec.local:
        raise InputError("HeadConfig(atom_logit=True) needs per-atom labels: give atom_tolerance (eV/Å) or "
                         "atom_quantile", atom_logit=True)
    atom_error = config.atom_error
    if atom_error is None:  # per-atom force-error regression wherever the labels are force errors
        atom_error = needs_forces(spec.criterion) and not np.isnan(features.atom_errors).any()
    return replace(config, cutoff=backbone.cutoff if config.cutoff is None else config.cutoff,
                   atom_logit=spec.local, atom_error=atom_error)


def tap_features(
    calc: Calculator | Tap, frames: list[Atoms] | FrameFile, spec: FitSpec, reference_data: Frames | None,
    cache_dir: str | os.PathLike | None | bool, progress: bool, features: FeatureSet | None = None,
) -> tuple[FeatureSet, tuple[torch.Tensor, torch.Tensor] | None, Backbone]:
    """Features and errors of ``frames`` (``features`` when given), features of the reference frames, and what the
    head records of the backbone; a tap passed as ``calc`` stays open (it is yours)."""
    o = spec.options
    if isinstance(calc, Tap):
        for name, asked, tapped in (("layers", o.layers, calc.layers), ("channels", o.channels, calc.channels)):
            if asked is not None and asked != tapped:
                raise InputError(f"options.{name}={asked!r} differ from the tap's {tapped!r}: choose them on the tap",
                                 **{name: asked, f"tap_{name}": tapped})
    with nullcontext(calc) if isinstance(calc, Tap) else find_tap(calc, o.layers, o.channels) as tap:
        energy_key, forces_key = spec.label_keys
        if features is None:
            features = featurize(tap, frames, energy_key, forces_key, o.batch_size, cache_dir, progress)
        elif len(features) != len(frames) or features.features.shape[1] != tap.feature_dim or not np.array_equal(
                features.numbers.numpy(), np.concatenate([a.numbers for a in frames])):
            raise InputError(f"the features given are not those of these {len(frames)} frames with this tap "
                             f"({len(features)} structures of width {features.features.shape[1]})",
                             n_frames=len(frames), n_features=len(features))
        reference = None if reference_data is None else features_only(tap, read_frames(reference_data), o.batch_size)
        # the head knows only elements it saw: others would get an untrained embedding
        backbone = Backbone(tap.kind, tap.fingerprint(), tuple(tap.layers), tap.channels, tap.cutoff,
                            tuple(torch.unique(features.numbers).tolist()))
    return features, reference, backbone


@dataclass(frozen=True)
class Backbone:
    """What a head records of the backbone it was fitted on, and the elements of its fit data."""

    kind: str
    fingerprint: str
    layers: tuple[int, ...]
    channels: str
    cutoff: float | None
    elements: tuple[int, ...]


def fit_report(p: np.ndarray, y: np.ndarray, errors: np.ndarray, accepted: np.ndarray, held: HeldOut,
               calibration: Calibration, cert: Certificate, spec: FitSpec) -> dict:
    """The fit's summary over the calibration structures (metrics, the certificate); warns when ``p`` is flat."""
    auroc = metrics.auroc(y == 0, 1 - p)
    informative = bool(np.ptp(p) >= FLAT_SPREAD)
    if not informative:
        warnings.warn(f"the calibrated probability carries no information: over the {len(p)} calibration structures "
                      f"it spans only {p.min():.4f}-{p.max():.4f} (temperature {calibration.temperature:.3g}, AUROC "
                      f"{auroc:.2f}); use the verdict (it is certified on the ranking), not the probability's value, "
                      "or refit with more data, another criterion or tolerance", stacklevel=3)
    return {
        **held.sizes, "auroc": auroc, "spearman": metrics.spearman(1 - p, errors),
        "ece": metrics.expected_calibration_error(p, y), "informative": informative,
        "probability_range": [float(p.min()), float(p.max())],
        "risk_at_p_star": float(np.mean(y[accepted] == 0)) if accepted.any() else float("nan"),
        "cal_out_of_support": float(np.mean(held.novelty_cal > 1)), "novelty_weight": calibration.novelty_weight,
        "certificate": {"certified": cert.certified, "risk": cert.risk, "delta": spec.delta,
                        "fallback": spec.options.fallback, "n_accepted": cert.n_accepted, "n_errors": cert.n_errors,
                        "frames_needed": cert.frames_needed},
    }
