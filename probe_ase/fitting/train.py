"""Head training: class-weighted BCE with early stopping, and out-of-fold logits of fold heads."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from probe_ase.exceptions import InputError, LabelError
from probe_ase.fitting.data import FeatureSet
from probe_ase.fitting.spec import CALIBRATION, CalibrationMode
from probe_ase.fitting.store import pooled_moments, structure_chunks
from probe_ase.fitting.workers import worker_data, worker_pool
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
        workers: processes that train independent heads (fold heads,
            members) side by side, one torch thread each (:func:`train_heads`).
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
    workers: int = 1

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION:
            raise InputError(f"calibration must be one of {CALIBRATION}, got {self.calibration!r}",
                             calibration=self.calibration)
        if self.folds < 2:
            raise InputError(f"folds must be >= 2, got {self.folds}", folds=self.folds)
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1 or self.workers < 1:
            raise InputError(f"epochs, patience, batch_size and workers must be >= 1, got {self.epochs}, "
                             f"{self.patience}, {self.batch_size}, {self.workers}", epochs=self.epochs,
                             patience=self.patience, batch_size=self.batch_size, workers=self.workers)
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
    stopping watches the main loss plus the atom and atom-error losses (not the auxiliary labels').
    With ``config.members = K > 1`` each of K single heads is trained so,
    with seeds ``train.seed + k``, and the returned head averages them
    (:meth:`ProbeHead.from_members`); the epochs are the most any member ran.
    """
    if config.members > 1:
        runs = [(splits, replace(train, seed=train.seed + k)) for k in range(config.members)]
        trained = train_heads(data, edges, labels, runs, elements, replace(config, members=1), train.workers, errors,
                              atom_labels, progress)
        return ProbeHead.from_members([head for head, _ in trained], config), max(epochs for _, epochs in trained)
    tr, val, _ = splits
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's global RNG alone
        torch.manual_seed(train.seed)
        head = ProbeHead(data.features.shape[1], elements, config)
    head.set_standardisation(*feature_moments(data, tr, head.feature_mean.dtype))
    loss = HeadLoss(head, data, edges, labels, tr, errors, atom_labels)
    epochs = early_stopping(head, loss, tr, val, train, progress)
    if config.atom_error:
        logits, structure_error = [], []
        with torch.no_grad():
            for group in structure_chunks(data.ptr, val):
                inputs = batch_inputs(data.features, data.numbers, data.ptr, edges, group)
                member, _, _, atom_errors = head.member_logits(*inputs)  # the one member's
                logits.append(member[0])
                structure_error.append(log_rms_error(atom_errors, head.error_shift, head.error_scale, *inputs[3:])[0])
        head.set_error_blend(torch.cat(logits), torch.cat(structure_error))
    return head, epochs


