"""The T5 encoder-decoder math in JAX (ft-t5-format.md section 5), on the tree of weights.py.

Shapes: B batch rows, S encoder length, T decoder length, M decoder cache length (the output
bucket), D d_model, H heads, K d_kv, F d_ff, V vocab, L layers. Layers are a Python loop over
separate per-layer arrays (weights.py says why: a scan over stacked weights copies each slice
before a GPU matmul); compile time grows with depth (UL2 20B: a first call of 15-24 s per bucket on an H100).

Everything that depends only on shapes (relative-position buckets) is computed with numpy at
trace time, in float32 like t5x and HF, so the buckets are bit-identical to theirs.

Relative-position bias: as in FT, one table per side (``<side>_rel_bias``) serves every layer;
a layer that carries its own table (``rel_bias``, weights.py: scalable_t5 checkpoints) uses it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from core.relpos import relative_position_bucket
from core.t5config import T5Config
from serving.engine import attention as paths

NEG_INF = -1e9  # additive mask; large but finite so that fully masked rows stay NaN-free
RMS_EPS = 1e-6


# --- small pieces ----------------------------------------------------------------------------


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated and returned in fp32 (attention logits, LM head).

    XLA's CPU backend has no bf16 x bf16 -> fp32 dot, so there the operands are upcast; GPUs
    keep the half-precision operands (bandwidth) and accumulate in fp32.
    """
    if a.dtype != jnp.float32 and jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """T5's layer norm: x * rsqrt(mean(x^2) + 1e-6) * scale, statistics in fp32. x [..., D]."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)
    return y.astype(x.dtype) * scale


def activation(cfg: T5Config, x: jax.Array) -> jax.Array:
    """The feed-forward non-linearity ``cfg.activation`` applied elementwise; x: any shape."""
    act = cfg.activation
    if act == "relu":
        return jax.nn.relu(x)
    if act == "gelu":
        # FT's gelu kernel and t5x's gated-gelu are both the tanh approximation.
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def mlp(cfg: T5Config, p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """act(x @ wi) [* (x @ wi2)] @ wo. x [..., D] -> [..., D].

    A layer with ``wi12`` ([D, 2, F], attention.fuse_weights) runs both input products as one.
    """
    if "wi12" in p:
        both = jnp.einsum("...d,dtf->t...f", x, p["wi12"])
        return (activation(cfg, both[0]) * both[1]) @ p["wo"]
    h = activation(cfg, x @ p["wi"])
    if cfg.gated:
        h = h * (x @ p["wi2"])
    return h @ p["wo"]


def position_bias(table: jax.Array, buckets: np.ndarray) -> jax.Array:
    """table [H, B], buckets [Q, Kp] -> bias [H, Q, Kp] (fp32)."""
    return table[:, buckets]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """No 1/sqrt(K) scaling (T5 folds it into the query weights).

    q [B, H, Q, K], k/v [B, H, Kp, K], bias broadcastable to [B, H, Q, Kp] (fp32, holds the
    masks) -> [B, H, Q, K].
    """
    logits = einsum_f32("bhqk,bhpk->bhqp", q, k) + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqp,bhpk->bhqk", probs, v)


def attend_one(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Attention of a single query position, as :func:`attention` without the length-1 query
    axis: q [B, H, K], k/v [B, H, P, K], bias broadcastable to [B, H, P] -> [B, H, K].

    Batched matrix-vector products: the decoder's cross-attention at 128 rows x 512 positions
    ran 6 % faster this way on an H200 than as [B, H, 1, K] products, with identical results
    (bench/engine_parts.py, docs/benchmarks.md).
    """
    logits = einsum_f32("bhk,bhpk->bhp", q, k) + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhp,bhpk->bhk", probs, v)


def project_heads(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, S, D], w [D, H, K] -> [B, H, S, K]."""
    return jnp.einsum("bsd,dhk->bhsk", x, w)


def self_qkv(h: jax.Array, p: dict[str, jax.Array], layout: str = "bhsk"
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's self-attention q, k, v: h [B, S, D] -> three [B, H, S, K] (layout "bhsk")
    or [B, S, H, K] ("bshk"). A layer with ``qkv`` ([D, 3, H, K], attention.fuse_weights)
    runs the three products as one."""
    if "qkv" in p:
        t = jnp.einsum(f"bsd,dthk->t{layout}", h, p["qkv"])
        return t[0], t[1], t[2]
    q, k, v = (jnp.einsum(f"bsd,dhk->{layout}", h, p[n]) for n in ("q", "k", "v"))
    return q, k, v


