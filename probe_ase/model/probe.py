"""The fitted PROBE head as one object: prediction, verdicts and the backbone check.

A :class:`Probe` holds the head, its novelty model and its metadata
(:class:`~probe_ase.model.headfile.HeadMeta`); :func:`~probe_ase.fit_probe` returns
one, :meth:`Probe.load` reads one from a head file
(:mod:`probe_ase.model.headfile`).
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from probe_ase.exceptions import MismatchError
from probe_ase.model.head import ProbeHead, batch_inputs
from probe_ase.model.headfile import HeadMeta, load_head, save_head
from probe_ase.model.novelty import NoveltyModel, per_structure
from probe_ase.verdict import Verdict, judge

if TYPE_CHECKING:
    from probe_ase.fitting.spec import FitSpec
    from ase.calculators.calculator import Calculator

    from probe_ase.taps import Tap

@dataclass(frozen=True)
class Scores:
    """What the head says about a batch of structures.

    Attributes:
        reliability: calibrated probability per structure (0-1).
        importance: attention importance per atom (sums to 1 per structure).
        atom_novelty: per atom, on the scale of :mod:`probe_ase.model.novelty` (<= 1 inside the support).
        novelty: per structure, the largest atom novelty.
        atom_reliability: per atom, calibrated P(|ΔF_i| <= atom tolerance)
            (0-1); empty when the head has no per-atom logit.
        atom_force_error: per atom, the head's predicted force-error norm
            ``|ΔF_i|`` (eV/Å; median-like, see :class:`~probe_ase.model.head.HeadConfig`
            ``atom_error``); empty when the head does not regress atom errors.
        force_error: per structure, the predicted force RMSE (eV/Å) as the
            ``force_rmse`` criterion defines it, over all force components:
            ``sqrt(mean_i atom_force_error_i**2 / 3)``; empty likewise.
    """

    reliability: np.ndarray
    importance: np.ndarray
    atom_novelty: np.ndarray
    novelty: np.ndarray
    atom_reliability: np.ndarray
    atom_force_error: np.ndarray
    force_error: np.ndarray


@dataclass
class Probe:
    """A fitted PROBE head with its metadata: what :func:`~probe_ase.fit_probe` returns.

    ``probe.report`` summarises the fit; ``probe.save(path)`` writes the head
    file and ``Probe.load(path)`` reads it back.
    """

    head: ProbeHead
    meta: HeadMeta
    novelty: NoveltyModel
    _frozen: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # one prediction at a time: the frozen TorchScript head crashed when two threads ran it at once
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:  # copies and pickles get their own lock and compiled head
        return {"head": self.head, "meta": self.meta, "novelty": self.novelty}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def report(self) -> dict:
        """The fitting summary stored in the head's metadata (``meta.report``)."""
        return self.meta.report

    @property
    def spec(self) -> FitSpec:
        """The settings the head was fitted with: ``fit_probe(calc, data, **probe.spec)`` fits it again."""
        return self.meta.spec

    @property
    def p_star(self) -> float:
        """The operating threshold p* on reliability (``meta.p_star``)."""
        return self.meta.p_star

    def save(self, path: str | os.PathLike) -> None:
        """Write the head file to ``path`` atomically."""
        save_head(self.head, self.novelty, self.meta, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Probe:
        """Read a head file (never executes code)."""
        return cls(*load_head(path))

    def tap_for(self, calc: Calculator) -> Tap:
        """A tap on the backbone in ``calc`` reading what this head reads (its layers and channels); close it after."""
        from probe_ase.taps import find_tap

        return find_tap(calc, self.meta.layers, self.meta.channels)

    def check_backbone(self, tap: Tap) -> None:
        """Raise :class:`MismatchError` unless the head was fitted on the backbone ``tap`` watches, its layers and
        channels."""
        m = self.meta
        kind, layers, feature_dim = tap.kind, tap.layers, tap.feature_dim
        if m.backbone not in (kind, *tap.aliases):
            raise MismatchError(f"head was fitted on a {m.backbone} backbone, not {kind}", expected=m.backbone, found=kind)
        if tap.channels != m.channels:
            raise MismatchError(f"head reads the {m.channels!r} channels of each layer; the tap gives {tap.channels!r} "
                                f"(build it with channels={m.channels!r}, or use Probe.tap_for)",
                                expected=m.channels, found=tap.channels)
        if tuple(layers) != m.layers or feature_dim != m.feature_dim:
            raise MismatchError(
                f"head reads {m.feature_dim} features from layers {list(m.layers)}; "
                f"the tap gives {feature_dim} from layers {list(layers)}",
                expected=(m.layers, m.feature_dim), found=(tuple(layers), feature_dim),
            )
        fingerprint = tap.fingerprint()
        if fingerprint != m.fingerprint:
            raise MismatchError(
                f"head was fitted on backbone {m.fingerprint[:12]}..., but this backbone is {fingerprint[:12]}... "
                "(a different or retrained model); refit the head for it",
                expected=m.fingerprint, found=fingerprint,
            )

    def to(self, device: torch.device | str) -> Probe:
        """Move head and novelty model to ``device``; returns self."""
        self.head.to(device)
        self.novelty.to(device)
        return self

    def predict(
        self, features: torch.Tensor, numbers: torch.Tensor, ptr: np.ndarray, edges: Sequence[np.ndarray]
    ) -> Scores:
        """Reliability, novelty and predicted force RMSE per structure; the per-atom results (atoms concatenated).

        The probabilities follow the head file's score formula (:class:`~probe_ase.model.calibration.Calibration`).
        """
        inputs = batch_inputs(features, numbers, ptr, edges, range(len(ptr) - 1))
        with self._lock, torch.inference_mode():
            logits, importance, atom_logits, atom_error = self._compiled()(*inputs)
            atom_novelty = self.novelty(inputs[0], inputs[1])
            novelty = per_structure(atom_novelty, inputs[3], inputs[4], "max")
            calibration = self.meta.calibration
            p = calibration.reliability(logits, per_structure(atom_novelty, inputs[3], inputs[4], "mean"))
            atom_p = calibration.atom_reliability(atom_logits)
            error = (per_structure(atom_error.square(), inputs[3], inputs[4], "mean") / 3).sqrt() \
                if atom_error.numel() else atom_error  # the force_rmse criterion's RMS over components
        return Scores(*(t.cpu().numpy().astype(float)
                        for t in (p, importance, atom_novelty, novelty, atom_p, atom_error, error)))

    def verdict(self, scores: Scores, threshold: float | None = None, max_novelty: float = 1.0,
                disagreement: np.ndarray | None = None, vouch: float = 0.0) -> Verdict:
        """The verdict on ``scores`` (:func:`~probe_ase.verdict.judge`) at ``threshold`` (0-1; default the certified
        p*) and the support edge ``max_novelty`` (default 1); with a companion's ``disagreement`` per structure (on
        the head's criterion scale, NaN where not measured) against the head's tau, and its ``vouch`` (0-1)."""
        return judge(scores.reliability, scores.novelty, self.meta.p_star if threshold is None else threshold,
                     max_novelty, disagreement, self.meta.tau, vouch)

    def atom_verdict(self, atom_reliability: np.ndarray, atom_novelty: np.ndarray, threshold: float | None = None,
                     max_novelty: float = 1.0) -> np.ndarray:
        """Per atom: reliable iff ``atom_reliability >= threshold`` and ``atom_novelty <= max_novelty``.

        ``threshold`` defaults to the head's ``atom_p_star``; a head without a
        per-atom logit raises :class:`MismatchError`.
        """
        if not self.meta.local:
            raise MismatchError("this head has no per-atom logit: refit it with atom_tolerance= or atom_quantile=",
                                expected="per-atom logit", found=None)
        threshold = self.meta.atom_p_star if threshold is None else threshold
        return (np.asarray(atom_reliability) >= threshold) & (np.asarray(atom_novelty) <= max_novelty)

    def _compiled(self) -> torch.nn.Module:
        """The head scripted and frozen for inference (fewer small-op dispatches per step).

        Built on first use on the head's current device; falls back to the eager head where TorchScript
        cannot compile it or its outputs differ.
        """
        device = self.head.feature_mean.device
        if self._frozen is None or self._frozen[0] != device:
            try:
                head = copy.deepcopy(self.head).eval()
                frozen = torch.jit.freeze(torch.jit.script(head))
                self._check_compiled(frozen)
            except Exception as err:  # noqa: BLE001 - an optimisation only; the eager head is exact
                warnings.warn(f"TorchScript could not compile the head ({err}); running it eagerly", stacklevel=3)
                frozen = self.head
            self._frozen = (device, frozen)
        return self._frozen[1]

    def _check_compiled(self, frozen: torch.nn.Module) -> None:
        """Raise unless ``frozen`` gives the eager head's outputs on a small structure of the head's elements."""
        head = self.head
        device = head.feature_mean.device
        n = 2 * len(head.elements)
        features = torch.linspace(-1, 1, n * head.feature_dim, device=device).view(n, head.feature_dim)
        numbers = torch.tensor(head.elements, device=device).repeat(2)
        index = torch.arange(n, device=device)
        edges = torch.stack([index, index.roll(1)], 0)
        edges = torch.cat([edges, torch.stack([index, index])], 1)  # neighbours and every atom's self loop
        inputs = (features, numbers, edges, torch.zeros(n, dtype=torch.long, device=device), 1)
        with torch.inference_mode():
            for got, expected in zip(frozen(*inputs), head(*inputs)):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
