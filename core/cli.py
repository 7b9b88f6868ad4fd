"""How every entry point ends (interfaces.md): the summary on stdout, an error as one line.

Shared by ``ray_jobs`` and the packages' own ``python -m`` commands (cluster, the tritonserver
launcher), which sit below ray_jobs and so cannot import it.
"""

from __future__ import annotations

import json
import os
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


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None):
    """Run an entry point: errors become one stderr line and a non-zero exit."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the contract is one line, the trace goes to a log
        if os.environ.get("T5FT_TRACEBACK"):
            traceback.print_exc()
        reason = first_line(exc)
        print(f"error: {type(exc).__name__}: {reason}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code or 0)