def merge_heads(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, H, S, K], w [H, K, D] -> [B, S, D]."""
    return jnp.einsum("bhsk,hkd->bsd", x, w)


def lm_logits(cfg: T5Config, params: dict, h: jax.Array) -> jax.Array:
    """Final decoder norm and LM head. h [..., D] -> fp32 logits [..., V]."""
    h = rms_norm(h, params["decoder_norm"])
    if cfg.tie_word_embeddings:
        h = h * jnp.asarray(cfg.d_model ** -0.5, h.dtype)
    return einsum_f32("...d,vd->...v", h, params["lm_head"])


# --- encoder ---------------------------------------------------------------------------------


def key_mask(lengths: jax.Array, size: int) -> jax.Array:
    """lengths [B] -> additive fp32 mask [B, 1, 1, size]: 0 on real keys, NEG_INF on padding."""
    real = jnp.arange(size)[None, :] < lengths[:, None]
    return jnp.where(real, 0.0, NEG_INF).astype(jnp.float32)[:, None, None, :]


def encode(cfg: T5Config, params: dict, ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """ids [B, S] (padded), lengths [B] -> encoder output [B, S, D] (padded rows: garbage)."""
    s = ids.shape[1]
    x = params["embedding"][ids]
    pos = np.arange(s)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], True,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    mask = key_mask(lengths, s)
    rel = position_bias(params["encoder_rel_bias"], buckets)[None]  # [1, H, S, S]
    choice = paths.choose(x.dtype, cfg.d_kv).encoder

    for p in params["encoder"]:
        rel_p = rel if "rel_bias" not in p else position_bias(p["rel_bias"], buckets)[None]
        h = rms_norm(x, p["ln_attn"])
        if choice == "reference":
            o = attention(*self_qkv(h, p), rel_p + mask)
            x = x + merge_heads(o, p["o"])
        else:  # fused attention in the [B, S, H, K] layout (attention.py)
            q, k, v = self_qkv(h, p, "bshk")
            o = paths.encoder_fused(q, k, v, rel_p, lengths,
                                    "xla" if choice == "xla-fused" else "cudnn")
            x = x + jnp.einsum("bshk,hkd->bsd", o, p["o"])
        x = x + mlp(cfg, p, rms_norm(x, p["ln_mlp"]))
    return rms_norm(x, params["encoder_norm"])


def cross_kv(params: dict, enc: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """The cross-attention keys and values, computed once per request.

    enc [B, S, D] -> (k, v), each a list of L_d arrays [B, H, S, K].
    """
    dec = params["decoder"]
    return ([project_heads(enc, p["ck"]) for p in dec],
            [project_heads(enc, p["cv"]) for p in dec])


# --- decoder ---------------------------------------------------------------------------------


def decode_full(cfg: T5Config, params: dict, dec_ids: jax.Array, enc: jax.Array,
                enc_lengths: jax.Array) -> jax.Array:
    """Teacher-forced decoder over the whole sequence (no cache), for scoring and tests.

    dec_ids [B, T], enc [B, S, D], enc_lengths [B] -> fp32 logits [B, T, V].
    """
    t = dec_ids.shape[1]
    pos = np.arange(t)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], False,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    causal = np.where(pos[None, :] <= pos[:, None], 0.0, NEG_INF).astype(np.float32)
    shared = position_bias(params["decoder_rel_bias"], buckets)[None] + causal
    cross_bias = key_mask(enc_lengths, enc.shape[1])
    ck, cv = cross_kv(params, enc)
    x = params["embedding"][dec_ids]

    for p, k_c, v_c in zip(params["decoder"], ck, cv, strict=True):
        self_bias = (shared if "rel_bias" not in p
                     else position_bias(p["rel_bias"], buckets)[None] + causal)
        h = rms_norm(x, p["ln_self"])
        o = attention(*self_qkv(h, p), self_bias)
        x = x + merge_heads(o, p["o"])
        h = rms_norm(x, p["ln_cross"])
        x = x + merge_heads(attention(project_heads(h, p["cq"]), k_c, v_c, cross_bias), p["co"])
        x = x + mlp(cfg, p, rms_norm(x, p["ln_mlp"]))
    return lm_logits(cfg, params, x)


def causal_bucket_table(cfg: T5Config, cache_len: int) -> np.ndarray:
    """Bucket of each distance n = query - key in [0, cache_len) for the causal decoder."""
    return relative_position_bucket(-np.arange(cache_len), False,
                                    cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance)


def decode_step(cfg: T5Config, params: dict, tokens: jax.Array, step: jax.Array,
                cache_k: list[jax.Array], cache_v: list[jax.Array], cross_k: list[jax.Array],
                cross_v: list[jax.Array], cross_bias: jax.Array
                ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """One incremental decoder step with a preallocated key/value cache.

    tokens [B] (the token at position `step`), step scalar int32,
    cache_k/cache_v: L lists of [B, H, M, K] (positions < step filled),
    cross_k/cross_v: L lists of [B, H, S, K], cross_bias [B, 1, 1, S].
    Returns (fp32 logits [B, V], cache_k, cache_v with position `step` written).

    Each layer attends to its cache (positions < step) plus this step's own key/value, then
    writes that key/value into position `step`: one dynamic_update_slice per layer, in place
    inside the while loop.
    """
    m = cache_k[0].shape[2]
    key_pos = jnp.arange(m)
    dist = jnp.clip(step - key_pos, 0, m - 1)
    table = jnp.asarray(causal_bucket_table(cfg, m))

    cache_first = paths.choose(cache_k[0].dtype, cfg.d_kv).decode_self == "cache_first"

    def step_bias(rel: jax.Array) -> tuple[jax.Array, jax.Array]:
        """rel [H, B] -> (bias to the cache [1, H, 1, M], bias to this step [1, H, 1, 1]);
        cache_first: (bias to the cache with this step at position `step` [1, H, M], None)."""
        if cache_first:
            return jnp.where(key_pos <= step, rel[:, table[dist]], NEG_INF)[None], None
        past = jnp.where(key_pos < step, rel[:, table[dist]], NEG_INF)  # [H, M]
        return past[None, :, None, :], rel[:, table[0]][None, :, None, None]  # distance 0

    shared = step_bias(params["decoder_rel_bias"])
    x = params["embedding"][tokens][:, None, :]  # [B, 1, D]

    new_k, new_v = [], []
    layers = zip(params["decoder"], cache_k, cache_v, cross_k, cross_v, strict=True)
    for p, k_past, v_past, k_c, v_c in layers:
        past_bias, self_bias = shared if "rel_bias" not in p else step_bias(p["rel_bias"])
        h = rms_norm(x, p["ln_self"])
        q, k, v = self_qkv(h, p)  # [B, H, 1, K]
        # this step's k/v [B, H, 1, K] -> position `step` of the layer's cache [B, H, M, K]
        k_new = jax.lax.dynamic_update_slice_in_dim(k_past, k, step, axis=2)
        v_new = jax.lax.dynamic_update_slice_in_dim(v_past, v, step, axis=2)
        if cache_first:  # one read of the cache, this step included (attention.py)
            o = attend_one(q[:, :, 0], k_new, v_new, past_bias)[:, :, None]
        else:
            logits_past = einsum_f32("bhqk,bhpk->bhqp", q, k_past) + past_bias
            logits_self = einsum_f32("bhqk,bhqk->bhq", q, k)[..., None] + self_bias
            probs = jax.nn.softmax(jnp.concatenate([logits_past, logits_self], -1), axis=-1)
            probs = probs.astype(v.dtype)
            o = jnp.einsum("bhqp,bhpk->bhqk", probs[..., :m], v_past) + probs[..., m:] * v
        x = x + merge_heads(o, p["o"])
        h = rms_norm(x, p["ln_cross"])
        o = attend_one(project_heads(h, p["cq"])[:, :, 0], k_c, v_c, cross_bias[:, :, 0])
        x = x + merge_heads(o[:, :, None], p["co"])
        x = x + mlp(cfg, p, rms_norm(x, p["ln_mlp"]))
        new_k.append(k_new)
        new_v.append(v_new)
    return lm_logits(cfg, params, x[:, 0]), new_k, new_v
