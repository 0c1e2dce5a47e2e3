"""Helpers shared by the benchmark scripts: fitting a head with study settings."""

from __future__ import annotations

from dataclasses import replace

from probe_ase.fitting.pipeline import Configs, fit_probe, fit_spec, internal_configs
from probe_ase.fitting.spec import FitOptions, FitSpec

#: the training ``fit_probe`` ran by default before FitOptions (TrainConfig's defaults, 200 epochs, patience 25):
#: the scripts whose published results were fitted with those defaults keep them
LEGACY_OPTIONS = FitOptions(epochs=200, patience=25)
#: the fields of each configuration that FitOptions sets (``internal_configs``): pass them in ``options``
OPTION_FIELDS = {"head": {"hidden", "cutoff", "members"},
                 "train": {"epochs", "patience", "seed", "calibration", "folds"},
                 "novelty": {"support_quantile", "weight_folds"}}


def study_configs(options: FitOptions, head: dict | None = None, train: dict | None = None,
                  novelty: dict | None = None) -> Configs:
    """The configurations ``options`` give, with study knobs beyond FitOptions changed.

    ``head``, ``train`` and ``novelty`` are field values of HeadConfig,
    TrainConfig and NoveltyConfig (e.g. ``head={"blocks": 2}``); fields that
    FitOptions sets belong in ``options`` and raise ValueError here.
    """
    changes = {"head": head or {}, "train": train or {}, "novelty": novelty or {}}
    for name, fields in OPTION_FIELDS.items():
        clash = fields & set(changes[name])
        if clash:
            raise ValueError(f"{sorted(clash)} are FitOptions fields: pass them in options, not {name}=")
    base = internal_configs(FitSpec(options=options))
    return Configs(replace(base.head, **changes["head"]), replace(base.train, **changes["train"]),
                   replace(base.novelty, **changes["novelty"]))


def fit(calc, data, options: FitOptions = FitOptions(), *, head: dict | None = None, train: dict | None = None,
        novelty: dict | None = None, reference_data=None, cache_dir=None, progress: bool = True, **spec):
    """A fitted Probe: ``fit_probe(calc, data, options=options, **spec)`` when no study knob changes, else
    ``fit_spec`` with :func:`study_configs` (``spec``: fit_probe's keywords criterion, tolerance, quantile, ...)."""
    configs = study_configs(options, head, train, novelty)
    where = dict(reference_data=reference_data, cache_dir=cache_dir, progress=progress)
    if configs == internal_configs(FitSpec(options=options)):
        return fit_probe(calc, data, options=options, **spec, **where)
    return fit_spec(calc, data, FitSpec(options=options, **spec), configs=configs, **where)
