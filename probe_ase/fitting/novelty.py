"""Fitting the novelty model: per-element Gaussian mixtures, the support radius, the logit weight."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from probe_ase.exceptions import InputError
from probe_ase.fitting.data import FeatureSet
from probe_ase.fitting.store import CHUNK_ATOMS
from probe_ase.fitting.workers import worker_data, worker_pool
from probe_ase.model.novelty import MIN_SLOPE, NOVELTY_FLOOR, NoveltyConfig, NoveltyModel


def fit_logit_weight(logits: np.ndarray, novelty: np.ndarray, reliable: np.ndarray) -> float:
    """How much novelty should lower the head's logit, fitted on held-out structures.

    Logistic regression of ``reliable`` on ``a * logit + b - lam * log(novelty)``
    with ``lam >= 0`` (more novelty may only lower reliability); returns ``lam / a``,
    the weight in the logit's own units, or 0 when the structures hold one
    class only or novelty does not lower reliability (``lam = 0``).

    Fail safe: ``a`` counts as at least :data:`MIN_SLOPE` (per standard
    deviation of the logit). A logit that does not rank the held-out
    structures (``a <= 0``, e.g. fold heads that stopped near their
    initialisation) then gets a large weight, so novelty decides the
    ranking, instead of weight 0, which would switch novelty off exactly when
    the head knows least. A constant logit gives ``lam`` (novelty alone ranks).

    With several columns (the main logit and label first, then the head's
    auxiliary quantile logits and labels "error <= q-quantile"), each column
    gets its own ``a`` and ``b`` and all share one ``lam``: the auxiliary
    labels hold many more unreliable structures than a strict main label, so
    the shared ``lam`` is fitted more steadily (tested on simulated data);
    the weight is ``lam / a`` of the main column. Columns with one class only,
    or a constant logit, are left out.

    Args:
        logits: raw logits ``(n,)`` or ``(n, k)`` of structures the head(s)
            that scored them did not train on (out-of-fold, or the validation
            split).
        novelty: their out-of-fold per-structure novelty ``(n,)`` (documented
            scale; each structure's mean atom novelty, as the penalty reads it);
            structures with infinite novelty are left out.
        reliable: their labels, shaped like ``logits`` (True: within tolerance).
    """
    from scipy.optimize import minimize

    novelty = np.asarray(novelty, dtype=float)
    finite = np.isfinite(novelty)  # inf: an element no out-of-fold density held; out of support whatever w is
    if finite.sum() < 2:
        return 0.0
    y = np.asarray(reliable, dtype=float).reshape(len(novelty), -1)[finite]
    z = np.asarray(logits, dtype=float).reshape(len(novelty), -1)[finite]
    novelty = novelty[finite]
    scale = z.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant logit: its slope is idle, novelty alone ranks
    keep = y.min(0) < y.max(0)  # columns holding both classes
    if not keep[0]:  # the main label holds one class only: nothing to fit
        return 0.0
    y, z, scale = y[:, keep], z[:, keep], scale[keep]
    z = (z - z.mean(0)) / scale  # centred unit-scale logits (the biases absorb the shift), converted back at the end
    log_n = np.log(np.maximum(novelty, NOVELTY_FLOOR))[:, None]
    k = z.shape[1]

    def nll(params: np.ndarray) -> float:
        s = params[:k] * z + params[k : 2 * k] - params[-1] * log_n
        return float(np.sum(np.logaddexp(0, s) - y * s))

    start = np.concatenate([np.ones(k), np.zeros(k + 1)])
    params = minimize(nll, start, method="L-BFGS-B", bounds=[(None, None)] * (2 * k) + [(0, None)]).x
    a, lam = params[0], params[-1]
    return float(lam * scale[0] / max(a, MIN_SLOPE))


def _fit_mixtures(
    read: Callable[[np.ndarray], np.ndarray], f: int, element: np.ndarray, n_elements: int, components: int, seed: int,
    max_atoms: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres ``(E, K, F)``, whiteners ``(E, K, F, F)`` and active mask ``(E, K)`` per element.

    ``read(positions)`` gives the float64 features ``(n, f)`` of the atoms at
    those positions of ``element``; only the atoms a mixture is fitted on are
    read. Features are standardised per element before the mixture is fitted
    (so ``reg_covar`` is relative), and the standardisation is folded into the
    returned centres and whiteners, which act on raw features.
    """
    from sklearn.mixture import GaussianMixture

    centres = np.zeros((n_elements, components, f))
    whiteners = np.tile(np.eye(f), (n_elements, components, 1, 1))
    active = np.zeros((n_elements, components), dtype=bool)
    rng = np.random.default_rng(seed)
    for e in range(n_elements):
        positions = np.flatnonzero(element == e)
        if len(positions) > max_atoms:
            positions = positions[rng.choice(len(positions), max_atoms, replace=False)]
        rows = read(positions)
        if len(rows) < 2:
            continue
        mean, scale = rows.mean(0), rows.std(0) + 1e-8
        k = max(1, min(components, len(rows) // (2 * f)))  # no more components than the atoms support
        gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-3, random_state=seed).fit((rows - mean) / scale)
        for c in range(k):
            centres[e, c] = mean + scale * gm.means_[c]
            whiteners[e, c] = gm.precisions_cholesky_[c] / scale[:, None]
            active[e, c] = True
    return centres, whiteners, active


#: mixture work per set (atoms fitted, capped per element, times features squared) from which ``workers`` > 1 fit
#: the sets in processes: about 3.5 s a set on one CPU thread, against about 3 s to start the processes
PARALLEL_WORK = 5e8


def fit_novelty(
    data: FeatureSet,
    fit_structures: Sequence[int],
    elements: Sequence[int],
    config: NoveltyConfig = NoveltyConfig(),
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    max_atoms: int = 20_000,
    workers: int = 1,
) -> tuple[NoveltyModel, np.ndarray]:
    """Fit the novelty model on structures ``fit_structures`` of a feature set.

    Args:
        data: the per-atom features, atomic numbers and structure offsets
            (structure ``k`` owns rows ``ptr[k]:ptr[k+1]``).
        fit_structures: structures the density is fitted on (never the
            calibration split: it must be scored as deployment frames are).
        elements: atomic numbers the model scores.
        config: mixture components, folds and support quantile.
        reference: extra ``(features, numbers)`` atoms (the backbone's own
            training frames) added to the density, never to the radius.
        seed: seeds fold assignment, subsampling and the mixtures.
        max_atoms: most atoms per element per mixture fit (subsampled above).
        workers: processes (> 1) that fit the ``folds + 1`` sets of mixtures
            side by side, one thread each, where a set is large enough
            (:data:`PARALLEL_WORK`): the model one thread fits, bit for bit.

    Returns:
        the fitted model and the out-of-fold novelty of the fit structures'
        atoms (in the order of ``fit_structures``; the largest per structure
        is <= 1 for the share ``support_quantile`` of them).
    """
    components, folds, fit_structures = config.components, config.folds, np.asarray(fit_structures)
    if len(fit_structures) < folds:
        raise InputError(f"novelty needs at least {folds} fit structures, got {len(fit_structures)}",
                         folds=folds, n_fit=len(fit_structures))
    features, numbers = data.features, data.numbers
    model = NoveltyModel(features.shape[1], elements, components)
    e_all = model.element_index.numpy()[numbers.cpu().numpy()]
    rows_of = [np.arange(data.ptr[k], data.ptr[k + 1]) for k in fit_structures]
    fold_of = np.random.default_rng(seed).permutation(len(fit_structures)) % folds
    fit_rows = (np.concatenate([rows_of[i] for i in np.flatnonzero(fold_of != f)]) for f in range(folds))
    all_rows = np.concatenate(rows_of)
    job = _Mixtures(data, e_all, *_reference_atoms(reference, model), len(model.elements), components, seed, max_atoms)
    parallel = workers > 1 and job.work(all_rows) >= PARALLEL_WORK  # the final set is the largest
    mixtures = _fit_each(job, itertools.chain(fit_rows, [all_rows]), workers if parallel else 1, folds + 1)
    # out-of-fold distances: each fit structure scored by a density fitted without it (a chunk of atoms at a time)
    oof = np.empty(len(features))
    for f, fitted in zip(range(folds), mixtures):
        _load(model, *fitted)
        test_rows = np.concatenate([rows_of[i] for i in np.flatnonzero(fold_of == f)])
        oof[test_rows] = _distances(model, features, numbers, test_rows)
    unit = _element_units(oof[all_rows], e_all[all_rows], model.elements, folds)
    with np.errstate(divide="ignore"):
        scaled = oof / unit[np.clip(e_all, 0, None)]
    radius = _support_radius(np.array([scaled[r].max() for r in rows_of]), config.support_quantile)
    _load(model, *next(mixtures))
    model.unit.copy_(torch.from_numpy(unit))
    model.radius.fill_(radius)
    return model, scaled[all_rows] / radius


@dataclass(frozen=True)
class _Mixtures:
    """Fits the per-element mixtures of the atoms of some feature rows and the reference atoms (picklable: a worker
    process gets it once; a mapped feature set travels as its path)."""

    data: FeatureSet
    element: np.ndarray  # each feature row's element index
    ref_x: torch.Tensor | None
    ref_e: np.ndarray | None
    n_elements: int
    components: int
    seed: int
    max_atoms: int

    def work(self, rows: np.ndarray) -> float:
        """The atoms the mixtures of ``rows`` are fitted on (at most ``max_atoms`` per element) × features²."""
        e = self.element[rows]
        fitted = np.minimum(np.bincount(e[e >= 0], minlength=self.n_elements), self.max_atoms).sum()
        return float(fitted) * self.data.features.shape[1] ** 2

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        e = self.element[rows] if self.ref_e is None else np.concatenate([self.element[rows], self.ref_e])
        return _fit_mixtures(lambda positions: _read_fit(self.data.features, rows, self.ref_x, positions),
                             self.data.features.shape[1], e, self.n_elements, self.components, self.seed,
                             self.max_atoms)


def _fit_each(job: _Mixtures, row_sets: Iterable[np.ndarray], workers: int, n: int) -> Iterator[tuple]:
    """``job`` on each of the ``n`` ``row_sets``, in order: lazily one after another, or in ``workers`` processes."""
    if workers <= 1:
        return map(job, row_sets)
    with worker_pool(workers, n, (job,)) as pool:
        return iter(list(pool.map(_mixtures_in_worker, row_sets)))


def _mixtures_in_worker(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.mixture import GaussianMixture  # noqa: F401 - loads the OpenMP runtime the limit below must see
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one thread per process, as torch's: the processes share the cores
        return worker_data()[0](rows)


def _distances(model: NoveltyModel, features: torch.Tensor, numbers: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """The model's distances (raw units) of the atoms ``rows``, read :data:`CHUNK_ATOMS` at a time."""
    chunks = [rows[start : start + CHUNK_ATOMS] for start in range(0, len(rows), CHUNK_ATOMS)]
    return np.concatenate([model.distances(_read(features, chunk), numbers[chunk]).numpy() for chunk in chunks])


def _read(features: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Float64 features of ``rows`` (read only when needed: ``features`` may be memory-mapped)."""
    return features[torch.from_numpy(rows)].detach().cpu().double()


def _read_fit(features: torch.Tensor, rows: np.ndarray, ref_x: torch.Tensor | None, positions: np.ndarray
              ) -> np.ndarray:
    """Float64 features ``(n, F)`` of the atoms at ``positions`` of ``rows`` followed by the reference atoms'
    features ``ref_x``, in the order of ``positions``."""
    own = positions < len(rows)
    x = np.empty((len(positions), features.shape[1]))
    x[own] = _read(features, rows[positions[own]]).numpy()
    if ref_x is not None:
        x[~own] = _read(ref_x, positions[~own] - len(rows)).numpy()
    return x


def _reference_atoms(reference: tuple[torch.Tensor, torch.Tensor] | None, model: NoveltyModel
                     ) -> tuple[torch.Tensor | None, np.ndarray | None]:
    """The reference atoms' features (as given: read as needed) and element indices (None, None without reference
    frames)."""
    if reference is None:
        return None, None
    ref_x, ref_e = reference[0], model.element_index.numpy()[reference[1].cpu().numpy()]
    if (ref_e < 0).any():
        raise InputError("the reference frames hold elements the head was not fitted on",
                         unknown=sorted(set(reference[1].cpu().numpy()[ref_e < 0].tolist())), known=list(model.elements))
    return ref_x, ref_e


def _element_units(distances: np.ndarray, element: np.ndarray, elements: Sequence[int], folds: int) -> np.ndarray:
    """Each element's unit: the median of its atoms' out-of-fold distances (0, so never in support, for an element
    no fold could score, with a warning)."""
    unit, rare = np.ones(len(elements)), []
    for e in range(len(elements)):
        held = distances[element == e]
        held = held[np.isfinite(held)]  # inf: no fold without this atom's structure held this element
        if len(held):
            unit[e] = max(float(np.median(held)), 1e-12)
        elif (element == e).any():  # no held-out scale at all: fail safe, its atoms are never in support
            unit[e] = 0.0  # distance / 0 = inf
            rare.append(elements[e])
    if rare:
        warnings.warn(f"novelty: element(s) {rare} occur in too few fit structures to be scored out of fold "
                      f"({folds} folds); every structure holding them will be out of support: add fit structures "
                      "with them", stacklevel=4)
    return unit


def _support_radius(per_structure: np.ndarray, support_quantile: float) -> float:
    """The ``support_quantile`` of the fit structures' out-of-fold novelty (in element units)."""
    if np.isfinite(per_structure).all():
        radius = float(np.quantile(per_structure, support_quantile))
    else:  # an observed value: interpolating towards inf would give an infinite radius and switch the edge off
        radius = float(np.quantile(per_structure, support_quantile, method="inverted_cdf"))
    if not np.isfinite(radius):
        raise InputError(f"novelty: {int((~np.isfinite(per_structure)).sum())} of {len(per_structure)} fit structures "
                         "hold atoms no out-of-fold density could score (elements in too few fit structures), more "
                         f"than the {1 - support_quantile:.0%} the support may leave out: add fit structures "
                         "with those elements", n_unscored=int((~np.isfinite(per_structure)).sum()),
                         n_fit=len(per_structure))
    return radius


def _load(model: NoveltyModel, centres: np.ndarray, whiteners: np.ndarray, active: np.ndarray) -> None:
    model.centres.copy_(torch.from_numpy(centres))
    model.whiteners.copy_(torch.from_numpy(whiteners))
    model.active.copy_(torch.from_numpy(active))