def feature_moments(data: FeatureSet, structures: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation ``(F,)`` of the features of ``structures``' atoms: torch's own in ``dtype`` over
    one chunk (:func:`~probe_ase.fitting.store.structure_chunks`, ``read_only``), pooled in float64 over several."""
    groups = structure_chunks(data.ptr, structures, read_only=True)
    rows = (data.features[structure_rows(data.ptr, group)] for group in groups)
    if len(groups) == 1:
        x = next(rows).to(dtype)
        return x.mean(0), x.std(0)
    return pooled_moments(rows)


def head_outputs(head: ProbeHead, data: FeatureSet, edges: Sequence[np.ndarray], indices: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All logits ``(n, 1 + n_aux)`` (main first), importances and atom logits of structures ``indices``, scored a
    chunk at a time (:func:`~probe_ase.fitting.store.structure_chunks`)."""
    parts = []
    with torch.no_grad():
        for group in structure_chunks(data.ptr, indices):
            outputs = head.all_logits(*batch_inputs(data.features, data.numbers, data.ptr, edges, group))[:3]
            parts.append([t.numpy().astype(float) for t in outputs])
    return tuple(np.concatenate(column) for column in zip(*parts))


class HeadLoss:
    """The training loss of a single head on structures ``indices`` (see :func:`train_head`).

    Built from the training structures ``tr``: the class weights, the auxiliary
    quantile levels and the atom-error scale (which it sets on ``head``).
    """

    def __init__(self, head: ProbeHead, data: FeatureSet, edges: Sequence[np.ndarray], labels: np.ndarray,
                 tr: np.ndarray, errors: np.ndarray | None, atom_labels: np.ndarray | None) -> None:
        config, rows = head.config, structure_rows(data.ptr, tr)
        self.head, self.data, self.edges, self.config = head, data, edges, config
        self.y = torch.as_tensor(labels, dtype=torch.float32)
        n_pos = float(labels[tr].sum())
        self.structure_loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(tr) - n_pos) / n_pos))
        if config.aux_quantiles:
            if errors is None:
                raise InputError("aux_quantiles need the per-structure errors", aux_quantiles=config.aux_quantiles)
            levels = np.quantile(np.asarray(errors)[tr], config.aux_quantiles)
            self.y_aux = torch.as_tensor(np.asarray(errors)[:, None] <= levels[None, :], dtype=torch.float32)
        if config.atom_error:
            log_error = torch.as_tensor(np.log(np.maximum(data.atom_errors, ATOM_ERROR_FLOOR)), dtype=torch.float32)
            if not torch.isfinite(log_error[rows]).all():
                raise InputError("HeadConfig(atom_error=True) needs reference forces on every training structure",
                                 atom_error=True)
            head.set_error_scale(log_error[rows])
            self.y_error = (log_error - head.error_shift) / head.error_scale
        if config.atom_logit:
            if atom_labels is None:
                raise InputError("atom_logit needs per-atom labels", atom_logit=config.atom_logit)
            self.y_atom = torch.as_tensor(atom_labels, dtype=torch.float32)
            n_good_atoms = float(self.y_atom[rows].sum())
            self.atom_loss = torch.nn.BCEWithLogitsLoss(
                pos_weight=torch.tensor(max(len(rows) - n_good_atoms, 1.0) / max(n_good_atoms, 1.0)))

    def __call__(self, indices: Sequence[int], main_only: bool = False) -> torch.Tensor:
        """The loss on structures ``indices``; ``main_only`` leaves the auxiliary labels' out (what early stopping
        watches)."""
        means = [mean for mean, _ in self.terms(indices, main_only)]
        return sum(means[1:], means[0])

    def terms(self, indices: Sequence[int], main_only: bool = False) -> list[tuple[torch.Tensor, int]]:
        """Each term of the loss on structures ``indices``: its mean and how many structures or atoms it averages."""
        data, config = self.data, self.config
        n_atoms = int(np.sum(data.ptr[np.add(indices, 1)] - data.ptr[indices]))
        logits, _, atom_logits, atom_errors = self.head.all_logits(*batch_inputs(data.features, data.numbers,
                                                                                 data.ptr, self.edges, indices))
        terms = [(self.structure_loss(logits[:, 0], self.y[list(indices)]), len(indices))]
        if config.aux_quantiles and not main_only:
            terms.append((torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:],
                                                                               self.y_aux[list(indices)]), len(indices)))
        if config.atom_error:  # part of the "main" loss: the blended logit ranks by it
            terms.append((torch.nn.functional.mse_loss(atom_errors, self.y_error[structure_rows(data.ptr, indices)]),
                          n_atoms))
        if config.atom_logit:
            terms.append((self.atom_loss(atom_logits, self.y_atom[structure_rows(data.ptr, indices)]), n_atoms))
        return terms

    def validation(self, indices: np.ndarray) -> float:
        """The main loss on structures ``indices`` (what early stopping watches), a chunk at a time
        (:func:`~probe_ase.fitting.store.structure_chunks`): each term the mean over all of them."""
        groups = structure_chunks(self.data.ptr, indices)
        with torch.no_grad():
            if len(groups) == 1:
                return float(self(indices, main_only=True))
            terms = [self.terms(group, main_only=True) for group in groups]
        sums = np.sum([[float(mean) * count for mean, count in chunk] for chunk in terms], axis=0)
        counts = np.sum([[count for _, count in chunk] for chunk in terms], axis=0)
        return float(np.sum(sums / counts))


