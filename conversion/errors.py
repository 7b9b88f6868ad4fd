"""The conversion's own error (kept apart so that every conversion module can raise it)."""

from __future__ import annotations


class ConversionError(RuntimeError):
    """A conversion task failed, or the destination refuses the conversion."""
