"""evaluation.batching, the loop both evaluation paths and the benchmark share, without Ray.

``generate`` is a plain Python function here (the loop takes any callable); decoding is the real
SentencePiece tokenizer trained by demo.vocab. The engine and Triton behind it are tested in
test_evaluate_in_process.py and test_evaluate_served.py.
"""

from __future__ import annotations

import pytest

from evaluation.batching import answer_request, group_rows, predict_rows
from evaluation.tokenizer import Tokenizer

TEXTS = ["Wales has a yellow weather warning.", "Ice.", "The Met Office said roads are icy.",
         "Snow fell overnight in the hills of Powys.", "Rain."]


def test_group_rows_longest_first_ties_in_order():
    assert group_rows([3, 5, 3, 9, 1], 2) == [[3, 1], [0, 2], [4]]
    assert group_rows([], 4) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        group_rows([1], 0)


def test_predict_rows_sends_groups_and_decodes(eval_vocab):
    tok = Tokenizer(eval_vocab.read_bytes())
    rows = [tok.encode(t, max_len=64) for t in TEXTS]
    sent: list[list[list[int]]] = []

    def echo(batch: list[list[int]]) -> list[list[int]]:
        sent.append(batch)
        return batch  # the input ids back: decoding them gives the input text

    answers = list(predict_rows(rows, echo, tok.decode, batch_size=2,
                                ids=[f"ex{i}" for i in range(len(rows))]))
    expected_groups = group_rows([len(r) for r in rows], 2)
    assert sent == [[rows[i] for i in g] for g in expected_groups]
    assert [a.ids for a in answers] == [[f"ex{i}" for i in g] for g in expected_groups]
    by_id = {i: p for a in answers for i, p in zip(a.ids, a.predictions, strict=True)}
    assert by_id == {f"ex{i}": t for i, t in enumerate(TEXTS)}
    assert all(a.error == "" and a.latency_ms >= 0 and a.generated is not None for a in answers)


def test_a_rejected_request_is_split_and_only_its_bad_row_fails(eval_vocab):
    tok = Tokenizer(eval_vocab.read_bytes())
    rows = [tok.encode(t, max_len=64) for t in TEXTS[:3]]
    too_long = max(len(r) for r in rows)

    def refuse_long(batch: list[list[int]]) -> list[list[int]]:
        if any(len(r) >= too_long for r in batch):
            raise ValueError(f"input length {too_long} is too long")
        return batch

    answers = list(answer_request(["a", "b", "c"], rows, refuse_long, tok.decode))
    failed = [a for a in answers if a.error]
    assert len(answers) == 3 and len(failed) == 1
    assert failed[0].ids == [["a", "b", "c"][max(range(3), key=lambda i: len(rows[i]))]]
    assert failed[0].error == f"ValueError: input length {too_long} is too long"
    assert failed[0].generated is None and failed[0].predictions == [""]


def test_a_failure_not_worth_splitting_fails_every_row(eval_vocab):
    tok = Tokenizer(eval_vocab.read_bytes())
    rows = [tok.encode(t, max_len=64) for t in TEXTS[:3]]
    calls = []

    def away(batch: list[list[int]]) -> list[list[int]]:
        calls.append(len(batch))
        raise ConnectionError("server away")

    [answer] = answer_request(["a", "b", "c"], rows, away, tok.decode,
                              should_split=lambda exc: False, describe=lambda exc: "gone")
    assert calls == [3] and answer.ids == ["a", "b", "c"] and answer.error == "gone"
    assert answer.predictions == ["", "", ""]
