"""Where an XSum-size batch's time goes on one GPU (issue 13): UL2 20B's widths, random bf16
weights in memory, 512 input tokens, 64 output tokens.

    python bench/engine_parts.py                       # on the GPU, batches 128 (and 256)
    python bench/engine_parts.py --model tiny --batches 4 --input-len 16   # CPU smoke test

Times, each the median of --repeats runs after a compiling run:

- ``encode``: the encoder alone at B rows (model.encode), and its FLOP rate;
- ``cross_kv``: the 32 decoder layers' cross-attention key/value projections;
- ``step``: one decoder step inside the real generate loop, from two runs of one compiled
  program (output bucket 64) with max_output_len 64 and 8: (t64 - t8) / 56;
- ``cross_attn``: the 32 layers' cross-attention of one decoder step (distinct keys/values per
  layer, as in the loop) in each formulation of CROSS_VARIANTS, with GB/s over the bytes the
  keys and values hold and the largest difference to the first (attention_4d);
- ``gemm``: one decoder step's weight products at B rows ([B, D] x 32 distinct [D, F]);
- ``encoder_attention``: the encoder's self-attention, the engine's against cuDNN's fused;
- ``fused_gemv``: a batch-1 step's weight products as nine per layer or as six (q|k|v and
  wi|wi2 concatenated);
- ``bounds``: the encoder's and a decoder step's least time on this card (measured copy and
  read bandwidth, measured bf16 matmul rate) and the engine's times over them.

``--attention reference`` runs everything with the formulations before issue 23 (the baseline;
serving/engine/attention.py), ``auto`` (the default) with the engine's per-shape choice.

Prints progress on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gpu import MODELS, jax_random_params, log, timed, zero_end_row  # noqa: E402
from core.t5config import T5Config  # noqa: E402


def median_time(fn, repeats: int) -> float:
    """Median seconds of fn() (which must block) after one warm-up call."""
    fn()
    return statistics.median(timed(fn, repeats))


def cross_variants():
    """name -> f(q [B,H,1,K], k [B,H,S,K], v [B,H,S,K], bias [B,1,1,S]) -> [B,H,1,K]."""
    import jax
    import jax.numpy as jnp

    from serving.engine import model

    def mul_reduce(q, k, v, bias):
        # products of bf16 values are exact in fp32: the same sums as the fp32-accumulated dot
        logits = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), -1)  # [B,H,S]
        logits = logits + bias[:, :, 0, :]
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).astype(jnp.float32)
        o = jnp.sum(probs[..., None] * v.astype(jnp.float32), axis=2)  # [B,H,K]
        return o.astype(v.dtype)[:, :, None, :]

    def attend_one(q, k, v, bias):
        # the engine's decoder step: the query as [B, H, K], batched matrix-vector products
        return model.attend_one(q[:, :, 0], k, v, bias[:, :, 0])[:, :, None]

    def cudnn(q, k, v, bias):
        # jax.nn.dot_product_attention wants [B, T, N, H]
        out = jax.nn.dot_product_attention(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
            bias=jnp.broadcast_to(bias, (q.shape[0], 1, 1, k.shape[2])).astype(q.dtype),
            scale=1.0, implementation="cudnn")
        return out.transpose(0, 2, 1, 3)

    # attention_4d: model.attention on a length-1 query axis (the engine's before issue 13's
    # second lease; named "current" in that lease's log, attend_one "dot_general_bhk")
    return {"attention_4d": model.attention, "attend_one": attend_one,
            "mul_reduce": mul_reduce, "cudnn": cudnn}


def cross_attn(cfg: T5Config, b: int, s: int, repeats: int) -> dict:
    """The 32 layers' cross-attention of one decoder step, per formulation."""
    import jax
    import jax.numpy as jnp

    h, kd, n = cfg.num_heads, cfg.d_kv, cfg.num_decoder_layers
    key = jax.random.key(1)
    ks = [jax.random.normal(jax.random.fold_in(key, i), (b, h, s, kd), jnp.bfloat16)
          for i in range(n)]
    vs = [jax.random.normal(jax.random.fold_in(key, 100 + i), (b, h, s, kd), jnp.bfloat16)
          for i in range(n)]
    q = jax.random.normal(jax.random.fold_in(key, 999), (b, h, 1, kd), jnp.bfloat16) * 0.1
    lengths = jnp.full((b,), s, jnp.int32).at[0].set(s // 2)
    from serving.engine import model
    bias = model.key_mask(lengths, s)
    nbytes = 2 * n * b * h * s * kd * 2
    out: dict = {"kv_GB": nbytes / 1e9}
    ref = None
    for name, fn in cross_variants().items():
        f = jax.jit(lambda q, ks, vs, bias, fn=fn: [fn(q, k, v, bias) for k, v in zip(ks, vs, strict=True)])
        try:
            res = f(q, ks, vs, bias)
            jax.block_until_ready(res)
            t = median_time(lambda f=f: jax.block_until_ready(f(q, ks, vs, bias)), repeats)
        except Exception as exc:  # a formulation this backend does not run: say why
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"cross_attn {name}: {out[name]}")
            continue
        got = jnp.stack(res).astype(jnp.float32)
        if ref is None:
            ref = got
        diff = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        out[name] = {"ms": t * 1e3, "GBps": nbytes / t / 1e9, "max_diff_rel": diff}
        log(f"cross_attn {name}: {out[name]}")
    return out


