"""Batch invariance through served models (issue 22): concurrent clients (Triton's dynamic
batcher merges their requests) get for each row exactly what the server gives that row alone,
in fp32, fp16 and bf16; and ``ray_jobs.evaluate`` writes byte-identical predictions.jsonl from
the bf16 model whatever its actor count and batch size (given, or the served model's when not),
and records the dtype and the mode in metrics.json."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from evaluation.runner import EvalSettings, evaluate
from tests.evaluation.conftest import COMMON, MODEL
from tests.serving.conftest import ft_inputs

pytestmark = pytest.mark.slow

OUTPUTS = ("output_ids", "sequence_length", "cum_log_probs", "output_log_probs")


def _rows(n: int, vocab: int) -> list[np.ndarray]:
    """n rows of 3..40 tokens (input buckets 8, 16, 32, 64), ending with EOS."""
    rng = np.random.default_rng(1)
    return [np.append(rng.integers(2, vocab, size=int(k)), 1).astype(np.uint32)
            for k in rng.integers(2, 40, size=n)]


# The server of each inference dtype: the fp32 one is the evaluation tests' (two replicas; this
# test talks to the first).
SERVERS = {"fp32": lambda request: request.getfixturevalue("grpc_urls")[0],
           "fp16": lambda request: request.getfixturevalue("fp16_grpc_url"),
           "bf16": lambda request: request.getfixturevalue("bf16_grpc_url")}


@pytest.mark.parametrize("dtype", list(SERVERS))
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_concurrent_clients_get_each_rows_alone_answer(request, dtype, mode):
    """Each of 12 rows sent alone, one request at a time; then 6 clients at once send them in
    requests of 1 to 3 rows, which Triton's dynamic batcher merges: every output of every row,
    log probs included, is byte-identical. (The served engine runs in the tritonserver's
    Python stub under Ray's worker settings; the in-process engine of this test process is
    another process, which bench/batch_invariance.py served compares on a GPU.)"""
    url = SERVERS[dtype](request)
    rows = _rows(12, 200)
    knobs = {"greedy": {}, "sample": {"runtime_top_k": 0, "runtime_top_p": 0.9,
                                      "random_seed": 2**40 + 7},
             "beam": {"beam_width": 2}}[mode]

    def ask(c: grpcclient.InferenceServerClient, part: list[int]) -> list[dict]:
        res = c.infer(MODEL, ft_inputs([rows[i] for i in part], [10 - i % 3 for i in part],
                                       is_return_log_probs=True, **knobs))
        return [{n: res.as_numpy(n)[j] for n in OUTPUTS} for j in range(len(part))]

    c = grpcclient.InferenceServerClient(url)
    alone = [ask(c, [i])[0] for i in range(len(rows))]
    c.close()

    answers: dict[int, dict[str, np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def client(parts: list[list[int]]) -> None:
        try:
            c = grpcclient.InferenceServerClient(url)
            barrier.wait()
            for part in parts:
                answers.update(zip(part, ask(c, part), strict=True))
            c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    plan = [[[0], [7]], [[1, 2]], [[3], [4, 5]], [[6, 8, 9]], [[10]], [[11]]]
    threads = [threading.Thread(target=client, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(answers) == list(range(12))
    for i, want in enumerate(alone):
        got = answers[i]
        n = 10 - i % 3  # a response is as long as its longest row: compare the row's own part
        assert np.array_equal(got["sequence_length"], want["sequence_length"]), i
        assert np.array_equal(got["output_ids"][:, :n], want["output_ids"][:, :n]), i
        assert got["cum_log_probs"].tobytes() == want["cum_log_probs"].tobytes(), i
        assert (got["output_log_probs"][:, :n].tobytes()
                == want["output_log_probs"][:, :n].tobytes()), i


def test_evaluate_actors_and_batch_sizes_give_identical_predictions(
        tmp_path, bf16_grpc_url, bf16_model_repo, data_with_holes):
    outputs: list[Path] = []
    # None: no --batch-size, so requests of the served model's max_batch_size (128: all 60)
    for actors, batch in ((1, 2), (2, 5), (4, 1), (2, None)):
        out = tmp_path / f"a{actors}-b{batch}"
        m = evaluate(EvalSettings(
            url=bf16_grpc_url, model_name=MODEL, output=str(out), dataset=str(data_with_holes),
            model_repository=str(bf16_model_repo),
            **{**COMMON, "batch_size": batch, "num_actors": actors}))
        assert m["serving"] == {"data_type": "bf16", "batch_invariant": True,
                                "source": "server"}
        assert m["request_rows"] == (batch or 128)
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["serving"] == m["serving"]
        outputs.append(out / "predictions.jsonl")
    first = outputs[0].read_bytes()
    assert first  # predictions.jsonl is sorted by id (example order) and not empty
    for other in outputs[1:]:
        assert other.read_bytes() == first, other.parent.name
