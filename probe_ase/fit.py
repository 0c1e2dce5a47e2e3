"""Fit a PROBE head: split, train, fit novelty, calibrate, certify the operating threshold.

1. Run the backbone over labelled data (:func:`~probe_ase.dataset.featurize`).
2. Label each structure reliable iff its error is at most ``tau``.
3. Split train / validation / calibration (stratified, seeded).
4. Train with class-weighted binary cross-entropy and early stopping on the
   validation loss; for force criteria the head also regresses each atom's
   force error and blends the structure's predicted error into its logit
   (``HeadConfig.atom_error``).
5. Fit the novelty model (:mod:`probe_ase.novelty`) on the train and
   validation structures (plus the backbone's own training frames when
   given); its support radius comes from out-of-fold distances. Fit how much
   novelty lowers the logit on out-of-fold logits of fold heads
   (:func:`out_of_fold_logits`) over the same structures.
6. Temperature-scale the logit on the calibration split.
7. Certify ``p*`` (:mod:`probe_ase.certify`): the loosest threshold whose
   verdict (probability >= p* and inside the support) has risk <= ``target_risk``
   with probability >= 1 - ``delta``, by Learn-then-Test on the calibration split;
   where the data cannot certify ``target_risk``, a threshold certified at a
   larger risk, chosen by ``fallback``.

``TrainConfig(calibration="crossfit")`` replaces steps 3-6's single split:
``folds`` fold heads each score the fold they never saw, so every structure
gets a held-out score (:func:`held_out_crossfit`); the novelty weight, the
temperature and the certificate read those (85 % of the structures
calibrate instead of 20 %) and the deployed head averages the fold heads.

With ``atom_threshold`` / ``atom_quantile`` each atom is labelled too (its
force-error norm within the atom tolerance), the head gets a per-atom logit
trained beside the structure one (step 4), its own temperature on the
calibration atoms (step 6) and an empirical atom threshold (step 7, not
certified: atoms of one structure are not independent).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from ase.calculators.calculator import Calculator
from scipy.optimize import minimize_scalar
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from . import metrics
from .certify import certify, check_fallback
from .dataset import FeatureSet, Frames, featurize, features_only, read_frames
from .exceptions import InputError, LabelError
from .graph import HeadGraph
from .head import HeadConfig, ProbeHead, batch_inputs, log_rms_error, structure_ptr, structure_rows
from .headfile import HeadMeta
from .probe import Probe
from .labels import Criterion, check_criterion, make_labels, needs_forces, resolve_tolerance
from .novelty import NoveltyConfig, NoveltyModel, fit_logit_weight, fit_novelty, logit_penalty, structure_novelty
from .taps import Tap, find_tap

#: temperature-scaled probabilities spread less than this over the calibration split carry no information
FLAT_SPREAD = 0.05
#: force-error norms below this (eV/Å) count as this in the log-scale atom-error targets (HeadConfig.atom_error)
ATOM_ERROR_FLOOR = 1e-3
#: what early stopping may watch (:attr:`TrainConfig.stop_on`)
STOP_ON = ("main", "all")
#: how calibration scores are held out (:attr:`TrainConfig.calibration`)
CALIBRATION = ("split", "crossfit")


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
        stop_on: which validation loss early stopping watches: ``"main"``
            (the main label's, plus the per-atom loss when there is one) or
            ``"all"`` (also the auxiliary quantile labels': the whole training loss).
        calibration: how calibration scores are held out. ``"split"``: one
            head trained on the train split; temperature and p* on the
            calibration split (``cal_fraction``), an exact Learn-then-Test
            guarantee. ``"crossfit"``: ``folds`` heads, each trained without
            one stratified fold (and early-stopped on ``val_fraction`` of the
            structures, taken from the other folds); every structure is scored
            by the head that never saw it, ``val_fraction`` of these held-out
            scores fix the certificate's grid and all the others calibrate;
            the deployed head averages the fold heads (``members = folds``).
            More calibration structures (85 % of the data instead of 20 %),
            hence a stricter certifiable risk from few structures; the
            guarantee is then approximate (see README, "Cross-fitted
            calibration").
        folds: fold heads of ``calibration="crossfit"`` (>= 2).
    """

    epochs: int = 200
    patience: int = 25
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    cal_fraction: float = 0.2
    seed: int = 0
    stop_on: str = "main"
    calibration: str = "split"
    folds: int = 5

    def __post_init__(self) -> None:
        if self.stop_on not in STOP_ON:
            raise InputError(f"stop_on must be one of {STOP_ON}, got {self.stop_on!r}", stop_on=self.stop_on)
        if self.calibration not in CALIBRATION:
            raise InputError(f"calibration must be one of {CALIBRATION}, got {self.calibration!r}",
                             calibration=self.calibration)
        if self.folds < 2:
            raise InputError(f"folds must be >= 2, got {self.folds}", folds=self.folds)
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise InputError(f"epochs, patience and batch_size must be >= 1, got {self.epochs}, {self.patience}, "
                             f"{self.batch_size}",
                             epochs=self.epochs, patience=self.patience, batch_size=self.batch_size)
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise InputError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}",
                             lr=self.lr, weight_decay=self.weight_decay)
        if not (0 < self.val_fraction and 0 < self.cal_fraction and self.val_fraction + self.cal_fraction < 1):
            raise InputError(f"val_fraction and cal_fraction must be > 0 with a sum < 1, got {self.val_fraction} "
                             f"and {self.cal_fraction}", val_fraction=self.val_fraction, cal_fraction=self.cal_fraction)


