"""Statistics of the benchmark scripts: percentile bootstrap intervals of a (paired) statistic.

Only the benchmarks resample their evaluation frames (``paired_bootstrap.py``); the library does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A statistic on the full sample and its bootstrap percentile interval.

    ``replicates`` holds the statistic on every resample that gave a finite
    value (for a difference "a − b", ``share_below_zero`` says how often the
    resampled data put ``a`` below ``b``).
    """

    estimate: float
    low: float
    high: float
    level: float
    replicates: np.ndarray

    @property
    def share_below_zero(self) -> float:
        """Fraction of the resampled statistics below 0 (NaN when none was finite)."""
        return float(np.mean(self.replicates < 0)) if len(self.replicates) else float("nan")


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, strata: np.ndarray | None = None,
              reps: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap of ``statistic(indices)`` over ``n`` structures.

    ``statistic`` takes an index array into the sample (with repeats) and
    returns a float; pass one that computes a *paired* difference (two scores
    of the same structures) to get the interval of the difference. With
    ``strata`` (one label per structure, e.g. its evaluation file) each
    resample keeps every stratum's size, so a pooled metric keeps the files'
    mix. Resamples whose statistic is not finite (one class only) are
    dropped. Structures are resampled as independent: frames of one
    trajectory that are correlated make the interval too narrow.
    """
    return bootstrap_seeds([statistic], n, strata, reps, level, seed)


def bootstrap_seeds(statistics: list[Callable[[np.ndarray], float]], n: int, strata: np.ndarray | None = None,
                    reps: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """:func:`bootstrap` of the mean of ``statistics``, one per fit seed (each a paired statistic of the same ``n``
    structures), each resample drawing the seeds with replacement too.

    The interval then holds the fit's own randomness as well as the
    evaluation sample's; with one statistic it is :func:`bootstrap`'s. A few
    seeds resample coarsely (three give ten distinct draws): the interval is
    wide rather than narrow.
    """
    if not 0 < level < 1 or reps < 1 or n < 1 or not statistics:
        raise ValueError(f"bootstrap needs 0 < level < 1, reps >= 1 and n >= 1 (got {level}, {reps}, {n}) and at "
                         f"least one statistic (got {len(statistics)})")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    values = []
    for _ in range(reps):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        drawn = statistics if len(statistics) == 1 else [statistics[k] for k in rng.integers(0, len(statistics),
                                                                                             len(statistics))]
        values.append(np.mean([statistic(idx) for statistic in drawn]))
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    tail = (1 - level) / 2
    low, high = (np.quantile(values, [tail, 1 - tail]) if len(values) else (float("nan"),) * 2)
    return Interval(float(np.mean([statistic(np.arange(n)) for statistic in statistics])), float(low), float(high),
                    level, values)
