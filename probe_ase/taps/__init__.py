"""Backbone taps: one adapter per backbone behind :class:`~probe_ase.taps.base.Tap`.

:func:`find_tap` picks the adapter for a calculator, looking inside ASE's
mixing calculators (``SumCalculator``, ``LinearCombinationCalculator``,
``MixedCalculator``) for the one backbone they hold.
"""

from __future__ import annotations

from collections.abc import Sequence

from ase.calculators.calculator import BaseCalculator
from ase.calculators.mixing import LinearCombinationCalculator

from ..exceptions import BackboneError
from .base import Prediction, Tap
from .mace import MaceTap
from .schnetpack import SchNetPackTap

TAPS: tuple[type[Tap], ...] = (MaceTap, SchNetPackTap)


def backbone_calculators(calc: BaseCalculator) -> list[tuple[type[Tap], BaseCalculator]]:
    """Every (tap class, calculator) pair for supported backbones inside ``calc``."""
    for tap_cls in TAPS:
        if tap_cls.accepts(calc):
            return [(tap_cls, calc)]
    if isinstance(calc, LinearCombinationCalculator):
        members = getattr(calc, "mixer", calc).calcs  # ASE >= 3.23 keeps them in a Mixer
        return [pair for member in members for pair in backbone_calculators(member)]
    return []


def find_tap(calc: BaseCalculator, layers: Sequence[int] | None = None) -> Tap:
    """Attach the right tap to the one backbone in ``calc`` (hooks are live on return)."""
    found = backbone_calculators(calc)
    if len(found) != 1:
        kinds = ", ".join(t.kind for t in TAPS)
        what = "no" if not found else f"{len(found)}"
        raise BackboneError(
            f"{what} supported backbone calculators ({kinds}) found in {type(calc).__name__}; "
            "probe-ase needs exactly one"
        )
    tap_cls, backbone = found[0]
    return tap_cls(backbone, layers)


__all__ = ["TAPS", "MaceTap", "Prediction", "SchNetPackTap", "Tap", "backbone_calculators", "find_tap"]
