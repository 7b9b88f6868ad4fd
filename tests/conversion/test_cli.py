"""ray_jobs.convert as users run it: `python -m` on a local Ray, and `ray job submit` to a head.

The head is started by this test (`ray start --head --block` on free ports, in its own temp
dir so no other Ray on the machine finds it) and stopped by ending that process group, which is
what `ray stop` would do without touching anyone else's Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conversion.conftest import MODELS
from tests.conversion.reference import reference_files

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    return env


def _last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1])


def _check(summary: dict, dst: Path, params, t: int) -> None:
    out = dst / "t5" / "1" / f"{t}-gpu"
    assert summary["output"] == str(out)
    expected = reference_files(params, MODELS["ul2"], t, "fp32")
    assert summary["files"] == len(expected)
    assert summary["bytes"] == sum(len(v) for v in expected.values())
    assert summary["seconds"] > 0
    assert summary["model"]["num_decoder_layers"] == 3
    assert summary["arch_sources"]["feed_forward_proj"] == "gin"
    for name, data in expected.items():
        assert (out / name).read_bytes() == data, name
    assert (dst / "t5" / "config.pbtxt").exists()


def test_cli_json_local(t5x_checkpoint, tmp_path):
    src, params = t5x_checkpoint("ul2")
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.convert", "--src", str(src), "--dst", str(tmp_path),
         "--tensor-parallel", "2", "--verify", "--json"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the contract: last line
    assert summary["verified"] is True
    _check(summary, tmp_path, params, 2)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture()
def ray_head():
    """A Ray head of our own: (dashboard URL, env); stopped with its whole process group."""
    gcs, dash, agent, agent_grpc, metrics, client, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rh")  # short: Ray puts sockets in it
    # Ray 2.60 turns token authentication on for `ray start` heads; this throwaway local head
    # and its client run without it, so the test needs no token file.
    env = {**_env(), "RAY_AUTH_MODE": "disabled"}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
           str(agent_grpc), "--metrics-export-port", str(metrics), "--ray-client-server-port",
           str(client), "--runtime-env-agent-port", str(runtime_env), "--temp-dir", temp_dir,
           "--disable-usage-stats"]
    log = tempfile.TemporaryFile()
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                log.seek(0)
                pytest.fail(f"ray start exited: {log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # the dashboard answers (an auth error is still an answer)
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the Ray head's job API never answered")
                time.sleep(0.5)
        yield url, env
    finally:
        head.terminate()  # `ray start --block` stops everything it started on SIGTERM
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # Children that outlived `ray start` (raylet workers) are in the same group.
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit(ray_head, t5x_checkpoint, tmp_path):
    url, env = ray_head
    src, params = t5x_checkpoint("ul2")
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--",
         "python", "-m", "ray_jobs.convert", "--src", str(src), "--dst", str(tmp_path),
         "--tensor-parallel", "2", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout
    _check(_last_json(proc.stdout), tmp_path, params, 2)


def test_cli_task_error_is_one_line(tmp_path):
    """An error inside a Ray task reaches the user as one stderr line naming the parameter,
    with Ray's own start-up chatter kept off stderr."""
    from demo.t5x_writer import random_t5x_params, write_t5x_checkpoint
    from tests.conversion.conftest import SMALL_CHUNK_BYTES

    ckpt = write_t5x_checkpoint(tmp_path / "ckpt", random_t5x_params(MODELS["ul2"], seed=4),
                                step=1, chunk_bytes=SMALL_CHUNK_BYTES)
    chunk = ckpt / "target.decoder.layers_2.mlp.wi_1.kernel" / "0.3"
    chunk.write_bytes(b"\x1f\x8b\x08\x00garbage")  # a gzip header, then nonsense
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.convert", "--src", str(ckpt), "--dst",
         str(tmp_path / "out"), "--json"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "'decoder.layers_2.mlp.wi_1.kernel'" in lines[0]
    assert not (tmp_path / "out" / "t5" / "config.pbtxt").exists()
