"""An independent reference forward pass: t5x's T5 network in plain numpy, on T5X parameters.

Written from t5x's ``examples/scalable_t5`` layers.py / network.py, not from this repository's
engine: RMS layer norm (eps 1e-6), attention without 1/sqrt(K) scaling, T5 relative-position
buckets (``_relative_position_bucket``, copied in numpy as t5x computes it), gated or plain MLP
with flax's activations (gelu is the tanh approximation), logits from ``logits_dense`` or the
embedding / sqrt(D). Each layer adds its own relative-bias table, as scalable_t5's layers do;
pass the same table for every layer to get the unscanned network.

Parameters are the unscanned names (``encoder.layers_<i>.attention.query.kernel`` [D, H*K]);
``tables`` gives each layer's [H, B] table per side.
"""

from __future__ import annotations

import numpy as np

from core.t5config import T5Config


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """t5x layers.RelativePositionBiases._relative_position_bucket, verbatim in numpy."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
        / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


def _norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _act(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0)
    if name == "silu":
        return x / (1 + np.exp(-x))
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))  # flax gelu


def _attend(cfg: T5Config, p: dict, prefix: str, xq: np.ndarray, xkv: np.ndarray,
            bias: np.ndarray) -> np.ndarray:
    """xq [Q, D], xkv [P, D], bias [H, Q, P] -> [Q, D]."""
    h, k = cfg.num_heads, cfg.d_kv
    q, kk, v = (
        (x @ p[f"{prefix}.{n}.kernel"]).reshape(len(x), h, k)
        for x, n in ((xq, "query"), (xkv, "key"), (xkv, "value")))
    logits = np.einsum("qhk,phk->hqp", q, kk) + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqp,phk->qhk", probs, v).reshape(len(xq), h * k) @ p[f"{prefix}.out.kernel"]


def _mlp(cfg: T5Config, p: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    if cfg.gated:
        y = _act(cfg.activation, x @ p[f"{prefix}.mlp.wi_0.kernel"]) * (
            x @ p[f"{prefix}.mlp.wi_1.kernel"])
    else:
        y = _act(cfg.activation, x @ p[f"{prefix}.mlp.wi.kernel"])
    return y @ p[f"{prefix}.mlp.wo.kernel"]


def _bias(table: np.ndarray, q: int, bidirectional: bool, cfg: T5Config) -> np.ndarray:
    pos = np.arange(q)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], bidirectional,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    return table[:, buckets]  # [H, Q, Q]


def logits(cfg: T5Config, p: dict[str, np.ndarray], tables: dict[str, list[np.ndarray]],
           ids: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Teacher-forced logits of one row: ids [S], dec [T] (starting with the start token)
    -> [T, V], in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    emb = p["token_embedder.embedding"]
    x = emb[ids]
    for i, table in enumerate(tables["encoder"]):
        pre = f"encoder.layers_{i}"
        h = _norm(x, p[f"{pre}.pre_attention_layer_norm.scale"])
        x = x + _attend(cfg, p, f"{pre}.attention", h, h,
                        _bias(np.asarray(table, np.float64), len(ids), True, cfg))
        x = x + _mlp(cfg, p, pre, _norm(x, p[f"{pre}.pre_mlp_layer_norm.scale"]))
    enc = _norm(x, p["encoder.encoder_norm.scale"])

    y = emb[dec]
    causal = np.where(np.arange(len(dec))[None, :] <= np.arange(len(dec))[:, None], 0.0, -1e10)
    for i, table in enumerate(tables["decoder"]):
        pre = f"decoder.layers_{i}"
        h = _norm(y, p[f"{pre}.pre_self_attention_layer_norm.scale"])
        y = y + _attend(cfg, p, f"{pre}.self_attention", h, h,
                        _bias(np.asarray(table, np.float64), len(dec), False, cfg) + causal)
        h = _norm(y, p[f"{pre}.pre_cross_attention_layer_norm.scale"])
        y = y + _attend(cfg, p, f"{pre}.encoder_decoder_attention", h, enc,
                        np.zeros((cfg.num_heads, len(dec), len(ids))))
        y = y + _mlp(cfg, p, pre, _norm(y, p[f"{pre}.pre_mlp_layer_norm.scale"]))
    y = _norm(y, p["decoder.decoder_norm.scale"])
    if cfg.tie_word_embeddings:
        return y @ emb.T / np.sqrt(cfg.d_model)
    return y @ p["decoder.logits_dense.kernel"]


def greedy(cfg: T5Config, p: dict[str, np.ndarray], tables: dict[str, list[np.ndarray]],
           ids: np.ndarray, steps: int) -> list[int]:
    """Greedy decoding by re-running the full decoder each step (no cache): the generated
    tokens, up to and including the end token (``eos_token_id``) or ``steps`` tokens."""
    dec = [cfg.decoder_start_token_id]
    while len(dec) <= steps:
        dec.append(int(np.argmax(logits(cfg, p, tables, ids, np.array(dec))[-1])))
        if dec[-1] == cfg.eos_token_id:
            break
    return dec[1:]
