"""Held-out splits of the fit pool: stratified train / validation / calibration."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from probe_ase.exceptions import LabelError
from probe_ase.fitting.train import TrainConfig


def split_indices(labels: np.ndarray, train: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / validation / calibration indices."""
    idx = np.arange(len(labels))
    n_minor = int(min(labels.sum(), len(labels) - labels.sum()))
    if n_minor < 6:
        raise LabelError(f"only {n_minor} structures in the minority class; at least 6 are needed to train and calibrate",
                         n=len(labels), n_reliable=int(labels.sum()), n_minor=n_minor)
    rest, cal = train_test_split(idx, test_size=train.cal_fraction, stratify=labels, random_state=train.seed)
    val_share = train.val_fraction / (1 - train.cal_fraction)
    tr, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=train.seed)
    return np.sort(tr), np.sort(val), np.sort(cal)


