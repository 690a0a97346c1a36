"""Evaluation: distances between feature sets, feature extractors, and ``collafuse eval``."""

from .agreement import LabelClassifier

__all__ = ["LabelClassifier"]
