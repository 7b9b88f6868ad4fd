"""What every entry point does the same way (interfaces.md).

- exit 0 on success; non-zero with a one-line reason on stderr otherwise;
- with --json, the last stdout line is one JSON object summarising the run;
- without --address and RAY_ADDRESS, a local Ray is started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """Bad input or a failed precondition: reported as one line, no traceback."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (ray://, http://HEAD:8265's GCS, or 'auto'); "
        "default: RAY_ADDRESS, else a new local Ray",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON summary as the last stdout line"
    )


def init_ray(address: str | None, **kwargs) -> None:
    """Connect to ADDRESS / RAY_ADDRESS, or start a local Ray.

    Workers get the repository on PYTHONPATH so the packages import the same way under
    `python -m` and under `ray job submit --working-dir .`.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = kwargs.pop("runtime_env", None) or {}
    if address is None:
        env_vars = dict(runtime_env.get("env_vars", {}))
        env_vars.setdefault("PYTHONPATH", _pythonpath())
        runtime_env = {**runtime_env, "env_vars": env_vars}
    # "local", not None: ray.init(None) would join any cluster `ray start` left on this machine.
    ray.init(address=address or "local", runtime_env=runtime_env or None,
             log_to_driver=kwargs.pop("log_to_driver", True), **kwargs)


def _pythonpath() -> str:
    parts = [str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


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
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {type(exc).__name__}: {reason}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code or 0)
