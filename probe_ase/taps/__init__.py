"""Backbone adapters behind :class:`~probe_ase.taps.base.Tap`, and their registry.

:data:`ADAPTERS` is the single list of shipped adapters: :func:`find_tap`
picks from it, :func:`probe_ase.backbones.load_backbone` loads model files
through it, the CLI's ``--backbone-type`` choices and the test suite's
backbone parametrisation come from it. :class:`ModuleTap` taps a backbone no
adapter knows, from modules you name.

:func:`find_tap` looks inside ASE's mixing calculators (``SumCalculator``,
``LinearCombinationCalculator``, ``MixedCalculator``) for the one backbone
they hold.
"""

from __future__ import annotations

from collections.abc import Sequence

from ase.calculators.calculator import BaseCalculator
from ase.calculators.mixing import LinearCombinationCalculator

from probe_ase.exceptions import BackboneError
from probe_ase.taps.base import Prediction, Tap
from probe_ase.taps.chgnet import CHGNetTap
from probe_ase.taps.generic import ModuleTap
from probe_ase.taps.mace import MaceTap
from probe_ase.taps.schnetpack import PaiNNTap, SchNetTap
from probe_ase.taps.sevenn import SevenNetTap

#: every shipped adapter by ``kind`` (each backbone library is a pip extra, imported only when used)
ADAPTERS: dict[str, type[Tap]] = {cls.kind: cls for cls in (MaceTap, SchNetTap, PaiNNTap, CHGNetTap, SevenNetTap)}


def adapter(kind: str) -> type[Tap]:
    """The adapter registered as ``kind`` (or as one of its ``aliases``)."""
    for cls in ADAPTERS.values():
        if kind == cls.kind or kind in cls.aliases:
            return cls
    raise BackboneError(f"no backbone adapter {kind!r}; known: {', '.join(ADAPTERS)}", kind=kind)


def backbone_calculators(calc: BaseCalculator) -> list[tuple[type[Tap], BaseCalculator]]:
    """Every (adapter, calculator) pair for supported backbones inside ``calc``."""
    for tap_cls in ADAPTERS.values():
        if tap_cls.accepts(calc):
            return [(tap_cls, calc)]
    if isinstance(calc, LinearCombinationCalculator):
        members = getattr(calc, "mixer", calc).calcs  # ASE >= 3.23 keeps them in a Mixer
        return [pair for member in members for pair in backbone_calculators(member)]
    return []


def find_tap(calc: BaseCalculator, layers: Sequence[int] | None = None, channels: str | None = None) -> Tap:
    """Attach the right adapter to the one backbone in ``calc`` (hooks are live on return).

    ``layers``: the interaction layers to tap (default all); ``channels``: which
    invariant channels of each (one of the adapter's ``channel_sets``; default
    its ``default_channels``).
    """
    found = backbone_calculators(calc)
    if len(found) != 1:
        kinds = ", ".join(ADAPTERS)
        what = "no" if not found else f"{len(found)}"
        raise BackboneError(
            f"{what} supported backbone calculators ({kinds}) found in {type(calc).__name__}; "
            "probe-ase needs exactly one (for another backbone, name its feature modules with ModuleTap)",
            calculator=type(calc).__name__, found=len(found),
        )
    tap_cls, backbone = found[0]
    return tap_cls(backbone, layers, channels)


__all__ = ["ADAPTERS", "CHGNetTap", "MaceTap", "ModuleTap", "PaiNNTap", "Prediction", "SchNetTap", "SevenNetTap", "Tap",
           "adapter", "backbone_calculators", "find_tap"]
