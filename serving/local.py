"""Triton servers on the Ray cluster's own nodes: one Ray actor owns one ``tritonserver``.

The process itself (backend layout, environment, staging of gs:// repositories, restarts) is
:class:`serving.tritonserver.TritonServer`, which runs without Ray too; here each replica's
server lives in a :class:`TritonServerActor`, spread over the nodes.

:class:`LocalServers` is the driver-side handle::

    with LocalServers(repo, "t5", replicas=2) as servers:
        servers.endpoints  # [{"grpc": "127.0.0.1:PORT", "http": ..., "metrics": ...}, ...]
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import ray

from serving.tritonserver import (
    _ANY_HOSTS,
    ServerError,
    TritonServer,
    check_repository,
    is_gcs,
)

__all__ = ["LocalServers", "ServerError", "TritonServerActor"]


@ray.remote(max_restarts=0, max_concurrency=4)
class TritonServerActor:
    """A Ray actor owning one :class:`TritonServer` (one replica)."""

    def __init__(self, model_repository: str, model_name: str, host: str = "127.0.0.1",
                 *args, **kwargs) -> None:
        # Endpoints name the node as Ray knows it (RAY_NODE_IP_ADDRESS may override it).
        if host in _ANY_HOSTS:
            kwargs.setdefault("advertised_host", ray.util.get_node_ip_address())
        self.server = TritonServer(model_repository, model_name, host, *args, **kwargs)

    def node_ip(self) -> str:
        """The IP Ray knows this actor's node by."""
        return ray.util.get_node_ip_address()

    def node_id(self) -> str:
        """The Ray node id this actor runs on."""
        return ray.get_runtime_context().get_node_id()

    def start(self) -> dict[str, str]:
        """Launch the server (see TritonServer.start); the endpoints, not yet ready."""
        return self.server.start()

    def wait_ready(self, timeout_s: float) -> dict[str, str]:
        """Block until the server and its model are ready; the endpoints."""
        return self.server.wait_ready(timeout_s)

    def is_ready(self) -> bool:
        """Server and model ready now."""
        return self.server.is_ready()

    def kill(self) -> int:
        """SIGKILL the tritonserver process (tests); its pid."""
        return self.server.kill()

    def status(self) -> dict[str, Any]:
        """The server's status dict (ready, restarts, pid, ...)."""
        return self.server.status()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of tritonserver.log."""
        return self.server.log_tail(lines)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        self.server.stop()


def _runtime_env() -> dict | None:
    """GCS emulator / auth variables of this process, for the actors (they stage gs://)."""
    from core.gcs_env import forwarded_env

    env = forwarded_env()
    return {"env_vars": env} if env else None


class LocalServers:
    """``replicas`` tritonservers for one model, each owned by an actor, spread over nodes.

    Args:
      model_repository: a local model repository folder (every node must see the path; on one
        machine that is always so), or a gs:// URL that each server downloads on its node.
      model_name: the model to load.
      replicas: how many servers.
      host: bind address; ``0.0.0.0`` advertises each node's IP.
      grpc_port / http_port / metrics_port: 0 picks free ports; N gives replica i port N + i.
      ready_timeout: seconds to wait for every replica to be ready.
      num_cpus: Ray CPUs each actor holds, so other work is not scheduled onto its cores.

    Ray must be initialised (``ray_jobs._cli.init_ray``).
    """

    def __init__(self, model_repository: str, model_name: str, replicas: int = 1,
                 host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0,
                 metrics_port: int = 0, ready_timeout: float = 300.0,
                 num_cpus: float = 1.0, log_verbose: int = 0) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        check_repository(model_repository, model_name)
        self.model_repository = model_repository if is_gcs(model_repository) \
            else str(Path(model_repository).resolve())
        self.model_name = model_name
        self.replicas = replicas
        self.host = host
        self.ports = (grpc_port, http_port, metrics_port)
        self.ready_timeout = ready_timeout
        self.num_cpus = num_cpus
        self.log_verbose = log_verbose
        self.actors: list[ray.actor.ActorHandle] = []
        self.endpoints: list[dict[str, str]] = []

    def start(self) -> list[dict[str, str]]:
        """Start every replica and wait until all are ready; returns their endpoints."""
        if not ray.is_initialized():
            raise ServerError("Ray is not initialised; call ray_jobs._cli.init_ray first")
        try:
            for i in range(self.replicas):
                ports = [p + i if p else 0 for p in self.ports]
                actor = TritonServerActor.options(
                    num_cpus=self.num_cpus, scheduling_strategy="SPREAD",
                    runtime_env=_runtime_env()).remote(self.model_repository, self.model_name, self.host, *ports,
                         log_verbose=self.log_verbose)
                self.actors.append(actor)
            try:
                ray.get([a.start.remote() for a in self.actors])
            except ray.exceptions.RayActorError as exc:
                # The actor's constructor failed (bad repository, download error): say why.
                lines = [ln for ln in str(exc).splitlines() if "Error:" in ln]
                raise ServerError(lines[-1].strip() if lines else str(exc)) from None
            self.endpoints = self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def wait_ready(self, timeout: float | None = None) -> list[dict[str, str]]:
        """Block until every replica is ready (after a restart too)."""
        timeout = self.ready_timeout if timeout is None else timeout
        try:
            return ray.get([a.wait_ready.remote(timeout) for a in self.actors])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
            raise ServerError(str(cause).splitlines()[-1] if str(cause) else repr(cause)) \
                from None

    def kill(self, i: int) -> int:
        """SIGKILL replica i's tritonserver (not its actor): the watcher must bring it back."""
        return ray.get(self.actors[i].kill.remote())

    def status(self) -> list[dict[str, Any]]:
        """Every replica's :meth:`TritonServer.status` (ready, restarts, ...)."""
        return ray.get([a.status.remote() for a in self.actors])

    def node_ids(self) -> list[str]:
        """The Ray node each replica runs on."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def stop(self) -> None:
        """Stop every server, then its actor. Safe to call twice."""
        actors, self.actors = self.actors, []
        if not actors:
            return
        with contextlib.suppress(Exception):
            ray.get([a.stop.remote() for a in actors], timeout=60)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)

    def __enter__(self) -> LocalServers:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

