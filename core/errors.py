"""Errors users see, and how an exception becomes the one line they read."""

from __future__ import annotations


class UserError(Exception):
    """Anything the user can fix (bad input, options, destination, environment): the entry
    points report it as one line, no traceback, exit 2 (core.cli.run_main). Every refusal of
    every stage is one of these; any other exception is a bug and keeps its traceback."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