def split_indices(labels: np.ndarray, train: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / validation / calibration indices."""
    idx = np.arange(len(labels))
    n_minor = int(min(labels.sum(), len(labels) - labels.sum()))
    if n_minor < 6:
        raise LabelError(f"only {n_minor} structures in the minority class; at least 6 are needed to train and calibrate",
                         n=len(labels), n_reliable=int(labels.sum()), n_minor=n_minor)
    rest, cal = train_test_split(idx, test_size=train.cal_fraction, stratify=labels, random_state=train.seed)
    val_share = train.val_fraction / (1 - train.cal_fraction)
    tr, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=train.seed)
    return np.sort(tr), np.sort(val), np.sort(cal)


def fit_temperature(logits: np.ndarray, reliable: np.ndarray) -> float:
    """Temperature minimising the calibration split's negative log-likelihood.

    Targets use Platt's prior correction, ``(n+ + 1) / (n+ + 2)`` and
    ``1 / (n- + 2)`` instead of 1 and 0, so a perfectly separable calibration
    split yields confident but finite probabilities rather than T -> 0.
    Non-finite logits are left out (they give probability 0 at any temperature).
    """
    finite = np.isfinite(logits)  # -inf: infinite novelty (an element the density never saw), any temperature
    logits, labels = np.asarray(logits, dtype=float)[finite], np.asarray(reliable, dtype=bool)[finite]
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
    atom_labels: np.ndarray | None = None,
) -> tuple[ProbeHead, int]:
    """Train a head with class-weighted BCE and early stopping; return it and epochs run.

    With ``config.aux_quantiles`` the per-structure ``errors`` (criterion
    units) give the auxiliary targets ``error <= quantile_q(errors[train])``,
    added to the loss with unit weight each (averaged). With
    ``config.atom_logit`` the per-atom ``atom_labels`` (1 = the atom's force
    error within tolerance; rows as in ``data``) add a class-weighted BCE over
    atoms with unit weight. With ``config.atom_error`` the head also regresses
    each atom's standardised ``log |ΔF_i|`` (mean squared error, unit weight;
    ``data.atom_errors`` must be finite on the training structures), and after
    training its predicted structure error is blended into the logits with
    the validation split's spread (:meth:`ProbeHead.set_error_blend`). Early
    stopping watches the main loss plus the atom and atom-error losses
    (``train.stop_on="main"``) or the whole training loss (``"all"``).
    With ``config.members = K > 1`` each of K single heads is trained so,
    with seeds ``train.seed + k``, and the returned head averages them
    (:meth:`ProbeHead.from_members`); the epochs are the most any member ran.
    """
    if config.members > 1:
        single = replace(config, members=1)
        trained = [train_head(data, edges, labels, splits, elements, single, replace(train, seed=train.seed + k),
                              progress, errors, atom_labels) for k in range(config.members)]
        return ProbeHead.from_members([head for head, _ in trained], config), max(epochs for _, epochs in trained)
    tr, val, _ = splits
    generator = torch.Generator().manual_seed(train.seed)
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's global RNG alone
        torch.manual_seed(train.seed)
        head = ProbeHead(data.features.shape[1], elements, config)
    rows = structure_rows(data.ptr, tr)
    head.set_standardisation(data.features[rows], data.numbers[rows])
    y = torch.as_tensor(labels, dtype=torch.float32)
    n_pos = float(labels[tr].sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(tr) - n_pos) / n_pos))
    optimiser = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    if config.aux_quantiles:
        if errors is None:
            raise InputError("aux_quantiles need the per-structure errors", aux_quantiles=config.aux_quantiles)
        levels = np.quantile(np.asarray(errors)[tr], config.aux_quantiles)
        y_aux = torch.as_tensor(np.asarray(errors)[:, None] <= levels[None, :], dtype=torch.float32)
    if config.atom_error:
        log_error = torch.as_tensor(np.log(np.maximum(data.atom_errors, ATOM_ERROR_FLOOR)), dtype=torch.float32)
        if not torch.isfinite(log_error[rows]).all():
            raise InputError("HeadConfig(atom_error=True) needs reference forces on every training structure",
                             atom_error=True)
        head.set_error_scale(log_error[rows])
        y_error = (log_error - head.error_shift) / head.error_scale
    if config.atom_logit:
        if atom_labels is None:
            raise InputError("atom_logit needs per-atom labels", atom_logit=config.atom_logit)
        y_atom = torch.as_tensor(atom_labels, dtype=torch.float32)
        n_good_atoms = float(y_atom[rows].sum())
        atom_loss_fn = torch.nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor(max(len(rows) - n_good_atoms, 1.0) / max(n_good_atoms, 1.0)))

    def loss_on(indices: Sequence[int], main_only: bool = False) -> torch.Tensor:
        logits, _, atom_logits, atom_errors = head.all_logits(*batch_inputs(data.features, data.numbers, data.ptr,
                                                                            edges, indices))
        loss = loss_fn(logits[:, 0], y[list(indices)])
        if config.aux_quantiles and not main_only:
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:], y_aux[list(indices)])
        if config.atom_error:  # part of the "main" loss: the blended logit ranks by it
            loss = loss + torch.nn.functional.mse_loss(atom_errors, y_error[structure_rows(data.ptr, indices)])
        if config.atom_logit:
            loss = loss + atom_loss_fn(atom_logits, y_atom[structure_rows(data.ptr, indices)])
        return loss

    best, best_state, since, epoch = math.inf, copy.deepcopy(head.state_dict()), 0, 0
    bar = tqdm(range(train.epochs), desc="fit head", unit="epoch", disable=not progress)
    for epoch in bar:  # noqa: B007 - read after the loop: the epochs run
        head.train()
        order = tr[torch.randperm(len(tr), generator=generator).numpy()]
        for start in range(0, len(order), train.batch_size):
            optimiser.zero_grad()
            loss_on(order[start : start + train.batch_size]).backward()
            optimiser.step()
        head.eval()
        with torch.no_grad():
            val_loss = float(loss_on(val, main_only=train.stop_on == "main"))
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
    if config.atom_error:
        with torch.no_grad():
            inputs = batch_inputs(data.features, data.numbers, data.ptr, edges, val)
            logits, _, _, atom_errors = head.all_logits(*inputs)
            head.set_error_blend(logits, log_rms_error(atom_errors, head.error_shift, head.error_scale, *inputs[3:]))
    return head, epoch + 1


def out_of_fold_logits(
    data: FeatureSet,
    edges: Sequence[np.ndarray],
    labels: np.ndarray,
    structures: np.ndarray,
    elements: Sequence[int],
    folds: int,
    config: HeadConfig = HeadConfig(),
    train: TrainConfig = TrainConfig(),
    progress: bool = True,
    errors: np.ndarray | None = None,
    atom_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Logits of each of ``structures`` from a head trained without it.

    ``folds`` stratified folds (at least 2, at most the minority class's
    structures), seeded by ``train.seed``; each fold head trains on the other
    folds with :func:`train_head` and early-stops on its own fold. Returns
    ``(len(structures), 1 + n_aux)`` logits in the order of ``structures``:
    the main logit first, then the auxiliary quantile logits.
    """
    from sklearn.model_selection import StratifiedKFold

    structures = np.asarray(structures)
    y = labels[structures]
    if not 2 <= folds <= min(y.sum(), len(y) - y.sum()):
        raise LabelError(f"{folds} out-of-fold heads need 2 <= folds <= the structures of each class, got "
                         f"{int(y.sum())} reliable of {len(y)}", folds=folds, n=len(y), n_reliable=int(y.sum()))
    out = np.empty((len(structures), 1 + len(config.aux_quantiles)))
    kfold = StratifiedKFold(folds, shuffle=True, random_state=train.seed)
    for rest, held in tqdm(list(kfold.split(structures, y)), desc="fold heads", unit="head", disable=not progress):
        splits = (structures[rest], structures[held], structures[held][:0])
        head, _ = train_head(data, edges, labels, splits, elements, config, train, False, errors, atom_labels)
        with torch.no_grad():
            out[held] = head.all_logits(*batch_inputs(data.features, data.numbers, data.ptr, edges,
                                                      structures[held]))[0].numpy()
    return out


