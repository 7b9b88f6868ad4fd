"""``--backend in-process`` equals the Triton path: the same converted ``--engine jax``
repository, evaluated by real tritonservers (conftest's reference run) and by the JAX engine
inside Ray Data actors, gives byte-identical predictions.jsonl and errors.jsonl, equal metrics,
the same resume and the same request failures. Greedy decoding makes both deterministic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.runner import EvalSettings, EvaluationError, evaluate
from tests.evaluation.conftest import CLI_COMMON, COMMON, MODEL, N, over_long_data, subprocess_env

pytestmark = pytest.mark.slow

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_in_process_max_examples_then_resume_equals_triton(
        tmp_path, repo_root, ray_local, eval_model_repo, data_with_holes, reference_run):
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    # The CLI without --url: the engine runs in the actors, no server is asked.
    cmd = [sys.executable, "-m", "ray_jobs.evaluate", "--backend", "in-process",
           "--model-name", MODEL, "--output", str(out), "--dataset", str(data_with_holes),
           "--model-repository", str(eval_model_repo), *CLI_COMMON, "--num-actors", "1",
           "--num-gpus-per-actor", "0", "--max-examples", "8", "--address", address, "--json"]
    proc = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(repo_root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first["examples"] == 7 and first["failed"] == 1  # rows 0-7 hold "empty-doc"
    ref_preds = _lines(reference_run / "predictions.jsonl")
    assert _lines(out / "predictions.jsonl") == ref_preds[:7]

    second = evaluate(EvalSettings(
        backend="in-process", model_name=MODEL, output=str(out), dataset=str(data_with_holes),
        model_repository=str(eval_model_repo), num_actors=1, resume=True, **COMMON))
    assert second["resumed"] == 7 and second["examples"] == N and second["failed"] == 2
    for name in ("predictions.jsonl", "errors.jsonl"):
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name
    ref = json.loads((reference_run / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    assert {t: got[t] for t in ROUGE} == {t: ref[t] for t in ROUGE}
    assert got["examples"] == ref["examples"] and got["failed"] == ref["failed"]
    html = (out / "report.html").read_text()
    assert "in-process" in html and html.count("data:image/png;base64,") == 2


def test_over_long_example_fails_alone_as_on_triton(tmp_path, grpc_urls, eval_model_repo,
                                                    xsum_sample):
    data = over_long_data(tmp_path, xsum_sample)
    common = dict(model_name=MODEL, dataset=str(data), model_repository=str(eval_model_repo),
                  **{**COMMON, "summary_field": "summary", "max_input_len": 100000,
                     "batch_size": 3}, num_actors=1)
    served = evaluate(EvalSettings(url=grpc_urls[0], output=str(tmp_path / "t"), **common))
    local = evaluate(EvalSettings(backend="in-process", output=str(tmp_path / "e"), **common))
    assert local["examples"] == served["examples"] == 2
    assert local["failed"] == served["failed"] == 1
    assert (tmp_path / "e" / "predictions.jsonl").read_bytes() == \
        (tmp_path / "t" / "predictions.jsonl").read_bytes()
    (t_err,), (e_err,) = _lines(tmp_path / "t" / "errors.jsonl"), \
        _lines(tmp_path / "e" / "errors.jsonl")
    assert (e_err["id"], e_err["index"], e_err["stage"]) == \
        (t_err["id"], t_err["index"], t_err["stage"]) == ("1", 1, "request")
    # The same contract refuses it: Triton's reason is the engine's, behind the endpoint.
    assert "over max_input_len" in e_err["reason"] and t_err["reason"].endswith(e_err["reason"])


def test_settings_name_the_missing_flag(tmp_path, eval_model_repo):
    base = dict(model_name=MODEL, output=str(tmp_path / "o"))
    with pytest.raises(EvaluationError, match=r"^--url HOST:PORT is required with --backend"):
        EvalSettings(**base).checked_urls()
    with pytest.raises(EvaluationError, match=r"^--backend in-process needs --model-repository"):
        EvalSettings(backend="in-process", **base).checked_urls()
    with pytest.raises(EvaluationError, match=r"^--backend in-process reads a local "):
        EvalSettings(backend="in-process", model_repository="gs://b/repo", **base).checked_urls()
    with pytest.raises(EvaluationError, match="no model 'nope'"):
        evaluate(EvalSettings(backend="in-process", model_repository=str(eval_model_repo),
                              **{**base, "model_name": "nope"}))
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_cli_without_url_is_one_line(tmp_path, repo_root):
    cmd = [sys.executable, "-m", "ray_jobs.evaluate", "--model-name", MODEL,
           "--output", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(repo_root),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --url HOST:PORT is required with --backend triton (or give --backend "
        "in-process --model-repository DST)")


def test_cli_unreadable_config_pbtxt_is_one_line(tmp_path, repo_root):
    """A config.pbtxt Triton could not read: one line naming it, before anything is written."""
    from core.repository import model_config, to_pbtxt

    model = tmp_path / "repo" / MODEL
    model.mkdir(parents=True)
    text = to_pbtxt(model_config(MODEL, "jax", 1))
    (model / "config.pbtxt").write_text(text[: text.rindex("}")])  # its last brace cut off
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "ray_jobs.evaluate", "--backend", "in-process",
           "--model-name", MODEL, "--model-repository", str(tmp_path / "repo"),
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(repo_root),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: --backend in-process: {model / 'config.pbtxt'}: unreadable config.pbtxt (")
    assert not out.exists()


def test_batching_loop_without_ray_matches_triton(eval_model_repo, eval_vocab, data_with_holes,
                                                  reference_run):
    """What a benchmark runs: predict_rows over EngineGenerate, in this process, no Ray."""
    from evaluation.batching import predict_rows
    from evaluation.data import load_examples
    from evaluation.engine_predictor import EngineGenerate
    from evaluation.tokenizer import Tokenizer

    tok = Tokenizer(eval_vocab.read_bytes())
    examples = load_examples(str(data_with_holes), split="test", max_examples=12,
                             document_field="document", summary_field="document",
                             input_template="summarize: {document}").examples
    rows = [tok.encode(e.input_text, COMMON["max_input_len"]) for e in examples]
    generate = EngineGenerate(str(eval_model_repo), MODEL,
                              max_output_len=COMMON["max_output_len"])
    answers = list(predict_rows(rows, generate, tok.decode, batch_size=COMMON["batch_size"],
                                ids=[e.id for e in examples]))
    assert [len(a.ids) for a in answers] == [2] * 5  # 10 examples in 12 rows, 2 per request
    got = {i: p for a in answers for i, p in zip(a.ids, a.predictions, strict=True)}
    ref = {p["id"]: p["prediction"] for p in _lines(reference_run / "predictions.jsonl")}
    assert got == {i: ref[i] for i in got}
