"""Held-out scores for calibration: one split, or cross-fitted fold heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from probe_ase.exceptions import LabelError
from probe_ase.fitting.data import FeatureSet
from probe_ase.fitting.novelty import fit_novelty
from probe_ase.fitting.split import split_indices
from probe_ase.fitting.timing import timed
from probe_ase.fitting.store import structure_chunks
from probe_ase.fitting.train import (TrainConfig, fold_logits, fold_runs, head_outputs, train_head,
                                     train_heads)
from probe_ase.model.head import HeadConfig, ProbeHead, structure_ptr, structure_rows
from probe_ase.model.novelty import NoveltyConfig, NoveltyModel, structure_novelty


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
    seconds: dict[str, float]


def held_out_split(
    data: FeatureSet, edges: Sequence[np.ndarray], labels: np.ndarray, errors: np.ndarray,
    atom_labels: np.ndarray | None, elements: Sequence[int], config: HeadConfig, train: TrainConfig,
    novelty: NoveltyConfig, reference: tuple[torch.Tensor, torch.Tensor] | None, progress: bool,
) -> tuple[ProbeHead, int, NoveltyModel, HeldOut]:
    """``calibration="split"``: one head on the train split; the validation split fixes the grid, the calibration
    split calibrates; the density is fitted on train and validation, the novelty weight on fold heads' logits."""
    splits, seconds = split_indices(labels, train), {}
    tr, val, cal = splits
    trval = np.concatenate([tr, val])  # the structures (and order) of held_out_atoms
    # fold heads: as many as asked, at most one per minority structure (split_indices leaves >= 4 here)
    weight_folds = min(novelty.weight_folds, int(labels[trval].sum()), int((labels[trval] == 0).sum())) \
        if novelty.logit_weight else 0
    head, epochs, z_oof = _split_heads(data, edges, labels, errors, atom_labels, elements, config, train, splits,
                                       weight_folds, progress, seconds)
    with timed(seconds, "novelty"):
        density, held_out_atoms = fit_novelty(data, trval, elements, novelty, reference, seed=train.seed,
                                              workers=train.workers)
    # support edge: the largest atom novelty; logit penalty: the mean atom novelty
    held_novelty, held_penalty = (structure_novelty(held_out_atoms, structure_ptr(data.ptr, trval), reduce)
                                  for reduce in ("max", "mean"))
    z_val = head_outputs(head, data, edges, val)[0]
    z_cal, importance_cal, z_atom_cal = head_outputs(head, data, edges, cal)
    with torch.no_grad():
        atom_novelty = np.concatenate([density(data.features[rows], data.numbers[rows]).numpy() for rows in
                                       (structure_rows(data.ptr, group) for group in structure_chunks(data.ptr, cal))])
    novelty_cal, penalty_cal = (structure_novelty(atom_novelty, structure_ptr(data.ptr, cal), reduce)
                                for reduce in ("max", "mean"))
    weight_inputs = None
    if z_oof is not None:
        weight_inputs = (z_oof, held_penalty, trval)
    elif novelty.logit_weight:
        weight_inputs = (z_val, held_penalty[len(tr):], val)
    sizes = {"n_train": len(tr), "n_val": len(val), "n_cal": len(cal), "n_grid": len(val),
             "novelty_weight_folds": weight_folds}
    return head, epochs, density, HeldOut(
        grid=val, cal=cal, fit_set=trval, z_grid=z_val, z_cal=z_cal,
        novelty_grid=held_novelty[len(tr):], penalty_grid=held_penalty[len(tr):],  # out-of-fold, validation split
        novelty_cal=novelty_cal, penalty_cal=penalty_cal, atom_novelty_cal=atom_novelty,
        importance_cal=importance_cal, z_atom_cal=z_atom_cal, weight_inputs=weight_inputs, sizes=sizes,
        seconds=seconds)


