"""Why the engine keeps one array per layer: stacked weights sliced in a loop are copied.

    python bench/layer_layout.py          # on the GPU machine (jax with CUDA)

32 UL2-sized MLP layers (D 4096, F 16384, bf16: 8.6 GB of weights), applied to a batch of 1
and 32 rows 16 times in one compiled program, three ways: ``lax.scan`` over weights stacked
[L, ...]; a Python loop indexing the stacked arrays; a Python loop over separate per-layer
arrays. Reports milliseconds per pass over all layers and the effective weight bandwidth
(weight bytes / time). On an H100 the first two ran at ~960 GB/s and the last at ~2,866 GB/s:
XLA materialises each slice of a stacked array before the GEMM, so the weights move three
times. serving/engine therefore holds separate arrays (weights.py).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

L, D, F, PASSES = 32, 4096, 16384, 16


def main() -> None:
    keys = iter(jax.random.split(jax.random.key(0), 2 * L))

    @jax.jit
    def normal(key, w):
        return jax.random.normal(key, w.shape, jnp.bfloat16) * jnp.bfloat16(0.01)

    layers = [{"wi": normal(next(keys), jnp.empty((D, F), jnp.bfloat16)),
               "wo": normal(next(keys), jnp.empty((F, D), jnp.bfloat16))} for _ in range(L)]
    stacked = {n: jnp.stack([p[n] for p in layers]) for n in ("wi", "wo")}
    jax.block_until_ready((layers, stacked))

    def mlp(x, p):
        return x + jax.nn.silu(x @ p["wi"]) @ p["wo"]

    def repeat(step):
        return jax.jit(lambda x, w: jax.lax.scan(lambda c, _: (step(c, w), None), x, None,
                                                 length=PASSES)[0])

    ways = {
        "scan over stacked": (repeat(lambda x, w: jax.lax.scan(
            lambda c, p: (mlp(c, p), None), x, w)[0]), stacked),
        "loop indexing stacked": (repeat(lambda x, w: _loop(mlp, x, [
            {n: w[n][i] for n in w} for i in range(L)])), stacked),
        "loop over per-layer arrays": (repeat(lambda x, w: _loop(mlp, x, w)), layers),
    }
    weight_bytes = 2 * L * D * F * 2
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    for batch in (1, 32):
        x = jnp.ones((batch, D), jnp.bfloat16)
        for name, (fn, w) in ways.items():
            fn(x, w).block_until_ready()
            t = time.perf_counter()
            for _ in range(3):
                fn(x, w).block_until_ready()
            per_pass = (time.perf_counter() - t) / 3 / PASSES
            print(f"batch {batch:2d}  {name:27s} {per_pass * 1e3:6.2f} ms/pass  "
                  f"{weight_bytes / per_pass / 1e9:6.0f} GB/s effective")


def _loop(mlp, x, layers):
    for p in layers:
        x = mlp(x, p)
    return x


if __name__ == "__main__":
    # No options: the flags exist so that `--help` explains the run without starting it.
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    main()
