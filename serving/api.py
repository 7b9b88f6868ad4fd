"""Serving's public door: ``open_servers(opts)`` gives the servers for either backend.

::

    with open_servers(opts) as servers:      # local: Ray must already be initialised
        endpoints = servers.start()          # every replica ready (idempotent)
        urls = servers.grpc_urls()

``local`` runs tritonserver processes owned by Ray actors (:mod:`serving.local`);
``kubernetes`` a Triton Deployment and Service (:mod:`serving.kubernetes`). Both answer the
same :class:`Servers` calls; errors a user can act on are :class:`ServeError` (one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.repository import config_url
from serving.servers import ServeError, Servers, ServersBase

if TYPE_CHECKING:
    from serving.local import LocalServers
    from serving.options import ServeOptions


class _Local(ServersBase):
    """:class:`serving.local.LocalServers` with :class:`ServeError` for its failures."""

    def __init__(self, servers: LocalServers) -> None:
        self.servers = servers
        self.endpoints: list[dict[str, str]] = []

    def start(self) -> list[dict[str, str]]:
        from serving.local import ServerError

        if not self.endpoints:
            try:
                self.endpoints = self.servers.start()
            except ServerError as exc:
                raise ServeError(str(exc)) from None
        return self.endpoints

    def grpc_urls(self) -> list[str]:
        return [e["grpc"] for e in self.endpoints]

    def status(self) -> list[dict[str, Any]]:
        import ray

        try:
            return self.servers.status()
        except ray.exceptions.RayActorError as exc:
            raise ServeError(f"a server's actor died: {exc}") from None

    def alive(self) -> bool:
        return bool(self.servers.actors)

    def stop(self) -> None:
        self.endpoints = []
        self.servers.stop()


def _check_host(host: str) -> None:
    """Refuse a --host that is neither an IP address nor a name that resolves (tritonserver
    would die on it with a page of C++ stack)."""
    import ipaddress
    import socket

    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as exc:
        raise ServeError(f"--host {host!r} is not an IP address nor a host name that resolves "
                         f"({getattr(exc, 'strerror', None) or exc})") from None


def _check_local_config(repo: str, name: str) -> None:
    """Refuse a config.pbtxt Triton cannot parse, or whose backend the local tritonserver
    lacks (it has the Python backend only), naming the file and what is wrong."""
    from google.protobuf import text_format

    from core.repository import ConvertedModel

    path = config_url(repo, name)
    try:
        config = ConvertedModel.open(repo, name).config
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ServeError(f"{path} is not a Triton model config: {str(exc).splitlines()[0]}"
                         ) from None
    if config.backend and config.backend != "python":
        raise ServeError(f"{path} is for the {config.backend!r} backend, which the local "
                         "tritonserver (CPU, Python backend only) does not have: convert with "
                         "--engine jax to serve here, or use --backend kubernetes with "
                         "Triton's FasterTransformer image")


def open_servers(opts: ServeOptions) -> Servers:
    """The servers ``opts`` asks for, not started yet (call ``start`` or use ``with``).

    Checks the repository first: a local one must hold ``<model_name>/config.pbtxt``; the
    kubernetes backend reads it for the GPU count. Raises :class:`ServeError` (or another
    ``UserError``) with the message ``ray_jobs.serve`` prints.
    """
    if opts.backend == "kubernetes":
        from serving.kubernetes import KubernetesServers

        return KubernetesServers(opts)
    from serving.local import LocalServers, ServerError

    repo = opts.model_repository
    if not repo.startswith("gs://") and not Path(config_url(repo, opts.model_name)).is_file():
        raise ServeError(f"{config_url(repo, opts.model_name)} not found")
    _check_host(opts.host)
    if not repo.startswith("gs://"):
        _check_local_config(repo, opts.model_name)
    try:
        # gs://: checked here, downloaded by each server's actor on its own node.
        return _Local(LocalServers(
            repo, opts.model_name, replicas=opts.replicas, host=opts.host,
            grpc_port=opts.grpc_port, http_port=opts.http_port, metrics_port=opts.metrics_port,
            ready_timeout=opts.ready_timeout, num_cpus=opts.num_cpus,
            log_verbose=opts.log_verbose))
    except ServerError as exc:
        raise ServeError(str(exc)) from None
