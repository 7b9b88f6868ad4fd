"""End to end: T5X checkpoint -> ray_jobs.convert -> ray_jobs.serve -> tritonclient.grpc.

The server's answers are checked against the JAX engine run in this process on the same weights
(the engine itself is checked against HF transformers in tests/serving/test_engine*).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.engine import SamplingParams
from tests.serving.conftest import MODEL, TINY, ft_inputs, sample_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(served):
    c = grpcclient.InferenceServerClient(served.grpc)
    yield c
    c.close()


def test_ready_line_names_model_and_endpoints(served):
    assert served.ready["model"] == MODEL
    assert len(served.endpoints) == 2
    urls = []
    for ep in served.endpoints:
        assert set(ep) == {"grpc", "http", "metrics"}
        for url in ep.values():
            host, port = url.rsplit(":", 1)
            assert host == "127.0.0.1" and int(port) > 0
            urls.append(url)
    assert len(set(urls)) == 6


def test_every_replica_answers_the_same(served):
    outs = []
    for ep in served.endpoints:
        c = grpcclient.InferenceServerClient(ep["grpc"])
        assert c.is_server_ready() and c.is_model_ready(MODEL)
        outs.append(c.infer(MODEL, ft_inputs(sample_rows(1), 8)).as_numpy("output_ids"))
        c.close()
    np.testing.assert_array_equal(outs[0], outs[1])


def test_greedy_matches_in_process_engine(client, engine):
    rows = sample_rows(4, seed=1)
    max_out = 8
    res = client.infer(MODEL, ft_inputs(rows, max_out, beam_width=1, runtime_top_k=1))
    out_ids = res.as_numpy("output_ids")
    seq_len = res.as_numpy("sequence_length")
    assert out_ids.dtype == np.uint32 and out_ids.shape == (4, 1, max_out)
    assert seq_len.dtype == np.uint32 and seq_len.shape == (4, 1)

    expected = engine.generate(rows, [SamplingParams(max_output_len=max_out)] * len(rows))
    for r, exp in enumerate(expected):
        n = int(exp.sequence_length[0])
        assert int(seq_len[r, 0]) == n
        np.testing.assert_array_equal(out_ids[r, 0, :n], exp.output_ids[0, :n])
    # Padded rows in one request must not change a row's answer: send row 0 alone.
    alone = client.infer(MODEL, ft_inputs(rows[:1], max_out))
    n0 = int(seq_len[0, 0])
    np.testing.assert_array_equal(alone.as_numpy("output_ids")[0, 0, :n0], out_ids[0, 0, :n0])


def test_same_seed_same_sample(client):
    rows = sample_rows(2, seed=2)
    kwargs = dict(runtime_top_k=20, temperature=1.5)
    a = client.infer(MODEL, ft_inputs(rows, 8, random_seed=1234, **kwargs))
    b = client.infer(MODEL, ft_inputs(rows, 8, random_seed=1234, **kwargs))
    np.testing.assert_array_equal(a.as_numpy("output_ids"), b.as_numpy("output_ids"))
    np.testing.assert_array_equal(a.as_numpy("sequence_length"), b.as_numpy("sequence_length"))
    # Different seeds draw different samples (over several seeds at least one differs).
    others = [client.infer(MODEL, ft_inputs(rows, 8, random_seed=s, **kwargs))
              .as_numpy("output_ids") for s in (1, 2, 3)]
    assert any(not np.array_equal(o, a.as_numpy("output_ids")) for o in others)


def test_beam_width_two_returns_two_beams(client, engine):
    rows = sample_rows(2, seed=3)
    res = client.infer(MODEL, ft_inputs(rows, 8, beam_width=2, is_return_log_probs=True))
    out_ids = res.as_numpy("output_ids")
    seq_len = res.as_numpy("sequence_length")
    cum = res.as_numpy("cum_log_probs")
    assert out_ids.shape == (2, 2, 8) and seq_len.shape == (2, 2) and cum.shape == (2, 2)
    assert (seq_len >= 1).all() and (seq_len <= 8).all()
    assert np.isfinite(cum).all() and (cum <= 0).all()
    expected = engine.generate(rows, [SamplingParams(max_output_len=8, beam_width=2,
                                                     return_log_probs=True)] * 2)
    for r, exp in enumerate(expected):
        np.testing.assert_array_equal(seq_len[r], exp.sequence_length)
        for b in range(2):
            n = int(exp.sequence_length[b])
            np.testing.assert_array_equal(out_ids[r, b, :n], exp.output_ids[b, :n])
        np.testing.assert_allclose(cum[r], exp.cum_log_probs, rtol=1e-4, atol=1e-4)


def test_log_probs_only_when_asked(client):
    rows = sample_rows(1, seed=4)
    plain = client.infer(MODEL, ft_inputs(rows, 6))
    assert plain.as_numpy("cum_log_probs") is None
    asked = client.infer(MODEL, ft_inputs(rows, 6, is_return_log_probs=True))
    per_token = asked.as_numpy("output_log_probs")
    n = int(asked.as_numpy("sequence_length")[0, 0])
    assert per_token.shape == (1, 1, 6)
    # Greedy: the sum of the generated tokens' log probs is the cumulative one.
    np.testing.assert_allclose(per_token[0, 0, :n].sum(), asked.as_numpy("cum_log_probs")[0, 0],
                               rtol=1e-4, atol=1e-4)


def test_concurrent_requests_keep_their_own_length(client, served):
    rows = sample_rows(3, seed=5)
    lengths = {"short": 3, "long": 8}
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def send(name: str) -> None:
        try:
            c = grpcclient.InferenceServerClient(served.grpc)
            results[name] = c.infer(MODEL, ft_inputs(rows, lengths[name]))
            c.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in lengths for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    short = results["short"].as_numpy("output_ids")
    long = results["long"].as_numpy("output_ids")
    assert short.shape == (3, 1, 3) and long.shape == (3, 1, 8)
    s_len = results["short"].as_numpy("sequence_length")
    assert (s_len <= 3).all()
    # Greedy decoding: the short answer is the long answer's prefix.
    for r in range(3):
        n = int(s_len[r, 0])
        np.testing.assert_array_equal(short[r, 0, :n], long[r, 0, :n])


def test_rows_of_one_request_keep_their_own_settings(client, engine):
    rows = sample_rows(2, seed=6)
    res = client.infer(MODEL, ft_inputs(rows, [4, 8]))
    out = res.as_numpy("output_ids")
    seq = res.as_numpy("sequence_length")
    assert out.shape == (2, 1, 8)
    assert int(seq[0, 0]) <= 4
    expected = engine.generate(rows, [SamplingParams(max_output_len=4),
                                      SamplingParams(max_output_len=8)])
    for r, exp in enumerate(expected):
        n = int(exp.sequence_length[0])
        assert int(seq[r, 0]) == n
        np.testing.assert_array_equal(out[r, 0, :n], exp.output_ids[0, :n])
    assert TINY.vocab_size > int(out.max())
