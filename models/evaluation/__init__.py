"""Fusion quality metrics, classical baselines and the evaluation report."""
