"""Labelled frames to a fitted Probe: features, labels, splits, training, novelty, calibration, certificate."""
