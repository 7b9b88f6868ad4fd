"""How every entry point ends (interfaces.md): the summary on stdout, an error as one line.

Shared by ``ray_jobs`` and the packages' own ``python -m`` commands (cluster, the tritonserver
launcher), which sit below ray_jobs and so cannot import it.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable

from core.errors import UserError, first_line


def emit_summary(summary: dict, as_json: bool) -> None:
    """Print the run's summary: JSON on the last line with --json, else readable lines.

    The work is done by now: Ray is disconnected first, so that none of its driver-side
    messages (a node's death, say, which Ray prints to stdout) can land after the summary.
    """
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if as_json:
        print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    else:
        for key, value in summary.items():
            print(f"{key}: {value}", flush=True)


# Our packages log progress at INFO; other libraries' (jax, google-auth...) from WARNING up.
_OURS = ("core", "conversion", "serving", "evaluation", "cluster", "pipeline", "demo", "ray_jobs")


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes, not the one it
    was made with: a caller that redirects stderr (pytest's capture, contextlib) gets the lines."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging() -> None:
    """stdlib logging for a command, once: one line per record on stderr, the message alone.

    stdout is kept for results (the JSON summary); progress and logs go to stderr. The library
    reports through module loggers (``logging.getLogger(__name__)``) whose messages carry their
    own prefix (``[pipeline]``, ``convert:``, ``evaluate:``, ``[demo]``), so the text is the same
    whichever command prints it.
    """
    root = logging.getLogger()
    if not any(getattr(h, "_t5ft", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._t5ft = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for name in _OURS:
        logging.getLogger(name).setLevel(logging.INFO)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None):
    """Run an entry point: the one place a command's errors are caught.

    A :class:`core.errors.UserError` (any stage's refusal) is one stderr line, exit 2; any
    other exception is a bug: its traceback, then the same one line, exit 1.
    """
    configure_logging()
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug: its traceback, then the one line
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code or 0)
