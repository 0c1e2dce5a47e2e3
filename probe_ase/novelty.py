"""Novelty: how unlike the fit data each atom's tapped features are.

A discriminative head knows only the shifts its fit data showed it; on
chemistry it never saw, its probability can be confidently wrong. The novelty
term needs no labels: per element, a Gaussian mixture (two components by
default) is fitted to the tapped features of the fit frames (and of the
backbone's own training frames when given), and each atom's novelty is its
Mahalanobis distance to the nearest component.

Scale (documented, used everywhere in probe-ase):

* ``atom_novelty`` = distance / (element's median held-out distance) /
  support radius;
* ``novelty`` (per structure) = the largest ``atom_novelty``;
* ``novelty <= 1``: inside the support, i.e. no atom is farther from the fit
  data than the atoms of 90 % of held-out fit frames were (the
  ``support_quantile``; the other 10 % of frames like the fit data fall
  outside by construction: the price of failing safe). ``novelty = 2``: some
  atom is twice as far as that edge.

Novelty also enters the probability (``NoveltyConfig(logit_weight=True)``):
the head's logit is lowered by ``w * log(mean atom novelty)`` before
temperature scaling (``NoveltyConfig(penalty="max")``: by the structure
novelty instead), with ``w >= 0`` fitted (:func:`fit_logit_weight`) on
cross-fitted out-of-fold logits of every train and validation structure
(``weight_folds`` fold heads; the validation split alone held too few
unreliable structures to fit it stably).
On the fit pools' own splits this sharpened the ranking of force errors
(structures far from the fit data tend to be worse; a structure's force RMSE
averages its atoms, and so ranked better by the mean atom novelty than by
the largest) and is fitted to 0 where novelty does not predict the error
(often for energies). Where the head's own logit ranks nothing (fold heads
that stopped near their initialisation), the weight is large instead of 0:
novelty then decides the ranking (fail safe, :data:`MIN_SLOPE`). The support edge stays on the largest atom novelty:
one atom out of support is enough to leave it.

The support edge is set on structures the size of the fit frames: the
largest of N atom novelties grows with N, so a much larger cell than the fit
frames leaves the support sooner; judge big cells by ``atom_novelty``.

The unit and the support radius come from *out-of-fold* distances (each fit
frame scored by a density fitted without it), so they describe frames the
density never saw, as deployment frames are. Distances are invariant to
rotation, translation and permutation because the features are. Cost per
structure: one ``(n_atoms, F) @ (F, F)`` product per component.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .exceptions import InputError


#: how atom novelties become the per-structure novelty that lowers the logit (NoveltyConfig.penalty)
PENALTIES = ("mean", "max")


@dataclass(frozen=True)
class NoveltyConfig:
    """How the novelty model is fitted.

    Attributes:
        components: Gaussian mixture components per element (default 2,
            chosen with ``support_quantile`` on the fit pools' leave-shift-out
            splits by ``benchmarks/novelty_variants.py``).
        folds: cross-fitting folds for the out-of-fold distances that set the
            per-element unit and the support radius.
        support_quantile: the support radius is this quantile (0-1] of the
            held-out fit structures' novelty; 1.0 takes the largest (default
            0.9: on acac's pool split, 1.0 let 600 K frames through at 38 %
            risk, 0.9 at 9 %).
        logit_weight: lower the head's logit by ``w * log(n)`` (``n``: see ``penalty``), ``w >= 0``
            (:func:`fit_logit_weight`); False keeps the head's logit as it is
            (``w = 0``).
        weight_folds: ``w`` is fitted on the out-of-fold logits of this many
            fold heads over the train and validation structures (each trained
            without its fold, early-stopping on it; the deployed head is not
            one of them); 0 fits ``w`` on the validation split's logits alone
            (cheaper: no extra heads, but unstable with few unreliable
            validation structures).
        penalty: which per-structure novelty lowers the logit: ``"mean"``
            (the mean atom novelty; default) or ``"max"`` (the structure
            novelty, as the support edge uses).
    """

    components: int = 2
    folds: int = 5
    support_quantile: float = 0.9
    logit_weight: bool = True
    weight_folds: int = 5
    penalty: str = "mean"

    def __post_init__(self) -> None:
        if self.penalty not in PENALTIES:
            raise InputError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}", penalty=self.penalty)
        if self.components < 1 or self.folds < 2:
            raise InputError(f"need components >= 1 and folds >= 2, got {self.components} and {self.folds}",
                             components=self.components, folds=self.folds)
        if self.weight_folds == 1 or self.weight_folds < 0:
            raise InputError(f"weight_folds must be 0 (validation split) or >= 2, got {self.weight_folds}",
                             weight_folds=self.weight_folds)
        if not 0 < self.support_quantile <= 1:
            raise InputError(f"support_quantile must lie in (0, 1], got {self.support_quantile}",
                             support_quantile=self.support_quantile)


class NoveltyModel(nn.Module):
    """Per-element Gaussian mixtures over tapped features, as tensors (loads with ``weights_only``).

    Args:
        feature_dim: width of the tapped features.
        elements: atomic numbers it scores.
        components: mixture components per element.
    """

    def __init__(self, feature_dim: int, elements: Sequence[int], components: int = 1) -> None:
        super().__init__()
        self.elements = tuple(sorted(int(z) for z in elements))
        n, f, k = len(self.elements), int(feature_dim), int(components)
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[list(self.elements)] = torch.arange(n)
        self.register_buffer("element_index", lookup)
        self.register_buffer("centres", torch.zeros(n, k, f, dtype=torch.float64))
        self.register_buffer("whiteners", torch.eye(f, dtype=torch.float64).repeat(n, k, 1, 1))
        self.register_buffer("active", torch.zeros(n, k, dtype=torch.bool))  # components that exist
        self.register_buffer("unit", torch.ones(n, dtype=torch.float64))  # median held-out distance per element
        self.register_buffer("radius", torch.ones((), dtype=torch.float64))  # support radius (in units)

    def distances(self, features: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance ``(n_atoms,)`` of each atom to its element's nearest component (raw units)."""
        x = features.to(self.centres.dtype)
        element = self.element_index[numbers.to(self.element_index.device)]
        out = x.new_full((x.shape[0],), float("inf"))
        for e in torch.unique(element).tolist():
            rows = torch.nonzero(element == e).squeeze(1)
            xe = x.index_select(0, rows)
            best = out.new_full((len(rows),), float("inf"))
            for c in torch.nonzero(self.active[e]).squeeze(1).tolist():
                d = ((xe - self.centres[e, c]) @ self.whiteners[e, c]).norm(dim=1)
                best = torch.minimum(best, d)
            out[rows] = best
        return out

    def forward(self, features: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """``atom_novelty`` ``(n_atoms,)`` on the documented scale (<= 1 inside the support)."""
        element = self.element_index[numbers.to(self.element_index.device)]
        return self.distances(features, numbers) / self.unit[element] / self.radius


def structure_novelty(atom_novelty: np.ndarray | torch.Tensor, ptr: Sequence[int], reduce: str = "max") -> np.ndarray:
    """Per-structure novelty of atoms ``ptr[k]:ptr[k+1]``: the largest atom novelty (``reduce="max"``) or the mean."""
    values = np.asarray(atom_novelty.cpu() if isinstance(atom_novelty, torch.Tensor) else atom_novelty, dtype=float)
    aggregate = np.max if reduce == "max" else np.mean
    return np.array([aggregate(values[ptr[k] : ptr[k + 1]]) for k in range(len(ptr) - 1)])


#: structure novelty below this counts as this in the logit penalty (log 0 is -inf)
NOVELTY_FLOOR = 1e-3
#: smallest slope of the logit (per standard deviation; odds ratio 1.1) the weight is divided by: a logit that ranks
#: less, or not at all, leaves the ranking to novelty instead of switching novelty off
MIN_SLOPE = 0.1


def logit_penalty(novelty: torch.Tensor, weight: float) -> torch.Tensor:
    """What novelty takes off the head's logit: ``weight * log(novelty)`` per structure.

    ``novelty`` is the per-structure novelty the head's ``NoveltyConfig.penalty``
    names (mean or largest atom novelty, documented scale).

    Zero when ``weight`` is 0, even for infinite novelty (an element the
    density has no component for), so the probability stays defined there.
    """
    if weight == 0:
        return torch.zeros_like(novelty)
    return weight * torch.log(novelty.clamp_min(NOVELTY_FLOOR))


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
    the shared ``lam`` is fitted more steadily; the weight is ``lam / a`` of
    the main column. (Simulated with 2 % unreliable under the main label and
    a true weight of 1.5: mean absolute miss 0.41-0.57 against 0.55-1.02 for
    the main label alone over five simulation seeds, medians 1.36-1.52;
    tested.) Columns with one class only, or a constant logit, are left out.

    Args:
        logits: raw logits ``(n,)`` or ``(n, k)`` of structures the head(s)
            that scored them did not train on (out-of-fold, or the validation
            split).
        novelty: their out-of-fold per-structure novelty ``(n,)`` (documented
            scale; the mean or largest atom novelty, as the penalty reads it);
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
    x: np.ndarray, element: np.ndarray, n_elements: int, components: int, seed: int, max_atoms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres ``(E, K, F)``, whiteners ``(E, K, F, F)`` and active mask ``(E, K)`` per element.

    Features are standardised per element before the mixture is fitted (so
    ``reg_covar`` is relative), and the standardisation is folded into the
    returned centres and whiteners, which act on raw features.
    """
    from sklearn.mixture import GaussianMixture

    f = x.shape[1]
    centres = np.zeros((n_elements, components, f))
    whiteners = np.tile(np.eye(f), (n_elements, components, 1, 1))
    active = np.zeros((n_elements, components), dtype=bool)
    rng = np.random.default_rng(seed)
    for e in range(n_elements):
        rows = x[element == e]
        if len(rows) > max_atoms:
            rows = rows[rng.choice(len(rows), max_atoms, replace=False)]
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


def fit_novelty(
    features: torch.Tensor,
    numbers: torch.Tensor,
    ptr: Sequence[int],
    fit_structures: Sequence[int],
    elements: Sequence[int],
    config: NoveltyConfig = NoveltyConfig(),
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    max_atoms: int = 20_000,
) -> tuple[NoveltyModel, np.ndarray]:
    """Fit the novelty model on structures ``fit_structures`` of a feature set.

    Args:
        features, numbers, ptr: concatenated per-atom features, atomic numbers,
            and structure offsets (structure ``k`` owns rows ``ptr[k]:ptr[k+1]``).
        fit_structures: structures the density is fitted on (never the
            calibration split: the calibration frames must be scored as
            deployment frames are).
        elements: atomic numbers the model scores.
        config: mixture components, folds and support quantile.
        reference: extra ``(features, numbers)`` atoms (the backbone's own
            training frames) added to the density, never to the radius.
        seed: seeds fold assignment, subsampling and the mixtures.
        max_atoms: most atoms per element per mixture fit (subsampled above).

    Returns:
        the fitted model and the out-of-fold atom novelty of the fit
        structures' atoms (documented scale; concatenated in the order of
        ``fit_structures``): :func:`structure_novelty` of it is <= 1 for the
        share ``support_quantile`` of them.
    """
    components, folds = config.components, config.folds
    fit_structures = np.asarray(fit_structures)
    if len(fit_structures) < folds:
        raise InputError(f"novelty needs at least {folds} fit structures, got {len(fit_structures)}",
                         folds=folds, n_fit=len(fit_structures))
    model = NoveltyModel(features.shape[1], elements, components)
    lookup = model.element_index.numpy()
    x_all = features.detach().cpu().double().numpy()
    e_all = lookup[numbers.cpu().numpy()]
    rows_of = [np.arange(ptr[k], ptr[k + 1]) for k in fit_structures]
    ref_x = ref_e = None
    if reference is not None:
        ref_x, ref_e = reference[0].detach().cpu().double().numpy(), lookup[reference[1].cpu().numpy()]
        if (ref_e < 0).any():
            raise InputError("the reference frames hold elements the head was not fitted on",
                             unknown=sorted(set(reference[1].cpu().numpy()[ref_e < 0].tolist())),
                             known=list(model.elements))
    n_el = len(model.elements)

    def with_reference(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, e = x_all[rows], e_all[rows]
        return (x, e) if ref_x is None else (np.concatenate([x, ref_x]), np.concatenate([e, ref_e]))

    # out-of-fold distances: each fit structure scored by a density fitted without it
    fold_of = np.random.default_rng(seed).permutation(len(fit_structures)) % folds
    oof = np.empty(len(x_all))
    for f in range(folds):
        train_rows = np.concatenate([rows_of[i] for i in np.flatnonzero(fold_of != f)])
        test_rows = np.concatenate([rows_of[i] for i in np.flatnonzero(fold_of == f)])
        _load(model, *_fit_mixtures(*with_reference(train_rows), n_el, components, seed, max_atoms))
        oof[test_rows] = model.distances(torch.from_numpy(x_all[test_rows]), numbers[test_rows]).numpy()
    all_rows = np.concatenate(rows_of)
    unit, rare = np.ones(n_el), []
    for e in range(n_el):
        held = oof[all_rows][e_all[all_rows] == e]
        held = held[np.isfinite(held)]  # inf: no fold without this atom's structure held this element
        if len(held):
            unit[e] = max(float(np.median(held)), 1e-12)
        elif (e_all[all_rows] == e).any():  # no held-out scale at all: fail safe, its atoms are never in support
            unit[e] = 0.0  # distance / 0 = inf
            rare.append(model.elements[e])
    if rare:
        warnings.warn(f"novelty: element(s) {rare} occur in too few fit structures to be scored out of fold "
                      f"({folds} folds); every structure holding them will be out of support: add fit structures "
                      "with them", stacklevel=3)
    with np.errstate(divide="ignore"):
        scaled = oof / unit[np.clip(e_all, 0, None)]
    per_structure = np.array([scaled[r].max() for r in rows_of])
    if np.isfinite(per_structure).all():
        radius = float(np.quantile(per_structure, config.support_quantile))
    else:  # an observed value: interpolating towards inf would give an infinite radius and switch the edge off
        radius = float(np.quantile(per_structure, config.support_quantile, method="inverted_cdf"))
    if not np.isfinite(radius):
        raise InputError(f"novelty: {int((~np.isfinite(per_structure)).sum())} of {len(per_structure)} fit structures "
                         "hold atoms no out-of-fold density could score (elements in too few fit structures), more "
                         f"than the {1 - config.support_quantile:.0%} the support may leave out: add fit structures "
                         "with those elements", n_unscored=int((~np.isfinite(per_structure)).sum()),
                         n_fit=len(per_structure))
    _load(model, *_fit_mixtures(*with_reference(all_rows), n_el, components, seed, max_atoms))
    model.unit.copy_(torch.from_numpy(unit))
    model.radius.fill_(radius)
    return model, scaled[all_rows] / radius


def _load(model: NoveltyModel, centres: np.ndarray, whiteners: np.ndarray, active: np.ndarray) -> None:
    model.centres.copy_(torch.from_numpy(centres))
    model.whiteners.copy_(torch.from_numpy(whiteners))
    model.active.copy_(torch.from_numpy(active))