def empirical_threshold(p: np.ndarray, reliable: np.ndarray, target_risk: float) -> float:
    """Loosest threshold t whose accepted set ``p >= t`` has empirical risk <= ``target_risk``.

    Just above 1 (accept nothing) when no threshold reaches it. Not a
    certificate: used for atoms, which are not independent draws.
    """
    order = np.argsort(-p, kind="stable")
    risk = np.cumsum(~reliable[order]) / np.arange(1, len(p) + 1)
    ok = np.flatnonzero(risk <= target_risk)
    return float(p[order][ok[-1]]) if ok.size else float(np.nextafter(1.0, 2.0))


def calibrate_atoms(
    z: np.ndarray, reliable: np.ndarray, error: np.ndarray, novelty: np.ndarray, importance: np.ndarray,
    ptr: np.ndarray, target_risk: float,
) -> tuple[float, dict]:
    """The atoms' operating threshold and their calibration report.

    ``z`` are temperature-scaled atom logits of the calibration atoms,
    ``reliable`` their labels, ``error`` their force-error norms (eV/Å),
    ``novelty`` their atom novelty, ``importance`` the head's importances,
    ``ptr`` the calibration structures' atom offsets. The threshold is
    :func:`empirical_threshold` over atoms inside the support (novelty <= 1).
    """
    p = 1 / (1 + np.exp(-z))
    inside = novelty <= 1
    p_star = empirical_threshold(p[inside], reliable[inside], target_risk)
    accepted = (p >= p_star) & inside
    # does the head's importance point at the worst atoms? Spearman within each structure that has a bad atom
    within = [metrics.spearman(importance[a:b], error[a:b]) for a, b in zip(ptr[:-1], ptr[1:])
              if (~reliable[a:b]).any() and b - a > 2]
    report = {
        "n_atoms": int(len(p)), "fraction_reliable": float(reliable.mean()),
        "auroc": metrics.auroc(~reliable, 1 - p), "spearman": metrics.spearman(1 - p, error),
        "ece": metrics.expected_calibration_error(p, reliable.astype(int)),
        "p_star": p_star, "coverage_at_p_star": float(accepted.mean()),
        "risk_at_p_star": float(np.mean(~reliable[accepted])) if accepted.any() else float("nan"),
        "importance_spearman": float(np.nanmean(within)) if within else float("nan"),
    }
    return p_star, report


