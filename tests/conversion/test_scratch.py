"""Scratch with an owner: a killed conversion's staged files are removed by the next run, a live
writer's never; --verify names files nothing accounts for (core/scratch.py, docs/scratch.md).

Writers here are real processes: the conversion job itself (`python -m ray_jobs.convert`,
killed with SIGKILL to its process group), or a Python process staging through
core.storage as a conversion task does, killed or left running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conversion.run import ConvertOptions, convert
from core import scratch
from core.t5config import T5Config
from demo.t5x_writer import gin_config, random_t5x_params, write_t5x_checkpoint
from tests.conversion.reference import reference_files

REPO = Path(__file__).resolve().parents[2]
# Enough layers and small enough chunks that a run lasts seconds and always has a layer's
# files staged: it can be killed after the manifest records a layer and before it ends.
# Wide enough MLPs (512 KiB kernels in 4 KiB chunks) that each file stays staged for
# milliseconds: the kill in test_killed_conversion_... must find writers mid-file.
KILL_CFG = T5Config(d_model=64, num_heads=4, d_kv=16, d_ff=2048, vocab_size=512,
                    num_encoder_layers=8, num_decoder_layers=8, feed_forward_proj="gated-silu",
                    tie_word_embeddings=False)
WEIGHTS = Path("t5", "1", "2-gpu")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def _convert_cmd(src: Path, dst: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ray_jobs.convert", "--src", str(src), "--dst", str(dst),
            "--tensor-parallel", "2", "--no-progress", "--json", *extra]


def _recorded(manifest: Path) -> dict[str, dict]:
    try:
        return {e["name"]: e for e in json.loads(manifest.read_text())["files"]}
    except (FileNotFoundError, ValueError):
        return {}  # not written yet, or replaced as we read


def _scratch_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if scratch.is_scratch(p))


def _staged_weights(folder: Path) -> list[str]:
    return [name for name in _scratch_in(folder) if ".bin.tmp-" in name]


def lease_owners(folder: Path) -> dict[int, str | None]:
    """pid -> process start time, from the leases of the writers staging in ``folder``."""
    owners = {}
    for lease in folder.rglob(".t5ft-*.lease"):
        try:
            info = json.loads(lease.read_text())
        except (FileNotFoundError, ValueError):
            continue
        owners[info["pid"]] = info["start"]
    return owners


def kill_writers(owners: dict[int, str | None]) -> None:
    """SIGKILL the processes named by leases, unless their pid now runs another process."""
    for pid, start in owners.items():
        if scratch._process_start(pid) == start:
            os.kill(pid, signal.SIGKILL)


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    """Until every pid has exited (orphaned Ray workers are reaped by whoever adopts them)."""
    deadline = time.monotonic() + timeout
    while any(scratch._process_start(p) is not None for p in pids):
        assert time.monotonic() < deadline, f"writers {pids} still alive"
        time.sleep(0.1)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    params = random_t5x_params(KILL_CFG, seed=7)
    d = tmp_path_factory.mktemp("kill") / "model"
    write_t5x_checkpoint(d, params, step=3, gin=gin_config(KILL_CFG), chunk_bytes=4 * 1024)
    return d, params


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_killed_conversion_resumes_and_leaves_no_scratch(ray_local, big_checkpoint, tmp_path):
    src, params = big_checkpoint
    dst = tmp_path / "repo"
    out = dst / WEIGHTS
    proc = subprocess.Popen(_convert_cmd(src, dst), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        # A layer recorded and another one's files being written: kill right then.
        while not (_recorded(out / "manifest.json") and _staged_weights(out)):
            assert proc.poll() is None, f"conversion ended first: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no layer recorded in time"
            time.sleep(0.01)
        # The job's process group (the driver and the local Ray it started), and the Ray
        # workers writing its files, which Ray puts in process groups of their own (left
        # alone, they see the raylet go and exit cleanly, tidying up as they go).
        writers = lease_owners(out)
        kill_writers(writers)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    wait_gone(list(writers))
    # A worker that began staging after the leases were read was not killed: it exits by itself
    # once the raylet is gone, removing what it staged. Count what the kill left only once
    # every writer that holds a lease is gone.
    while late := set(lease_owners(out)) - set(writers):
        wait_gone(list(late))
        writers.update(dict.fromkeys(late))
    done = _recorded(out / "manifest.json")
    expected = reference_files(params, KILL_CFG, 2, "fp32")
    assert 1 <= len(done) < len(expected), f"{len(done)} of {len(expected)} recorded"
    # The kill left scratch: staged weights, or at least a killed writer's lease (a writer
    # takes its lease before its file's first bytes are read and inflated, so a kill in that
    # window leaves a lease alone, as CI once saw).
    left = _scratch_in(out)
    assert left, "the kill left no scratch"
    assert not (dst / "t5" / "config.pbtxt").exists()
    kept = {n: _stamp(out / n) for n in done}

    resumed = subprocess.run(_convert_cmd(src, dst, "--resume", "--verify"), cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["skipped_files"] == len(done)
    assert summary["scratch_removed"]["files"] >= len(left)
    assert summary["scratch_removed"]["bytes"] > 0
    assert "scratch file(s)" in resumed.stderr
    assert summary["unaccounted"] == []
    # Exactly an uninterrupted run's files, byte for byte, and nothing else anywhere.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*expected, "config.ini", "manifest.json"])
    for name, data in expected.items():
        assert (out / name).read_bytes() == data, name
    assert _scratch_in(dst) == []
    # The whole model folder (config.pbtxt, config.ini, manifest.json included) is an
    # uninterrupted run's, byte for byte.
    clean = tmp_path / "clean"
    convert(ConvertOptions(src=str(src), dst=str(clean), tensor_parallel=2, progress=False))
    assert _tree(dst) == _tree(clean)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["complete"] is True
    final = {e["name"]: e for e in manifest["files"]}
    assert {n: final[n] for n in done} == done
    # The recorded layers' files were kept as they were, not written again.
    assert {n: _stamp(out / n) for n in done} == kept


_WRITER = """
import sys
from core import scratch, storage
local, size = sys.argv[1], int(sys.argv[2])
with storage.staged_file(local) as a, scratch.scratch_file(name="t5ft.part") as b:
    for p in (a, b):
        open(p, "wb").write(b"x" * size)
    print(a, b, flush=True)
    sys.stdin.readline()  # hold the scratch until told, or until killed
