"""Serving fixtures: one tiny T5X checkpoint, converted once, served once per session.

The chain is the real one: ``demo.t5x_writer`` writes a T5X checkpoint, ``python -m
ray_jobs.convert --engine jax`` turns it into a model repository, ``python -m ray_jobs.serve``
(a subprocess, on the session's Ray) serves it with a real tritonserver.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.t5config import T5Config

MODEL = "t5"
# Small enough to compile and run in seconds; unequal depths and an untied head, like T5 1.1.
TINY = T5Config(d_model=32, num_heads=4, d_kv=8, d_ff=64, vocab_size=160,
                num_encoder_layers=2, num_decoder_layers=3,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def _env(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(repo_root), env.get("PYTHONPATH", "")) if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


@pytest.fixture(scope="session")
def serving_model_repo(tmp_path_factory, repo_root, ray_address) -> Path:
    """A model repository written by ray_jobs.convert (jax engine, fp32) from a T5X checkpoint."""
    from demo.t5x_writer import random_t5x_params, write_t5x_checkpoint

    work = tmp_path_factory.mktemp("serving")
    ckpt = work / "ckpt"
    write_t5x_checkpoint(ckpt, random_t5x_params(TINY, seed=0, dtype="float32"), step=1)
    repo = work / "repo"
    cmd = [sys.executable, "-m", "ray_jobs.convert", "--src", str(ckpt), "--dst", str(repo),
           "--model-name", MODEL, "--engine", "jax", "--inference-dtype", "fp32",
           "--address", ray_address, "--json"]
    proc = subprocess.run(cmd, cwd=repo_root, env=_env(repo_root), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"convert failed: {proc.stderr[-2000:]}"
    assert (repo / MODEL / "config.pbtxt").is_file()
    return repo


def read_ready_line(proc: subprocess.Popen, timeout: float) -> dict:
    """The first JSON line ray_jobs.serve prints (its ready line); fails with its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        elif proc.poll() is not None:
            break
    proc.kill()
    _, err = proc.communicate(timeout=30)
    raise AssertionError(f"ray_jobs.serve gave no ready line (rc {proc.returncode}): {err[-3000:]}")


class ServeProcess:
    """A running ``python -m ray_jobs.serve`` and what it printed when ready."""

    def __init__(self, proc: subprocess.Popen, ready: dict) -> None:
        self.proc = proc
        self.ready = ready
        self.endpoints = ready["endpoints"]
        self.grpc = self.endpoints[0]["grpc"]
        self.http = self.endpoints[0]["http"]

    def terminate(self, timeout: float = 60) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session Ray's GCS address, so serve subprocesses join it rather than start another."""
    return ray_local.get_runtime_context().gcs_address


def port_open(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="session")
def served(serving_model_repo, ray_address, repo_root):
    """``ray_jobs.serve --replicas 2`` running the converted model (on the session's Ray).

    Teardown is part of the contract under test: SIGTERM must exit 0 and close every port.
    """
    cmd = [sys.executable, "-m", "ray_jobs.serve", "--model-repository",
           str(serving_model_repo), "--model-name", MODEL, "--replicas", "2",
           "--address", ray_address, "--num-cpus", "0", "--ready-timeout", "240", "--json"]
    proc = subprocess.Popen(cmd, cwd=repo_root, env=_env(repo_root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    serve = ServeProcess(proc, read_ready_line(proc, 300))
    yield serve
    rc, err = serve.terminate()
    assert rc == 0, f"ray_jobs.serve exited {rc} on SIGTERM: {err[-2000:]}"
    still_open = [url for ep in serve.endpoints for url in ep.values() if port_open(url)]
    assert not still_open, f"ports still served after SIGTERM: {still_open}"


@pytest.fixture(scope="session")
def engine(serving_model_repo):
    """The JAX engine, in this process, on the very weights the server loads."""
    from serving.engine import T5Engine

    return T5Engine.load(str(serving_model_repo / MODEL / "1" / "1-gpu"), dtype="fp32")


def ft_inputs(rows: list[np.ndarray], max_output_len: int | list[int], **settings):
    """tritonclient.grpc InferInputs for the FT T5 contract: padded ids + per-row settings."""

    batch = len(rows)
    width = max(len(r) for r in rows)
    ids = np.zeros((batch, width), np.uint32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    lens = np.array([[len(r)] for r in rows], np.uint32)
    outs = max_output_len if isinstance(max_output_len, list) else [max_output_len] * batch
    arrays = {"input_ids": ids, "sequence_length": lens,
              "max_output_len": np.array([[n] for n in outs], np.uint32)}
    types = {"beam_width": np.uint32, "runtime_top_k": np.uint32, "runtime_top_p": np.float32,
             "temperature": np.float32, "len_penalty": np.float32,
             "repetition_penalty": np.float32, "random_seed": np.uint64,
             "is_return_log_probs": np.bool_, "start_id": np.uint32, "end_id": np.uint32}
    for name, value in settings.items():
        arrays[name] = np.full((batch, 1), value, types[name])
    from evaluation.client import to_infer_inputs

    return to_infer_inputs(arrays)


def sample_rows(n: int, seed: int = 0, vocab: int = TINY.vocab_size) -> list[np.ndarray]:
    """n token rows of 3..8 tokens, ending with EOS (1) as tokenised T5 inputs do.

    At most 8 tokens: the engine compiles one program per length bucket (8, 16, ...), and
    keeping every test in the first bucket keeps the suite fast.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        body = rng.integers(2, vocab, size=2 + (i + seed) % 6).astype(np.uint32)
        rows.append(np.concatenate([body, np.array([1], np.uint32)]))
    return rows
