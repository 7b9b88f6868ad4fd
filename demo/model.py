"""A T5 1.1 / UL2-style encoder-decoder in plain JAX, with T5X's parameter tree.

Mirrors t5x ``examples/t5/network.py`` and ``layers.py`` (see t5x-checkpoint-format.md,
section 3) and is written independently of the serving engine, so that the demo checks the
converter and the engine against a third implementation:

- RMS layer norm (epsilon 1e-6, scale only), pre-norm residual blocks, a final norm per side;
- attention logits are not divided by sqrt(K): that factor lives in the query kernel's init;
- one relative-position bias table per side, [H, B], bidirectional buckets in the encoder and
  causal buckets in the decoder, added in every layer; none in cross-attention;
- gated MLP: act(x @ wi_0) * (x @ wi_1) @ wo, act = silu (UL2) or gelu (T5 1.1);
- untied LM head ``decoder.logits_dense.kernel`` [D, V].

Parameters are nested dicts keyed exactly as t5x names them, e.g.
``params["encoder"]["layers_0"]["attention"]["query"]["kernel"]`` of shape [D, H*K], so that
:func:`flatten` gives ``"encoder.layers_0.attention.query.kernel"``. Kernels are [in, out].
Sizes come from a :class:`core.t5config.T5Config`, the repository's one model description
(notation: D = d_model, H = num_heads, K = d_kv, F = d_ff, V = vocab_size).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core.relpos import relative_position_bucket
from core.t5config import T5Config

Params = dict[str, Any]
NEG_INF = -1e10  # t5x's mask bias: large but finite so fully masked rows stay finite


# The demo's model: UL2's architecture (gated-silu, untied head) at toy size.
MODELS: dict[str, T5Config] = {
    "ul2-demo": T5Config(vocab_size=800, d_model=128, num_heads=4, d_kv=32, d_ff=256,
                         num_encoder_layers=2, num_decoder_layers=2,
                         feed_forward_proj="gated-silu", tie_word_embeddings=False),
}


def check_config(cfg: T5Config) -> None:
    """Raise ValueError unless this network can build ``cfg``: a gated silu or gelu MLP
    (UL2, T5 1.1) and an untied LM head."""
    if cfg.feed_forward_proj not in ("gated-silu", "gated-gelu"):
        raise ValueError(f"feed_forward_proj must be gated-silu or gated-gelu, got "
                         f"{cfg.feed_forward_proj!r}")
    if cfg.tie_word_embeddings:
        raise ValueError("the demo network has an untied LM head (tie_word_embeddings=False)")


# --- initialisation (t5x's variance-scaling choices) ------------------------------------------


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32) * std


def init_params(cfg: T5Config, key: jax.Array) -> Params:
    """A fresh parameter tree. The query kernel's std carries the 1/sqrt(K) of attention."""
    check_config(cfg)
    d, i, f, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    keys = iter(jax.random.split(key, 256))

    def attention() -> Params:
        return {
            "query": {"kernel": _normal(next(keys), (d, i), (d * cfg.d_kv) ** -0.5)},
            "key": {"kernel": _normal(next(keys), (d, i), d**-0.5)},
            "value": {"kernel": _normal(next(keys), (d, i), d**-0.5)},
            "out": {"kernel": _normal(next(keys), (i, d), i**-0.5)},
        }

    def mlp() -> Params:
        return {
            "wi_0": {"kernel": _normal(next(keys), (d, f), d**-0.5)},
            "wi_1": {"kernel": _normal(next(keys), (d, f), d**-0.5)},
            "wo": {"kernel": _normal(next(keys), (f, d), f**-0.5)},
        }

    def norm() -> Params:
        return {"scale": jnp.ones((d,), jnp.float32)}

    def relpos() -> Params:
        buckets = cfg.relative_attention_num_buckets
        bound = math.sqrt(6.0 / (cfg.num_heads + buckets))
        table = jax.random.uniform(next(keys), (cfg.num_heads, buckets), jnp.float32,
                                   -bound, bound)
        return {"rel_embedding": table}

    encoder: Params = {"relpos_bias": relpos(), "encoder_norm": norm()}
    for n in range(cfg.num_encoder_layers):
        encoder[f"layers_{n}"] = {
            "pre_attention_layer_norm": norm(),
            "attention": attention(),
            "pre_mlp_layer_norm": norm(),
            "mlp": mlp(),
        }
    decoder: Params = {
        "relpos_bias": relpos(),
        "decoder_norm": norm(),
        "logits_dense": {"kernel": _normal(next(keys), (d, v), d**-0.5)},
    }
    for n in range(cfg.num_decoder_layers):
        decoder[f"layers_{n}"] = {
            "pre_self_attention_layer_norm": norm(),
            "self_attention": attention(),
            "pre_cross_attention_layer_norm": norm(),
            "encoder_decoder_attention": attention(),
            "pre_mlp_layer_norm": norm(),
            "mlp": mlp(),
        }
    return {
        "token_embedder": {"embedding": _normal(next(keys), (v, d), 1.0)},
        "encoder": encoder,
        "decoder": decoder,
    }


