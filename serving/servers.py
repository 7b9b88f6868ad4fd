"""What every serving backend answers (:class:`Servers`), its ``with`` base and its error.

Kept apart from :mod:`serving.api` so that the backends (:mod:`serving.kubernetes`) build on it
without importing the door that chooses them.
"""

from __future__ import annotations

from typing import Any, Protocol

from core.errors import UserError


class ServeError(UserError):
    """The servers could not start or become ready (one line, for the user)."""


class Servers(Protocol):
    """What :func:`open_servers` returns, whatever the backend."""

    def start(self) -> list[dict[str, str]]:
        """Start every replica, wait until ready; ``[{"grpc", "http", "metrics"}]`` each."""

    def grpc_urls(self) -> list[str]:
        """``host:port`` of every replica's gRPC endpoint."""

    def status(self) -> list[dict[str, Any]]:
        """Per replica ``{"ready": bool, ...}`` (local adds ``"restarts"``)."""

    def alive(self) -> bool:
        """Started and not stopped."""

    def stop(self) -> None:
        """Stop everything started; safe to call twice."""

    def __enter__(self) -> Servers: ...

    def __exit__(self, *exc: object) -> None: ...


class ServersBase:
    """``with`` for a :class:`Servers` implementation: start on entry, stop on exit."""

    def start(self) -> list[dict[str, str]]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Servers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