def _split_heads(
    data: FeatureSet, edges: Sequence[np.ndarray], labels: np.ndarray, errors: np.ndarray,
    atom_labels: np.ndarray | None, elements: Sequence[int], config: HeadConfig, train: TrainConfig,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray], weight_folds: int, progress: bool, seconds: dict[str, float],
) -> tuple[ProbeHead, int, np.ndarray | None]:
    """The deployed head on the train split, its epochs, and the out-of-fold logits of the train and validation
    structures from ``weight_folds`` fold heads (None without). With ``train.workers`` > 1 and single heads the
    deployed head trains beside the fold heads in one pool of processes (``seconds["train"]`` then holds all of
    them, ``seconds["fold_heads"]`` the fold heads' scoring)."""
    trval = np.concatenate(splits[:2])
    held, runs = fold_runs(labels, trval, weight_folds, train) if weight_folds else ([], [])
    together = bool(runs) and train.workers > 1 and config.members == 1
    with timed(seconds, "train"):
        if together:
            trained = train_heads(data, edges, labels, [(splits, train), *runs], elements, config, train.workers,
                                  errors, atom_labels, progress)
            (head, epochs), fold_heads = trained[0], [fold_head for fold_head, _ in trained[1:]]
        else:
            head, epochs = train_head(data, edges, labels, splits, elements, config, train, progress, errors,
                                      atom_labels)
    if not runs:
        return head, epochs, None
    with timed(seconds, "fold_heads"):
        if not together:
            fold_heads = [fold_head for fold_head, _ in train_heads(data, edges, labels, runs, elements, config,
                                                                    train.workers, errors, atom_labels, progress)]
        return head, epochs, fold_logits(fold_heads, held, data, edges, trval)


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
    everything = np.arange(len(labels))
    n_minor = int(min(labels.sum(), len(labels) - labels.sum()))
    if n_minor < 2 * train.folds:
        raise LabelError(f"only {n_minor} structures in the minority class; {train.folds} fold heads need at least "
                         f"{2 * train.folds} (two per fold: one to train on, one to stop on)",
                         n=len(labels), n_reliable=int(labels.sum()), n_minor=n_minor, folds=train.folds)
    seconds: dict[str, float] = {}
    with timed(seconds, "train"):
        head, epochs, z_all, importance_all, z_atom_all, (tr, val) = _fold_heads(
            data, edges, labels, errors, atom_labels, elements, config, train, progress)
    with timed(seconds, "novelty"):
        density, held_out_atoms = fit_novelty(data, everything, elements, novelty, reference, seed=train.seed,
                                              workers=train.workers)
    held_novelty, held_penalty = (structure_novelty(held_out_atoms, structure_ptr(data.ptr, everything), reduce)
                                  for reduce in ("max", "mean"))
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
        np.empty(0), weight_inputs=(z_all, held_penalty, everything) if novelty.logit_weight else None, sizes=sizes,
        seconds=seconds)


def _fold_heads(
    data: FeatureSet, edges: Sequence[np.ndarray], labels: np.ndarray, errors: np.ndarray,
    atom_labels: np.ndarray | None, elements: Sequence[int], config: HeadConfig, train: TrainConfig, progress: bool,
) -> tuple[ProbeHead, int, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``train.folds`` heads, each trained without one stratified fold and scoring it; their mean head, the most
    epochs any ran, every structure's held-out logits, importances and atom logits, and the last fold's train and
    validation structures."""
    from sklearn.model_selection import StratifiedKFold

    everything = np.arange(len(labels))
    z_all = np.empty((len(labels), 1 + len(config.aux_quantiles)))
    importance_all, z_atom_all = np.empty(len(data.numbers)), np.empty(len(data.numbers))
    kfold = list(StratifiedKFold(train.folds, shuffle=True, random_state=train.seed).split(everything, labels))
    runs = []
    for k, (rest, fold) in enumerate(kfold):
        tr, val = train_test_split(rest, test_size=train.val_fraction * len(labels) / len(rest),
                                   stratify=labels[rest], random_state=train.seed)
        runs.append(((np.sort(tr), np.sort(val), fold[:0]), replace(train, seed=train.seed + k)))
    trained = train_heads(data, edges, labels, runs, elements, replace(config, members=1), train.workers, errors,
                          atom_labels, progress)
    for (_, fold), (head, _) in zip(kfold, trained):
        z_all[fold], importance, z_atom = head_outputs(head, data, edges, fold)
        rows = structure_rows(data.ptr, fold).numpy()
        importance_all[rows] = importance
        if len(z_atom):
            z_atom_all[rows] = z_atom
    head = ProbeHead.from_members([head for head, _ in trained], replace(config, members=train.folds))
    tr, val = runs[-1][0][:2]
    return head, max(ran for _, ran in trained), z_all, importance_all, z_atom_all, (tr, val)


