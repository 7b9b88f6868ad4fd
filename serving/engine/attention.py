"""Which attention formulation each of T5's attentions uses, per shape and backend (issue 23).

model.py holds the reference formulations (``model.attention``, ``model.attend_one`` and the
decoder step's concatenated self-attention): fp32 logits through device memory, the layout
the engine has always used. This module holds the faster ones and the one place that picks
between them:

- ``encoder``: the encoder's self-attention. ``"cudnn"``: cuDNN's fused (flash) attention
  through ``jax.nn.dot_product_attention`` with T5's relative-position bias as a [1, H, S, S]
  bias broadcast over the batch and the padding given as key lengths, so no [B, H, S, S]
  logits or bias is written to memory. Measured (bench/engine_parts.py, docs/benchmarks.md):
  at 64-wide heads (Flan-T5-XL, 128 rows x 350 tokens, one H100) 28 ms against the
  reference's 71 ms for 24 layers; at UL2's 256-wide heads cuDNN was 1.35x slower on an
  H200. So cuDNN below ``CUDNN_MAX_HEAD_DIM``, the reference above it.
- ``decode_self``: the decoder step's self-attention over its cache. ``"cache_first"``: the
  step's key/value is written into the cache first and one masked ``model.attend_one`` reads
  the cache once (as the cross-attention does: fewer, larger kernels per layer); the reference
  concatenates the cached logits with the step's own logit and adds two value products.
- The decoder's cross-attention stays ``model.attend_one`` (XLA's batched matrix-vector
  products): it reads the keys/values at 1.2x the measured read bound, and cuDNN was 2.6x
  slower there (issue 23's measurements).

The fast paths are opt-in (``T5FT_ATTENTION=auto``) until measured on a GPU: by default every
run uses the reference. Even when opted in, every fast path runs only on a GPU in a
half-precision dtype: fp32 (on any backend) and every
CPU run use the reference formulations, so fp32 outputs are bit-identical to the engine before
this module existed. Each path keeps a row's result independent of the other rows: every
reduction runs over one row's own keys, never across the batch.

The choice is read while a program is traced; :func:`force` sets it for tests and benchmarks
(before the first trace of a program: compiled programs keep the choice they were traced with).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

# cuDNN's fused attention wins at 64-wide heads and loses at 256-wide ones (module docstring);
# 128 is the widest head its flash kernel takes on every cuDNN 9 the jax wheels ship.
CUDNN_MAX_HEAD_DIM = 128
HALF = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Paths:
    """One formulation per attention: ``encoder`` "reference" | "cudnn" | "xla-fused" (the
    cuDNN call's own layout and arguments through jax's XLA implementation: how the cuDNN
    path is tested on a CPU); ``decode_self`` "reference" | "cache_first"; and whether the
    engine stacks each layer's input products (read when an engine is built, not traced)."""

    encoder: str = "reference"
    decode_self: str = "reference"
    fuse_weights: bool = False  # q|k|v and wi|wi2 as one matrix each (:func:`fuse_weights`)


REFERENCE = Paths()
_forced: Paths | None = None


# The fast paths are opt-in until a GPU run has measured them against the reference on the same
# card (speed at Flan-T5 and UL2 widths, and greedy outputs of the trained demo model): no device
# could be had in the session that wrote them. ``T5FT_ATTENTION=auto`` turns them on; the GPU
# benchmarks' ``--attention auto`` sets it. docs/benchmarks.md has the commands still to run.
OPT_IN_ENV = "T5FT_ATTENTION"


def choose(dtype: jnp.dtype, head_dim: int, backend: str | None = None) -> Paths:
    """The formulations the engine uses: :func:`per_shape` where ``T5FT_ATTENTION=auto``, else
    the reference (or whatever :func:`force` set)."""
    if _forced is not None:
        return _forced
    if os.environ.get(OPT_IN_ENV, "reference") != "auto":
        return REFERENCE
    return per_shape(dtype, head_dim, backend)


def per_shape(dtype: jnp.dtype, head_dim: int, backend: str | None = None) -> Paths:
    """The choice for a compute dtype, head width and backend (default: JAX's), from the
    measurements in the module docstring."""
    backend = backend or jax.default_backend()
    if backend != "gpu" or jnp.dtype(dtype) not in [jnp.dtype(d) for d in HALF]:
        return REFERENCE
    encoder = "cudnn" if head_dim <= CUDNN_MAX_HEAD_DIM else "reference"
    return Paths(encoder=encoder, decode_self="cache_first", fuse_weights=True)


@contextlib.contextmanager
def force(paths: Paths) -> Iterator[None]:
    """Use ``paths`` for every program traced inside the block, whatever :func:`choose` says."""
    global _forced
    before, _forced = _forced, paths
    try:
        yield
    finally:
        _forced = before


def encoder_fused(q: jax.Array, k: jax.Array, v: jax.Array, rel_bias: jax.Array,
                  lengths: jax.Array, implementation: str = "cudnn") -> jax.Array:
    """Encoder self-attention without the [B, H, S, S] logits in memory.

    q/k/v [B, S, H, K] (cuDNN's BTNH layout: the projections write it directly),
    rel_bias [1, H, S, S] fp32 (T5's relative-position bias, shared by the rows), lengths [B]
    (keys at positions >= length are padding) -> [B, S, H, K]. No 1/sqrt(K) scaling (T5 folds
    it into the query weights). The bias goes in the compute dtype (cuDNN's requirement).
    A row of length 0 (batch padding) is given length 1: its output is discarded, and a fully
    masked row would divide by zero.
    """
    return jax.nn.dot_product_attention(
        q, k, v, bias=rel_bias.astype(q.dtype), scale=1.0,
        key_value_seq_lengths=jnp.maximum(lengths, 1).astype(jnp.int32),
        implementation=implementation)



def fuse_weights(params: dict) -> dict:
    """A weights.py tree with each layer's q|k|v stacked as ``qkv`` [D, 3, H, K] and, for
    gated feed-forwards, wi|wi2 as ``wi12`` [D, 2, F]: two products per layer instead of five
    (fewer, larger kernels in each decoder step; measured 5 % on UL2's batch-1 step). The
    stacking axis is new, so the head and d_ff axes that tensor parallelism splits
    (sharding.py) are unchanged. Layer dicts are rebuilt; the caller's tree is not modified.
    """
    def stack(arrays: list, axis: int):
        # host arrays (weights.py's numpy tree) stay on the host until the engine places them
        return (np.stack if isinstance(arrays[0], np.ndarray) else jnp.stack)(arrays, axis)

    def fuse(layer: dict) -> dict:
        if "qkv" in layer:  # already stacked
            return layer
        out = {n: a for n, a in layer.items() if n not in ("q", "k", "v", "wi", "wi2")}
        out["qkv"] = stack([layer["q"], layer["k"], layer["v"]], 1)
        if "wi2" in layer:
            out["wi12"] = stack([layer["wi"], layer["wi2"]], 1)
        else:
            out["wi"] = layer["wi"]
        return out

    return {**params, "encoder": [fuse(p) for p in params["encoder"]],
            "decoder": [fuse(p) for p in params["decoder"]]}