"""


def _writer(target: Path, size: int, scratch_dir: Path) -> tuple[subprocess.Popen, list[Path]]:
    """A process staging ``target`` (beside it) and a part file in the node scratch folder."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(size)], cwd=REPO,
                            env=_env(T5FT_SCRATCH_DIR=str(scratch_dir)), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, [Path(p) for p in proc.stdout.readline().split()]


def test_a_run_removes_dead_writers_scratch_and_never_a_live_ones(
        ray_local, monkeypatch, tmp_path):
    from tests.conversion.conftest import MODELS, SMALL_CHUNK_BYTES

    params = random_t5x_params(MODELS["t5v1"], seed=3)
    src = write_t5x_checkpoint(tmp_path / "ckpt", params, step=1, chunk_bytes=SMALL_CHUNK_BYTES)
    node = tmp_path / "node-scratch"
    monkeypatch.setenv(scratch.SCRATCH_DIR_ENV, str(node))  # forwarded to the sweep tasks
    opts = ConvertOptions(src=str(src), dst=str(tmp_path / "repo"), progress=False)
    convert(opts)
    name = "shared.weight_T.bin"
    target = tmp_path / "repo" / "t5" / "1" / "1-gpu" / name
    fresh = tmp_path / "fresh"  # a first run's folder holding nothing but its scratch yet

    dead, dead_files = _writer(target, 1000, node)
    dead.kill()
    dead.wait()
    live = [_writer(target, 77, node), _writer(fresh / "t5" / "1" / "1-gpu" / name, 5, node)]
    live_files = [p for _, files in live for p in files]
    try:
        for flags in ({"resume": True}, {"overwrite": True}, {"dst": str(fresh)}):
            summary = convert(ConvertOptions(**{**opts.__dict__, **flags}))
            if "resume" in flags:  # the dead writer's two scratch files and two leases
                assert summary["scratch_removed"]["files"] == 4
                assert summary["scratch_removed"]["bytes"] > 2 * 1000
            else:
                assert summary["scratch_removed"] == {"files": 0, "bytes": 0}, flags
            assert not any(p.exists() for p in dead_files)
            assert all(p.exists() for p in live_files), flags
            assert summary["files"] == len(reference_files(params, MODELS["t5v1"], 1, "fp32"))
    finally:
        for proc, _ in live:
            proc.communicate("\n", timeout=30)
    # A writer that finishes publishes its scratch whole and takes its lease with it.
    assert _scratch_in(tmp_path) == []
    assert target.read_bytes() == b"x" * 77


