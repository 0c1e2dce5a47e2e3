"""Fit a PROBE head: split, train, calibrate, pick the operating threshold.

1. Run the backbone over labelled data (:func:`~probe_ase.dataset.featurize`).
2. Label each structure reliable iff its error is at most ``tau``.
3. Split train / validation / calibration (stratified, seeded).
4. Train with class-weighted binary cross-entropy and early stopping on the
   validation loss.
5. Temperature-scale the logit on the calibration split.
6. Choose ``p*``, the lowest probability threshold whose accepted calibration
   structures have at most ``target_risk`` unreliable ones (maximum coverage).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from ase.calculators.calculator import Calculator
from scipy.optimize import minimize_scalar
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from . import metrics
from .dataset import FeatureSet, Frames, featurize, read_frames
from .exceptions import InputError, LabelError
from .graph import radius_graph
from .head import HeadConfig, ProbeHead, batch_inputs
from .headfile import HeadMeta, Probe
from .labels import Criterion, check_criterion, make_labels, resolve_tolerance
from .taps import find_tap


@dataclass(frozen=True)
class TrainConfig:
    """Training options.

    Attributes:
        epochs: most passes over the training split.
        patience: epochs without validation improvement before stopping.
        batch_size: structures per optimiser step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        val_fraction: share of structures for early stopping.
        cal_fraction: share of structures for calibration and p*.
        seed: seeds the split, initialisation and shuffling.
    """

    epochs: int = 200
    patience: int = 25
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    cal_fraction: float = 0.2
    seed: int = 0


def split_indices(labels: np.ndarray, train: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / validation / calibration indices."""
    idx = np.arange(len(labels))
    n_minor = int(min(labels.sum(), len(labels) - labels.sum()))
    if n_minor < 6:
        raise LabelError(f"only {n_minor} structures in the minority class; at least 6 are needed to train and calibrate")
    rest, cal = train_test_split(idx, test_size=train.cal_fraction, stratify=labels, random_state=train.seed)
    val_share = train.val_fraction / (1 - train.cal_fraction)
    tr, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=train.seed)
    return np.sort(tr), np.sort(val), np.sort(cal)


def select_threshold(p: np.ndarray, reliable: np.ndarray, target_risk: float) -> tuple[float, float, float]:
    """``(p*, coverage, risk)``: the lowest threshold with risk <= ``target_risk``.

    If no threshold reaches the target, ``p*`` is 1.0 (nothing accepted below
    certainty) and coverage is that of ``p >= 1``.
    """
    coverage, risk, thresholds = metrics.risk_coverage(p, reliable)
    ok = np.flatnonzero(risk <= target_risk)
    if ok.size == 0:
        accepted = p >= 1.0
        return 1.0, float(accepted.mean()), float("nan")
    k = ok[-1]
    return float(thresholds[k]), float(coverage[k]), float(risk[k])