@dataclass
class HeldOut:
    """What calibration sees: scores of structures the deployed head's training never used.

    ``grid`` structures fix the certificate's threshold grid, ``cal``
    structures calibrate and certify. ``z_*`` are logits before the novelty
    penalty (``(n, 1 + n_aux)`` for the grid, the main logit first),
    ``novelty_*`` the structure novelty (largest atom's) and ``penalty_*`` the
    one the logit penalty reads; ``atom_novelty_cal``, ``importance_cal``
    and ``z_atom_cal`` are per atom of the calibration structures.
    ``weight_inputs`` are the held-out logits, penalty novelties and
    structures the novelty weight is fitted on (None: not fitted);
    ``fit_set`` the structures the density and the auxiliary levels see.
    """

    grid: np.ndarray
    cal: np.ndarray
    fit_set: np.ndarray
    z_grid: np.ndarray
    z_cal: np.ndarray
    novelty_grid: np.ndarray
    penalty_grid: np.ndarray
    novelty_cal: np.ndarray
    penalty_cal: np.ndarray
    atom_novelty_cal: np.ndarray
    importance_cal: np.ndarray
    z_atom_cal: np.ndarray
    weight_inputs: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    sizes: dict


def head_outputs(head: ProbeHead, data: FeatureSet, edges: Sequence[np.ndarray], indices: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All logits ``(n, 1 + n_aux)`` (main first), importances and atom logits of structures ``indices``."""
    with torch.no_grad():
        outputs = head.all_logits(*batch_inputs(data.features, data.numbers, data.ptr, edges, indices))[:3]
    return tuple(t.numpy().astype(float) for t in outputs)


def held_out_split(
    data: FeatureSet, edges: Sequence[np.ndarray], labels: np.ndarray, errors: np.ndarray,
    atom_labels: np.ndarray | None, elements: Sequence[int], config: HeadConfig, train: TrainConfig,
    novelty: NoveltyConfig, reference: tuple[torch.Tensor, torch.Tensor] | None, progress: bool,
) -> tuple[ProbeHead, int, NoveltyModel, HeldOut]:
    """``calibration="split"``: one head on the train split; the validation split fixes the grid, the calibration
    split calibrates; the density is fitted on train and validation, the novelty weight on fold heads' logits."""
    splits = split_indices(labels, train)
    head, epochs = train_head(data, edges, labels, splits, elements, config, train, progress, errors, atom_labels)
    tr, val, cal = splits
    trval = np.concatenate([tr, val])  # the structures (and order) of held_out_atoms
    density, held_out_atoms = fit_novelty(data.features, data.numbers, data.ptr, trval, elements,
                                          novelty, reference, seed=train.seed)
    # support edge: the largest atom novelty; logit penalty: novelty.penalty ("mean" or "max") of the atom novelties
    held_novelty, held_penalty = (structure_novelty(held_out_atoms, structure_ptr(data.ptr, trval), reduce)
                                  for reduce in ("max", novelty.penalty))
    z_val = head_outputs(head, data, edges, val)[0]
    z_cal, importance_cal, z_atom_cal = head_outputs(head, data, edges, cal)
    cal_rows = structure_rows(data.ptr, cal)
    with torch.no_grad():
        atom_novelty = density(data.features[cal_rows], data.numbers[cal_rows]).numpy()
    novelty_cal, penalty_cal = (structure_novelty(atom_novelty, structure_ptr(data.ptr, cal), reduce)
                                for reduce in ("max", novelty.penalty))
    # fold heads: as many as asked, at most one per minority structure (split_indices leaves >= 4 here)
    weight_folds = min(novelty.weight_folds, int(labels[trval].sum()), int((labels[trval] == 0).sum()))
    weight_inputs = None
    if novelty.logit_weight and weight_folds:
        z_oof = out_of_fold_logits(data, edges, labels, trval, elements, weight_folds, config, train,
                                   progress, errors, atom_labels)
        weight_inputs = (z_oof, held_penalty, trval)
    elif novelty.logit_weight:
        weight_inputs = (z_val, held_penalty[len(tr):], val)
    sizes = {"n_train": len(tr), "n_val": len(val), "n_cal": len(cal), "n_grid": len(val),
             "novelty_weight_folds": weight_folds if novelty.logit_weight else 0}
    return head, epochs, density, HeldOut(
        grid=val, cal=cal, fit_set=trval, z_grid=z_val, z_cal=z_cal,
        novelty_grid=held_novelty[len(tr):], penalty_grid=held_penalty[len(tr):],  # out-of-fold, validation split
        novelty_cal=novelty_cal, penalty_cal=penalty_cal, atom_novelty_cal=atom_novelty,
        importance_cal=importance_cal, z_atom_cal=z_atom_cal, weight_inputs=weight_inputs, sizes=sizes)


def held_out_crossfit(
    data: FeatureSet, edges: Sequence[np.ndarray], labels: np.ndarray, errors: np.ndarray,
    atom_labels: np.ndarray | None, elements: Sequence[int], config: HeadConfig, train: TrainConfig,
    novelty: NoveltyConfig, reference: tuple[torch.Tensor, torch.Tensor] | None, progress: bool,
) -> tuple[ProbeHead, int, NoveltyModel, HeldOut]:
    """``calibration="crossfit"``: ``train.folds`` heads, each trained without one stratified fold, score it.

    The returned head averages them. Every structure's scores come from the
    head that never saw it (its novelty from a density fitted without it);
    a stratified ``val_fraction`` of them fixes the grid, the rest calibrate;
    the novelty weight is fitted on all of them.
    """
    from sklearn.model_selection import StratifiedKFold

    everything = np.arange(len(labels))
    n_minor = int(min(labels.sum(), len(labels) - labels.sum()))
    if n_minor < 2 * train.folds:
        raise LabelError(f"only {n_minor} structures in the minority class; {train.folds} fold heads need at least "
                         f"{2 * train.folds} (two per fold: one to train on, one to stop on)",
                         n=len(labels), n_reliable=int(labels.sum()), n_minor=n_minor, folds=train.folds)
    single = replace(config, members=1)
    heads, epochs = [], 0
    z_all = np.empty((len(labels), 1 + len(config.aux_quantiles)))
    importance_all, z_atom_all = np.empty(len(data.numbers)), np.empty(len(data.numbers))
    kfold = StratifiedKFold(train.folds, shuffle=True, random_state=train.seed)
    for k, (rest, fold) in enumerate(tqdm(list(kfold.split(everything, labels)), desc="fold heads", unit="head",
                                          disable=not progress)):
        tr, val = train_test_split(rest, test_size=train.val_fraction * len(labels) / len(rest),
                                   stratify=labels[rest], random_state=train.seed)
        head, ran = train_head(data, edges, labels, (np.sort(tr), np.sort(val), fold[:0]), elements, single,
                               replace(train, seed=train.seed + k), False, errors, atom_labels)
        heads.append(head)
        epochs = max(epochs, ran)
        z_all[fold], importance, z_atom = head_outputs(head, data, edges, fold)
        rows = structure_rows(data.ptr, fold).numpy()
        importance_all[rows] = importance
        if len(z_atom):
            z_atom_all[rows] = z_atom
    head = ProbeHead.from_members(heads, replace(config, members=train.folds))
    density, held_out_atoms = fit_novelty(data.features, data.numbers, data.ptr, everything, elements,
                                          novelty, reference, seed=train.seed)
    held_novelty, held_penalty = (structure_novelty(held_out_atoms, structure_ptr(data.ptr, everything), reduce)
                                  for reduce in ("max", novelty.penalty))
    cal, grid = train_test_split(everything, test_size=train.val_fraction, stratify=labels, random_state=train.seed)
    cal, grid = np.sort(cal), np.sort(grid)
    cal_rows = structure_rows(data.ptr, cal).numpy()
    sizes = {"n_train": len(tr), "n_val": len(val), "n_cal": len(cal), "n_grid": len(grid), "folds": train.folds,
             "novelty_weight_folds": train.folds if novelty.logit_weight else 0}
    return head, epochs, density, HeldOut(
        grid=grid, cal=cal, fit_set=everything, z_grid=z_all[grid], z_cal=z_all[cal],
        novelty_grid=held_novelty[grid], penalty_grid=held_penalty[grid],
        novelty_cal=held_novelty[cal], penalty_cal=held_penalty[cal], atom_novelty_cal=held_out_atoms[cal_rows],
        importance_cal=importance_all[cal_rows], z_atom_cal=z_atom_all[cal_rows] if config.atom_logit else
        np.empty(0), weight_inputs=(z_all, held_penalty, everything) if novelty.logit_weight else None, sizes=sizes)


def fit_probe(
    calc: Calculator,
    data: Frames,
    criterion: Criterion = "force_rmse",
    threshold: float | None = None,
    quantile: float | None = None,
    atom_threshold: float | None = None,
    atom_quantile: float | None = None,
    target_risk: float = 0.05,
    delta: float = 0.1,
    fallback: str = "strictest",
    reference_data: Frames | None = None,
    layers: Sequence[int] | None = None,
    channels: str | None = None,
    config: HeadConfig = HeadConfig(),
    train: TrainConfig = TrainConfig(),
    novelty: NoveltyConfig = NoveltyConfig(),
    energy_key: str = "energy",
    forces_key: str = "forces",
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
    tap: Tap | None = None,
) -> Probe:
    """Fit a PROBE head for the backbone in ``calc`` on labelled ``data``.

    Args:
        calc: a backbone calculator an adapter knows (MACE, SchNet, PaiNN,
            CHGNet; possibly inside a SumCalculator), or the one ``tap`` watches.
        data: extxyz / ase.db path or list of Atoms with reference energy (eV)
            and, for force criteria, forces (eV/Å). Never the backbone's
            training frames: their errors are not honest.
        criterion: ``force_rmse`` or ``force_max`` (eV/Å), ``energy_per_atom``
            (eV/atom) or ``energy`` (eV).
        threshold: absolute tolerance tau in the criterion's unit ...
        quantile: ... or tau as this quantile (0-1) of the observed errors.
            Default when neither is given: quantile 0.8.
        atom_threshold: per-atom tolerance on the norm of each atom's force
            error ``|ΔF_i|`` (eV/Å) ... (needs reference forces)
        atom_quantile: ... or as this quantile (0-1) of all atoms' errors.
            Either one adds a per-atom logit to the head, trained beside the
            structure logit and temperature-scaled on the calibration atoms:
            ``results["atom_reliability"]`` is then P(|ΔF_i| <= atom tolerance).
        target_risk: largest fraction of accepted structures allowed to be
            unreliable at the operating threshold p* (0-1).
        delta: p* keeps ``target_risk`` with probability >= 1 - delta over the
            calibration draw (0-1), for structures like the calibration ones.
        fallback: where ``target_risk`` cannot be certified, which threshold
            certified at the larger risk p* is: ``"strictest"`` (default, the
            least coverage and the most margin) or ``"target"`` (the loosest
            whose calibration risk is at most ``target_risk``); see
            :func:`~probe_ase.certify.certify`.
        reference_data: the backbone's own training frames (path or list;
            no labels needed): added to the novelty model's density, so
            structures like them count as inside the support.
        layers: interaction layers to tap (default: all).
        channels: which invariant channels of each layer to read: ``"scalars"``
            or ``"scalars+norms"`` (beside the scalars, the norm of each vector
            channel; PaiNN and MACE). Default: the adapter's
            (``"scalars+norms"`` for PaiNN, ``"scalars"`` for the others).
        config, train, novelty: head size, training and novelty options.
        energy_key, forces_key: where reference values live in ``info``/``arrays``.
        batch_size: structures per backbone pass.
        cache_dir: feature cache folder (None: default, False: off).
        progress: show progress bars.
        tap: a tap you built on the backbone (e.g. a
            :class:`~probe_ase.taps.ModuleTap`) instead of the adapter found
            for ``calc``; it stays open (it is yours).

    Returns:
        a :class:`~probe_ase.probe.Probe`; ``.save(path)`` writes the head
        file. Warns when ``target_risk`` cannot be certified (p* is then
        certified at the best risk it can, ``meta.certified_risk``) and when
        the calibrated probability carries no information.
    """
    check_criterion(criterion)
    check_fallback(fallback)
    if not 0 < target_risk < 1 or not 0 < delta < 1:
        raise InputError(f"target_risk and delta must lie strictly between 0 and 1, got {target_risk} and {delta}",
                         target_risk=target_risk, delta=delta)
    if threshold is None and quantile is None:
        quantile = 0.8
    local = atom_threshold is not None or atom_quantile is not None
    if config.atom_logit and not local:
        raise InputError("HeadConfig(atom_logit=True) needs per-atom labels: give atom_threshold (eV/Å) or atom_quantile",
                         atom_logit=True, atom_threshold=None, atom_quantile=None)
    if local:
        config = replace(config, atom_logit=True)
    if train.calibration == "crossfit" and config.members not in (1, train.folds):
        raise InputError(f"calibration='crossfit' deploys the mean of its {train.folds} fold heads: members must be "
                         f"1 or {train.folds}, got {config.members}", members=config.members, folds=train.folds)
    frames = read_frames(data)
    if tap is not None and layers is not None and tuple(layers) != tap.layers:
        raise InputError(f"layers={list(layers)} differ from the tap's {list(tap.layers)}: choose them on the tap",
                         layers=list(layers), tap_layers=list(tap.layers))
    if tap is not None and channels is not None and channels != tap.channels:
        raise InputError(f"channels={channels!r} differ from the tap's {tap.channels!r}: choose them on the tap",
                         channels=channels, tap_channels=tap.channels)
    with find_tap(calc, layers, channels) if tap is None else nullcontext(tap) as tap:  # a tap you pass stays open
        features = featurize(tap, frames, energy_key, forces_key, batch_size, cache_dir, progress)
        reference = None if reference_data is None else features_only(tap, read_frames(reference_data), batch_size)
        kind, fingerprint, tap_layers, channels = tap.kind, tap.fingerprint(), tap.layers, tap.channels
        if config.cutoff is None:
            config = replace(config, cutoff=tap.cutoff)
    # the head knows only elements it saw: others would get an untrained embedding
    elements = tuple(sorted(set(features.numbers.tolist())))
    if config.atom_error is None:  # per-atom force-error regression wherever the labels are force errors
        config = replace(config, atom_error=needs_forces(criterion) and not np.isnan(features.atom_errors).any())
    errors = features.error(criterion)
    tau = resolve_tolerance(errors, threshold, quantile)
    labels = make_labels(errors, tau)
    atom_tau, atom_labels = None, None
    if local:
        atom_tau = resolve_tolerance(features.atom_error(), atom_threshold, atom_quantile)
        atom_labels = make_labels(features.atom_errors, atom_tau, what="atoms")
    edges = HeadGraph(config.cutoff).frames(frames)
    held_out = held_out_crossfit if train.calibration == "crossfit" else held_out_split
    head, epochs, density, held = held_out(features, edges, labels, errors, atom_labels, elements, config, train,
                                           novelty, reference, progress)
    config, cal = head.config, held.cal
    # novelty in the probability: weight fitted on held-out logits, then part of the logit from here on;
    # one novelty coefficient shared by the main label and the auxiliary quantile labels (steadier, see there)
    levels = np.quantile(errors[held.fit_set], config.aux_quantiles)
    weight = 0.0
    if held.weight_inputs is not None:
        z_held, penalty_held, structures = held.weight_inputs
        weight = fit_logit_weight(z_held, penalty_held, np.column_stack(
            [labels[structures] == 1, *(errors[structures] <= level for level in levels)]))
    z_val = held.z_grid[:, 0] - logit_penalty(torch.from_numpy(held.penalty_grid), weight).numpy()
    z_cal = held.z_cal[:, 0] - logit_penalty(torch.from_numpy(held.penalty_cal), weight).numpy()
    novelty_cal = held.novelty_cal
    temperature = fit_temperature(z_cal, labels[cal])
    head.temperature.fill_(temperature)
    p = 1 / (1 + np.exp(-z_cal / temperature))
    cert = certify(z_cal, labels[cal] == 0, z_val, target_risk, delta, cal_eligible=novelty_cal <= 1,
                   val_eligible=held.novelty_grid <= 1, fallback=fallback)
    # accept p >= p*: p* = sigmoid(z*/T); nothing certified -> just above 1, so nothing is accepted
    p_star = float(np.nextafter(1.0, 2.0)) if not np.isfinite(cert.threshold) else \
        float(1 / (1 + np.exp(-cert.threshold / temperature)))
    accepted = (z_cal >= cert.threshold) & (novelty_cal <= 1)
    if not cert.certified:
        inside = int((novelty_cal <= 1).sum())
        if cert.frames_needed:
            more = f"about {cert.frames_needed} calibration structures (now {len(cal)}) would certify it"
        elif inside < 10:
            more = (f"only {inside} calibration structures lie inside the novelty support, too few to say how many "
                    "would certify it: fit on more structures")
        else:
            more = ("more data like this would not certify it (its empirical risk is never below the target): "
                    "improve the backbone or the head, or raise target_risk")
        if fallback == "strictest" and np.isfinite(cert.threshold):
            aim = certify(z_cal, labels[cal] == 0, z_val, target_risk, delta, cal_eligible=novelty_cal <= 1,
                          val_eligible=held.novelty_grid <= 1, fallback="target")
            if aim.n_accepted > cert.n_accepted:
                more += (f"; p* accepts {cert.n_accepted} calibration structures, fallback='target' would accept "
                         f"{aim.n_accepted} at the same certified risk (calibration risk <= {target_risk:.1%}, less "
                         "margin under shift)")
        warnings.warn(f"target risk {target_risk:.1%} cannot be certified at delta {delta} with {len(cal)} calibration "
                      f"structures; p* = {p_star:.3f} is certified at risk {cert.risk:.1%} instead (the fallback risks "
                      f"share delta {delta}, so this one too holds with probability >= {1 - delta:g}); {more}", stacklevel=2)
    auroc = metrics.auroc(labels[cal] == 0, 1 - p)
    informative = bool(np.ptp(p) >= FLAT_SPREAD)
    if not informative:
        warnings.warn(f"the calibrated probability carries no information: over the {len(cal)} calibration structures "
                      f"it spans only {p.min():.4f}-{p.max():.4f} (temperature {temperature:.3g}, AUROC {auroc:.2f}); "
                      "use the verdict (it is certified on the ranking), not the probability's value, or refit with "
                      "more data, another criterion or tolerance", stacklevel=2)
    report = {
        "calibration": train.calibration, **held.sizes,
        "fraction_reliable": float(labels.mean()), "epochs": epochs,
        "auroc": auroc, "spearman": metrics.spearman(1 - p, errors[cal]),
        "ece": metrics.expected_calibration_error(p, labels[cal]),
        "informative": informative, "probability_range": [float(p.min()), float(p.max())],
        "risk_at_p_star": float(np.mean(labels[cal][accepted] == 0)) if accepted.any() else float("nan"),
        "cal_out_of_support": float(np.mean(novelty_cal > 1)), "novelty_weight": weight,
        "certificate": {"certified": cert.certified, "risk": cert.risk, "delta": delta, "fallback": fallback,
                        "n_accepted": cert.n_accepted, "n_errors": cert.n_errors, "frames_needed": cert.frames_needed},
        "n_reference": 0 if reference is None else int(reference[0].shape[0]),
        "train": asdict(train),
    }
    atom_p_star = None
    if local:
        cal_rows = structure_rows(features.ptr, cal)
        head.atom_temperature.fill_(fit_temperature(held.z_atom_cal, atom_labels[cal_rows]))
        atom_p_star, report["atoms"] = calibrate_atoms(
            held.z_atom_cal / float(head.atom_temperature), atom_labels[cal_rows] == 1, features.atom_errors[cal_rows],
            held.atom_novelty_cal, held.importance_cal, structure_ptr(features.ptr, cal), target_risk)
        report["atoms"]["temperature"] = float(head.atom_temperature)
    meta = HeadMeta(
        backbone=kind, fingerprint=fingerprint, layers=tap_layers, channels=channels,
        feature_dim=features.features.shape[1],
        elements=elements, criterion=criterion, tau=tau, quantile=quantile, temperature=temperature,
        p_star=p_star, target_risk=target_risk, coverage=float(accepted.mean()), config=config, report=report,
        delta=delta, certified_risk=cert.risk, novelty=novelty,
        atom_tau=atom_tau, atom_quantile=atom_quantile, atom_p_star=atom_p_star, novelty_weight=weight,
    )
    return Probe(head, meta, density)
