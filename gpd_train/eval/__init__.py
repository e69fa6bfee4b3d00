"""Evaluation: metrics, the learned feature space, the detail metric, reports."""
