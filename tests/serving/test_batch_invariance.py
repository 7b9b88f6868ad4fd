"""Batch invariance of the JAX engine (issue 22): a row's output ids and log probs are
bit-identical whether it is decoded alone, in batches of other sizes, at other positions,
beside other rows, in every dtype, for greedy, seeded sampling and beam search.

Random-weight models have many near-ties, so a last-bit change in a logit flips tokens often:
the check is sharp. The rows span two input buckets (8, 16) and two max_output_len (5, 8, one
output bucket: each extra bucket is one more compiled program per case on 2 cores), so rows of
different shapes share batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.engine import GenerationResult, SamplingParams, T5Engine
from testing.ft_writer import UL2_TINY, random_ft_weights, write_ft_folder

LENGTHS = (3, 11, 9, 5, 15, 14, 7, 12, 8, 6, 16, 4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_ft_folder(tmp_path_factory.mktemp("ul2"), UL2_TINY, 1,
                           random_ft_weights(UL2_TINY, seed=11))


@pytest.fixture(scope="module")
def rows() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(2, UL2_TINY.vocab_size, size=n) for n in LENGTHS]


def settings(mode: str, i: int) -> SamplingParams:
    """Row i's settings: its own seed, and max_output_len 5 or 8."""
    common = {"max_output_len": 5 if i % 3 else 8, "return_log_probs": True}
    if mode == "sample":
        return SamplingParams(top_k=0, top_p=0.9, temperature=1.3, random_seed=1000 + i, **common)
    if mode == "beam":
        return SamplingParams(beam_width=2, **common)
    return SamplingParams(**common)


def key(r: GenerationResult) -> tuple[bytes, bytes, bytes, bytes]:
    """Everything a row returns, as bytes: equal keys mean bit-identical results."""
    return (r.output_ids.tobytes(), r.sequence_length.tobytes(), r.cum_log_probs.tobytes(),
            r.output_log_probs.tobytes())


def decode_in(engine: T5Engine, rows: list[np.ndarray], mode: str, order: list[int],
              sizes: list[int]) -> dict[int, tuple]:
    """Rows in ``order`` cut into consecutive batches of ``sizes``: row index -> its key."""
    out: dict[int, tuple] = {}
    start = 0
    for size in sizes:
        part = order[start:start + size]
        start += size
        results = engine.generate([rows[i] for i in part], [settings(mode, i) for i in part])
        out.update({i: key(r) for i, r in zip(part, results, strict=True)})
    return out


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_a_row_decodes_the_same_in_any_batch(folder, rows, dtype, mode) -> None:
    engine = T5Engine.load(str(folder), dtype=dtype)
    assert engine.batch_invariant  # the default
    n = len(rows)
    alone = decode_in(engine, rows, mode, list(range(n)), [1] * n)
    rng = np.random.default_rng(3)
    for sizes in ([n], [2] * 6, [5, 4, 3], [9, 3]):
        order = [int(i) for i in rng.permutation(n)]  # other neighbours, other positions
        got = decode_in(engine, rows, mode, order, sizes)
        differ = [i for i in range(n) if got[i] != alone[i]]
        assert not differ, f"{dtype} {mode}: rows {differ} changed in batches of {sizes}"
    if mode == "sample":  # the seeds matter: the rows did not all decode greedily
        greedy = decode_in(engine, rows, "greedy", list(range(n)), [n])
        assert any(greedy[i][0] != alone[i][0] for i in range(n))


def test_without_invariance_rows_depend_on_their_batch(folder, rows) -> None:
    """The check above is sharp: the engine batching freely (``batch_invariant=False``,
    shapes from the batch's longest row and its size) changes bf16 rows' log probs."""
    engine = T5Engine.load(str(folder), dtype="bf16", batch_invariant=False)
    n = len(rows)
    alone = decode_in(engine, rows, "greedy", list(range(n)), [1] * n)
    together = decode_in(engine, rows, "greedy", list(range(n)), [n])
    assert sum(together[i] != alone[i] for i in range(n)) >= n // 2
