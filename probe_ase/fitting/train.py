"""Head training: class-weighted BCE with early stopping, and out-of-fold logits of fold heads."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn import functional
from tqdm.auto import tqdm

from probe_ase.exceptions import InputError, LabelError
from probe_ase.fitting.data import FeatureSet
from probe_ase.fitting.spec import CALIBRATION, CalibrationMode
from probe_ase.model.head import HeadConfig, ProbeHead, batch_inputs, log_rms_error, structure_rows

#: force-error norms below this (eV/Å) count as this in the log-scale atom-error targets (HeadConfig.atom_error)
ATOM_ERROR_FLOOR = 1e-3


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

    epochs: int = 150
    patience: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    cal_fraction: float = 0.2
    seed: int = 0
    calibration: CalibrationMode = "split"
    folds: int = 5

    def __post_init__(self) -> None:
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
) -> tuple[ProbeHead, int, int]:
    """Train a head with class-weighted BCE and early stopping; return it, the epochs run and the epochs its kept
    (best) state had trained.

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
    stopping watches the main loss plus the atom and atom-error losses (not the auxiliary labels').
    With ``config.members = K > 1`` each of K single heads is trained so,
    with seeds ``train.seed + k``, and the returned head averages them
    (:meth:`ProbeHead.from_members`); the epochs are the most any member ran (and kept).
    """
    if config.members > 1:
        single = replace(config, members=1)
        trained = [train_head(data, edges, labels, splits, elements, single, replace(train, seed=train.seed + k),
                              progress, errors, atom_labels) for k in range(config.members)]
        return (ProbeHead.from_members([head for head, _, _ in trained], config),
                max(ran for _, ran, _ in trained), max(kept for _, _, kept in trained))
    tr, val, _ = splits
    head = seeded_head(data, elements, config, train.seed)
    head.set_standardisation(data.features[structure_rows(data.ptr, tr)])
    loss = HeadLoss(head, data, edges, labels, [tr], errors, atom_labels)
    ran, kept = early_stopping(head, loss, tr, val, train, progress)
    if config.atom_error:
        blend_error(head, data, edges, val)
    return head, ran, kept


def seeded_head(data: FeatureSet, elements: Sequence[int], config: HeadConfig, seed: int) -> ProbeHead:
    """A freshly initialised head for ``data``'s features, seeded by ``seed``; the caller's global RNG is left
    alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHead(data.features.shape[1], elements, config)


def blend_error(head: ProbeHead, data: FeatureSet, edges: Sequence[np.ndarray], held: np.ndarray,
                member: int | None = None) -> None:
    """Set ``member``'s error blend (None: a single head's) from its logits on the held-out structures ``held``."""
    with torch.no_grad():
        inputs = batch_inputs(data.features, data.numbers, data.ptr, edges, held)
        logits, _, _, atom_errors = head.member_logits(*inputs)
        k = 0 if member is None else member
        structure_error = log_rms_error(atom_errors[k : k + 1], head.error_shift[k : k + 1],
                                        head.error_scale[k : k + 1], *inputs[3:])
        head.set_error_blend(logits[k], structure_error[0], member)


class HeadLoss:
    """The training loss of a head's members on structures ``indices`` (see :func:`train_head`).

    Member ``k`` trains on structures ``train_sets[k]``: its class weights,
    auxiliary quantile levels and atom-error scale (set on ``head``) come from
    them, and in a training batch only they count in its loss. The members'
    losses add up: their weights are independent, so each gets the gradient
    it would get alone.
    """

    def __init__(self, head: ProbeHead, data: FeatureSet, edges: Sequence[np.ndarray], labels: np.ndarray,
                 train_sets: Sequence[np.ndarray], errors: np.ndarray | None, atom_labels: np.ndarray | None) -> None:
        config, members = head.config, len(train_sets)
        self.head, self.data, self.edges, self.config = head, data, edges, config
        self.y = torch.as_tensor(labels, dtype=torch.float32)
        self.trains = torch.zeros((members, len(labels)), dtype=torch.bool)
        for k, tr in enumerate(train_sets):
            self.trains[k, tr] = True
        self.pos_weight = torch.tensor([[(len(tr) - float(labels[tr].sum())) / float(labels[tr].sum())]
                                        for tr in train_sets])
        if config.aux_quantiles:
            if errors is None:
                raise InputError("aux_quantiles need the per-structure errors", aux_quantiles=config.aux_quantiles)
            levels = np.stack([np.quantile(np.asarray(errors)[tr], config.aux_quantiles) for tr in train_sets])
            self.y_aux = torch.as_tensor(np.asarray(errors)[None, :, None] <= levels[:, None, :], dtype=torch.float32)
        rows = [structure_rows(data.ptr, tr) for tr in train_sets]
        if config.atom_error:
            log_error = torch.as_tensor(np.log(np.maximum(data.atom_errors, ATOM_ERROR_FLOOR)), dtype=torch.float32)
            if not all(torch.isfinite(log_error[r]).all() for r in rows):
                raise InputError("HeadConfig(atom_error=True) needs reference forces on every training structure",
                                 atom_error=True)
            for k, r in enumerate(rows):
                head.set_error_scale(log_error[r], k if members > 1 else None)
            self.y_error = (log_error - head.error_shift.unsqueeze(1)) / head.error_scale.unsqueeze(1)
        if config.atom_logit:
            if atom_labels is None:
                raise InputError("atom_logit needs per-atom labels", atom_logit=config.atom_logit)
            self.y_atom = torch.as_tensor(atom_labels, dtype=torch.float32)
            good = [float(self.y_atom[r].sum()) for r in rows]
            self.atom_pos_weight = torch.tensor([[max(len(r) - g, 1.0) / max(g, 1.0)] for r, g in zip(rows, good)])

    def __call__(self, indices: Sequence[int], validation: bool = False) -> torch.Tensor:
        """The loss on structures ``indices``. ``validation``: every structure counts and the auxiliary labels'
        loss is left out (what early stopping watches)."""
        data, config, indices = self.data, self.config, list(indices)
        inputs = batch_inputs(data.features, data.numbers, data.ptr, self.edges, indices)
        logits, _, atom_logits, atom_errors = self.head.member_logits(*inputs)
        counts = None if validation or len(self.trains) == 1 else self.trains[:, indices].float()  # (K, n)
        atom_counts = None if counts is None else counts[:, inputs[3]]
        bce = functional.binary_cross_entropy_with_logits
        loss = member_mean(bce(logits[..., 0], self.y[indices].expand_as(logits[..., 0]),
                               pos_weight=self.pos_weight, reduction="none"), counts)
        if config.aux_quantiles and not validation:
            aux = bce(logits[..., 1:], self.y_aux[:, indices], reduction="none").flatten(1)  # (K, n * n_aux)
            loss = loss + member_mean(aux, None if counts is None else counts.repeat_interleave(logits.shape[-1] - 1, 1))
        rows = structure_rows(data.ptr, indices)
        if config.atom_error:  # part of the "main" loss: the blended logit ranks by it
            loss = loss + member_mean(functional.mse_loss(atom_errors, self.y_error[:, rows], reduction="none"),
                                      atom_counts)
        if config.atom_logit:
            loss = loss + member_mean(bce(atom_logits, self.y_atom[rows].expand_as(atom_logits),
                                          pos_weight=self.atom_pos_weight, reduction="none"), atom_counts)
        return loss.sum()


def member_mean(values: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    """Each member's mean of ``values`` ``(K, n)`` over the entries ``counts`` (0/1, ``(K, n)``) keeps (None: all)."""
    if counts is None:
        return values.flatten().mean().unsqueeze(0) if len(values) == 1 else values.mean(1)
    return (values * counts).sum(1) / counts.sum(1).clamp_min(1.0)


def early_stopping(head: ProbeHead, loss: HeadLoss, tr: np.ndarray, val: np.ndarray, train: TrainConfig,
                   progress: bool) -> tuple[int, int]:
    """AdamW over shuffled batches of ``tr`` until the validation loss stalls ``train.patience`` epochs; leaves the
    best state in ``head`` (in eval mode) and returns the epochs run and the epochs the best state had trained."""
    generator, optimiser = torch.Generator().manual_seed(train.seed), adamw(head, train)
    best, best_state, since, kept, epoch = math.inf, copy.deepcopy(head.state_dict()), 0, 0, 0
    bar = tqdm(range(train.epochs), desc="fit head", unit="epoch", disable=not progress)
    for epoch in bar:  # noqa: B007 - read after the loop: the epochs run
        one_epoch(head, loss, tr, train.batch_size, optimiser, generator)
        with torch.no_grad():
            val_loss = float(loss(val, validation=True))
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if val_loss < best - 1e-5:
            best, best_state, since, kept = val_loss, copy.deepcopy(head.state_dict()), 0, epoch + 1
        else:
            since += 1
            if since >= train.patience:
                break
    bar.close()
    head.load_state_dict(best_state)
    head.eval()
    return epoch + 1, kept


def adamw(head: ProbeHead, train: TrainConfig) -> torch.optim.AdamW:
    """The optimiser of every head (``foreach``: the same steps as the per-parameter loop, fewer small ops)."""
    return torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay, foreach=True)


def one_epoch(head: ProbeHead, loss: HeadLoss, structures: np.ndarray, batch_size: int,
              optimiser: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """One pass of optimiser steps over shuffled batches of ``structures``; leaves ``head`` in eval mode."""
    head.train()
    order = structures[torch.randperm(len(structures), generator=generator).numpy()]
    for start in range(0, len(order), batch_size):
        optimiser.zero_grad()
        loss(order[start : start + batch_size]).backward()
        optimiser.step()
    head.eval()


def out_of_fold_logits(
    data: FeatureSet,
    edges: Sequence[np.ndarray],
    labels: np.ndarray,
    structures: np.ndarray,
    elements: Sequence[int],
    folds: int,
    epochs: int,
    config: HeadConfig = HeadConfig(),
    train: TrainConfig = TrainConfig(),
    progress: bool = True,
    errors: np.ndarray | None = None,
    atom_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Logits of each of ``structures`` from a head trained without it.

    ``folds`` stratified folds (at least 2, at most the minority class's
    structures), seeded by ``train.seed``. The fold heads (each of
    ``config.members`` members) train together, as one head of ``folds *
    config.members`` members on shared shuffled batches of the structures
    (``folds / (folds - 1)`` times ``train.batch_size``, so each sees about
    that many of its own per step), each counting only the structures outside its fold, for
    ``epochs`` epochs: the deployed head's, so no held fold is used to stop
    on and its logits are those of a head trained as the deployed one was.
    Returns ``(len(structures), 1 + n_aux)`` logits in the order of
    ``structures``: the main logit first, then the auxiliary quantile logits.
    """
    from sklearn.model_selection import StratifiedKFold

    structures = np.asarray(structures)
    y = labels[structures]
    if not 2 <= folds <= min(y.sum(), len(y) - y.sum()):
        raise LabelError(f"{folds} out-of-fold heads need 2 <= folds <= the structures of each class, got "
                         f"{int(y.sum())} reliable of {len(y)}", folds=folds, n=len(y), n_reliable=int(y.sum()))
    split = list(StratifiedKFold(folds, shuffle=True, random_state=train.seed).split(structures, y))
    per_fold = config.members
    owner = np.repeat(np.arange(folds), per_fold)  # member m is one of fold owner[m]'s heads
    head = seeded_head(data, elements, replace(config, members=folds * per_fold), train.seed)
    trains = [np.sort(structures[split[f][0]]) for f in owner]
    for m, tr in enumerate(trains):
        head.set_standardisation(data.features[structure_rows(data.ptr, tr)], m)
    loss = HeadLoss(head, data, edges, labels, trains, errors, atom_labels)
    generator, optimiser = torch.Generator().manual_seed(train.seed), adamw(head, train)
    batch = math.ceil(train.batch_size * folds / (folds - 1))
    for _ in tqdm(range(epochs), desc="fold heads", unit="epoch", disable=not progress):
        one_epoch(head, loss, structures, batch, optimiser, generator)
    out = np.empty((len(structures), 1 + len(config.aux_quantiles)))
    for f, (_, held) in enumerate(split):
        mine = np.flatnonzero(owner == f)
        if config.atom_error:
            for m in mine:
                blend_error(head, data, edges, structures[held], int(m))
        with torch.no_grad():
            logits = head.member_logits(*batch_inputs(data.features, data.numbers, data.ptr, edges,
                                                      structures[held]))[0]
        out[held] = logits[mine].mean(0).numpy()
    return out
