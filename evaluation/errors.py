"""The evaluation's own error (kept apart so that its options and its runner can both raise it)."""

from __future__ import annotations

from core.errors import UserError


class EvaluationError(UserError, ValueError):
    """Settings or preconditions that make the evaluation impossible (reported as one line)."""
