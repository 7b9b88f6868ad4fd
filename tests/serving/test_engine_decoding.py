"""Decoding behaviour of the JAX engine: seeds, beams, per-row limits, padding, penalties,
compilation reuse and input checking, on a tiny UL2-style model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from serving.engine import GenerationResult, SamplingParams, T5Engine
from testing.ft_writer import UL2_TINY, random_ft_weights, write_ft_folder

END = UL2_TINY.eos_token_id


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_ft_folder(tmp_path_factory.mktemp("ul2"), UL2_TINY, 2,
                           random_ft_weights(UL2_TINY, seed=11))


@pytest.fixture(scope="module")
def engine(folder) -> T5Engine:
    return T5Engine.load(str(folder))


@pytest.fixture(scope="module")
def rows() -> list[np.ndarray]:
    """Mixed lengths that share one input bucket (16), so that each row alone and the batch
    compile one program each."""
    rng = np.random.default_rng(5)
    return [rng.integers(2, 100, size=n) for n in (9, 16, 11, 14)]


def tokens(res: GenerationResult, beam: int = 0) -> list[int]:
    """The generated tokens of one beam, end token included when produced."""
    return res.output_ids[beam, : int(res.sequence_length[beam])].tolist()


def sampled(top_k: int = 0, top_p: float = 0.95, seed: int = 0, **kw) -> SamplingParams:
    return SamplingParams(max_output_len=16, top_k=top_k, top_p=top_p, random_seed=seed,
                          temperature=1.5, **kw)


def test_same_seed_same_sample_different_seeds_differ(engine, rows) -> None:
    row = rows[1]
    a = engine.generate([row] * 4, [sampled(seed=s) for s in (1, 1, 2, 3)])
    # batch makeup does not matter either: same program (batch bucket 4), other neighbours
    again = engine.generate([rows[0], row, rows[2]], [sampled(seed=9), sampled(seed=1),
                                                      sampled(seed=9)])
    assert tokens(a[0]) == tokens(a[1]) == tokens(again[1])
    samples = {tuple(tokens(r)) for r in a[1:]}
    assert len(samples) == 3, samples
    greedy = engine.generate([row] * 4, [SamplingParams(max_output_len=16)] * 4)[0]
    assert any(tokens(r) != tokens(greedy) for r in a)
    # top_k sampling (top_k > 1, no top_p) is seeded the same way
    k = engine.generate([row] * 3, [sampled(top_k=20, top_p=0.0, seed=4)] * 3)
    assert tokens(k[0]) == tokens(k[1])


def test_top_k_one_and_zero_zero_are_greedy(engine, rows) -> None:
    greedy = engine.generate(rows, [SamplingParams(max_output_len=16)] * len(rows))
    zero = engine.generate(rows, [SamplingParams(max_output_len=16, top_k=0, top_p=0.0,
                                                 random_seed=3)] * len(rows))
    one = engine.generate(rows, [sampled(top_k=1, seed=8)] * len(rows))
    for g, z, o in zip(greedy, zero, one, strict=True):
        assert tokens(g) == tokens(z) == tokens(o)


def test_top_p_tiny_is_greedy(engine, rows) -> None:
    """Nucleus with p -> 0 keeps only the most likely token."""
    greedy = engine.generate(rows, [SamplingParams(max_output_len=16, temperature=1.5)] * 4)
    nucleus = engine.generate(rows, [sampled(top_k=0, top_p=1e-6, seed=s) for s in range(4)])
    for g, n in zip(greedy, nucleus, strict=True):
        assert tokens(g) == tokens(n)


def test_beam_search_returns_width_beams_best_first(engine, rows) -> None:
    alpha = 0.6
    res = engine.generate(rows, [SamplingParams(max_output_len=12, beam_width=2,
                                                len_penalty=alpha, return_log_probs=True)] * 4)
    for r in res:
        assert r.output_ids.shape == (2, 12) and r.sequence_length.shape == (2,)
        assert r.cum_log_probs is not None and r.output_log_probs is not None
        score = r.cum_log_probs / r.sequence_length.astype(np.float32) ** alpha
        assert score[0] >= score[1]
        assert tokens(r, 0) != tokens(r, 1)
        for b in range(2):
            n = int(r.sequence_length[b])
            np.testing.assert_allclose(r.output_log_probs[b, :n].sum(), r.cum_log_probs[b],
                                       rtol=1e-5)
            assert np.all(r.output_ids[b, n:] == END)


def test_beam_log_probs_match_teacher_forced_logits(engine, rows) -> None:
    """The cached incremental decoder scores each beam as the full-sequence decoder does."""
    [r] = engine.generate([rows[2]], [SamplingParams(max_output_len=10, beam_width=2,
                                                     return_log_probs=True)])
    for b in range(2):
        toks = tokens(r, b)
        dec = np.array([[0] + toks[:-1]])
        logits = engine.logits(rows[2][None], dec)[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want = logp[np.arange(len(toks)), toks]
        np.testing.assert_allclose(r.output_log_probs[b, :len(toks)], want, atol=1e-4)


def test_beam_width_one_equals_greedy(engine, rows) -> None:
    greedy = engine.generate(rows, [SamplingParams(max_output_len=14)] * 4)
    before = engine.trace_counts["beam"]
    beam = engine.generate_beam(rows, [SamplingParams(max_output_len=14)] * 4)
    assert engine.trace_counts["beam"] == before + 1  # the beam-search program, width 1
    for g, b in zip(greedy, beam, strict=True):
        assert tokens(g) == tokens(b)
        np.testing.assert_array_equal(g.output_ids, b.output_ids)


def test_per_row_max_output_len_in_one_batch(engine, rows) -> None:
    limits = [2, 5, 9, 16]
    long = engine.generate(rows, [SamplingParams(max_output_len=16)] * 4)
    mixed = engine.generate(rows, [SamplingParams(max_output_len=m) for m in limits])
    for lim, full, r in zip(limits, long, mixed, strict=True):
        assert r.output_ids.shape == (1, lim)
        assert int(r.sequence_length[0]) == min(lim, int(full.sequence_length[0]))
        assert tokens(r) == tokens(full)[:lim]
    assert any(int(f.sequence_length[0]) > lim for lim, f in zip(limits, long, strict=True))
    # beams honour their row's own limit too
    beams = engine.generate(rows, [SamplingParams(max_output_len=m, beam_width=2)
                                   for m in limits])
    for lim, b in zip(limits, beams, strict=True):
        assert b.output_ids.shape == (2, lim) and max(b.sequence_length) <= lim


@pytest.mark.parametrize("kind", ["greedy", "sampling", "beam"])
def test_padding_of_other_rows_does_not_change_a_row(engine, rows, kind: str) -> None:
    def params(i: int) -> SamplingParams:
        if kind == "greedy":
            return SamplingParams(max_output_len=12)
        if kind == "sampling":
            return sampled(seed=100 + i)
        return SamplingParams(max_output_len=12, beam_width=2)

    together = engine.generate(rows, [params(i) for i in range(len(rows))])
    for i, row in enumerate(rows):
        [alone] = engine.generate([row], [params(i)])
        np.testing.assert_array_equal(alone.output_ids, together[i].output_ids)
        np.testing.assert_array_equal(alone.sequence_length, together[i].sequence_length)


def test_repetition_penalty_and_temperature_follow_ft(engine, rows) -> None:
    """Greedy with a penalty equals argmax of teacher-forced logits / temperature with seen
    tokens (start token included) divided by the penalty when positive, multiplied if not."""
    pen, temp = 3.0, 0.7
    row = rows[1]
    [r] = engine.generate([row], [SamplingParams(max_output_len=12, repetition_penalty=pen,
                                                 temperature=temp)])
    [plain] = engine.generate([row], [SamplingParams(max_output_len=12)])
    assert tokens(r) != tokens(plain)
    toks = tokens(r)
    logits = engine.logits(row[None], np.array([[0] + toks[:-1]]))[0] / temp
    for t, tok in enumerate(toks):
        seen = [0] + toks[:t]
        step = logits[t].copy()
        step[seen] = np.where(step[seen] > 0, step[seen] / pen, step[seen] * pen)
        assert int(np.argmax(step)) == tok, t


def test_start_and_end_ids(engine, rows) -> None:
    [plain] = engine.generate([rows[0]], [SamplingParams(max_output_len=12)])
    stop_at = tokens(plain)[2]  # end on the third generated token
    [r] = engine.generate([rows[0]], [SamplingParams(max_output_len=12, end_id=stop_at)])
    assert tokens(r) == tokens(plain)[:3] and int(r.sequence_length[0]) == 3
    assert np.all(r.output_ids[0, 3:] == stop_at)
    [s] = engine.generate([rows[0]], [SamplingParams(max_output_len=6, start_id=5)])
    logits = engine.logits(rows[0][None], np.array([[5]]))[0, 0]
    assert int(s.output_ids[0, 0]) == int(np.argmax(logits))


def test_one_compilation_per_bucket(folder) -> None:
    """Programs are counted as jax traces them; this test uses input and output buckets (32)
    no other test here uses, and counts the programs it adds."""
    engine = T5Engine.load(str(folder))
    rng = np.random.default_rng(9)
    base = dict(engine.trace_counts)

    def added(kind: str) -> int:
        return engine.trace_counts[kind] - base.get(kind, 0)

    def request(batch: int, in_len: int, out_len: int, **kw) -> None:
        engine.generate([rng.integers(2, 100, size=in_len) for _ in range(batch)],
                        [SamplingParams(max_output_len=out_len, **kw)] * batch)

    request(3, 17, 17)
    assert added("sampling") == 1
    # batch 3..4 -> 4, input 17..32 -> 32, output 17..32 -> 32: one program for all of them
    for batch, in_len, out_len in [(4, 32, 32), (3, 20, 18), (4, 25, 31), (3, 17, 17)]:
        request(batch, in_len, out_len, temperature=0.5 + batch / 10)
    assert added("sampling") == 1
    request(5, 17, 17)  # a new batch bucket (8) compiles once more
    request(6, 30, 20)
    assert added("sampling") == 2
    request(3, 17, 17, top_k=0, top_p=0.9, random_seed=1)
    request(4, 19, 30, top_k=5, random_seed=2)
    assert added("sampling") == 3  # sampling is its own program
    request(2, 17, 17, beam_width=2)
    request(2, 31, 31, beam_width=2, len_penalty=1.0)
    assert added("beam") == 1
    # a second engine on the same model reuses the programs
    T5Engine.load(str(folder)).generate([rng.integers(2, 100, size=18)] * 3,
                                        [SamplingParams(max_output_len=20)] * 3)
    assert added("sampling") == 3


def test_input_limit_caps_the_ask_and_zero_means_the_engines() -> None:
    limit = T5Engine.max_input_len
    assert T5Engine.input_limit(0) == limit
    assert T5Engine.input_limit(64) == 64
    assert T5Engine.input_limit(limit + 1) == limit


def test_bad_inputs_are_named(engine, rows) -> None:
    ok = SamplingParams(max_output_len=4)
    cases = [
        ([np.array([5, 100])], [ok], "outside"),
        ([np.array([], int)], [ok], "non-empty"),
        ([np.array([[5, 6]])], [ok], "1-D"),
        ([np.array([1.5])], [ok], "integer"),
        ([rows[0]], [ok, ok], "2 SamplingParams"),
        ([rows[0]], [SamplingParams(max_output_len=0)], "max_output_len"),
        ([rows[0]], [dataclasses.replace(ok, top_p=1.5)], "top_p"),
        ([rows[0]], [dataclasses.replace(ok, temperature=0.0)], "temperature"),
        ([rows[0]], [dataclasses.replace(ok, end_id=100)], "end_id"),
        ([rows[0]], [dataclasses.replace(ok, beam_width=0)], "beam_width"),
    ]
    for inputs, params, words in cases:
        with pytest.raises(ValueError, match=words):
            engine.generate(inputs, params)
    with pytest.raises(ValueError, match="dtype"):
        T5Engine.load("/nonexistent", dtype="int8")


def test_broken_folders_are_named(folder, tmp_path) -> None:
    import shutil

    broken = tmp_path / "2-gpu"
    shutil.copytree(folder, broken)
    victim = broken / "decoder.block.2.layer.2.DenseReluDense.wi2.weight.1.bin"
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(ValueError, match="wi2.weight.1.bin"):
        T5Engine.load(str(broken))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="wi2.weight.1.bin"):
        T5Engine.load(str(broken))
    (broken / "config.ini").unlink()
    with pytest.raises(FileNotFoundError, match="config.ini"):
        T5Engine.load(str(broken))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T5Engine.load(str(tmp_path / "nothing"))
