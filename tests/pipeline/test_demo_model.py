"""The demo's building blocks: vocabulary, network, training data (fast, no Ray)."""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
import pytest

from core.t5config import T5Config
from demo import model as m
from demo import train as tr
from demo.build import DemoSettings, cache_key, gin_text, load_rows
from demo.t5x_writer import t5x_param_shapes
from demo.vocab import EOS_ID, load, train_sentencepiece


@pytest.fixture(scope="module")
def rows(xsum_sample):
    return load_rows(xsum_sample)


@pytest.fixture(scope="module")
def texts(rows):
    return [r["document"] for r in rows] + [r["summary"] for r in rows]


def test_vocab_has_t5_ids_and_is_deterministic(tmp_path, texts):
    a = train_sentencepiece(texts, tmp_path / "a" / "spiece.model", 300)
    b = train_sentencepiece(texts, tmp_path / "b" / "spiece.model", 300)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    sp = load(a)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 300
    summary = texts[-1]
    assert sp.decode(sp.encode(summary)) == summary


def test_vocab_errors_name_the_problem(tmp_path, texts):
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece(["", "  "], tmp_path / "x.model", 100)
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_sentencepiece(texts[:2], tmp_path / "y.model", 5000)


def test_parameter_names_and_shapes_are_t5xs():
    """The demo network's tree is exactly what t5x's examples/t5 network has (as the
    conversion side's independent table lists it)."""
    cfg = T5Config(vocab_size=96, d_model=16, num_heads=4, d_kv=8, d_ff=24,
                   num_encoder_layers=2, num_decoder_layers=3, feed_forward_proj="gated-silu")
    # Shapes only: eval_shape traces the initialiser without running it.
    tree = jax.eval_shape(lambda: m.init_params(cfg, jax.random.PRNGKey(0)))
    shapes = {k: v.shape for k, v in _flat_shapes(tree).items()}
    expected = t5x_param_shapes(T5Config(
        d_model=16, num_heads=4, d_kv=8, d_ff=24, vocab_size=96, num_encoder_layers=2,
        num_decoder_layers=3, feed_forward_proj="gated-silu", tie_word_embeddings=False))
    assert shapes == expected
    assert "encoder.layers_0.attention.query.kernel" in shapes


def _flat_shapes(tree, prefix=""):
    out = {}
    for name, value in tree.items():
        full = f"{prefix}.{name}" if prefix else name
        out.update(_flat_shapes(value, full) if isinstance(value, dict) else {full: value})
    return out


def test_relative_position_buckets_follow_t5():
    rel = np.arange(-200, 201, dtype=np.int32)
    bi = m.relative_position_bucket(rel, True, 32, 128)
    causal = m.relative_position_bucket(rel, False, 32, 128)
    # bidirectional: 16 buckets per direction, exact below 8, log-spaced to 128, clipped
    assert bi[rel == 0] == 0 and bi[rel == -1] == 1 and bi[rel == 1] == 17
    assert bi[rel == -7] == 7 and bi[rel == 7] == 23
    assert bi.min() == 0 and bi.max() == 31
    assert bi[rel == -200] == bi[rel == -128] == 15
    # causal: keys after the query all fall in bucket 0; the past spreads over 32 buckets
    assert set(causal[rel >= 0]) == {0}
    assert causal[rel == -1] == 1 and causal[rel == -15] == 15 and causal[rel == -200] == 31
    assert np.all(np.diff(causal[rel <= 0][::-1]) >= 0)


def test_forward_masks_padding_and_is_causal():
    cfg = T5Config(vocab_size=50, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                   num_encoder_layers=1, num_decoder_layers=1, feed_forward_proj="gated-silu")
    params = jax.jit(m.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(1))
    flat = m.flatten(params)
    back = m.flatten(m.unflatten(flat))
    assert all(np.array_equal(back[k], flat[k]) for k in flat)
    forward = jax.jit(m.forward, static_argnums=3)
    inputs = np.array([[5, 6, 7, EOS_ID, 0, 0]], np.int32)
    padded = np.array([[5, 6, 7, EOS_ID, 0, 0, 0, 0]], np.int32)
    dec = np.array([[0, 9, 10, 11]], np.int32)
    a = forward(params, inputs, dec, cfg)
    b = forward(params, padded, dec, cfg)
    assert a.shape == (1, 4, 50)
    np.testing.assert_allclose(a, b, atol=1e-5)  # extra padding changes nothing
    changed = dec.copy()
    changed[0, 3] = 12
    c = forward(params, inputs, changed, cfg)
    np.testing.assert_allclose(a[:, :3], c[:, :3], atol=1e-5)  # the future is not seen
    assert not np.allclose(a[:, 3], c[:, 3])


def test_examples_match_evaluation_truncation(tmp_path, rows, texts):
    """One training input per way a client may cut a long document, one of which is
    evaluation's own (max_len - 1 pieces, then EOS)."""
    from evaluation.tokenizer import Tokenizer

    sp = load(train_sentencepiece(texts, tmp_path / "spiece.model", 300))
    cfg = tr.TrainConfig(max_input_len=32, max_target_len=96)
    inputs, targets = tr.make_examples(sp.encode, rows, cfg)
    assert inputs.shape[1] == 32 and targets.shape[1] == 96
    assert len(inputs) == 2 * len(rows)  # every sample document is longer than 32 pieces
    for t in targets:
        assert EOS_ID in t.tolist()
    evaluation = Tokenizer((tmp_path / "spiece.model").read_bytes())
    first = cfg.input_template.format(document=rows[0]["document"])
    assert inputs[0].tolist() == evaluation.encode(first, 32)
    with pytest.raises(ValueError, match="max_target_len"):
        tr.make_examples(sp.encode, rows, tr.TrainConfig(max_target_len=4))


def test_cache_key_tracks_settings_and_gin():
    a, b = DemoSettings(), DemoSettings(steps=301)
    assert cache_key(a) == cache_key(DemoSettings())
    assert cache_key(a) != cache_key(b)
    gin = gin_text(a)
    assert "NUM_EMBEDDINGS = 800" in gin and "('silu', 'linear')" in gin
    assert "logits_via_embedding = False" in gin
    json.dumps(a.__dict__)
