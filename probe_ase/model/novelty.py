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
temperature scaling, with ``w >= 0`` fitted (:func:`fit_logit_weight`) on
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from probe_ase.exceptions import InputError

#: how atom values become one per structure (:func:`per_structure`)
Reduce = Literal["mean", "max"]


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
        logit_weight: lower the head's logit by ``w * log(n)`` (``n``: the mean atom novelty), ``w >= 0``
            (:func:`fit_logit_weight`); False keeps the head's logit as it is
            (``w = 0``).
        weight_folds: ``w`` is fitted on the out-of-fold logits of this many
            fold heads over the train and validation structures (each trained
            without its fold, early-stopping on it; the deployed head is not
            one of them); 0 fits ``w`` on the validation split's logits alone
            (cheaper: no extra heads, but unstable with few unreliable
            validation structures).
    """

    components: int = 2
    folds: int = 5
    support_quantile: float = 0.9
    logit_weight: bool = True
    weight_folds: int = 5

    def __post_init__(self) -> None:
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


def per_structure(atom_values: torch.Tensor, owner: torch.Tensor, n_structures: int, reduce: Reduce) -> torch.Tensor:
    """``(n_structures,)`` largest (``reduce="max"``) or mean of per-atom values; ``owner`` gives each atom's structure."""
    if n_structures == 1:
        return (atom_values.max() if reduce == "max" else atom_values.mean()).reshape(1)
    return atom_values.new_zeros(n_structures).scatter_reduce(
        0, owner, atom_values, reduce="amax" if reduce == "max" else "mean", include_self=False)


def structure_novelty(atom_novelty: np.ndarray | torch.Tensor, ptr: Sequence[int], reduce: Reduce = "max"
                      ) -> np.ndarray:
    """Per-structure novelty of atoms ``ptr[k]:ptr[k+1]`` (:func:`per_structure` of concatenated atoms)."""
    values = torch.as_tensor(np.asarray(atom_novelty.cpu() if isinstance(atom_novelty, torch.Tensor) else atom_novelty,
                                        dtype=float))
    sizes = torch.as_tensor(np.diff(np.asarray(ptr)))
    owner = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    return per_structure(values, owner, len(sizes), reduce).numpy()


#: structure novelty below this counts as this in the logit penalty (log 0 is -inf)
NOVELTY_FLOOR = 1e-3
#: smallest slope of the logit (per standard deviation; odds ratio 1.1) the weight is divided by: a logit that ranks
#: less, or not at all, leaves the ranking to novelty instead of switching novelty off
MIN_SLOPE = 0.1


def logit_penalty(novelty: torch.Tensor, weight: float) -> torch.Tensor:
    """What novelty takes off the head's logit: ``weight * log(novelty)`` per structure.

    ``novelty`` is each structure's mean atom novelty (documented scale).

    Zero when ``weight`` is 0, even for infinite novelty (an element the
    density has no component for), so the probability stays defined there.
    """
    if weight == 0:
        return torch.zeros_like(novelty)
    return weight * torch.log(novelty.clamp_min(NOVELTY_FLOOR))
