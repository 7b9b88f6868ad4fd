"""ServeOptions: everything ``ray_jobs.serve`` accepts (interfaces.md), as one model.

``address`` and ``json`` are flags every entry point shares (ray_jobs/_cli.py), not options.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pydantic

from core.options import OptionsError, StageOptions, option

_K8S = "kubernetes backend"


def _port(what: str) -> str:
    return (f"{what} port; 0 picks a free one; with several replicas, replica i gets PORT + i "
            f"(default 0)")


class ServeOptions(StageOptions):
    """Everything ``ray_jobs.serve`` accepts (interfaces.md)."""

    # The --help description of python -m ray_jobs.serve.
    COMMAND_HELP: ClassVar[str] = (
        "Serve NAME from a Triton model repository with tritonserver processes "
        "owned by Ray actors (local) or as a Kubernetes Deployment (kubernetes). Prints one "
        "JSON line with the endpoints once every replica is ready, then serves until "
        "SIGINT/SIGTERM and stops every server it started."
    )

    model_repository: str = option(
        help="Triton model repository root: a local folder or gs://bucket/prefix "
        "(local backend: each server downloads a gs:// model to its node first)")
    model_name: str = option(help="the model to load (a folder in it)")
    backend: Literal["local", "kubernetes"] = option(
        "local", help="local: tritonserver on the Ray cluster's nodes (default); "
        "kubernetes: a Triton Deployment and Service")
    replicas: int = option(1, help="number of servers (default 1)")
    grpc_port: int = option(0, help=_port("gRPC"))
    http_port: int = option(0, help=_port("HTTP"))
    metrics_port: int = option(0, help=_port("metrics"))
    host: str = option(
        "127.0.0.1", help="address to bind; 0.0.0.0 binds all and advertises each "
        "node's IP (default 127.0.0.1)")
    ready_timeout: float = option(
        300.0, help="seconds to wait for every replica to be ready (default 300)")
    num_cpus: float = option(
        1.0, help="local: Ray CPUs each server's actor reserves (default 1)")
    log_verbose: int = option(0, help="tritonserver --log-verbose level")
    namespace: str = option("default", help="namespace (default 'default')",
                           group=_K8S)
    image: str | None = option(None, help="Triton image to run", group=_K8S)
    kubeconfig: str | None = option(
        None, help="kubeconfig file (default: in-cluster config, else ~/.kube/config)",
        group=_K8S)
    service_account: str | None = option(
        None, help="Kubernetes service account for the pods (Workload Identity for "
        "gs://)", group=_K8S)

    @pydantic.model_validator(mode="after")
    def _check(self) -> ServeOptions:
        """What no server could start with, refused the same way on every path."""
        if self.replicas < 1:
            raise OptionsError(f"--replicas must be >= 1, got {self.replicas}")
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535 - self.replicas:
                raise OptionsError(f"--{name.replace('_', '-')} {port} is not a usable port")
        if self.ready_timeout <= 0:
            raise OptionsError(f"--ready-timeout must be > 0, got {self.ready_timeout}")
        return self
