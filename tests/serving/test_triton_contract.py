"""The FT T5 request contract as the Triton model parses it (pure numpy, no server)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.engine import GenerationResult
from serving.engine.contract import RequestError, assemble_outputs, parse_request

LIMITS = dict(max_input_len=16, vocab_size=100, max_batch_size=4)


def _request(ids, lens, max_out, **extra):
    inputs = {"input_ids": np.asarray(ids, np.uint32),
              "sequence_length": np.asarray(lens, np.uint32).reshape(-1, 1),
              "max_output_len": np.asarray(max_out, np.uint32).reshape(-1, 1)}
    inputs.update(extra)
    return inputs


def test_rows_are_cut_to_their_length_and_keep_their_settings():
    req = parse_request(_request([[5, 6, 7, 0], [8, 9, 0, 0]], [3, 2], [4, 7],
                                 runtime_top_k=np.array([[1], [5]], np.uint32),
                                 random_seed=np.array([[3], [2**40]], np.uint64),
                                 temperature=np.array([[1.0], [0.5]], np.float32)), **LIMITS)
    assert [t.tolist() for t in req.tokens] == [[5, 6, 7], [8, 9]]
    assert [t.dtype for t in req.tokens] == [np.uint32, np.uint32]
    p0, p1 = req.params
    assert (p0.max_output_len, p0.top_k, p0.random_seed) == (4, 1, 3)
    assert (p1.max_output_len, p1.top_k, p1.random_seed, p1.temperature) == (7, 5, 2**40, 0.5)
    assert not req.return_log_probs


@pytest.mark.parametrize("inputs, needle", [
    (dict(sequence_length=np.array([[2]], np.uint32), max_output_len=np.array([[2]], np.uint32)),
     "input_ids is required"),
    (_request([[5, 6]], [3], [2]), "sequence_length 3 is larger than the row"),
    (_request([[5, 6]], [0], [2]), "sequence_length must be >= 1"),
    (_request([[5] * 17], [17], [2]), "over max_input_len 16"),
    (_request([[5, 100]], [2], [2]), "token 100 >= vocab_size 100"),
    (_request([[5]] * 5, [1] * 5, [2] * 5), "over max_batch_size 4"),
    (_request([[5]], [1], [0]), "max_output_len must be in"),
    ({"input_ids": np.array([[5]], np.int64), "max_output_len": np.array([[2]], np.uint32)},
     "input_ids must be UINT32, got INT64"),
    ({"input_ids": np.array([[5]], np.uint32)}, "max_output_len is required"),
    (_request([[5], [6]], [1, 1], [2, 2], beam_width=np.array([[1], [2]], np.uint32)),
     "agree on beam_width"),
    (_request([[5]], [1], [2], runtime_top_p=np.array([[2.0]], np.float32)), "runtime_top_p"),
    (_request([[5]], [1], [2], bogus=np.array([[2]], np.uint32)), "unknown inputs ['bogus']"),
    (_request([[5]], [1], [2], bad_words_list=np.zeros((1, 3, 2), np.int32)),
     "bad_words_list must have shape [batch, 2, L]"),
])
def test_bad_requests_name_the_problem(inputs, needle):
    with pytest.raises(RequestError) as info:
        parse_request(inputs, **LIMITS)
    assert needle in str(info.value)


def test_outputs_pad_to_longest_row_with_end_id():
    req = parse_request(_request([[5], [6]], [1, 1], [2, 4],
                                 is_return_log_probs=np.array([[True], [False]])), **LIMITS)
    assert req.return_log_probs and all(p.return_log_probs for p in req.params)
    results = [
        GenerationResult(output_ids=np.array([[7, 1]], np.uint32),
                         sequence_length=np.array([2], np.uint32),
                         cum_log_probs=np.array([-0.5], np.float32),
                         output_log_probs=np.array([[-0.2, -0.3]], np.float32)),
        GenerationResult(output_ids=np.array([[9, 9, 9, 9]], np.uint32),
                         sequence_length=np.array([4], np.uint32),
                         cum_log_probs=np.array([-1.0], np.float32),
                         output_log_probs=np.array([[-0.25] * 4], np.float32)),
    ]
    out = assemble_outputs(req, results, end_id=1)
    assert out["output_ids"].dtype == np.uint32 and out["output_ids"].shape == (2, 1, 4)
    assert out["output_ids"][0, 0].tolist() == [7, 1, 1, 1]
    assert out["sequence_length"].tolist() == [[2], [4]]
    assert out["cum_log_probs"].shape == (2, 1)
    assert out["output_log_probs"][0, 0].tolist() == pytest.approx([-0.2, -0.3, 0.0, 0.0])
