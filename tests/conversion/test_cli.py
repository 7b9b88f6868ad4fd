"""ray_jobs.convert as users run it: `python -m` on a local Ray, and `ray job submit` to a head.

The head is started by this test (`ray start --head --block` on free ports, in its own temp
dir so no other Ray on the machine finds it) and stopped by ending that process group, which is
what `ray stop` would do without touching anyone else's Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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


@contextlib.contextmanager
def _ray_head(env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A Ray head of our own: (dashboard URL, GCS address); stopped with its process group."""
    gcs, dash, agent, agent_grpc, metrics, client, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rh")  # short: Ray puts sockets in it
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
        yield url, f"127.0.0.1:{gcs}"
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


@pytest.fixture()
def ray_head():
    """(dashboard URL, env) of a head without token authentication, and its clients' env."""
    # Ray 2.60 turns token authentication on for `ray start` heads when a token exists; this
    # throwaway local head and its client run without it, so the test needs no token file.
    env = {**_env(), "RAY_AUTH_MODE": "disabled"}
    with _ray_head(env) as (url, _):
        yield url, env


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
    # Progress lines ("convert: <group> done (i/n)") go to stderr too; nothing else may.
    lines = [ln for ln in proc.stderr.splitlines()
             if ln.strip() and not re.fullmatch(r"convert: \S+ done \(\d+/\d+\)", ln)]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.returncode == 2
    assert "'decoder.layers_2.mlp.wi_1.kernel'" in lines[0]
    assert not (tmp_path / "out" / "t5" / "config.pbtxt").exists()


# --- a head as `ray start --head` starts by default: token authentication on ----------------------


def _no_auth_env(home: Path) -> dict[str, str]:
    """The clients' env with no RAY_AUTH_* setting and HOME (where Ray's token file is) at HOME."""
    env = {k: v for k, v in _env().items() if not k.startswith("RAY_AUTH_")}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def default_head(tmp_path_factory):
    """(dashboard URL, GCS address, env): a head started with Ray's default auth settings on a
    machine that has a token in Ray's default file, HOME/.ray/auth_token (made by Ray's CLI, as
    a user would: `ray get-auth-token --generate`). Ray 2.60 then requires that token."""
    home = tmp_path_factory.mktemp("home")
    env = _no_auth_env(home)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=120)
    assert (home / ".ray" / "auth_token").is_file()
    with _ray_head(env) as (url, gcs):
        yield url, gcs, env


def _convert(src: Path, dst: Path, env: dict[str, str], *extra: str):
    return subprocess.run(
        [sys.executable, "-m", "ray_jobs.convert", "--src", str(src), "--dst", str(dst),
         "--tensor-parallel", "2", "--json", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_address_joins_a_default_head(default_head, t5x_checkpoint, tmp_path):
    """`--address` against a default `ray start --head` on this machine works without
    RAY_AUTH_MODE: the token in Ray's default file is sent."""
    _, gcs, env = default_head
    src, params = t5x_checkpoint("ul2")
    proc = _convert(src, tmp_path, env, "--address", gcs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(_last_json(proc.stdout), tmp_path, params, 2)


def test_no_token_is_one_line(default_head, t5x_checkpoint, tmp_path):
    """With no token findable (empty HOME, no RAY_AUTH_TOKEN), joining through RAY_ADDRESS fails
    with one line naming what to set, and nothing is written."""
    _, gcs, _ = default_head
    src, _ = t5x_checkpoint("ul2")
    env = {**_no_auth_env(tmp_path / "empty-home"), "RAY_ADDRESS": gcs}
    proc = _convert(src, tmp_path / "out", env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: the Ray head at {gcs} requires token authentication")
    assert "RAY_AUTH_TOKEN" in lines[0] and "RAY_AUTH_MODE=token" in lines[0]
    assert not (tmp_path / "out" / "t5").exists()


def test_job_submit_to_a_default_head(default_head, t5x_checkpoint, tmp_path):
    """The README's `RAY_AUTH_MODE=token ray job submit`: Ray's job CLI sends the token only in
    token mode; the job's own driver (the head's `python`) joins the head with it."""
    url, _, env = default_head
    src, params = t5x_checkpoint("ul2")
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--",
         "python", "-m", "ray_jobs.convert", "--src", str(src), "--dst", str(tmp_path),
         "--tensor-parallel", "2", "--json"],
        cwd=REPO, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _check(_last_json(proc.stdout), tmp_path, params, 2)
