"""Fixtures shared by every test area. Each area keeps its own in tests/<area>/conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep Ray quiet and local in tests; jobs launched by tests find the repo on PYTHONPATH.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session", autouse=True)
def stderr_logging() -> None:
    """The library reports through module loggers; every command configures them once
    (core.cli.run_main) to print on stderr. Tests that call the library directly get the same
    configuration, so capsys/capfd see on stderr what a user would."""
    from core.cli import configure_logging

    configure_logging()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (real raylet, real workers).

    4 logical CPUs on a 2-core machine so that per-layer tasks and actor pools overlap.
    Tests that need their own cluster (multi-node, `ray start --head`) must not use this one.
    """
    import ray

    if not ray.is_initialized():
        # address="local": never join a cluster another test (or engineer) started with
        # `ray start` on this machine, which ray.init() with no address would autodetect.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    # left running for the session: ray.shutdown happens at interpreter exit


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def xsum_sample() -> Path:
    """The 10 real XSum rows bundled in demo/data (sources in demo/data/SOURCES.md)."""
    return REPO / "demo" / "data" / "xsum_sample.jsonl"
