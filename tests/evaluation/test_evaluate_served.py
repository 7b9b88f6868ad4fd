"""ray_jobs.evaluate / evaluation.runner against real tritonservers serving a converted model.

A random-weights model writes garbage, but greedy decoding makes it deterministic garbage. Its
words come from the article's vocabulary, not the one-line summary's, so most runs score
against the article (``summary_field="document"``): ROUGE is then non-zero and comparing
metrics.json with an independent computation means something.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from rouge_score import rouge_scorer, scoring

from evaluation.runner import EvalSettings, evaluate
from tests.evaluation.conftest import (
    CLI_COMMON,
    COMMON,
    MODEL,
    N,
    over_long_data,
    subprocess_env,
)

pytestmark = pytest.mark.slow



def _settings(url: str, output: Path, dataset: Path, repo: Path, **kw) -> EvalSettings:
    return EvalSettings(url=url, model_name=MODEL, output=str(output), dataset=str(dataset),
                        model_repository=str(repo), **{**COMMON, **kw})


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outputs_and_metrics_equal_independent_rouge(reference_run, data_with_holes):
    preds = _lines(reference_run / "predictions.jsonl")
    rows = [r for r in _lines(data_with_holes) if r.get("document")]
    assert [p["id"] for p in preds] == [r["id"] for r in rows]  # example order, none missing
    assert all(p["reference"] == r["document"] for p, r in zip(preds, rows, strict=True))
    errors = _lines(reference_run / "errors.jsonl")
    assert [(e["id"], e["stage"]) for e in errors] == [("empty-doc", "data"), ("no-doc", "data")]
    assert "empty document" in errors[0]["reason"] and "missing document" in errors[1]["reason"]

    # ROUGE from scratch with rouge_score, numpy seeded before the bootstrap.
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    agg = scoring.BootstrapAggregator()
    for p in preds:
        s = scorer.score(p["reference"], p["prediction"])
        agg.add_scores(s)
        assert {t: p[t] for t in types} == {t: s[t].fmeasure for t in types}
    np.random.seed(0)
    expected = agg.aggregate()
    metrics = json.loads((reference_run / "metrics.json").read_text())
    for t in types:
        assert metrics[t] == {"low": expected[t].low.fmeasure, "mid": expected[t].mid.fmeasure,
                              "high": expected[t].high.fmeasure}
    assert metrics["rouge1"]["mid"] > 0
    assert metrics["examples"] == N and metrics["failed"] == 2
    assert metrics["examples_per_second"] > 0 and metrics["seconds"] > 0
    lat = metrics["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    html = (reference_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2


def _inference_counts(urls: list[str]) -> list[int]:
    """Rows each Triton server has inferred so far (its own statistics endpoint)."""
    counts = []
    for url in urls:
        client = grpcclient.InferenceServerClient(url)
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        counts.append(int(stats.get("inference_count", 0)))
        client.close()
    return counts


def test_four_actors_give_identical_outputs(tmp_path, reference_run, grpc_urls,
                                            eval_model_repo, data_with_holes):
    out = tmp_path / "out4"
    before = _inference_counts(grpc_urls)
    m = evaluate(_settings(",".join(grpc_urls), out, data_with_holes, eval_model_repo,
                           num_actors=4))
    assert m["examples"] == N and m["failed"] == 2
    # the requests were spread over every --url, and every row was inferred exactly once
    served = [a - b for a, b in zip(_inference_counts(grpc_urls), before, strict=True)]
    assert all(n > 0 for n in served) and sum(served) == N, served
    for name in ("predictions.jsonl", "errors.jsonl"):
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name
    ref = json.loads((reference_run / "metrics.json").read_text())
    assert {t: m[t] for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")} == {
        t: ref[t] for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")}


def test_sigkilled_run_resumes_to_the_same_files(tmp_path, repo_root, ray_local, grpc_urls,
                                                 eval_model_repo, data_with_holes,
                                                 reference_run):
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ray_jobs.evaluate", "--url", grpc_urls[0],
           "--model-name", MODEL, "--output", str(out), "--dataset", str(data_with_holes),
           "--model-repository", str(eval_model_repo), *CLI_COMMON, "--num-actors", "1",
           "--requests-per-actor", "1", "--address", address, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=repo_root, env=subprocess_env(repo_root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pred = out / "predictions.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if pred.exists() and pred.read_bytes().count(b"\n") >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"not killed midway: {proc.stderr.read()[-2000:]}"
    kept = pred.read_bytes().count(b"\n")
    assert 4 <= kept < N

    m = evaluate(_settings(grpc_urls[0], out, data_with_holes, eval_model_repo, resume=True,
                           num_actors=2))
    assert m["resumed"] == kept and m["examples"] == N
    for name in ("predictions.jsonl", "errors.jsonl"):
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name
    ids = [p["id"] for p in _lines(pred)]
    assert len(ids) == len(set(ids)) == N
    rouge = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    ref = json.loads((reference_run / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    assert {t: got[t] for t in rouge} == {t: ref[t] for t in rouge}
    assert got["examples"] == N and got["failed"] == 2


def test_server_killed_mid_run_costs_no_example(tmp_path, eval_servers, grpc_urls,
                                                eval_model_repo, data_with_holes,
                                                reference_run):
    out = tmp_path / "out"
    # Only the server that gets killed: every example must wait for its restart, not fail over.
    settings = _settings(grpc_urls[1], out, data_with_holes, eval_model_repo, num_actors=1,
                         batch_size=1, requests_per_actor=1)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(evaluate(settings)))
    worker.start()
    pred = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.is_alive():
        if pred.exists() and pred.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert worker.is_alive(), "the run ended before the server could be killed"
    old_pid = eval_servers.kill(1)
    worker.join(timeout=240)
    assert not worker.is_alive()
    assert eval_servers.status()[1].get("pid") != old_pid  # it really was restarted
    assert result["failed"] == 2 and result["examples"] == N  # only the two bad rows
    assert pred.read_bytes() == (reference_run / "predictions.jsonl").read_bytes()


def test_dead_endpoint_fails_over_and_rejected_example_is_reported(
        tmp_path, grpc_urls, eval_model_repo, xsum_sample):
    data = over_long_data(tmp_path, xsum_sample)
    # Port 1 refuses connections: requests sent there are retried on the live server.
    m = evaluate(_settings(f"127.0.0.1:1,{grpc_urls[0]}", tmp_path / "out", data,
                           eval_model_repo, summary_field="summary", max_input_len=100000,
                           batch_size=3, num_actors=1))
    assert m["examples"] == 2 and m["failed"] == 1
    assert [p["id"] for p in _lines(tmp_path / "out" / "predictions.jsonl")] == ["0", "2"]
    (error,) = _lines(tmp_path / "out" / "errors.jsonl")
    assert error["id"] == "1" and error["stage"] == "request"
    assert grpc_urls[0] in error["reason"] and "input" in error["reason"].lower()


def test_cli_reports_bad_input_in_one_line(tmp_path, repo_root, grpc_urls, eval_model_repo):
    cmd = [sys.executable, "-m", "ray_jobs.evaluate", "--url", grpc_urls[0], "--model-name",
           MODEL, "--output", str(tmp_path / "o"), "--dataset", str(tmp_path / "none.jsonl"),
           "--model-repository", str(eval_model_repo)]
    proc = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(repo_root),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: --dataset {tmp_path / 'none.jsonl'}: no such file"


def test_gs_paths_max_examples_then_resume(gcs_bucket, grpc_urls, eval_vocab, data_with_holes,
                                           reference_run):
    from core import storage

    dataset = f"{gcs_bucket}/data/xsum.jsonl"
    vocab = f"{gcs_bucket}/vocab/spiece.model"
    storage.write_bytes(dataset, data_with_holes.read_bytes())
    storage.write_bytes(vocab, eval_vocab.read_bytes())
    out = f"{gcs_bucket}/eval/out"
    settings = dict(url=",".join(grpc_urls), model_name=MODEL, output=out, dataset=dataset,
                    vocab=vocab, num_actors=2, **COMMON)
    first = evaluate(EvalSettings(max_examples=8, **settings))
    assert first["examples"] == 7 and first["failed"] == 1  # rows 0-7 hold "empty-doc"
    assert first["predictions"] == f"{out}/predictions.jsonl"
    second = evaluate(EvalSettings(resume=True, **settings))
    assert second["resumed"] == 7 and second["examples"] == N
    for name in ("predictions.jsonl", "errors.jsonl"):
        assert storage.read_bytes(f"{out}/{name}") == (reference_run / name).read_bytes(), name
    metrics = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    ref = json.loads((reference_run / "metrics.json").read_text())
    assert metrics["rouge1"] == ref["rouge1"] and metrics["rougeLsum"] == ref["rougeLsum"]
    assert storage.read_bytes(f"{out}/report.html").startswith(b"<!doctype html>")
