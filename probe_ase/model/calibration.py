"""The score formula: how the head's raw logits become calibrated probabilities, at fit time and at every step.

``reliability = sigmoid((logit - novelty_weight * log(max(n, NOVELTY_FLOOR))) / temperature)``, ``n`` the
structure's mean atom novelty;
``atom_reliability = sigmoid(atom_logit / atom_temperature)``. :func:`~probe_ase.fit_probe` fits the numbers
(:mod:`probe_ase.fitting.calibrate`), the head file stores them, :meth:`~probe_ase.model.probe.Probe.predict`
applies them: one implementation for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from probe_ase.exceptions import InputError
from probe_ase.model.novelty import logit_penalty


@dataclass(frozen=True)
class Calibration:
    """The fitted numbers of the score formula (see the module docstring).

    Attributes:
        temperature: divides the structure logit (> 0).
        novelty_weight: how much ``log(novelty)`` lowers the logit (>= 0).
        atom_temperature: divides the per-atom logit (> 0; 1 for heads without one).
    """

    temperature: float = 1.0
    novelty_weight: float = 0.0
    atom_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and self.atom_temperature > 0 and self.novelty_weight >= 0):
            raise InputError(f"temperatures must be > 0 and the novelty weight >= 0, got {self.temperature}, "
                             f"{self.atom_temperature} and {self.novelty_weight}", temperature=self.temperature,
                             atom_temperature=self.atom_temperature, novelty_weight=self.novelty_weight)

    def logit(self, logits: torch.Tensor, novelty: torch.Tensor) -> torch.Tensor:
        """The novelty-penalised logit before temperature scaling; ``novelty``: each structure's mean atom novelty."""
        return logits - logit_penalty(novelty, self.novelty_weight).to(logits.dtype)

    def reliability(self, logits: torch.Tensor, novelty: torch.Tensor) -> torch.Tensor:
        """Calibrated probability (0-1) per structure from raw logits and each structure's mean atom novelty."""
        return self.probability(self.logit(logits, novelty))

    def probability(self, penalised: torch.Tensor | np.ndarray | float) -> torch.Tensor | np.ndarray | float:
        """``sigmoid(penalised / temperature)`` of penalised logits (tensor, array or float alike)."""
        if isinstance(penalised, torch.Tensor):
            return torch.sigmoid(penalised / self.temperature)
        if isinstance(penalised, np.ndarray):
            return 1 / (1 + np.exp(-penalised / self.temperature))
        return 1 / (1 + math.exp(-penalised / self.temperature))

    def atom_reliability(self, atom_logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probability (0-1) per atom that its force error is within the atom tolerance."""
        return torch.sigmoid(atom_logits / self.atom_temperature)
