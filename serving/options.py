"""ServeOptions: everything ``ray_jobs.serve`` accepts (interfaces.md), as one model.

``address`` and ``json`` are flags every entry point shares (ray_jobs/_cli.py), not options.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.options import StageOptions

_K8S = {"group": "kubernetes backend"}


def _port(what: str) -> str:
    return (f"{what} port; 0 picks a free one; with several replicas, replica i gets PORT + i "
            f"(default 0)")


class ServeOptions(StageOptions):
    """Everything ``ray_jobs.serve`` accepts (interfaces.md)."""

    model_repository: str = Field(
        description="Triton model repository root: a local folder or gs://bucket/prefix "
        "(local backend: each server downloads a gs:// model to its node first)")
    model_name: str = Field(description="the model to load (a folder in it)")
    backend: Literal["local", "kubernetes"] = Field(
        "local", description="local: tritonserver on the Ray cluster's nodes (default); "
        "kubernetes: a Triton Deployment and Service")
    replicas: int = Field(1, description="number of servers (default 1)")
    grpc_port: int = Field(0, description=_port("gRPC"))
    http_port: int = Field(0, description=_port("HTTP"))
    metrics_port: int = Field(0, description=_port("metrics"))
    host: str = Field(
        "127.0.0.1", description="address to bind; 0.0.0.0 binds all and advertises each "
        "node's IP (default 127.0.0.1)")
    ready_timeout: float = Field(
        300.0, description="seconds to wait for every replica to be ready (default 300)")
    num_cpus: float = Field(
        1.0, description="local: Ray CPUs each server's actor reserves (default 1)")
    log_verbose: int = Field(0, description="tritonserver --log-verbose level")
    namespace: str = Field("default", description="namespace (default 'default')",
                           json_schema_extra=_K8S)
    image: str | None = Field(None, description="Triton image to run", json_schema_extra=_K8S)
    kubeconfig: str | None = Field(
        None, description="kubeconfig file (default: in-cluster config, else ~/.kube/config)",
        json_schema_extra=_K8S)
    service_account: str | None = Field(
        None, description="Kubernetes service account for the pods (Workload Identity for "
        "gs://)", json_schema_extra=_K8S)
