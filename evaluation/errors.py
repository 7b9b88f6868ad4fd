"""The evaluation's own error (kept apart so that its options and its runner can both raise it)."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Settings or preconditions that make the evaluation impossible (reported as one line)."""
