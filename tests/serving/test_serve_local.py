"""serving.local: tritonservers owned by Ray actors come back after a crash; ray_jobs.serve's
command line fails with one clear line (its SIGTERM shutdown is checked by the ``served``
fixture's teardown)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.serving.conftest import MODEL, _env, ft_inputs, port_open, sample_rows

pytestmark = pytest.mark.slow


def test_killed_server_comes_back_on_same_ports(ray_local, serving_model_repo):
    from serving.local import LocalServers

    with LocalServers(str(serving_model_repo), MODEL, replicas=1, num_cpus=0,
                      ready_timeout=120) as servers:
        (before,) = servers.endpoints
        client = grpcclient.InferenceServerClient(before["grpc"])
        first = client.infer(MODEL, ft_inputs(sample_rows(2), 6)).as_numpy("output_ids")
        old_pid = servers.status()[0]["pid"]

        assert servers.kill(0) == old_pid
        t0 = time.monotonic()
        # The watcher notices the death and relaunches on the same ports.
        (after,) = servers.wait_ready(timeout=120)
        back_in = time.monotonic() - t0
        status = servers.status()[0]
        assert after == before
        assert status["restarts"] == 1 and status["pid"] != old_pid and status["ready"]
        assert back_in < 120
        again = client.infer(MODEL, ft_inputs(sample_rows(2), 6)).as_numpy("output_ids")
        np.testing.assert_array_equal(first, again)
        client.close()
    # Context exit stops the server and frees its ports.
    assert not port_open(before["grpc"]) and not port_open(before["http"])


def test_server_that_cannot_load_its_model_fails_fast(ray_local, tmp_path):
    from serving.local import LocalServers, ServerError

    bad = tmp_path / "repo" / "broken" / "1"
    bad.mkdir(parents=True)
    (bad.parent / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 1\n'
        'input { name: "x" data_type: TYPE_UINT32 dims: [ 1 ] }\n'
        'output { name: "y" data_type: TYPE_UINT32 dims: [ 1 ] }\n'
        'parameters { key: "weights_dir" value { string_value: "9-gpu" } }\n')
    (bad / "model.py").write_text(
        "from serving.triton_model.model import TritonPythonModel  # noqa: F401\n")
    servers = LocalServers(str(tmp_path / "repo"), "broken", num_cpus=0, ready_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="9-gpu"):
        servers.start()
    assert time.monotonic() - t0 < 60
    assert servers.actors == []


def _serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray_jobs.serve", *args]


def test_cli_missing_model_is_one_line_error(repo_root, tmp_path):
    proc = subprocess.run(_serve_cmd("--model-repository", str(tmp_path), "--model-name", "nope"),
                          cwd=repo_root, env=_env(repo_root), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope/config.pbtxt" in lines[0]


def test_cli_rejects_bad_flags(repo_root, tmp_path):
    proc = subprocess.run(_serve_cmd("--model-repository", str(tmp_path), "--model-name", "t5",
                                     "--replicas", "0"),
                          cwd=repo_root, env=_env(repo_root), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "--replicas" in proc.stderr
