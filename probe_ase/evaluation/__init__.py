"""Evaluation of a fitted head on labelled frames: metrics, report, plots."""
