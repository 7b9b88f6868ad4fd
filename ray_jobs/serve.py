"""Serve a Triton model repository, launched and watched by Ray (interfaces.md, ray_jobs.serve).

    python -m ray_jobs.serve --model-repository DST --model-name NAME [--replicas N] [--json]

When every replica is ready, prints ONE JSON line
``{"model": NAME, "endpoints": [{"grpc": "HOST:PORT", "http": ..., "metrics": ...}, ...]}``
and keeps serving until SIGINT or SIGTERM, then stops every server it started and exits 0.
The flags are serving.options.ServeOptions' fields; the servers come from serving.api.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from ray_jobs import _cli
from serving.options import ServeOptions

# How often the driver asks the replicas how they are (restarts are reported on stderr).
_MONITOR_PERIOD_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    """The command line: ServeOptions' flags plus --address and --json."""
    return _cli.stage_parser("serve", ServeOptions.COMMAND_HELP, ServeOptions)


def _install_signal_handlers(stop: threading.Event, ready: threading.Event) -> None:
    """SIGINT/SIGTERM end the serving loop; before ready they abort the start-up."""

    def _on_signal(signum, _frame) -> None:
        print(f"received {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        stop.set()
        if not ready.is_set():
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def _report_changes(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> None:
    """One stderr line per replica that restarted (local) or changed readiness (kubernetes)."""
    for i, (old, new) in enumerate(zip(before, now, strict=False)):
        if new.get("restarts", 0) != old.get("restarts", 0):
            print(f"replica {i} restarted ({new['restarts']} so far), ready={new['ready']}",
                  file=sys.stderr, flush=True)
        elif "restarts" not in new and new["ready"] != old["ready"]:
            print(f"replica {i}: {'ready again' if new['ready'] else 'not ready'}",
                  file=sys.stderr, flush=True)


def _watch(servers, stop: threading.Event, replicas: int) -> None:
    """Until STOP: ask the servers how they are every few seconds and report changes.

    A replica's actor that died is serving.api.ServeError (one line, exit 2).
    """
    last: list[dict[str, Any]] = [{"ready": True, "restarts": 0}] * replicas
    while not stop.wait(_MONITOR_PERIOD_S):
        now = servers.status()
        _report_changes(last, now)
        last = now


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, start the servers, print the ready line, serve until a signal."""
    args = build_parser().parse_args(argv)
    opts = _cli.options_from_args(ServeOptions, args)  # ServeOptions checks the values
    from serving.api import open_servers

    # Before Ray starts: a repository without the model fails at once.
    servers = open_servers(opts)
    if opts.backend == "local":
        _cli.init_ray(args.address)
    # After ray.init, so these handlers are the ones in force.
    stop, ready = threading.Event(), threading.Event()
    _install_signal_handlers(stop, ready)
    try:
        print(f"starting {opts.replicas} tritonserver replica(s) for {opts.model_name}",
              file=sys.stderr, flush=True)
        endpoints = servers.start()
        ready.set()
        # The ready line: always JSON, whatever --json says (readers wait for it).
        print(json.dumps({"model": opts.model_name, "endpoints": endpoints}), flush=True)
        _watch(servers, stop, len(endpoints))
        print("stopping servers", file=sys.stderr, flush=True)
        return 0
    finally:
        servers.stop()


if __name__ == "__main__":
    _cli.run_main(main)