def encoder_attention(cfg: T5Config, b: int, s: int, repeats: int) -> dict:
    """The encoder's self-attention of all layers at B rows: the engine's (fp32 logits through
    device memory) against cuDNN's fused attention (bias in the compute dtype)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from core.relpos import relative_position_bucket
    from serving.engine import model

    h, kd, n = cfg.num_heads, cfg.d_kv, 8  # 8 layers, scaled to 32 below
    key = jax.random.key(5)
    qkv = [[jax.random.normal(jax.random.fold_in(key, 3 * j + m), (b, h, s, kd), jnp.bfloat16)
            * 0.1 for m in range(3)] for j in range(n)]
    pos = np.arange(s)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], True,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    table = jax.random.normal(key, (h, cfg.relative_attention_num_buckets), jnp.float32)
    lengths = jnp.full((b,), s, jnp.int32).at[0].set(s // 3)

    def engine(qkv, table, lengths):
        bias = model.position_bias(table, buckets)[None] + model.key_mask(lengths, s)
        return [model.attention(q, k, v, bias) for q, k, v in qkv]

    def cudnn(qkv, table, lengths):
        bias = (model.position_bias(table, buckets)[None]
                + model.key_mask(lengths, s)).astype(jnp.bfloat16)
        return [jax.nn.dot_product_attention(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
            bias=bias, scale=1.0, implementation="cudnn").transpose(0, 2, 1, 3)
            for q, k, v in qkv]

    out: dict = {"rows": b, "layers_timed": n}
    ref = None
    for name, fn in (("engine", engine), ("cudnn", cudnn)):
        f = jax.jit(fn)
        try:
            got = jnp.stack(f(qkv, table, lengths)).astype(jnp.float32)
            t = median_time(lambda f=f: jax.block_until_ready(f(qkv, table, lengths)), repeats)
        except Exception as exc:  # a formulation this backend does not run: say why
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        ref = got if ref is None else ref
        diff = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        out[name] = {"ms_32_layers": t * 1e3 * cfg.num_encoder_layers / n, "max_diff_rel": diff}
    log(f"encoder attention: {out}")
    return out


def gemm(cfg: T5Config, b: int, repeats: int) -> dict:
    """One decoder step's weight products at B rows: 32 x ([B, D] @ [D, F])."""
    import jax
    import jax.numpy as jnp

    d, f, n = cfg.d_model, cfg.d_ff, cfg.num_decoder_layers
    key = jax.random.key(2)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (d, f), jnp.bfloat16) for i in range(n)]
    x = jax.random.normal(key, (b, d), jnp.bfloat16)
    fn = jax.jit(lambda x, ws: [x @ w for w in ws])
    t = median_time(lambda: jax.block_until_ready(fn(x, ws)), repeats)
    nbytes = n * d * f * 2
    return {"rows": b, "ms": t * 1e3, "GBps": nbytes / t / 1e9,
            "TFLOPs": 2 * b * n * d * f / t / 1e12}


def fused_gemv(cfg: T5Config, repeats: int) -> dict:
    """A batch-1 decoder step's weight products, 32 layers: as the engine runs them (nine
    products a layer: q, k, v, o, cq, co, wi, wi2, wo) and with q|k|v and wi|wi2 each one
    concatenated matrix (six products a layer: fewer, larger kernels)."""
    import jax
    import jax.numpy as jnp

    d, i, f, n = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_decoder_layers
    key = jax.random.key(4)

    def w(j: int, shape: tuple[int, int]) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(key, j), shape, jnp.bfloat16) * 0.01

    sep = [[w(10 * j + m, s) for m, s in enumerate(
        [(d, i)] * 3 + [(i, d), (d, i), (i, d), (d, f), (d, f), (f, d)])] for j in range(n)]
    x = jax.random.normal(key, (1, d), jnp.bfloat16)

    def separate(x, layers):
        for q, k, v, o, cq, co, wi, wi2, wo in layers:
            a = (x @ q) + (x @ k) + (x @ v)
            x = x + a @ o
            x = x + (x @ cq) @ co
            x = x + (jax.nn.silu(x @ wi) * (x @ wi2)) @ wo
        return x

    def fused(x, layers):
        for qkv, o, cq, co, wii, wo in layers:
            a = (x @ qkv).reshape(1, 3, -1).sum(1)
            x = x + a @ o
            x = x + (x @ cq) @ co
            g, u = jnp.split(x @ wii, 2, axis=-1)
            x = x + (jax.nn.silu(g) * u) @ wo
        return x

    nbytes = sum(a.size * 2 for layer in sep for a in layer)
    out = {"GB": nbytes / 1e9}
    run_sep, run_fused = jax.jit(separate), jax.jit(fused)
    t = median_time(lambda: run_sep(x, sep).block_until_ready(), repeats)
    out["separate_ms"] = t * 1e3
    out["separate_GBps"] = nbytes / t / 1e9
    fus = [[jnp.concatenate(layer[:3], 1), layer[3], layer[4], layer[5],
            jnp.concatenate(layer[6:8], 1), layer[8]] for layer in sep]
    t = median_time(lambda: run_fused(x, fus).block_until_ready(), repeats)
    out["fused_ms"] = t * 1e3
    out["fused_GBps"] = nbytes / t / 1e9
    log(f"batch-1 weight products: {out}")
    return out


