"""Readiness of one tritonserver: server and model ready, polled with a tenacity wait.

The probe is tritonclient's ``is_server_ready``/``is_model_ready`` over HTTP (the port the
launcher has always probed). The GPU machine's environment has tritonclient's gRPC side only:
without geventhttpclient, ``tritonclient.http`` does not import there. Then the same two GETs
go through the standard library (the fallback below), so the launcher keeps working.
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections.abc import Callable

import tenacity

try:
    import tritonclient.http as _http
except ImportError:  # tritonclient without its [http] extras (the GPU machine)
    _http = None

# Probes go straight to the server, whatever http_proxy says.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PROBE_TIMEOUT_S = 2.0


def is_ready(hostport: str, model_name: str) -> bool:
    """Server ready (``/v2/health/ready``) and ``model_name`` ready, at ``host:port`` (HTTP)."""
    if _http is None:
        return _is_ready_stdlib(hostport, model_name)
    try:
        client = _http.InferenceServerClient(hostport, connection_timeout=_PROBE_TIMEOUT_S,
                                             network_timeout=_PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - cannot even connect: not ready
        return False
    try:
        return client.is_server_ready() and client.is_model_ready(model_name)
    except Exception:  # noqa: BLE001 - not listening yet, reset while starting: not ready
        return False
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _is_ready_stdlib(hostport: str, model_name: str) -> bool:
    base = f"http://{hostport}/v2"
    try:
        for path in ("/health/ready", f"/models/{model_name}/ready"):
            with _NO_PROXY.open(base + path, timeout=_PROBE_TIMEOUT_S) as reply:
                if reply.status != 200:
                    return False
        return True
    except (OSError, urllib.error.URLError):  # not listening yet, or 400: not ready
        return False


def wait_for(check: Callable[[], bool], timeout_s: float, give_up: Callable[[], bool],
             period_s: float = 0.25) -> bool:
    """Call ``check`` every ``period_s`` until it is True (returns True), ``give_up`` is True
    or ``timeout_s`` passed (returns False)."""
    poller = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda ok: not ok),
        stop=tenacity.stop_any(tenacity.stop_after_delay(timeout_s), lambda _: give_up()),
        wait=tenacity.wait_fixed(period_s),
        retry_error_callback=lambda _: False)
    return poller(check)
