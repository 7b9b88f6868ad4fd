"""The conversion's own errors (kept apart so that every conversion module can raise them)."""

from __future__ import annotations

from core.errors import UserError


class ConversionError(RuntimeError):
    """A conversion task failed or the conversion broke one of its own invariants (a bug,
    reported with its traceback) unless it is a :class:`ConversionRefused`."""


class ConversionRefused(ConversionError, UserError):
    """The options, the checkpoint or the destination refuse the conversion (one line)."""
