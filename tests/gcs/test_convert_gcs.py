"""ray_jobs.convert from gs:// to gs:// on a multi-node Ray: same bytes, lost nodes, resume.

One ``ray.cluster_utils.Cluster`` for the module (in its own process, tests/gcs/cluster_proc.py):
a head with no CPUs (so every conversion task runs on a worker node, which can then be killed)
and two 1-CPU worker nodes, all started after the emulator fixture so they inherit its
variables. Each job runs as ``python -m
ray_jobs.convert --address CLUSTER`` in a subprocess, as a user runs it.

The source is written to the emulator the way t5x writes on GCS (testing/t5x_gcs.py), with
small zarr chunks so that every task makes many ranged reads and a run lasts long enough to be
interrupted. The reference is the same checkpoint converted local -> local.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import ft_format, scratch
from core.t5config import T5Config
from demo.t5x_writer import gin_config, random_t5x_params, write_t5x_checkpoint
from testing.t5x_gcs import write_t5x_checkpoint_gcs
from tests.conversion.test_scratch import kill_writers, lease_owners, wait_gone
from tests.gcs.conftest import sha256_local_tree

REPO = Path(__file__).resolve().parents[2]
CFG = T5Config(d_model=128, num_heads=4, d_kv=16, d_ff=512, vocab_size=2048,
               num_encoder_layers=6, num_decoder_layers=6, feed_forward_proj="gated-silu")
CHUNK_BYTES = 16 * 1024
WEIGHTS = "t5/1/1-gpu"
N_BIN = len(ft_format.all_files(CFG, 1))


class ClusterProcess:
    """tests/gcs/cluster_proc.py running: its address, and a way to kill a worker node."""

    def __init__(self, workers: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.gcs.cluster_proc",
                                      str(workers)], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.address = json.loads(self._read_line("{"))["address"]

    def _read_line(self, prefix: str) -> str:
        """The next stdout line starting with ``prefix`` (Ray may print others)."""
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line
        raise AssertionError(f"cluster process ended (rc {self.proc.poll()}) before {prefix!r}")

    def kill_worker(self, i: int) -> None:
        self.proc.stdin.write(f"kill {i}\n")
        self.proc.stdin.flush()
        self._read_line(f"killed {i}")

    def shutdown(self) -> None:
        try:
            self.proc.communicate("shutdown\n", timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def node_scratch(tmp_path_factory):
    """The nodes' scratch folder for this module's jobs (a killed node's part files stay in the
    test's temp folder, not in the machine's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(scratch.SCRATCH_DIR_ENV, str(tmp_path_factory.mktemp("node-scratch")))
        yield


@pytest.fixture(scope="module")
def cluster(gcs):
    """A head with no CPUs and two 1-CPU worker nodes (tests/gcs/cluster_proc.py)."""
    c = ClusterProcess(workers=2)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def sources(gcs, tmp_path_factory) -> dict[str, str]:
    """The same checkpoint (and config.gin) on the emulator and on local disk."""
    params = random_t5x_params(CFG, seed=11)
    gin = gin_config(CFG)
    local = tmp_path_factory.mktemp("ckpt") / "model"
    write_t5x_checkpoint(local, params, step=42, gin=gin, chunk_bytes=CHUNK_BYTES)
    url = f"gs://{gcs.bucket}/convert/model"
    write_t5x_checkpoint_gcs(url, params, step=42, chunk_bytes=CHUNK_BYTES)
    gcs.client.bucket(gcs.bucket).blob("convert/model/config.gin").upload_from_string(gin)
    return {"local": str(local), "gcs": url}


def convert_cmd(src: str, dst: str, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ray_jobs.convert", "--src", src, "--dst", dst,
            "--address", address, "--no-progress", "--json", *extra]


def run_convert(src: str, dst: str, address: str, *extra: str,
                env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(convert_cmd(src, dst, address, *extra), cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"convert failed: {proc.stderr[-3000:]}"
    return last_json(proc.stdout, proc.stderr)


def last_json(out: str, err: str) -> dict:
    """The --json summary: the last stdout line."""
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"no JSON summary; stdout {out[-1000:]!r}, " \
        f"stderr {err[-2000:]!r}"
    return json.loads(lines[-1])


def manifest_files(text: str) -> list[dict]:
    return json.loads(text)["files"]


@pytest.fixture(scope="module")
def reference(cluster, sources, tmp_path_factory) -> dict:
    """The local -> local conversion: file name -> sha256, and the manifest's file list."""
    c = cluster
    repo = tmp_path_factory.mktemp("ref") / "repo"
    summary = run_convert(sources["local"], str(repo), c.address)
    assert summary["files"] == N_BIN
    tree = sha256_local_tree(repo)
    return {"tree": tree,
            "manifest": manifest_files((repo / WEIGHTS / "manifest.json").read_text())}


def assert_same_as_reference(gcs, prefix: str, reference: dict) -> None:
    """Every object under gs://bucket/prefix, hashed from the emulator, equals the reference;
    the manifest lists the same files, sizes and crc32c, and each crc32c is the one the
    emulator computed for the object (its header names the source, which differs)."""
    tree = gcs.sha256_tree(prefix)
    manifest = f"{WEIGHTS}/manifest.json"
    assert set(tree) == set(reference["tree"])
    differing = [n for n in tree if n != manifest and tree[n] != reference["tree"][n]]
    assert not differing, f"differ from local -> local: {differing[:5]}"
    got = manifest_files(gcs.blobs(prefix)[manifest].download_as_text())
    assert got == reference["manifest"]
    by_name = {e["name"]: e["crc32c"] for e in got}
    for name, blob in gcs.blobs(prefix).items():
        if name.startswith(WEIGHTS) and name.endswith(".bin"):
            assert by_name[name.rsplit("/", 1)[1]] == blob.crc32c


def test_gcs_to_gcs_equals_local_to_local(gcs, cluster, sources, reference):
    c = cluster
    summary = run_convert(sources["gcs"], f"gs://{gcs.bucket}/out/plain", c.address, "--verify")
    assert summary["output"] == f"gs://{gcs.bucket}/out/plain/{WEIGHTS}"
    assert summary["files"] == N_BIN and summary["verified"] is True
    assert summary["read_from_gin"] == ["feed_forward_proj"]  # config.gin found on gs:// too
    assert_same_as_reference(gcs, "out/plain", reference)


def _bin_count(gcs, prefix: str) -> int:
    return sum(1 for name in gcs.blobs(prefix) if name.endswith(".bin"))


def _start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"conversion ended (rc {proc.returncode}) before {what}: {err[-2000:]}")
        if condition():
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def test_worker_node_killed_mid_run(gcs, cluster, sources, reference):
    c = cluster
    prefix = "out/node-killed"
    proc = _start(convert_cmd(sources["gcs"], f"gs://{gcs.bucket}/{prefix}", c.address))
    _wait_for(proc, lambda: _bin_count(gcs, prefix) >= N_BIN // 4, "a quarter of the files")
    # SIGKILL the node's raylet and its workers: the tasks running there die mid-write.
    c.kill_worker(0)
    written_at_kill = _bin_count(gcs, prefix)
    assert written_at_kill < N_BIN, "the conversion finished before the node was killed"
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"conversion did not survive the lost node: {err[-3000:]}"
    assert last_json(out, err)["files"] == N_BIN
    assert_same_as_reference(gcs, prefix, reference)


def test_killed_conversion_resumes_rewriting_only_missing_files(gcs, cluster, sources,
                                                               reference, tmp_path):
    """Also: the killed run's part files, staged in the nodes' scratch folder (one local temp
    folder here, as every node runs on this machine), are removed by the resumed run."""
    c = cluster
    prefix = "out/resumed"
    dst = f"gs://{gcs.bucket}/{prefix}"
    manifest = f"{prefix}/{WEIGHTS}/manifest.json"
    node_scratch = tmp_path / "node-scratch"
    env = {**os.environ, scratch.SCRATCH_DIR_ENV: str(node_scratch)}  # forwarded to the tasks

    def recorded() -> list[dict]:
        # A new Blob each time: one that has been read pins the generation it read.
        try:
            return manifest_files(gcs.client.bucket(gcs.bucket).blob(manifest).download_as_text())
        except Exception:  # noqa: BLE001 - not written yet
            return []

    def parts() -> list[str]:
        return [p.name for p in node_scratch.glob("t5ft.part.tmp-*")]

    proc = _start(convert_cmd(sources["gcs"], dst, c.address), env)
    _wait_for(proc, lambda: len(recorded()) >= N_BIN // 3 and parts(),
              "a third of the files recorded, more being staged")
    # The job's driver, and the workers staging its files (their leases name them): killed
    # outright, as a lost machine would be, they cannot tidy up.
    writers = lease_owners(node_scratch)
    kill_writers(writers)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    wait_gone(list(writers))
    time.sleep(2)  # let Ray reap the dead job's other workers before we look
    left = parts()
    assert left, "the kill left no staged part file"
    done = {e["name"]: e for e in recorded()}
    assert N_BIN // 3 <= len(done) < N_BIN, f"{len(done)} of {N_BIN} recorded at the kill"
    assert not gcs.blobs(prefix).get("t5/config.pbtxt"), "an interrupted run looks complete"
    blobs = gcs.blobs(f"{prefix}/{WEIGHTS}")
    generations = {name: blobs[name].generation for name in done}

    summary = run_convert(sources["gcs"], dst, c.address, "--resume", env=env)
    assert summary["skipped_files"] == len(done)
    assert summary["scratch_removed"]["files"] >= len(left)
    after = gcs.blobs(f"{prefix}/{WEIGHTS}")
    rewritten = [n for n, g in generations.items() if after[n].generation != g]
    assert not rewritten, f"--resume rewrote finished files: {rewritten[:5]}"
    assert_same_as_reference(gcs, prefix, reference)
    assert [p.name for p in node_scratch.iterdir()] == []  # no part file, no lease


def test_hf_gcs_to_gcs_killed_and_resumed_equals_an_uninterrupted_run(gcs, cluster, sources,
                                                                      tmp_path):
    """--format hf: the same machinery (per-layer shards, manifest, --resume) from gs:// to
    gs://; the killed and resumed folder is byte for byte the uninterrupted one."""
    c = cluster
    shards = 1 + CFG.num_encoder_layers + CFG.num_decoder_layers
    plain = run_convert(sources["gcs"], f"gs://{gcs.bucket}/out/hf-plain", c.address,
                        "--format", "hf", "--verify")
    assert plain["output"] == f"gs://{gcs.bucket}/out/hf-plain/t5"
    assert (plain["files"], plain["verified"], plain["unaccounted"]) == (shards, True, [])

    prefix = "out/hf-resumed"
    manifest = f"{prefix}/t5/manifest.json"
    node_scratch = tmp_path / "node-scratch"
    env = {**os.environ, scratch.SCRATCH_DIR_ENV: str(node_scratch)}

    def recorded() -> list[dict]:
        try:
            return manifest_files(gcs.client.bucket(gcs.bucket).blob(manifest).download_as_text())
        except Exception:  # noqa: BLE001 - not written yet
            return []

    proc = _start(convert_cmd(sources["gcs"], f"gs://{gcs.bucket}/{prefix}", c.address,
                              "--format", "hf"), env)
    _wait_for(proc, lambda: len(recorded()) >= shards // 3, "a third of the shards recorded")
    writers = lease_owners(node_scratch)
    kill_writers(writers)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    wait_gone(list(writers))
    done = {e["name"] for e in recorded()}
    assert shards // 3 <= len(done) < shards, f"{len(done)} of {shards} recorded at the kill"
    assert "t5/config.json" not in gcs.blobs(prefix), "an interrupted run looks complete"

    summary = run_convert(sources["gcs"], f"gs://{gcs.bucket}/{prefix}", c.address,
                          "--format", "hf", "--resume", env=env)
    assert summary["skipped_files"] >= len(done)
    assert gcs.sha256_tree(prefix) == gcs.sha256_tree("out/hf-plain")
