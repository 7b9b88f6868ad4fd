"""Evaluation fixtures: a vocabulary trained on the bundled XSum sample, data files in every
supported format, and (for the server-backed tests) a tiny random T5 converted by
``ray_jobs.convert`` and served by real tritonservers (``serving.local.LocalServers``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = "t5"
VOCAB_SIZE = 200
# Short inputs and outputs keep the engine to a few compiled shapes (one input-length bucket).
COMMON = {"max_input_len": 64, "max_output_len": 16, "batch_size": 2,
          "summary_field": "document", "progress": False}
CLI_COMMON = ["--summary-field", "document", "--max-input-len", "64", "--max-output-len", "16",
              "--batch-size", "2"]
N = 60  # examples with a document; plus two rows without


def sample_rows(xsum_sample: Path) -> list[dict]:
    return [json.loads(line) for line in xsum_sample.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def eval_vocab(tmp_path_factory, xsum_sample) -> Path:
    """A T5-style SentencePiece model (pad 0, eos 1, unk 2) trained on the sample's texts."""
    from demo.vocab import train_sentencepiece

    rows = sample_rows(xsum_sample)
    texts = [r["document"] for r in rows] + [r["summary"] for r in rows]
    path = tmp_path_factory.mktemp("eval_vocab") / "spiece.model"
    return train_sentencepiece(texts, path, VOCAB_SIZE)


@pytest.fixture(scope="session")
def eval_jsonl(tmp_path_factory, xsum_sample) -> Path:
    """The 10 sample rows twice over (20 examples), each with an ``id`` field."""
    rows = sample_rows(xsum_sample)
    path = tmp_path_factory.mktemp("eval_data") / "xsum20.jsonl"
    with path.open("w") as f:
        for i, row in enumerate(rows + rows):
            f.write(json.dumps({"id": f"bbc-{i:03d}", **row}) + "\n")
    return path


def over_long_data(tmp_path: Path, xsum_sample: Path) -> Path:
    """Three short examples (ids "0".."2"); the second is far beyond the model's input limit."""
    rows = sample_rows(xsum_sample)[:3]
    for row in rows:  # short inputs: cheap for the engine
        row["document"] = row["document"].split("\n")[0]
    rows[1]["document"] = " ".join([rows[1]["document"]] * 60)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def subprocess_env(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root), env.get("PYTHONPATH")) if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def convert_tiny_model(work: Path, repo_root: Path, vocab: Path, extra_logits: int = 0,
                       dtype: str = "fp32") -> Path:
    """``work/repo``: a tiny random T5 with ``vocab``'s pieces plus ``extra_logits`` logits
    (config vocab_size) and ``vocab`` as its spiece.model, made by the real chain:
    demo.t5x_writer -> python -m ray_jobs.convert --engine jax --vocab; served in ``dtype``.
    """
    import sentencepiece as spm

    from core.t5config import T5Config
    from demo.t5x_writer import random_t5x_params, write_t5x_checkpoint

    pieces = spm.SentencePieceProcessor(model_file=str(vocab)).get_piece_size()
    cfg = T5Config(d_model=32, num_heads=4, d_kv=8, d_ff=64, vocab_size=pieces + extra_logits,
                   num_encoder_layers=2, num_decoder_layers=2,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    ckpt = work / "ckpt"
    write_t5x_checkpoint(ckpt, random_t5x_params(cfg, seed=0, dtype="float32"), step=1)
    repo = work / "repo"
    cmd = [sys.executable, "-m", "ray_jobs.convert", "--src", str(ckpt), "--dst", str(repo),
           "--model-name", MODEL, "--engine", "jax", "--inference-dtype", dtype,
           "--vocab", str(vocab), "--json"]
    proc = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(repo_root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"convert failed: {proc.stderr[-2000:]}"
    assert (repo / MODEL / "spiece.model").is_file()
    return repo


@pytest.fixture(scope="session")
def eval_model_repo(tmp_path_factory, repo_root, eval_vocab) -> Path:
    """A Triton model repository (jax engine, fp32) with ``t5/spiece.model``, as many logits
    as the vocabulary has pieces."""
    return convert_tiny_model(tmp_path_factory.mktemp("eval_model"), repo_root, eval_vocab)


@pytest.fixture(scope="session")
def eval_servers(ray_local, eval_model_repo):
    """Two real tritonservers serving the tiny model (ports fixed for the session)."""
    from serving.local import LocalServers

    with LocalServers(str(eval_model_repo), MODEL, replicas=2, num_cpus=0.5) as servers:
        yield servers


@pytest.fixture(scope="session")
def bf16_model_repo(tmp_path_factory, repo_root, eval_vocab) -> Path:
    """The tiny model converted with the default inference dtype, bf16 (batch-invariant by
    default)."""
    return convert_tiny_model(tmp_path_factory.mktemp("bf16_model"), repo_root, eval_vocab,
                              dtype="bf16")


@pytest.fixture(scope="session")
def bf16_grpc_url(ray_local, bf16_model_repo):
    """One real tritonserver serving the bf16 model: its gRPC HOST:PORT."""
    from serving.local import LocalServers

    with LocalServers(str(bf16_model_repo), MODEL, replicas=1, num_cpus=0.5) as servers:
        yield servers.endpoints[0]["grpc"]


@pytest.fixture(scope="session")
def fp16_grpc_url(ray_local, tmp_path_factory, repo_root, eval_vocab):
    """One real tritonserver serving the tiny model converted with inference dtype fp16."""
    from serving.local import LocalServers

    repo = convert_tiny_model(tmp_path_factory.mktemp("fp16_model"), repo_root, eval_vocab,
                              dtype="fp16")
    with LocalServers(str(repo), MODEL, replicas=1, num_cpus=0.5) as servers:
        yield servers.endpoints[0]["grpc"]


@pytest.fixture(scope="session")
def grpc_urls(eval_servers) -> list[str]:
    return [e["grpc"] for e in eval_servers.endpoints]


@pytest.fixture(scope="session")
def data_with_holes(tmp_path_factory, xsum_sample) -> Path:
    """The sample six times over (60 examples) plus two bad rows (empty / missing document)."""
    sample = sample_rows(xsum_sample)
    rows = [{"id": f"bbc-{i:03d}", **sample[i % len(sample)]} for i in range(N)]
    rows.insert(5, {"id": "empty-doc", "document": "", "summary": "s"})
    rows.insert(11, {"id": "no-doc", "summary": "s"})
    path = tmp_path_factory.mktemp("holes") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, repo_root, ray_local, grpc_urls, eval_model_repo,
                  data_with_holes) -> Path:
    """One uninterrupted run through the CLI (1 actor, both endpoints, --json)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ray_jobs.evaluate", "--url", ",".join(grpc_urls),
           "--model-name", MODEL, "--output", str(out), "--dataset", str(data_with_holes),
           "--model-repository", str(eval_model_repo), *CLI_COMMON, "--num-actors", "1",
           "--address", address, "--json"]
    proc = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(repo_root),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["examples"] == N and summary["metrics"]["failed"] == 2
    assert summary["predictions"] == str(out / "predictions.jsonl")
    return out


@pytest.fixture(scope="module")
def gcs_bucket():
    """fake-gcs-server (the real binary) with one bucket; clients pointed at it via os.environ.

    Only the driver talks to GCS (the actors get the vocabulary as bytes), so the variables
    need not reach Ray workers.
    """
    from tests.gcs_emulator import emulator

    with emulator("t5ft-eval"):
        yield "gs://t5ft-eval"