def fit_temperature(logits: np.ndarray, reliable: np.ndarray) -> float:
    """Temperature minimising the calibration split's negative log-likelihood.

    Targets use Platt's prior correction, ``(n+ + 1) / (n+ + 2)`` and
    ``1 / (n- + 2)`` instead of 1 and 0, so a perfectly separable calibration
    split yields confident but finite probabilities rather than T -> 0.
    """
    labels = np.asarray(reliable, dtype=bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    y = np.where(labels, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, z) - y * z))

    return float(math.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def train_head(
    data: FeatureSet,
    edges: Sequence[np.ndarray],
    labels: np.ndarray,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    elements: Sequence[int],
    config: HeadConfig = HeadConfig(),
    train: TrainConfig = TrainConfig(),
    progress: bool = True,
    errors: np.ndarray | None = None,
) -> tuple[ProbeHead, int]:
    """Train a head with class-weighted BCE and early stopping; return it and epochs run.

    With ``config.aux_quantiles`` the per-structure ``errors`` (criterion
    units) give the auxiliary targets ``error <= quantile_q(errors[train])``,
    added to the loss with unit weight each (averaged); early stopping watches
    the main loss only.
    """
    tr, val, _ = splits
    torch.manual_seed(train.seed)
    generator = torch.Generator().manual_seed(train.seed)
    head = ProbeHead(data.features.shape[1], elements, config)
    rows = torch.cat([torch.arange(data.ptr[k], data.ptr[k + 1]) for k in tr])
    head.set_standardisation(data.features[rows], data.numbers[rows])
    y = torch.as_tensor(labels, dtype=torch.float32)
    n_pos = float(labels[tr].sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(tr) - n_pos) / n_pos))
    optimiser = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    if config.aux_quantiles:
        if errors is None:
            raise ValueError("aux_quantiles need the per-structure errors")
        levels = np.quantile(np.asarray(errors)[tr], config.aux_quantiles)
        y_aux = torch.as_tensor(np.asarray(errors)[:, None] <= levels[None, :], dtype=torch.float32)

    def loss_on(indices: Sequence[int], main_only: bool = False) -> torch.Tensor:
        logits, _ = head.all_logits(*batch_inputs(data.features, data.numbers, data.ptr, edges, indices))
        loss = loss_fn(logits[:, 0], y[list(indices)])
        if config.aux_quantiles and not main_only:
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:], y_aux[list(indices)])
        return loss

    best, best_state, since, epoch = math.inf, copy.deepcopy(head.state_dict()), 0, 0
    bar = tqdm(range(train.epochs), desc="fit head", unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        order = tr[torch.randperm(len(tr), generator=generator).numpy()]
        for start in range(0, len(order), train.batch_size):
            optimiser.zero_grad()
            loss_on(order[start : start + train.batch_size]).backward()
            optimiser.step()
        head.eval()
        with torch.no_grad():
            val_loss = float(loss_on(val, main_only=True))
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if val_loss < best - 1e-5:
            best, best_state, since = val_loss, copy.deepcopy(head.state_dict()), 0
        else:
            since += 1
            if since >= train.patience:
                break
    bar.close()
    head.load_state_dict(best_state)
    head.eval()
    return head, epoch + 1


def fit_probe(
    calc: Calculator,
    data: Frames,
    criterion: Criterion = "force_rmse",
    threshold: float | None = None,
    quantile: float | None = None,
    target_risk: float = 0.05,
    layers: Sequence[int] | None = None,
    config: HeadConfig = HeadConfig(),
    train: TrainConfig = TrainConfig(),
    energy_key: str = "energy",
    forces_key: str = "forces",
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
) -> Probe:
    """Fit a PROBE head for the backbone in ``calc`` on labelled ``data``.

    Args:
        calc: a MACE or SchNetPack calculator (possibly inside a SumCalculator).
        data: extxyz / ase.db path or list of Atoms with reference energy (eV)
            and, for force criteria, forces (eV/Å).
        criterion: ``force_rmse`` or ``force_max`` (eV/Å), ``energy_per_atom``
            (eV/atom) or ``energy`` (eV).
        threshold: absolute tolerance tau in the criterion's unit ...
        quantile: ... or tau as this quantile (0-1) of the observed errors.
            Default when neither is given: quantile 0.8.
        target_risk: largest fraction of accepted structures allowed to be
            unreliable at the operating threshold p*.
        layers: interaction layers to tap (default: all).
        config, train: head size and training options.
        energy_key, forces_key: where reference values live in ``info``/``arrays``.
        batch_size: structures per backbone pass.
        cache_dir: feature cache folder (None: default, False: off).

    Returns:
        a :class:`~probe_ase.headfile.Probe`; ``.save(path)`` writes the head file.
    """
    check_criterion(criterion)
    if not 0 < target_risk < 1:
        raise InputError(f"target_risk must lie strictly between 0 and 1, got {target_risk}")
    if threshold is None and quantile is None:
        quantile = 0.8
    frames = read_frames(data)
    with find_tap(calc, layers) as tap:
        features = featurize(tap, frames, energy_key, forces_key, batch_size, cache_dir, progress)
        kind, fingerprint, tap_layers = tap.kind, tap.fingerprint(), tap.layers
        if config.cutoff is None:
            config = replace(config, cutoff=tap.cutoff)
    # the head knows only elements it saw: others would get an untrained embedding
    elements = tuple(sorted(set(features.numbers.tolist())))
    errors = features.error(criterion)
    tau = resolve_tolerance(errors, threshold, quantile)
    labels = make_labels(errors, tau)
    edges = [radius_graph(atoms, config.cutoff) for atoms in frames]
    splits = split_indices(labels, train)
    head, epochs = train_head(features, edges, labels, splits, elements, config, train, progress, errors)

    cal = splits[2]
    with torch.no_grad():
        logits, _ = head(*batch_inputs(features.features, features.numbers, features.ptr, edges, cal))
    temperature = fit_temperature(logits.numpy().astype(float), labels[cal])
    head.temperature.fill_(temperature)
    p = torch.sigmoid(logits / temperature).numpy().astype(float)
    p_star, coverage, risk = select_threshold(p, labels[cal], target_risk)
    if np.isnan(risk):
        warnings.warn(f"no threshold reaches target risk {target_risk:.1%} on the {len(cal)} calibration "
                      "structures: p* = 1.0, so every structure will be called unreliable; "
                      "raise target_risk or add data", stacklevel=2)
    report = {
        "n_train": len(splits[0]), "n_val": len(splits[1]), "n_cal": len(cal),
        "fraction_reliable": float(labels.mean()), "epochs": epochs,
        "auroc": metrics.auroc(labels[cal] == 0, 1 - p),
        "spearman": metrics.spearman(1 - p, errors[cal]),
        "ece": metrics.expected_calibration_error(p, labels[cal]),
        "risk_at_p_star": risk,
        "train": asdict(train),
    }
    meta = HeadMeta(
        backbone=kind, fingerprint=fingerprint, layers=tap_layers, feature_dim=features.features.shape[1],
        elements=elements, criterion=criterion, tau=tau, quantile=quantile, temperature=temperature,
        p_star=p_star, target_risk=target_risk, coverage=coverage, config=config, report=report,
    )
    return Probe(head, meta)