def flatten(params: Params, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"encoder.layers_0.attention.query.kernel": array, ...}`` as numpy float32."""
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = np.asarray(value, dtype=np.float32)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> Params:
    """Inverse of :func:`flatten`."""
    tree: Params = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


# --- layers ----------------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """T5 layer norm: x * rsqrt(mean(x^2) + 1e-6) * scale. x: [..., D]."""
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-6) * scale


def position_bias(table: jax.Array, q_len: int, k_len: int, bidirectional: bool,
                  cfg: T5Config) -> jax.Array:
    """The bias added to attention logits: table [H, B] -> [1, H, q_len, k_len]."""
    context = np.arange(q_len, dtype=np.int32)[:, None]
    memory = np.arange(k_len, dtype=np.int32)[None, :]
    buckets = relative_position_bucket(memory - context, bidirectional,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    return table[:, buckets][None]


def attention(p: Params, x_q: jax.Array, x_kv: jax.Array, bias: jax.Array,
              cfg: T5Config) -> jax.Array:
    """Multi-head dot-product attention, logits unscaled (T5).

    x_q: [B, Q, D]; x_kv: [B, S, D]; bias: broadcastable to [B, H, Q, S] (mask + positions).
    Returns [B, Q, D].
    """
    h, k = cfg.num_heads, cfg.d_kv

    def heads(x: jax.Array, kernel: jax.Array) -> jax.Array:
        y = x @ kernel  # [B, L, H*K], heads major within the inner axis as t5x reshapes it
        return y.reshape(*y.shape[:-1], h, k)

    q, key, v = heads(x_q, p["query"]["kernel"]), heads(x_kv, p["key"]["kernel"]), heads(
        x_kv, p["value"]["kernel"])
    logits = jnp.einsum("bqhk,bshk->bhqs", q, key) + bias
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqs,bshk->bqhk", weights, v)
    return out.reshape(*out.shape[:-2], h * k) @ p["out"]["kernel"]


def mlp(p: Params, x: jax.Array, cfg: T5Config) -> jax.Array:
    """Gated MLP: act(x @ wi_0) * (x @ wi_1) @ wo. x: [..., D] -> [..., D]."""
    if cfg.activation == "silu":
        gate = jax.nn.silu(x @ p["wi_0"]["kernel"])
    else:
        gate = jax.nn.gelu(x @ p["wi_0"]["kernel"], approximate=True)
    return (gate * (x @ p["wi_1"]["kernel"])) @ p["wo"]["kernel"]


# --- the network -----------------------------------------------------------------------------


def encode(params: Params, tokens: jax.Array, cfg: T5Config) -> jax.Array:
    """tokens: [B, S] int32, 0 = padding -> encoded [B, S, D]."""
    p = params["encoder"]
    s = tokens.shape[1]
    x = params["token_embedder"]["embedding"][tokens]
    valid = tokens > 0
    mask = jnp.where(valid[:, None, None, :] & valid[:, None, :, None], 0.0, NEG_INF)
    bias = mask + position_bias(p["relpos_bias"]["rel_embedding"], s, s, True, cfg)
    for n in range(cfg.num_encoder_layers):
        layer = p[f"layers_{n}"]
        x = x + attention(layer["attention"],
                          *(2 * [rms_norm(x, layer["pre_attention_layer_norm"]["scale"])]),
                          bias, cfg)
        x = x + mlp(layer["mlp"], rms_norm(x, layer["pre_mlp_layer_norm"]["scale"]), cfg)
    return rms_norm(x, p["encoder_norm"]["scale"])


def decode(params: Params, encoded: jax.Array, input_tokens: jax.Array,
           decoder_inputs: jax.Array, cfg: T5Config) -> jax.Array:
    """Teacher-forced decoder: logits [B, T, V] for decoder_inputs [B, T] (0 = start token).

    input_tokens [B, S] gives the encoder padding mask for cross-attention.
    """
    p = params["decoder"]
    t, s = decoder_inputs.shape[1], input_tokens.shape[1]
    y = params["token_embedder"]["embedding"][decoder_inputs]
    causal = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], 0.0, NEG_INF)
    self_bias = causal[None, None] + position_bias(p["relpos_bias"]["rel_embedding"], t, t,
                                                   False, cfg)
    cross_bias = jnp.where(input_tokens[:, None, None, :] > 0, 0.0, NEG_INF)
    del s
    for n in range(cfg.num_decoder_layers):
        layer = p[f"layers_{n}"]
        h = rms_norm(y, layer["pre_self_attention_layer_norm"]["scale"])
        y = y + attention(layer["self_attention"], h, h, self_bias, cfg)
        h = rms_norm(y, layer["pre_cross_attention_layer_norm"]["scale"])
        y = y + attention(layer["encoder_decoder_attention"], h, encoded, cross_bias, cfg)
        y = y + mlp(layer["mlp"], rms_norm(y, layer["pre_mlp_layer_norm"]["scale"]), cfg)
    y = rms_norm(y, p["decoder_norm"]["scale"])
    return y @ p["logits_dense"]["kernel"]


def forward(params: Params, input_tokens: jax.Array, decoder_inputs: jax.Array,
            cfg: T5Config) -> jax.Array:
    """Logits [B, T, V] for inputs [B, S] and shifted-right targets [B, T]."""
    return decode(params, encode(params, input_tokens, cfg), input_tokens, decoder_inputs, cfg)


def greedy_decode(params: Params, input_tokens: np.ndarray, max_len: int, cfg: T5Config,
                  eos_id: int = 1) -> list[list[int]]:
    """Greedy generation without a cache (the demo model is tiny): [B, S] -> B id lists.

    Each list stops before EOS. Used to check training before anything is served.
    """
    tokens = jnp.asarray(input_tokens, jnp.int32)
    batch = tokens.shape[0]

    @jax.jit
    def run(params: Params, tokens: jax.Array) -> jax.Array:
        encoded = encode(params, tokens, cfg)

        def step(i: int, out: jax.Array) -> jax.Array:
            logits = decode(params, encoded, tokens, out[:, :-1], cfg)
            nxt = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)
            return out.at[:, i + 1].set(nxt)

        out = jnp.zeros((batch, max_len + 1), jnp.int32)
        return jax.lax.fori_loop(0, max_len, step, out)[:, 1:]

    result = []
    for row in np.asarray(run(params, tokens)).tolist():
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result
