"""``python -m serving.tritonserver``: one tritonserver for one model, without Ray."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from core.errors import UserError
from serving.tritonserver import ServerError, TritonServer, is_gcs

# By name, not __name__: ``python -m serving.tritonserver`` runs this module as __main__, a
# logger that run_main's configuration (core.cli) would not show at INFO.
LOG = logging.getLogger("serving.tritonserver")


def build_parser() -> argparse.ArgumentParser:
    """``python -m serving.tritonserver``'s flags (docs/interfaces.md)."""
    p = argparse.ArgumentParser(
        prog="python -m serving.tritonserver",
        description="Serve one model of a Triton model repository with one tritonserver "
        "process, without Ray. Prints one JSON line with the endpoints once the model is "
        "ready, restarts the server if it dies after that, and on SIGINT/SIGTERM stops it "
        "and exits 0.",
    )
    p.add_argument("--model-repository", required=True,
                   help="Triton model repository root: a local folder or gs://bucket/prefix "
                   "(downloaded to a work folder first)")
    p.add_argument("--model-name", default=None,
                   help="the model to load (a folder in it); default: the repository's only "
                   "model")
    for name, what in (("grpc", "gRPC"), ("http", "HTTP"), ("metrics", "metrics")):
        p.add_argument(f"--{name}-port", type=int, default=0,
                       help=f"{what} port; 0 picks a free one (default 0)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 binds all and advertises this machine's IP "
                   "(default 127.0.0.1)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for the model to be ready (default 300)")
    p.add_argument("--log-dir", default=None,
                   help="folder for tritonserver.log, kept after exit (default: a temporary "
                   "folder, removed on a clean stop)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    return p


def _model_name(repository: str, asked: str | None) -> str:
    """``asked``, else the one folder of a local repository that holds a config.pbtxt."""
    if asked:
        return asked
    if is_gcs(repository):
        raise UserError("--model-name is required with a gs:// repository")
    models = sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))
    if len(models) != 1:
        raise UserError(f"{repository} holds {len(models)} models ({', '.join(models) or 'none'})"
                        "; name one with --model-name")
    return models[0]


def main(argv: list[str] | None = None) -> int:
    """Start, announce, watch, stop: the command's whole life."""
    args = build_parser().parse_args(argv)
    for name in ("grpc_port", "http_port", "metrics_port"):
        if not 0 <= getattr(args, name) <= 65535:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a port")
    if args.ready_timeout <= 0:
        raise UserError(f"--ready-timeout must be > 0, got {args.ready_timeout}")
    name = _model_name(args.model_repository, args.model_name)
    try:
        server = TritonServer(args.model_repository, name, host=args.host,
                              grpc_port=args.grpc_port, http_port=args.http_port,
                              metrics_port=args.metrics_port, log_dir=args.log_dir,
                              log_verbose=args.log_verbose)
    except ServerError as exc:
        raise UserError(str(exc)) from None
    stop, ready = threading.Event(), threading.Event()

    def _on_signal(signum, _frame) -> None:
        LOG.info("received %s", signal.Signals(signum).name)
        stop.set()
        if not ready.is_set():
            raise KeyboardInterrupt  # abort the wait for readiness; finally stops the server

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        LOG.info("starting tritonserver for %s", name)
        try:
            server.start()
            server.wait_ready(args.ready_timeout)
        except ServerError as exc:
            raise UserError(str(exc)) from None
        ready.set()
        # The ready line, always JSON: readers wait for it (same shape as ray_jobs.serve's).
        print(json.dumps({"model": name, "endpoints": [server.endpoints], "pid": server.pid,
                          "log": str(server.log_path)}), flush=True)
        restarts = 0
        while not stop.wait(1.0):
            if server.restarts != restarts:
                restarts = server.restarts
                LOG.info("tritonserver restarted (%d so far)", restarts)
        LOG.info("stopping tritonserver")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    from core.cli import run_main

    run_main(main)
