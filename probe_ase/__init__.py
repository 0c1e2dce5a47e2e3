"""probe-ase: per-step reliability of machine-learned interatomic potentials in ASE.

A :class:`ProbeCalculator` wraps a MACE or SchNetPack calculator, taps the
backbone's per-atom features with forward hooks during its own pass, and adds
``reliability``, ``novelty``, the fail-safe verdict ``reliable`` with its
``reason``, and per-atom ``atom_novelty`` and ``atom_importance`` to its
results. Heads are fitted with :func:`fit_probe` (PROBE, arXiv:2605.00640),
their operating threshold certified by Learn-then-Test.
"""

from .active_learning import ActiveLearner
from .calculator import ProbeCalculator, annotate
from .dataset import featurize, read_frames
from .exceptions import (
    BackboneError,
    EmptyStructureError,
    HeadFileError,
    InputError,
    LabelError,
    MismatchError,
    MissingReferenceError,
    NonFiniteError,
    ProbeError,
    UnknownElementError,
)
from .fit import TrainConfig, fit_probe
from .head import HeadConfig, ProbeHead
from .guard import GuardReport, guarded_optimize
from .headfile import HeadMeta, Probe
from .novelty import NoveltyConfig
from .observers import ReliabilityHalt, ReliabilityMonitor, ReliabilityTrajectory
from .taps import find_tap

__all__ = [
    "ActiveLearner",
    "BackboneError",
    "EmptyStructureError",
    "GuardReport",
    "HeadConfig",
    "HeadFileError",
    "HeadMeta",
    "InputError",
    "LabelError",
    "MismatchError",
    "MissingReferenceError",
    "NonFiniteError",
    "NoveltyConfig",
    "Probe",
    "ProbeCalculator",
    "ProbeError",
    "ProbeHead",
    "ReliabilityHalt",
    "ReliabilityMonitor",
    "ReliabilityTrajectory",
    "TrainConfig",
    "UnknownElementError",
    "annotate",
    "featurize",
    "find_tap",
    "fit_probe",
    "guarded_optimize",
    "read_frames",
]
__version__ = "0.1.0"
