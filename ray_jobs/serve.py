"""Serve a Triton model repository, launched and watched by Ray (interfaces.md, ray_jobs.serve).

    python -m ray_jobs.serve --model-repository DST --model-name NAME [--replicas N] [--json]

When every replica is ready, prints ONE JSON line
``{"model": NAME, "endpoints": [{"grpc": "HOST:PORT", "http": ..., "metrics": ...}, ...]}``
and keeps serving until SIGINT or SIGTERM, then stops every server it started and exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from ray_jobs._cli import UserError, add_common_arguments, init_ray, run_main

# How often the driver asks the replicas how they are (restarts are reported on stderr).
_MONITOR_PERIOD_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.serve",
        description="Serve NAME from a Triton model repository with tritonserver processes "
        "owned by Ray actors (local) or as a Kubernetes Deployment (kubernetes). Prints one "
        "JSON line with the endpoints once every replica is ready, then serves until "
        "SIGINT/SIGTERM and stops every server it started.",
    )
    p.add_argument("--model-repository", required=True,
                   help="Triton model repository root: a local folder or gs://bucket/prefix "
                   "(local backend: each server downloads a gs:// model to its node first)")
    p.add_argument("--model-name", required=True, help="the model to load (a folder in it)")
    p.add_argument("--backend", choices=("local", "kubernetes"), default="local",
                   help="local: tritonserver on the Ray cluster's nodes (default); "
                   "kubernetes: a Triton Deployment and Service")
    p.add_argument("--replicas", type=int, default=1, help="number of servers (default 1)")
    for name, what in (("grpc", "gRPC"), ("http", "HTTP"), ("metrics", "metrics")):
        p.add_argument(f"--{name}-port", type=int, default=0,
                       help=f"{what} port; 0 picks a free one; with several replicas, "
                       f"replica i gets PORT + i (default 0)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 binds all and advertises each node's IP "
                   "(default 127.0.0.1)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for every replica to be ready (default 300)")
    p.add_argument("--num-cpus", type=float, default=1.0,
                   help="local: Ray CPUs each server's actor reserves (default 1)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    k8s = p.add_argument_group("kubernetes backend")
    k8s.add_argument("--namespace", default="default", help="namespace (default 'default')")
    k8s.add_argument("--image", default=None, help="Triton image to run")
    k8s.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster "
                     "config, else ~/.kube/config)")
    k8s.add_argument("--service-account", default=None,
                     help="Kubernetes service account for the pods (Workload Identity for gs://)")
    add_common_arguments(p)
    return p


def _check(args: argparse.Namespace) -> None:
    if args.replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {args.replicas}")
    for name in ("grpc_port", "http_port", "metrics_port"):
        port = getattr(args, name)
        if not 0 <= port <= 65535 - args.replicas:
            raise UserError(f"--{name.replace('_', '-')} {port} is not a usable port")
    if args.ready_timeout <= 0:
        raise UserError(f"--ready-timeout must be > 0, got {args.ready_timeout}")


def _install_signal_handlers(stop: threading.Event, ready: threading.Event) -> None:
    """SIGINT/SIGTERM end the serving loop; before ready they abort the start-up."""

    def _on_signal(signum, _frame) -> None:
        print(f"received {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        stop.set()
        if not ready.is_set():
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def serve_local(args: argparse.Namespace) -> int:
    import ray

    from serving.local import LocalServers, ServerError

    repo = args.model_repository
    if not repo.startswith("gs://") and \
            not (Path(repo) / args.model_name / "config.pbtxt").is_file():
        raise UserError(f"{repo}/{args.model_name}/config.pbtxt not found")
    try:
        # gs://: checked here, downloaded by each server's actor on its own node.
        servers = LocalServers(repo, args.model_name, replicas=args.replicas, host=args.host,
                               grpc_port=args.grpc_port, http_port=args.http_port,
                               metrics_port=args.metrics_port,
                               ready_timeout=args.ready_timeout, num_cpus=args.num_cpus,
                               log_verbose=args.log_verbose)
    except ServerError as exc:
        raise UserError(str(exc)) from None

    init_ray(args.address)
    # After ray.init, so these handlers are the ones in force.
    stop, ready = threading.Event(), threading.Event()
    _install_signal_handlers(stop, ready)
    try:
        print(f"starting {args.replicas} tritonserver replica(s) for {args.model_name}",
              file=sys.stderr, flush=True)
        try:
            endpoints = servers.start()
        except ServerError as exc:
            raise UserError(str(exc)) from None
        ready.set()
        # The ready line: always JSON, whatever --json says (readers wait for it).
        print(json.dumps({"model": args.model_name, "endpoints": endpoints}), flush=True)
        restarts = [0] * len(endpoints)
        while not stop.wait(_MONITOR_PERIOD_S):
            try:
                status = servers.status()
            except ray.exceptions.RayActorError as exc:
                raise UserError(f"a server's actor died: {exc}") from None
            for i, s in enumerate(status):
                if s["restarts"] != restarts[i]:
                    restarts[i] = s["restarts"]
                    print(f"replica {i} restarted ({restarts[i]} so far), ready={s['ready']}",
                          file=sys.stderr, flush=True)
        print("stopping servers", file=sys.stderr, flush=True)
        return 0
    finally:
        servers.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    if args.backend == "kubernetes":
        from serving import kubernetes

        return kubernetes.serve(args)
    return serve_local(args)


if __name__ == "__main__":
    run_main(main)
