"""probe-ase: per-step reliability of machine-learned interatomic potentials in ASE.

A :class:`ProbeCalculator` wraps a backbone calculator (MACE, SchNet, PaiNN,
CHGNet; any other torch MLIP through :class:`ModuleTap`), taps the
backbone's per-atom features with forward hooks during its own pass, and adds
``reliability``, ``novelty``, the fail-safe verdict ``reliable`` with its
``reason``, and per-atom ``atom_novelty`` and ``atom_importance`` (and, for
heads fitted with an atom tolerance, ``atom_reliability``) to its results. Heads are fitted with :func:`fit_probe` (PROBE, arXiv:2605.00640),
their operating threshold certified by Learn-then-Test.
"""

from probe_ase.exceptions import (
    BackboneError,
    EmptyStructureError,
    HeadFileError,
    InputError,
    LabelError,
    MismatchError,
    MissingReferenceError,
    NonFiniteError,
    ProbeError,
    ReliabilityHalt,
    SCFNotConvergedError,
    StoreError,
    TrainingError,
    UnknownElementError,
)

#: public names and the module defining each, imported on first use (PEP 562): ``import probe_ase`` stays
#: cheap (no torch, scikit-learn, scipy until a name that needs them is touched)
_LAZY = {
    "ActiveLearner": "al.learner", "ProbeCalculator": "calculator", "annotate": "calculator",
    "featurize": "fitting.data", "read_frames": "fitting.data", "FitOptions": "fitting.spec",
    "FitSpec": "fitting.spec", "fit_probe": "fitting.pipeline", "GuardReport": "guard",
    "guarded_optimize": "guard", "HeadMeta": "model.headfile", "Probe": "model.probe",
    "ReliabilityMonitor": "observers", "ReliabilityTrajectory": "observers",
    "find_tap": "taps", "ModuleTap": "taps", "ADAPTERS": "taps", "load_backbone": "backbones",
    "companion_labels": "companion", "Region": "al.regions", "extract_regions": "al.regions", "ALStore": "al.store", "check_database": "al.store",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ADAPTERS",
    "ALStore",
    "ActiveLearner",
    "BackboneError",
    "EmptyStructureError",
    "FitOptions",
    "FitSpec",
    "GuardReport",
    "HeadFileError",
    "HeadMeta",
    "InputError",
    "LabelError",
    "MismatchError",
    "MissingReferenceError",
    "ModuleTap",
    "NonFiniteError",
    "Probe",
    "ProbeCalculator",
    "ProbeError",
    "Region",
    "ReliabilityHalt",
    "ReliabilityMonitor",
    "ReliabilityTrajectory",
    "SCFNotConvergedError",
    "StoreError",
    "TrainingError",
    "UnknownElementError",
    "annotate",
    "check_database",
    "companion_labels",
    "extract_regions",
    "featurize",
    "find_tap",
    "fit_probe",
    "guarded_optimize",
    "load_backbone",
    "read_frames",
]
__version__ = "0.1.0"