def early_stopping(head: ProbeHead, loss: HeadLoss, tr: np.ndarray, val: np.ndarray, train: TrainConfig,
                   progress: bool) -> int:
    """AdamW over shuffled batches of ``tr`` until the validation loss stalls ``train.patience`` epochs; leaves the
    best state in ``head`` (in eval mode) and returns the epochs run."""
    generator = torch.Generator().manual_seed(train.seed)
    optimiser = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay, foreach=True)
    best, best_state, since, epoch = math.inf, copy.deepcopy(head.state_dict()), 0, 0
    bar = tqdm(range(train.epochs), desc="fit head", unit="epoch", disable=not progress)
    for epoch in bar:  # noqa: B007 - read after the loop: the epochs run
        head.train()
        order = tr[torch.randperm(len(tr), generator=generator).numpy()]
        for start in range(0, len(order), train.batch_size):
            optimiser.zero_grad()
            loss(order[start : start + train.batch_size]).backward()
            optimiser.step()
        head.eval()
        val_loss = loss.validation(val)
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
    return epoch + 1


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
    """Logits of each of ``structures`` from a head trained without it (:func:`fold_runs`, :func:`fold_logits`).

    Returns ``(len(structures), 1 + n_aux)`` logits in the order of
    ``structures``: the main logit first, then the auxiliary quantile logits.
    """
    held, runs = fold_runs(labels, structures, folds, train)
    trained = train_heads(data, edges, labels, runs, elements, config, train.workers, errors, atom_labels, progress)
    return fold_logits([head for head, _ in trained], held, data, edges, structures)


def fold_runs(labels: np.ndarray, structures: np.ndarray, folds: int, train: TrainConfig
              ) -> tuple[list[np.ndarray], list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], TrainConfig]]]:
    """``folds`` stratified folds of ``structures`` (at least 2, at most the minority class's structures), seeded by
    ``train.seed``: each fold's positions in ``structures``, and the :func:`train_heads` run of the head that never
    sees it (trained on the other folds, early-stopped on its own)."""
    from sklearn.model_selection import StratifiedKFold

    structures = np.asarray(structures)
    y = labels[structures]
    if not 2 <= folds <= min(y.sum(), len(y) - y.sum()):
        raise LabelError(f"{folds} out-of-fold heads need 2 <= folds <= the structures of each class, got "
                         f"{int(y.sum())} reliable of {len(y)}", folds=folds, n=len(y), n_reliable=int(y.sum()))
    kfold = list(StratifiedKFold(folds, shuffle=True, random_state=train.seed).split(structures, y))
    runs = [((structures[rest], structures[held], structures[held][:0]), train) for rest, held in kfold]
    return [held for _, held in kfold], runs


def fold_logits(heads: Sequence[ProbeHead], held: Sequence[np.ndarray], data: FeatureSet, edges: Sequence[np.ndarray],
                structures: np.ndarray) -> np.ndarray:
    """Each of ``structures``' logits ``(n, 1 + n_aux)`` from the head of the fold holding it (``held``: each fold's
    positions in ``structures``, as :func:`fold_runs` gives them)."""
    structures = np.asarray(structures)
    out = np.empty((len(structures), 1 + len(heads[0].config.aux_quantiles)))
    for head, positions in zip(heads, held):
        out[positions] = head_outputs(head, data, edges, structures[positions])[0]
    return out


def train_heads(
    data: FeatureSet,
    edges: Sequence[np.ndarray],
    labels: np.ndarray,
    runs: Sequence[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], TrainConfig]],
    elements: Sequence[int],
    config: HeadConfig,
    workers: int = 1,
    errors: np.ndarray | None = None,
    atom_labels: np.ndarray | None = None,
    progress: bool = True,
) -> list[tuple[ProbeHead, int]]:
    """:func:`train_head` once per ``(splits, train)`` of ``runs``, in order: one after another, or with ``workers``
    > 1 in that many fresh (spawned) processes of one torch thread each, which get the data once.

    Each head's training is seeded by its own ``train.seed``: the heads are those one after another on one torch
    thread gives, bit for bit (tested). Parallel runs pay about a second per process to start (importing torch);
    the processes map a cached feature set's file, or get a copy of features held in memory.
    """
    shared = (data, edges, labels, elements, config, errors, atom_labels)
    bar = dict(total=len(runs), desc="heads", unit="head", disable=not progress)
    if workers <= 1 or len(runs) <= 1:
        return [_train_run(shared, run) for run in tqdm(runs, **bar)]
    with worker_pool(workers, len(runs), shared) as pool:
        return list(tqdm(pool.map(_train_in_worker, runs), **bar))


def _train_in_worker(run: tuple) -> tuple[ProbeHead, int]:
    return _train_run(worker_data(), run)


def _train_run(shared: tuple, run: tuple) -> tuple[ProbeHead, int]:
    data, edges, labels, elements, config, errors, atom_labels = shared
    splits, train = run
    return train_head(data, edges, labels, splits, elements, config, train, False, errors, atom_labels)