def test_verify_reports_a_file_nothing_accounts_for(ray_local, t5x_checkpoint, tmp_path,
                                                    capsys):
    src, _ = t5x_checkpoint("ul2")
    opts = ConvertOptions(src=str(src), dst=str(tmp_path), tensor_parallel=2, progress=False)
    first = convert(ConvertOptions(**{**opts.__dict__, "verify": True}))
    assert first["unaccounted"] == []
    out = tmp_path / "t5" / "1" / "2-gpu"
    (out / "decoder.block.9.layer.0.SelfAttention.q.weight.0.bin").write_bytes(b"stray")
    (out / "notes").mkdir()
    (out / "notes" / "readme.txt").write_text("mine")
    capsys.readouterr()
    summary = convert(ConvertOptions(**{**opts.__dict__, "resume": True, "verify": True}))
    assert summary["verified"] is True
    assert summary["unaccounted"] == ["decoder.block.9.layer.0.SelfAttention.q.weight.0.bin",
                                      "notes/readme.txt"]
    err = capsys.readouterr().err
    assert "2 file(s)" in err and "decoder.block.9.layer.0.SelfAttention.q.weight.0.bin" in err
    assert summary["skipped_files"] == first["files"]  # reported, and nothing rewritten


def _lease(folder: Path, owner: str, host: str, pid: int, start: str | None,
           age: float) -> None:
    path = folder / f".t5ft-{owner}.lease"
    path.write_text(json.dumps({"owner": owner, "host": host, "pid": pid, "start": start}))
    then = time.time() - age
    os.utime(path, (then, then))
    (folder / f"w.bin.tmp-{owner}-0123456789ab").write_bytes(b"abc")


def test_sweep_judges_other_hosts_by_lease_age_and_this_host_by_pid(tmp_path):
    me = os.getpid()
    _lease(tmp_path, "a" * 12, "another-host", me, "1", age=60)  # refreshed lately: kept
    _lease(tmp_path, "b" * 12, "another-host", me, "1", age=scratch.STALE_SECONDS + 5)
    _lease(tmp_path, "c" * 12, socket.gethostname(), me, scratch._process_start(me), age=9e5)
    _lease(tmp_path, "d" * 12, socket.gethostname(), me, "1", age=0)  # pid reused by another
    (tmp_path / f"x.bin.tmp-{'e' * 12}-0123456789ab").write_bytes(b"no lease")
    (tmp_path / "old.bin.tmp-0123456789ab").write_bytes(b"legacy, fresh")
    (tmp_path / "model.bin").write_bytes(b"not scratch")
    removed = scratch.sweep(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".t5ft-aaaaaaaaaaaa.lease", "w.bin.tmp-aaaaaaaaaaaa-0123456789ab",
                           ".t5ft-cccccccccccc.lease", "w.bin.tmp-cccccccccccc-0123456789ab",
                           "old.bin.tmp-0123456789ab", "model.bin"])
    assert removed.files == 2 + 2 + 1  # b's and d's lease and scratch, the lease-less file


def test_a_lease_covers_its_folder_whatever_the_path_spelling(tmp_path, monkeypatch):
    from core import storage

    monkeypatch.chdir(tmp_path)
    with storage.staged_file("d/a.bin") as a:
        Path(a).write_bytes(b"a")
        with storage.staged_file(str(tmp_path / "d" / ".." / "d" / "b.bin")) as b:
            Path(b).write_bytes(b"b")
        # b is published; a is still staged, so its owner's lease must still be there.
        assert [p.name for p in (tmp_path / "d").glob(".t5ft-*.lease")]
        assert scratch.sweep(tmp_path / "d").files == 0 and Path(a).exists()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.bin", "b.bin"]


def test_staging_left_in_temp_by_earlier_versions_goes_by_age(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the stdlib's own setting
    monkeypatch.delenv(scratch.SCRATCH_DIR_ENV, raising=False)  # the default node folder
    old = time.time() - scratch.STALE_SECONDS - 60

    def make(rel: str, data: bytes, aged: bool) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if aged:
            os.utime(path, (old, old))
            os.utime(path.parent, (old, old))

    make("t5ft-k2j4_x9a.part", b"12345", aged=True)
    make("t5ft-eval-ab_c1/predictions.jsonl", b"{}\n", aged=True)
    make("t5ft-n65j9vrn.part", b"being written", aged=False)
    make("t5ft-eval-live/predictions.jsonl", b"{}\n", aged=False)
    make("t5ft-jax-cache/entry", b"not staging", aged=True)
    # An evaluation still appending: the folder itself is old, the file in it is not.
    os.utime(tmp_path / "t5ft-eval-live", (old, old))
    removed = scratch.sweep_node()
    assert removed.as_dict() == {"files": 2, "bytes": 5 + 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t5ft-eval-live", "t5ft-jax-cache", "t5ft-n65j9vrn.part"]
    assert scratch.node_dir().parent == tmp_path
