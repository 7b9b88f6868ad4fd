"""A served model with more logits than its vocabulary has pieces (issue 11, part 3).

Every real T5 is such a model (T5 1.1: 32000 pieces, 32128 logits). The tiny model here has the
evaluation vocabulary's 200 pieces and 256 logits (the vocab_size T5 would round up to); with
random weights about a fifth of the ids it generates are >= 200, in nearly every row.
``ray_jobs.evaluate`` must decode them as seqio does (unk) and lose no example.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tritonclient.grpc as grpcclient

from tests.evaluation.conftest import (
    MODEL,
    VOCAB_SIZE,
    convert_tiny_model,
    sample_rows,
    subprocess_env,
)

pytestmark = pytest.mark.slow

EXTRA_LOGITS = 56
MAX_INPUT_LEN, MAX_OUTPUT_LEN = 64, 16


@pytest.fixture(scope="module")
def wide_model_repo(tmp_path_factory, repo_root, eval_vocab) -> Path:
    return convert_tiny_model(tmp_path_factory.mktemp("wide_model"), repo_root, eval_vocab,
                              extra_logits=EXTRA_LOGITS)


@pytest.fixture(scope="module")
def wide_url(ray_local, wide_model_repo):
    from serving.local import LocalServers

    with LocalServers(str(wide_model_repo), MODEL, replicas=1, num_cpus=0.5) as servers:
        yield servers.endpoints[0]["grpc"]


def _evaluate_cli(repo_root: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ray_jobs.evaluate", "--model-name", MODEL,
           "--max-input-len", str(MAX_INPUT_LEN), "--max-output-len", str(MAX_OUTPUT_LEN),
           "--no-progress", *args]
    return subprocess.run(cmd, cwd=repo_root, env=subprocess_env(repo_root),
                          capture_output=True, text=True, timeout=300)


def _served_ids(url: str, input_ids: list[int]) -> list[int]:
    """The ids the server generates for one row, asked with tritonclient directly."""
    arrays = {
        "input_ids": np.asarray([input_ids], dtype=np.uint32),
        "sequence_length": np.asarray([[len(input_ids)]], dtype=np.uint32),
        "max_output_len": np.asarray([[MAX_OUTPUT_LEN]], dtype=np.uint32),
    }
    inputs = []
    for name, array in arrays.items():
        inp = grpcclient.InferInput(name, list(array.shape), "UINT32")
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(MODEL, inputs)
    finally:
        client.close()
    length = int(result.as_numpy("sequence_length")[0, 0])
    return result.as_numpy("output_ids")[0, 0, :length].tolist()


def _seqio_decode(sp: spm.SentencePieceProcessor, ids: list[int]) -> str:
    """seqio's SentencePieceVocabulary.decode, step by step (seqio/vocabularies.py)."""
    clean = [sp.unk_id() if i >= sp.get_piece_size() else i for i in ids]
    if sp.eos_id() in clean:
        clean = clean[: clean.index(sp.eos_id()) + 1]
    return sp.decode_ids(clean)


def test_vocabulary_smaller_than_the_logits_loses_no_example(
        tmp_path, repo_root, ray_local, eval_vocab, eval_jsonl, wide_model_repo, wide_url):
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    proc = _evaluate_cli(repo_root, [
        "--url", wide_url, "--output", str(out), "--dataset", str(eval_jsonl),
        "--model-repository", str(wide_model_repo), "--batch-size", "4", "--num-actors", "2",
        "--address", address, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["examples"] == 20
    assert summary["metrics"]["vocab_pieces"] == VOCAB_SIZE
    assert summary["metrics"]["model_vocab_size"] == VOCAB_SIZE + EXTRA_LOGITS
    assert (f"evaluate: vocabulary {VOCAB_SIZE} pieces, model vocab_size "
            f"{VOCAB_SIZE + EXTRA_LOGITS}: the {EXTRA_LOGITS} ids") in proc.stderr
    assert (out / "errors.jsonl").read_text() == ""

    sp = spm.SentencePieceProcessor(model_file=str(eval_vocab))
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in eval_jsonl.read_text().splitlines()]
    assert [p["id"] for p in preds] == [r["id"] for r in rows]
    beyond = 0
    for pred, row in zip(preds, rows, strict=True):
        input_ids = [*sp.encode(f"summarize: {row['document']}")[: MAX_INPUT_LEN - 1],
                     sp.eos_id()]
        ids = _served_ids(wide_url, input_ids)
        beyond += any(i >= VOCAB_SIZE for i in ids)
        assert pred["prediction"] == _seqio_decode(sp, ids), row["id"]
    # The model really emits ids SentencePiece has no piece for, in most rows.
    assert beyond >= len(rows) // 2, beyond


def test_vocabulary_larger_than_the_logits_is_refused_before_any_request(
        tmp_path, repo_root, xsum_sample, wide_model_repo):
    from demo.vocab import train_sentencepiece

    rows = sample_rows(xsum_sample)
    repo = tmp_path / "repo"
    shutil.copytree(wide_model_repo, repo)
    big = VOCAB_SIZE + EXTRA_LOGITS + 44
    train_sentencepiece([r["document"] for r in rows], repo / MODEL / "spiece.model", big)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    earlier = '{"id": "0", "prediction": "kept"}\n'
    (out / "predictions.jsonl").write_text(earlier)
    # Port 1 refuses connections: had a request been tried, the error would be another one.
    proc = _evaluate_cli(repo_root, ["--url", "127.0.0.1:1", "--output", str(out),
                                     "--dataset", str(data), "--model-repository", str(repo)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: vocabulary {repo}/{MODEL}/spiece.model has {big} pieces but the model has "
        f"only {VOCAB_SIZE + EXTRA_LOGITS} logits (vocab_size in "
        f"{repo}/{MODEL}/1/1-gpu/config.ini): it is not this model's vocabulary")
    assert (out / "predictions.jsonl").read_text() == earlier
