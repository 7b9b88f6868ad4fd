"""`ray job stop` gives a job the grace our cluster sets (RAY_JOB_STOP_WAIT_TIME_S), on a real
Ray head started here (`ray start --head`, stopped by its process group).

Ray 2.60's job supervisor sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S seconds
(3 by default), read from its own environment, which includes the job's runtime_env env_vars.
Two jobs that need 5 s to clean up after SIGTERM are stopped together: the one submitted with
the RayJob's runtime env (cluster.raycluster.job_runtime_env) finishes its clean-up, the one
with Ray's default is killed first.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cluster import raycluster
from tests.conversion.test_cli import BIN, _env, _ray_head

JOB = """\
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def on_term(signum, frame):
    time.sleep(5)  # a teardown that takes longer than Ray's default 3 s
    (out / "cleaned").write_text("ok")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(out / "started").write_text("ok")
while True:
    time.sleep(0.1)
"""


def _wait_for(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.timeout(120)
def test_ray_job_stop_waits_the_grace_of_the_rayjob_runtime_env(tmp_path):
    env = {k: v for k, v in _env().items() if k != raycluster.ENV_JOB_STOP_WAIT}
    # A throwaway local head without token authentication (as tests/conversion/test_cli.py).
    env["RAY_AUTH_MODE"] = "disabled"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    jobs = {"grace": raycluster.job_runtime_env(), "default": {}}
    with _ray_head(env) as (url, _):
        def ray(command: str, *args: str) -> None:
            # --address before the rest: after `--` it would be the entrypoint's.
            proc = subprocess.run([str(BIN / "ray"), "job", command, "--address", url, *args],
                                  env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]

        for name, runtime_env in jobs.items():
            (tmp_path / name).mkdir()
            ray("submit", "--no-wait", "--submission-id", f"stop-{name}-{os.getpid()}",
                "--runtime-env-json", json.dumps(runtime_env), "--",
                "python", str(script), str(tmp_path / name))
        for name in jobs:
            assert _wait_for(tmp_path / name / "started", 60), f"job {name} never started"
        for name in jobs:
            ray("stop", "--no-wait", f"stop-{name}-{os.getpid()}")
        stopped = time.monotonic()
        assert _wait_for(tmp_path / "grace" / "cleaned", 30), "the grace job was killed"
        # The default job would have finished its clean-up 5 s after SIGTERM; it got 3.
        time.sleep(max(0.0, stopped + 8 - time.monotonic()))
        assert not (tmp_path / "default" / "cleaned").exists()
