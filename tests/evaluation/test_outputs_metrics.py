"""Output files (append, resume, final order), ROUGE aggregation, report, request building."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring
from tritonclient.utils import InferenceServerException

from evaluation import client, metrics, report
from evaluation.outputs import ERRORS, PREDICTIONS, OutputDir, ResumeError, prediction_line
from tests.evaluation.conftest import sample_rows


def _record(i: int, ref: str) -> dict:
    return {"id": f"e{i}", "prediction": f"prediction {i}", "reference": ref, "rouge1": 0.5}


def test_resume_keeps_complete_lines_drops_a_cut_one_and_orders(tmp_path):
    refs = {f"e{i}": f"reference {i}" for i in range(6)}
    order = {f"e{i}": i for i in range(6)}
    out = OutputDir(str(tmp_path), resume=False)
    for i in (4, 1, 3):  # arrival order is not example order
        out.append_prediction(_record(i, refs[f"e{i}"]))
    out.close()
    path = tmp_path / PREDICTIONS
    # A kill in the middle of a write leaves a line without its newline.
    with path.open("a") as f:
        f.write(prediction_line(_record(0, refs["e0"]))[:17])
    out = OutputDir(str(tmp_path), resume=True)
    done = out.load_done(refs)
    assert sorted(done) == ["e1", "e3", "e4"]
    assert path.read_text().endswith("\n")  # the stub is gone, new lines start clean
    for i in (5, 0, 2):
        done[f"e{i}"] = prediction_line(_record(i, refs[f"e{i}"]))
        out.append_prediction(_record(i, refs[f"e{i}"]))
    out.finalize(order, done, [{"id": "x", "index": 9, "reason": "r", "stage": "data"}])
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"e{i}" for i in range(6)]
    assert json.loads((tmp_path / ERRORS).read_text())["reason"] == "r"
    # Lines of ids outside this evaluation (a smaller --max-examples) are not kept.
    again = OutputDir(str(tmp_path), resume=True)
    assert sorted(again.load_done({"e0": refs["e0"]})) == ["e0"]
    # Without --resume the folder starts afresh, but only once the new run has a prediction:
    # until then (a server that is down) the earlier outputs stay as they were.
    before = path.read_text()
    (tmp_path / "metrics.json").write_text("{}")
    fresh = OutputDir(str(tmp_path), resume=False)
    assert path.read_text() == before and (tmp_path / "metrics.json").exists()
    fresh.append_prediction(_record(3, refs["e3"]))
    fresh.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["e3"]
    assert not (tmp_path / "metrics.json").exists()  # it described the lines now gone


def test_resume_refuses_another_datasets_predictions(tmp_path):
    out = OutputDir(str(tmp_path), resume=False)
    out.append_prediction(_record(0, "the old reference"))
    out.close()
    with pytest.raises(ResumeError, match="another reference"):
        OutputDir(str(tmp_path), resume=True).load_done({"e0": "a new reference"})


def test_rouge_aggregate_is_seeded_and_matches_rouge_score(xsum_sample):
    rows = sample_rows(xsum_sample)
    preds = [r["document"].split("\n")[0] for r in rows]
    scorer = metrics.make_scorer()
    scores = [metrics.score_example(scorer, p, r["summary"]) for p, r in zip(preds, rows, strict=True)]
    ours = metrics.aggregate_rouge(scores)
    assert ours == metrics.aggregate_rouge(scores)  # reproducible
    # Independently: rouge_score's own scorer and aggregator, numpy seeded the same way.
    ref_scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                          use_stemmer=True)
    agg = scoring.BootstrapAggregator()
    for p, r in zip(preds, rows, strict=True):
        agg.add_scores(ref_scorer.score(r["summary"], p))
    np.random.seed(0)
    expected = agg.aggregate()
    for t in metrics.ROUGE_TYPES:
        assert ours[t] == {"low": expected[t].low.fmeasure, "mid": expected[t].mid.fmeasure,
                           "high": expected[t].high.fmeasure}
        assert 0 <= ours[t]["low"] <= ours[t]["mid"] <= ours[t]["high"] <= 1
    assert ours["rouge1"]["mid"] > 0  # the lead sentence shares words with the summary
    lat = metrics.latency_percentiles([float(x) for x in range(1, 101)])
    assert lat == {"p50": 50.5, "p90": pytest.approx(90.1), "p99": pytest.approx(99.01)}


def test_report_embeds_plots_and_numbers():
    rouge = {t: {"low": 0.1, "mid": 0.2, "high": 0.3} for t in metrics.ROUGE_TYPES}
    m = metrics.summary_metrics(rouge, examples=3, failed=1, seconds=2.0, request_seconds=1.5, sent=3,
                                latencies_ms=[10.0, 20.0, 30.0], resumed=0)
    html = report.render_report(
        m, per_example={t: [0.1, 0.2, 0.3] for t in metrics.ROUGE_TYPES},
        latencies_ms=[10.0, 20.0, 30.0],
        samples=[{"id": "a", "prediction": "<b>p</b>", "reference": "r", "rougeL": 0.2}],
        errors=[{"id": "z", "reason": "UNAVAILABLE"}])
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 2
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "&lt;b&gt;p&lt;/b&gt;" in html and "UNAVAILABLE" in html and "0.2000" in html


def test_request_arrays_follow_the_ft_contract():
    arrays = client.build_request_arrays([[5, 6, 1], [7, 1]], max_output_len=64, beam_width=1,
                                         top_k=1, random_seed=3)
    assert arrays["input_ids"].dtype == np.uint32
    assert arrays["input_ids"].tolist() == [[5, 6, 1], [7, 1, 0]]
    assert arrays["sequence_length"].tolist() == [[3], [2]]
    assert arrays["max_output_len"].tolist() == [[64], [64]]
    assert arrays["beam_width"].shape == (2, 1) and arrays["runtime_top_k"].tolist() == [[1], [1]]
    assert arrays["random_seed"].dtype == np.uint64 and arrays["random_seed"].tolist() == [[3]] * 2
    inputs = client.to_infer_inputs(arrays)
    assert [(i.name(), i.datatype(), i.shape()) for i in inputs][:2] == [
        ("input_ids", "UINT32", [2, 3]), ("sequence_length", "UINT32", [2, 1])]
    # output_ids [b, beam, len], sequence_length [b, beam]: beam 0, cut to its length.
    out = np.array([[[9, 8, 1, 0], [4, 4, 4, 4]], [[3, 1, 0, 0], [2, 2, 2, 2]]], np.uint32)
    assert client.parse_response(out, np.array([[3, 4], [2, 4]], np.uint32)) == [[9, 8, 1], [3, 1]]
    with pytest.raises(ValueError, match="no rows"):
        client.build_request_arrays([], max_output_len=4)


def test_transient_errors_and_urls():
    down = InferenceServerException("failed to connect to all addresses",
                                    status="StatusCode.UNAVAILABLE")
    bad = InferenceServerException("unexpected inference input 'foo'",
                                   status="StatusCode.INVALID_ARGUMENT")
    assert client.is_transient(down) and not client.is_transient(bad)
    assert client.is_transient(ConnectionRefusedError("refused"))
    assert client.parse_urls("a:1, b:2") == ["a:1", "b:2"]
    for bad_url in ("", "nohost", "h:port"):
        with pytest.raises(ValueError, match="--url"):
            client.parse_urls(bad_url)
