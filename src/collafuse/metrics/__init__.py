"""Evaluation of samples (more metrics come with the evaluation issue)."""

from .agreement import LabelClassifier

__all__ = ["LabelClassifier"]
