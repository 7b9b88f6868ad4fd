"""Google Cloud Storage clients that behave the same against GCS and against an emulator.

Two libraries talk to GCS here and each finds an emulator its own way:

- google-cloud-storage (objects: model repositories, manifests, datasets, evaluation outputs)
  reads ``STORAGE_EMULATOR_HOST``; it then needs no credentials, but still wants a project name.
- tensorstore (T5X arrays, through its ``gcs`` kvstore driver) reads ``TENSORSTORE_GCS_HTTP_URL``
  for the endpoint; without ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` it first looks for application
  default credentials and the GCE metadata server, which is slow and noisy off GCP.

Ray workers must see the same variables as the driver, so :func:`forwarded_env` lists the ones
set in this process for a job's ``runtime_env``. On GKE none is set and every client uses the
pod's Workload Identity.
"""

from __future__ import annotations

import functools
import os
from typing import Any

GS_SCHEME = "gs://"
# Every variable that points a client at an emulator or changes how it authenticates.
EMULATOR_VARS: tuple[str, ...] = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
)
# google-cloud-storage requires a project for some calls even when an emulator ignores it.
EMULATOR_PROJECT = "emulator"


def emulator_env(url: str) -> dict[str, str]:
    """The variables that point both libraries at the emulator at ``url`` (``http://HOST:PORT``)."""
    url = url.rstrip("/")
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        # Any non-empty token: the emulator does not check it, and tensorstore then skips the
        # credential search (gcloud files, GCE metadata server).
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }


def forwarded_env() -> dict[str, str]:
    """The emulator/auth variables set in this process, for a Ray ``runtime_env``'s env_vars."""
    return {k: os.environ[k] for k in EMULATOR_VARS if os.environ.get(k)}


def is_gcs(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``gs://`` URL (the one test every module uses)."""
    return str(path).startswith(GS_SCHEME)


def split_gs_url(url: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``; raises ValueError on anything else."""
    if not is_gcs(url):
        raise ValueError(f"not a gs:// URL: {url!r}")
    bucket, _, path = url[len(GS_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"gs:// URL has no bucket: {url!r}")
    return bucket, path.strip("/")


def tensorstore_kvstore(path: str | os.PathLike) -> dict[str, Any]:
    """A tensorstore kvstore spec for a local folder or a ``gs://`` prefix (ending in "/")."""
    path = str(path)
    if is_gcs(path):
        bucket, prefix = split_gs_url(path)
        return {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/" if prefix else ""}
    return {"driver": "file", "path": os.path.abspath(path).rstrip("/") + "/"}


def _client_key() -> tuple[int, str | None]:
    # A client is bound to its endpoint: after a fork, or if the emulator moves, make a new one.
    return os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST")


@functools.lru_cache(maxsize=4)
def _client(key: tuple[int, str | None]):
    from google.cloud import storage

    if key[1]:
        from google.auth.credentials import AnonymousCredentials

        from core import reach

        # The client retries a closed endpoint for about 100 s: ask once, fail in one line.
        try:
            host, port = reach.host_port(key[1], 80)
        except ValueError as exc:
            raise reach.Unreachable(f"STORAGE_EMULATOR_HOST: {exc}") from None
        reach.require("STORAGE_EMULATOR_HOST", key[1], host, port)

        return storage.Client(project=EMULATOR_PROJECT, credentials=AnonymousCredentials())
    from google.auth.exceptions import DefaultCredentialsError

    from core.errors import UserError

    try:
        return storage.Client()
    except DefaultCredentialsError:
        raise UserError("gs:// needs Google Cloud credentials and none were found: run `gcloud "
                        "auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
                        ) from None


def storage_client():
    """One google-cloud-storage client per process (and per emulator endpoint)."""
    return _client(_client_key())