def bounds(cfg: T5Config, b: int, s: int, s_bucket: int, rates: dict, read: dict) -> dict:
    """Least times at B rows of S tokens: the encoder (max of reading its weights at the
    copy bandwidth and its FLOPs, attention included, at the measured bf16 rate) and one
    decoder step of the output-64 program (decoder weights, LM head, the cross keys/values of
    S positions and a self cache of 32 positions on average, at the measured read rate).
    ``step_at_bucket_ms``: the same at the engine's input bucket (the cross keys/values it
    actually holds: S rounded up to a power of two)."""
    from bench.gpu import step_bytes

    d, i, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    mlp = d * f * (3 if cfg.gated else 2)
    enc_params = cfg.num_encoder_layers * (4 * d * i + mlp) + v * d
    flop = 2 * b * s * cfg.num_encoder_layers * (4 * d * i + mlp)
    flop += 4 * b * s * s * i * cfg.num_encoder_layers
    enc_s = max(2 * enc_params / (rates["bandwidth_GBps"] * 1e9),
                flop / (rates["bf16_TFLOPs"] * 1e12))
    self_cache = 2 * cfg.num_decoder_layers * b * 32 * i * 2
    read_bps = read["read_GBps"] * 1e9
    return {"encoder_s": enc_s, "encoder_flop": flop,
            "step_ms": (step_bytes(cfg, s, b) + self_cache) / read_bps * 1e3,
            "step_at_bucket_ms": (step_bytes(cfg, s_bucket, b) + self_cache) / read_bps * 1e3,
            "step_GB": (step_bytes(cfg, s, b) + self_cache) / 1e9}


