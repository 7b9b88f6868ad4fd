"""Errors users see, and how an exception becomes the one line they read."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a failed precondition: reported as one line, no traceback (exit 2)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
