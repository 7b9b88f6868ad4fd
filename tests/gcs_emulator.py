"""One GCS emulator for a block of tests: fake-gcs-server, a bucket, os.environ pointed at it.

Every fixture that needs GCS (tests/gcs, tests/evaluation, tests/serving) uses this, so the
environment is saved and restored in one place: processes started inside the block (job
subprocesses, `ray start` nodes, Ray workers) inherit the variables, and tests after it see
the environment they had before.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

from core import gcs_env
from testing import gcs_emulator


@contextlib.contextmanager
def patched_environ(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in os.environ inside the block; restore (or remove) each variable after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def emulator(bucket: str) -> Iterator[tuple[str, dict[str, str]]]:
    """fake-gcs-server (memory backend) with ``bucket`` created; yields (emulator URL, env).

    ``env`` holds the variables that point both GCS clients at it; they are in os.environ
    only inside the block.
    """
    proc, url = gcs_emulator.start_emulator()
    env = gcs_env.emulator_env(url)
    try:
        with patched_environ(env):
            gcs_env.storage_client().create_bucket(bucket)
            yield url, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
