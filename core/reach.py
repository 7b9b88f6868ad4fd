"""Whether anything listens at an endpoint, found out in seconds.

The clients behind our endpoints retry for a long time before they give up: Ray's GCS client
for minutes with no output, tritonclient's readiness loop for its timeout (60 s), the
google-cloud-storage client for about 100 s. A TCP connect answers "nothing listens there" at
once (connection refused) or within a short timeout (a dropped packet), so each entry point
asks first and a wrong address is one line within seconds.
"""

from __future__ import annotations

import socket
import time

from core.errors import UserError

# A connect to a host that drops packets waits this long; a refused one returns at once.
CONNECT_TIMEOUT_S = 5.0


class Unreachable(UserError):
    """Nothing answers at an endpoint the user named."""


def host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) of ``[scheme://]HOST[:PORT][/path]``; ValueError when there is none."""
    rest = text.split("://", 1)[1] if "://" in text else text
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):  # [v6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":")
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            host, port = rest, ""
    if not host:
        raise ValueError(f"{text!r} names no host")
    if not port:
        if default_port is None:
            raise ValueError(f"{text!r} names no port (HOST:PORT)")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def why_unreachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to HOST:PORT opens, else why not (a few words)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r} ({exc.strerror or exc})"
    except TimeoutError:
        return f"no answer within {timeout_s:.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def require(what: str, address: str, host: str, port: int, hint: str = "",
            grace_s: float = 0.0) -> None:
    """Raise :class:`Unreachable` naming WHAT at ADDRESS unless HOST:PORT accepts a connection
    within ``grace_s`` seconds (tried once a second; 0: once)."""
    deadline = time.monotonic() + grace_s
    while True:
        why = why_unreachable(host, port)
        if why is None:
            return
        if time.monotonic() >= deadline:
            raise Unreachable(f"{what} {address} is unreachable: {why}"
                              + (f"; {hint}" if hint else ""))
        time.sleep(1.0)