def step_kernels(engine, b: int, s: int) -> dict:
    """Kernels one decoder step launches: the instructions of the greedy output-64 program's
    while-loop body (optimized HLO) that run as their own kernel, by kind. Many small
    per-layer kernels are where a decode step's time beyond its reads goes."""
    import collections
    import re

    import jax
    import jax.numpy as jnp

    from serving.engine import engine as engine_mod
    from serving.engine import generate

    def spec(shape: tuple, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    i32, f32, u32 = jnp.int32, jnp.float32, jnp.uint32
    r = generate.Rows(spec((b, s), i32), *(spec((b,), t) for t in (
        i32, i32, i32, i32, i32, f32, f32, f32, f32, u32, u32)))
    cross = jax.eval_shape(lambda p, i, n: generate.encode_cross(engine.config, p, i, n),
                           engine.params, r.ids, r.lengths)
    hlo = engine_mod._sampling.lower(engine.config, engine.params, r, cross, out_len=64,
                                     sample=False).compile().as_text()
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    comps = {m.group(1): m.group(2) for m in re.finditer(
        r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)}
    kinds: collections.Counter[str] = collections.Counter()
    for body in bodies:
        for line in comps.get(body, "").splitlines():
            m = re.search(r"= [^ ]+ (fusion|custom-call|copy|dynamic-update-slice|"
                          r"all-reduce|convolution|dot|gather|scatter)\(", line)
            if m:
                kinds[m.group(1)] += 1
    return {"while_bodies": len(bodies), "kernels": sum(kinds.values()), "by_kind": dict(kinds),
            "per_layer": sum(kinds.values()) / max(1, engine.config.num_decoder_layers)}


def engine_parts(cfg: T5Config, params: dict, b: int, s: int, repeats: int) -> dict:
    """encode, cross_kv and a decoder step of the real engine at B rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.gpu import input_rows, step_times
    from serving.engine import T5Engine, attention, model

    if attention.choose(params["embedding"].dtype, cfg.d_kv).fuse_weights:
        params = attention.fuse_weights(params)  # as the engine holds them

    ids = jnp.asarray(input_rows(cfg, b, s, seed=3), jnp.int32)
    lengths = jnp.full((b,), s, jnp.int32)
    enc_fn = jax.jit(lambda p, i, n: model.encode(cfg, p, i, n))
    t_enc = median_time(lambda: enc_fn(params, ids, lengths).block_until_ready(), repeats)
    enc = enc_fn(params, ids, lengths)
    kv_fn = jax.jit(model.cross_kv)
    t_kv = median_time(lambda: jax.block_until_ready(kv_fn(params, enc)), repeats)
    d, i, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    mlp = d * f * (3 if cfg.gated else 2)
    enc_flop = 2 * b * s * cfg.num_encoder_layers * (4 * d * i + mlp)
    attn_flop = 4 * b * s * s * i * cfg.num_encoder_layers
    kv_flop = 2 * b * s * cfg.num_decoder_layers * 2 * d * i
    out = {"rows": b, "encode_s": t_enc, "encode_TFLOPs": (enc_flop + attn_flop) / t_enc / 1e12,
           "cross_kv_s": t_kv, "cross_kv_TFLOPs": kv_flop / t_kv / 1e12}
    log(f"B={b}: {out}")
    engine = T5Engine(cfg, params, dtype="bf16")
    engine.max_batch = b
    try:
        out["step_kernels"] = step_kernels(engine, b, 1 << max(0, s - 1).bit_length())
    except Exception as exc:  # a diagnosis only; never fail the numbers
        out["step_kernels"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    log(f"B={b}: kernels in a decode step: {out['step_kernels']}")
    times = step_times(engine, list(np.asarray(ids)), repeats)
    step = times["step_s"]
    out.update(generate_64_s=times["generate_64_s"], generate_8_s=times["generate_8_s"],
               step_ms=step * 1e3, fixed_s=times["generate_64_s"] - 64 * step)
    log(f"B={b}: {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="ul2-20b")
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-engine", action="store_true", help="microbenchmarks only")
    ap.add_argument("--skip-micro", action="store_true",
                    help="no decoder microbenchmarks (cross attention, products)")
    ap.add_argument("--attention", choices=["auto", "reference"], default="auto",
                    help="auto: the engine's per-shape choice; reference: the formulations "
                         "before issue 23 (serving/engine/attention.py)")
    args = ap.parse_args()
    import dataclasses

    import jax
    import jax.numpy as jnp

    from bench.gpu import hardware_rates, read_bandwidth
    from serving.engine import attention

    if args.attention == "auto":  # the engine's per-shape choice is opt-in (attention.py)
        os.environ["T5FT_ATTENTION"] = "auto"
    if args.attention == "reference":
        attention.force(attention.REFERENCE).__enter__()  # for the whole process
    cfg = MODELS[args.model]
    result: dict = {"model": args.model, "device": str(jax.devices()[0].device_kind),
                    "jax": jax.__version__, "input_len": args.input_len,
                    "attention": args.attention,
                    "paths": dataclasses.asdict(attention.choose(jnp.bfloat16, cfg.d_kv))}
    b0 = args.batches[0]
    if not args.skip_micro:
        result["cross_attn"] = cross_attn(cfg, b0, args.input_len, args.repeats)
        result["fused_gemv"] = fused_gemv(cfg, max(args.repeats, 5))
        result["gemm"] = [gemm(cfg, b, args.repeats) for b in (1, *args.batches)]
        log(f"gemm: {result['gemm']}")
    result["encoder_attention"] = encoder_attention(cfg, b0, args.input_len, args.repeats)
    if not args.skip_engine:
        params = zero_end_row(jax_random_params(cfg), cfg)
        result["rates"], result["read"] = hardware_rates(), read_bandwidth()
        log(f"rates: {result['rates']} {result['read']}")
        s_bucket = 1 << max(0, args.input_len - 1).bit_length()
        result["engine"] = []
        for b in args.batches:
            try:
                part = engine_parts(cfg, params, b, args.input_len, args.repeats)
                bound = bounds(cfg, b, args.input_len, s_bucket, result["rates"],
                               result["read"])
                part.update(bound=bound, encode_over_bound=part["encode_s"] / bound["encoder_s"],
                            step_over_bound=part["step_ms"] / bound["step_ms"],
                            step_over_bound_at_bucket=part["step_ms"]
                            / bound["step_at_bucket_ms"])
                log(f"B={b} against the bounds: {part}")
                result["engine"].append(part)
            except Exception as exc:  # e.g. out of memory at the larger batch: say so
                result["engine"].append({"rows": b, "error": f"{type(exc).__name__}: {exc}"[:400]})
                log(f"B={b}: {result['engine'][-1]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
