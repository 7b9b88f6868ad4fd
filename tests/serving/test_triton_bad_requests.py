"""Requests that break the FT T5 contract get a Triton error that says what is wrong, and the
server keeps answering good requests afterwards (real tritonserver, real Python backend)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.serving.conftest import MODEL, TINY, ft_inputs, sample_rows

pytestmark = pytest.mark.slow


def _input(name: str, arr: np.ndarray, dtype: str | None = None) -> grpcclient.InferInput:
    from tritonclient.utils import np_to_triton_dtype

    inp = grpcclient.InferInput(name, list(arr.shape), dtype or np_to_triton_dtype(arr.dtype))
    inp.set_data_from_numpy(arr)
    return inp


@pytest.fixture(scope="module")
def client(served):
    c = grpcclient.InferenceServerClient(served.grpc)
    yield c
    c.close()


def _error(client, inputs) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, inputs)
    return str(info.value)


def _assert_still_serving(client) -> None:
    res = client.infer(MODEL, ft_inputs(sample_rows(1), 4))
    assert res.as_numpy("output_ids").shape == (1, 1, 4)


def test_missing_input_ids(client):
    msg = _error(client, [_input("sequence_length", np.array([[3]], np.uint32)),
                          _input("max_output_len", np.array([[4]], np.uint32))])
    assert "input_ids" in msg
    _assert_still_serving(client)


def test_input_longer_than_max_input_len(client):
    cfg = client.get_model_config(MODEL).config
    limit = int(cfg.parameters["max_input_len"].string_value)
    row = np.full(limit + 1, 5, np.uint32)
    msg = _error(client, ft_inputs([row], 4))
    assert "max_input_len" in msg and str(limit + 1) in msg
    _assert_still_serving(client)


def test_sequence_length_larger_than_row(client):
    ids = np.array([[5, 6, 7]], np.uint32)
    msg = _error(client, [_input("input_ids", ids),
                          _input("sequence_length", np.array([[9]], np.uint32)),
                          _input("max_output_len", np.array([[4]], np.uint32))])
    assert "sequence_length 9" in msg and "larger than the row" in msg
    _assert_still_serving(client)


def test_token_outside_vocabulary(client):
    row = np.array([3, TINY.vocab_size + 7, 1], np.uint32)
    msg = _error(client, ft_inputs([row], 4))
    assert "vocab_size" in msg and str(TINY.vocab_size + 7) in msg
    _assert_still_serving(client)


def test_wrong_dtype_is_named(client):
    # INT32 ids where the contract says UINT32: Triton refuses it against config.pbtxt.
    ids = np.array([[5, 6, 7]], np.int32)
    msg = _error(client, [_input("input_ids", ids),
                          _input("sequence_length", np.array([[3]], np.uint32)),
                          _input("max_output_len", np.array([[4]], np.uint32))])
    assert "input_ids" in msg and "INT32" in msg and "UINT32" in msg
    _assert_still_serving(client)


def test_batch_over_max_batch_size(client):
    limit = client.get_model_config(MODEL).config.max_batch_size
    assert limit > 0
    rows = [np.array([5, 6, 1], np.uint32)] * (limit + 1)
    msg = _error(client, ft_inputs(rows, 2))
    assert "batch" in msg and str(limit) in msg
    _assert_still_serving(client)


def test_zero_max_output_len_and_bad_sampling_settings(client):
    rows = sample_rows(1)
    assert "max_output_len" in _error(client, ft_inputs(rows, 0))
    assert "runtime_top_p" in _error(client, ft_inputs(rows, 4, runtime_top_p=1.5))
    assert "temperature" in _error(client, ft_inputs(rows, 4, temperature=0.0))
    _assert_still_serving(client)


def test_bad_and_stop_words_are_accepted(client):
    rows = sample_rows(2)
    words = np.array([[[7, 8, 9], [2, 3, -1]]] * 2, np.int32)  # [batch, 2, L]
    inputs = ft_inputs(rows, 5) + [_input("bad_words_list", words),
                                   _input("stop_words_list", words)]
    res = client.infer(MODEL, inputs)
    assert res.as_numpy("output_ids").shape == (2, 1, 5)


def test_http_client_gets_the_same_error(served):
    # Error text travels over both protocols; evaluation uses gRPC, curl users HTTP.
    c = httpclient.InferenceServerClient(served.http)
    ids = np.array([[5, 6, 7]], np.uint32)
    inputs = []
    for name, arr in (("input_ids", ids), ("sequence_length", np.array([[9]], np.uint32)),
                      ("max_output_len", np.array([[4]], np.uint32))):
        inp = httpclient.InferInput(name, list(arr.shape), "UINT32")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    with pytest.raises(InferenceServerException, match="larger than the row"):
        c.infer(MODEL, inputs)
    assert c.is_model_ready(MODEL)
    c.close()
