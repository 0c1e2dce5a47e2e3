"""What a fit is asked to do: the user's settings (:class:`FitSpec`) and the advanced ones (:class:`FitOptions`).

Both are frozen and validated on construction; the head file stores the
spec, so a refit is ``fit_probe(calc, data, **probe.spec)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from probe_ase.exceptions import InputError
from probe_ase.fitting.certify import FALLBACKS, Fallback
from probe_ase.fitting.labels import CRITERIA, Criterion
from probe_ase.model.head import HeadConfig
from probe_ase.model.novelty import NoveltyConfig

#: tau's quantile of the fit pool's errors when neither a tolerance nor a quantile is given
DEFAULT_QUANTILE = 0.8
#: how calibration scores are held out (:attr:`FitOptions.calibration`)
CalibrationMode = Literal["split", "crossfit"]
CALIBRATION: tuple[CalibrationMode, ...] = ("split", "crossfit")
#: what the head reads of each tapped layer (:attr:`FitOptions.channels`)
Channels = Literal["scalars", "scalars+norms"]
CHANNELS: tuple[Channels, ...] = ("scalars", "scalars+norms")


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}", **{name: value})


@dataclass(frozen=True)
class FitOptions:
    """Advanced fitting settings; the defaults are what the published benchmarks ran.

    Attributes:
        layers: backbone interaction layers to tap (None: all).
        channels: ``"scalars"`` or ``"scalars+norms"`` (beside the scalars, the
            norm of each vector channel); None: the adapter's default.
        cutoff: radius (Å) of the neighbourhood each atom attends to in the
            head (None: the backbone's own cutoff).
        hidden: width of the head's per-atom encoding.
        members: independently trained heads averaged into one (seeds
            ``seed`` .. ``seed + members - 1``; ``members`` times the fit time).
        calibration: ``"split"``: one head, temperature and p* on a held-out
            20 % (an exact Learn-then-Test guarantee); ``"crossfit"``:
            ``folds`` heads, each trained without one fold, so every structure
            calibrates once (85 % of the data; approximate guarantee); the head
            file holds their mean.
        folds: fold heads of ``calibration="crossfit"`` (>= 2).
        fallback: where ``target_risk`` cannot be certified, p* is the
            ``"strictest"`` threshold certified at a larger risk, or the loosest
            whose calibration risk is at most the target (``"target"``).
        support_quantile: the novelty support edge: this quantile (0-1] of the
            held-out fit structures' novelty.
        weight_folds: fold heads whose out-of-fold logits fit how much novelty
            lowers the logit (0: the validation split, no extra heads). Most of
            a fit's time; 3 takes about half of 5's and did as well in the
            benchmarks (the fit pools' shifts; every MACE evaluation row,
            ethanol's over five fit seeds); 2 and 0 ranked worse (docs:
            validation, the novelty weight).
        epochs: most training epochs per head.
        patience: epochs without validation improvement before stopping.
        seed: seeds splits, initialisation and shuffling.
        batch_size: structures per backbone pass while featurising.
        workers: processes that train the heads side by side (the fold
            heads and ``members``, with the deployed head beside the fold
            heads), and then fit the novelty mixtures side by side where
            they are large (five out-of-fold sets and the final one), one
            thread each: about ``min(workers, heads)`` times faster on idle
            cores, the same heads and novelty model as one thread gives
            (each process starts in about a second and maps the cached
            features, or gets a copy without a cache). The processes are spawned: a script must call
            the fit under ``if __name__ == "__main__":``.
    """

    layers: tuple[int, ...] | None = None
    channels: Channels | None = None
    cutoff: float | None = None
    hidden: int = 64
    members: int = 1
    calibration: CalibrationMode = "split"
    folds: int = 5
    fallback: Fallback = "strictest"
    support_quantile: float = 0.9
    weight_folds: int = 5
    epochs: int = 150
    patience: int = 20
    seed: int = 0
    batch_size: int = 32
    workers: int = 1

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.channels is not None:
            _choice("channels", self.channels, CHANNELS)
        _choice("calibration", self.calibration, CALIBRATION)
        _choice("fallback", self.fallback, FALLBACKS)
        for name in ("hidden", "members", "epochs", "patience", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}", **{name: getattr(self, name)})
        if self.folds < 2:
            raise InputError(f"folds must be >= 2, got {self.folds}", folds=self.folds)
        if self.calibration == "crossfit" and self.members not in (1, self.folds):
            raise InputError(f"calibration='crossfit' deploys the mean of its {self.folds} fold heads: members must be "
                             f"1 or {self.folds}, got {self.members}", members=self.members, folds=self.folds)
        # the novelty and head settings are checked where they are used, by the same rules
        NoveltyConfig(support_quantile=self.support_quantile, weight_folds=self.weight_folds)
        HeadConfig(hidden=self.hidden, cutoff=self.cutoff, members=self.members)


@dataclass(frozen=True)
class FitSpec(Mapping):
    """The settings of one fit, as :func:`~probe_ase.fit_probe` takes them (see there); a mapping of its keywords.

    ``fit_probe(calc, data, **spec)`` fits again with the same settings.
    """

    criterion: Criterion = "force_rmse"
    tolerance: float | None = None
    quantile: float | None = None
    atom_tolerance: float | None = None
    atom_quantile: float | None = None
    target_risk: float = 0.05
    delta: float = 0.1
    label_keys: tuple[str, str] = ("energy", "forces")
    options: FitOptions = field(default_factory=FitOptions)

    def __post_init__(self) -> None:
        _choice("criterion", self.criterion, CRITERIA)
        if self.tolerance is None and self.quantile is None:
            object.__setattr__(self, "quantile", DEFAULT_QUANTILE)
        if self.tolerance is not None and self.quantile is not None:
            raise InputError("give tolerance or quantile, not both", tolerance=self.tolerance, quantile=self.quantile)
        if self.atom_tolerance is not None and self.atom_quantile is not None:
            raise InputError("give atom_tolerance or atom_quantile, not both",
                             atom_tolerance=self.atom_tolerance, atom_quantile=self.atom_quantile)
        for name in ("tolerance", "atom_tolerance"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"{name} must be positive (in the criterion's unit: eV/Å, eV/atom or eV), got {value}",
                                 **{name: value})
        for name in ("quantile", "atom_quantile"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise InputError(f"{name} must lie strictly between 0 and 1, got {value}", **{name: value})
        if not 0 < self.target_risk < 1 or not 0 < self.delta < 1:
            raise InputError(f"target_risk and delta must lie strictly between 0 and 1, got {self.target_risk} and "
                             f"{self.delta}", target_risk=self.target_risk, delta=self.delta)
        if len(self.label_keys) != 2 or not all(isinstance(k, str) and k for k in self.label_keys):
            raise InputError(f"label_keys must be two names (energy key, forces key), got {self.label_keys!r}",
                             label_keys=self.label_keys)
        object.__setattr__(self, "label_keys", tuple(self.label_keys))
        if not isinstance(self.options, FitOptions):
            raise InputError(f"options must be a FitOptions, got {type(self.options).__name__}",
                             options=type(self.options).__name__)

    @property
    def local(self) -> bool:
        """Whether the fit labels atoms too (an atom tolerance or quantile was given)."""
        return self.atom_tolerance is not None or self.atom_quantile is not None

    def __getitem__(self, key: str) -> object:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> dict:
        """A JSON-ready dict (as stored in the head file; tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FitSpec:
        """The spec :meth:`to_dict` wrote."""
        return cls(**{**d, "label_keys": tuple(d["label_keys"]), "options": FitOptions(**d["options"])})
