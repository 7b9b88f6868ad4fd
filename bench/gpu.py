"""GPU benchmark (issue 8): our JAX T5 engine vs HF transformers T5 generate on UL2 20B.

One process, one GPU, the same weights: HF's T5ForConditionalGeneration is built with random
bf16 weights on the GPU and timed; then its tensors are handed to our engine through DLPack
(transposed into the engine's layout one layer at a time, each HF layer freed once moved, so 40
GB of weights are never held twice) and the engine is timed on the same inputs. Input 512
tokens, exactly 64 greedy output tokens, batch 1 / 8 / 32, median of --repeats timed runs after
a warm-up (compiling) run. Both sides' greedy outputs and teacher-forced logits on the same rows
are compared and reported. Also reports the memory-bandwidth bound: the least time any
implementation needs to read the weights (and the key/value caches) once per decoder step,
with the bandwidth and bf16 matmul rate measured on the same GPU.

    python bench/gpu.py                          # both, UL2 20B, batches 1 8 32, on the GPU
    python bench/gpu.py --impl jax --batches 1   # one side only (its own random weights)
    python bench/gpu.py --model tiny --input-len 32 --output-len 8   # CPU smoke test
    python bench/gpu.py --impl check             # GPU vs CPU correctness only
    python bench/gpu.py --impl bound             # read-only HBM bandwidth, batch-1 step

Before timing, the JAX side checks correctness on the same GPU (``check``): a fixture FT folder
(random weights written at tensor-parallel 2, re-joined by the engine) served in fp32 on the GPU
gives greedy outputs identical to the same engine on the host CPU, and served in bf16 gives
logits within BF16_TOLERANCE of the fp32 CPU logits. A failed check fails the benchmark.

Prints a table and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Both frameworks share the GPU: JAX must not grab 75 % of it at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.t5config import T5Config  # noqa: E402

MODELS = {
    # UL2 20B (google/ul2): 32 + 32 layers, D 4096, 16 heads of 256, F 16384, gated-silu, untied.
    "ul2-20b": T5Config(d_model=4096, num_heads=16, d_kv=256, d_ff=16384, vocab_size=32128,
                        num_encoder_layers=32, num_decoder_layers=32,
                        feed_forward_proj="gated-silu", tie_word_embeddings=False),
    # Flan-T5-XL (google/flan-t5-xl): 24 + 24 layers, D 2048, 32 heads of 64, F 5120,
    # gated-gelu, untied: the shape of every T5 1.1 / Flan-T5 model (issue 23).
    "flan-t5-xl": T5Config(d_model=2048, num_heads=32, d_kv=64, d_ff=5120, vocab_size=32128,
                           num_encoder_layers=24, num_decoder_layers=24,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "tiny": T5Config(d_model=32, num_heads=4, d_kv=8, d_ff=64, vocab_size=100,
                     num_encoder_layers=2, num_decoder_layers=2,
                     feed_forward_proj="gated-silu", tie_word_embeddings=False),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# --- inputs and timing -------------------------------------------------------------------


def input_rows(cfg: T5Config, batch: int, in_len: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, cfg.vocab_size, size=(batch, in_len))


def summarise(runs: list[dict], batch: int, out_len: int, times: list[float], first: float
              ) -> dict:
    med = statistics.median(times)
    run = {"batch": batch, "output_len": out_len, "seconds": med,
           "tokens_per_s": batch * out_len / med, "first_call_s": first, "all_s": times}
    runs.append(run)
    return run


# --- correctness on the GPU against the CPU engine -------------------------------------------

# bf16 vs fp32 teacher-forced logits: the largest absolute difference, relative to the largest
# fp32 logit, and the share of positions whose arg-max agrees. bf16 keeps 8 mantissa bits
# (~0.4 % per rounding); through 4 + 4 layers the logits drift by a few percent of their scale.
BF16_TOLERANCE = {"max_abs_over_max_logit": 0.05, "argmax_agreement": 0.95}
# A fixture larger than the unit tests' (so GPU kernels, not toy shapes, run) but quick on CPU.
CHECK_MODEL = T5Config(d_model=256, num_heads=8, d_kv=32, d_ff=1024, vocab_size=1000,
                       num_encoder_layers=4, num_decoder_layers=4,
                       feed_forward_proj="gated-silu", tie_word_embeddings=False)


def run_check(rows: int = 8, out_len: int = 32, devices: int = 1) -> dict:
    """fp32 greedy on GPU == on CPU (same engine, same folder); bf16 GPU logits vs fp32 CPU.
    devices > 1: the GPU engines are tensor-parallel over that many GPUs."""
    import tempfile

    import jax

    from serving.engine import SamplingParams, T5Engine
    from testing.ft_writer import random_ft_weights, write_ft_folder

    cfg = CHECK_MODEL
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(1)
    inputs = [rng.integers(2, cfg.vocab_size, size=int(n)) for n in rng.integers(5, 60, rows)]
    params = [SamplingParams(max_output_len=out_len)] * rows
    ids = rng.integers(2, cfg.vocab_size, size=(4, 48))
    dec = np.concatenate([np.zeros((4, 1), np.int64),
                          rng.integers(2, cfg.vocab_size, size=(4, 15))], axis=1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_ft_folder(Path(tmp), cfg, 2, random_ft_weights(cfg, seed=3))
        # "fp32" means fp32: without "highest", XLA may run fp32 GPU matmuls in TF32.
        with jax.default_matmul_precision("highest"):
            gpu32 = T5Engine.load(str(folder), dtype="fp32", devices=devices)
            out_gpu = gpu32.generate(inputs, params)
            logits_gpu32 = gpu32.logits(ids, dec)
            with jax.default_device(cpu):
                cpu32 = T5Engine.load(str(folder), dtype="fp32")
                out_cpu = cpu32.generate(inputs, params)
                logits_cpu = cpu32.logits(ids, dec)
                placed = {dev.platform for leaf in jax.tree_util.tree_leaves(cpu32.params)
                          for dev in leaf.devices()}
        gpu16 = T5Engine.load(str(folder), dtype="bf16", devices=devices)
        logits_gpu16 = gpu16.logits(ids, dec)
        out_gpu16 = gpu16.generate(inputs, params)
    same = all(np.array_equal(a.output_ids, b.output_ids)
               and np.array_equal(a.sequence_length, b.sequence_length)
               for a, b in zip(out_gpu, out_cpu, strict=True))
    scale = float(np.abs(logits_cpu).max())
    rel16 = float(np.abs(logits_gpu16 - logits_cpu).max()) / scale
    agree16 = float((logits_gpu16.argmax(-1) == logits_cpu.argmax(-1)).mean())
    same16 = sum(np.array_equal(a.output_ids, b.output_ids)
                 for a, b in zip(out_gpu16, out_cpu, strict=True))
    result = {
        "model": dataclasses.asdict(cfg), "gpu": str(jax.devices()[0].device_kind),
        "gpu_devices": devices,
        "cpu_engine_on": sorted(placed),
        "fp32_greedy_identical": bool(same), "rows": rows, "out_len": out_len,
        "fp32_logits_max_abs_diff": float(np.abs(logits_gpu32 - logits_cpu).max()),
        "bf16_logits_max_abs_over_max_logit": rel16, "bf16_argmax_agreement": agree16,
        "bf16_greedy_rows_identical_to_fp32": f"{same16}/{rows}",
        "bf16_tolerance": BF16_TOLERANCE,
    }
    result["passed"] = bool(same and placed == {"cpu"}
                            and rel16 <= BF16_TOLERANCE["max_abs_over_max_logit"]
                            and agree16 >= BF16_TOLERANCE["argmax_agreement"])
    log(f"check: {result}")
    return result


# --- HF side ---------------------------------------------------------------------------------


def hf_model(cfg: T5Config):
    """HF T5ForConditionalGeneration with random bf16 weights, built on the GPU."""
    import torch
    from transformers import T5Config as HFT5Config
    from transformers import T5ForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = HFT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=cfg.tie_word_embeddings, dropout_rate=0.0,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: fp32 20B does not fit
    with torch.device(device):
        model = T5ForConditionalGeneration(hf_cfg).eval()
        if not cfg.tie_word_embeddings:  # transformers 5 ties the head; UL2's is its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight)
                                                      * cfg.d_model ** -0.5)
    torch.set_default_dtype(torch.float32)
    return model


def run_hf(model, cfg: T5Config, batches: list[int], in_len: int, out_lens: list[int],
           repeats: int) -> dict:
    import torch
    import transformers

    device = model.device
    log(f"torch {torch.__version__}, transformers {transformers.__version__} on {device}")
    out = {"impl": "hf", "torch": torch.__version__, "transformers": transformers.__version__,
           "runs": []}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for batch, out_len in ((b, n) for b in batches for n in out_lens):
        ids = torch.as_tensor(input_rows(cfg, batch, in_len, seed=batch), device=device)

        def go(ids=ids, out_len=out_len):
            with torch.inference_mode():
                res = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=out_len, min_new_tokens=out_len,
                                     do_sample=False, num_beams=1)
            sync()
            return res

        t = time.perf_counter()
        res = go()
        first = time.perf_counter() - t
        assert res.shape[1] == out_len + 1, res.shape  # start token + out_len
        run = summarise(out["runs"], batch, out_len, timed(go, repeats), first)
        log(f"hf batch {batch}, {out_len} out: {run['seconds']:.3f}s, "
            f"{run['tokens_per_s']:.1f} tok/s")
    return out


def hf_probe(model, cfg: T5Config, rows: np.ndarray, dec: np.ndarray, out_len: int
             ) -> dict:
    """HF's greedy outputs (stopping at end_id) and teacher-forced fp32 logits on probe rows."""
    import torch

    ids = torch.as_tensor(rows, device=model.device)
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                             do_sample=False, num_beams=1)
        logits = model(input_ids=ids[:len(dec)],
                       decoder_input_ids=torch.as_tensor(dec, device=model.device)).logits
    return {"tokens": gen[:, 1:].cpu().numpy(), "logits": logits.float().cpu().numpy()}


def hf_to_engine(model, cfg: T5Config) -> dict:
    """Move HF's weights into the engine's tree (weights.py layout) on the same GPU.

    Each tensor is transposed where the layouts differ (HF's Linear is [out, in], the engine's
    projections [in, ...]), handed to JAX through DLPack without a copy, and each HF block is
    freed (moved to the meta device) once taken, so the weights are never held twice.
    """
    import jax
    import torch

    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv

    def sync() -> None:  # the copies are queued on torch's stream; JAX must see them done
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def put(t: torch.Tensor) -> jax.Array:
        return jax.dlpack.from_dlpack(t.detach().contiguous())

    def heads(w: torch.Tensor) -> jax.Array:  # [H*K, D] -> [D, H, K]
        return put(w.detach().t().reshape(d, h, k))

    def heads_out(w: torch.Tensor) -> jax.Array:  # [D, H*K] -> [H, K, D]
        return put(w.detach().t().reshape(h, k, d))

    def mlp(ff) -> dict:
        dense = ff.DenseReluDense
        if cfg.gated:  # HF: act(wi_0 x) * wi_1 x; engine: act(x wi) * (x wi2)
            out = {"wi": put(dense.wi_0.weight.t()), "wi2": put(dense.wi_1.weight.t())}
        else:
            out = {"wi": put(dense.wi.weight.t())}
        return {**out, "wo": put(dense.wo.weight.t())}

    def attention(a, prefix: str = "") -> dict:  # q, k, v, o (cq, ck, cv, co for cross)
        return {f"{prefix}q": heads(a.q.weight), f"{prefix}k": heads(a.k.weight),
                f"{prefix}v": heads(a.v.weight), f"{prefix}o": heads_out(a.o.weight)}

    def bias(block) -> jax.Array:  # [buckets, H] -> [H, buckets], fp32
        table = block.layer[0].SelfAttention.relative_attention_bias.weight
        return put(table.t().float())

    params = {
        "embedding": put(model.shared.weight),
        "lm_head": put(model.lm_head.weight),
        "encoder_norm": put(model.encoder.final_layer_norm.weight),
        "decoder_norm": put(model.decoder.final_layer_norm.weight),
        "encoder_rel_bias": bias(model.encoder.block[0]),
        "decoder_rel_bias": bias(model.decoder.block[0]),
        "encoder": [], "decoder": [],
    }
    for block in model.encoder.block:
        params["encoder"].append({
            "ln_attn": put(block.layer[0].layer_norm.weight),
            **attention(block.layer[0].SelfAttention),
            "ln_mlp": put(block.layer[1].layer_norm.weight), **mlp(block.layer[1])})
        sync()
        block.to("meta")
    for block in model.decoder.block:
        params["decoder"].append({
            "ln_self": put(block.layer[0].layer_norm.weight),
            **attention(block.layer[0].SelfAttention),
            "ln_cross": put(block.layer[1].layer_norm.weight),
            **attention(block.layer[1].EncDecAttention, "c"),
            "ln_mlp": put(block.layer[2].layer_norm.weight), **mlp(block.layer[2])})
        sync()
        block.to("meta")
    return params


# --- JAX side --------------------------------------------------------------------------------


def jax_random_params(cfg: T5Config, seed: int = 0) -> dict:
    """The engine's weights.py tree, bf16, generated on the default device leaf by leaf."""
    import functools

    import jax
    import jax.numpy as jnp

    d, h, k, f, v = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size
    le, ld, b = cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.relative_attention_num_buckets
    shapes = {
        "embedding": ((v, d), 1.0), "lm_head": ((v, d), d ** -0.5),
        "encoder_norm": ((d,), None), "decoder_norm": ((d,), None),
        "encoder_rel_bias": ((h, b), 0.5), "decoder_rel_bias": ((h, b), 0.5),
    }
    layer = {"q": ((d, h, k), (d * k) ** -0.5), "k": ((d, h, k), d ** -0.5),
             "v": ((d, h, k), d ** -0.5), "o": ((h, k, d), (h * k) ** -0.5),
             "wi": ((d, f), d ** -0.5), "wi2": ((d, f), d ** -0.5), "wo": ((f, d), f ** -0.5)}
    enc = {**layer, "ln_attn": ((d,), None), "ln_mlp": ((d,), None)}
    dec = {**layer, "cq": layer["q"], "ck": layer["k"], "cv": layer["v"], "co": layer["o"],
           "ln_self": ((d,), None), "ln_cross": ((d,), None), "ln_mlp": ((d,), None)}
    key = jax.random.key(seed)

    # One program per (shape, scale, dtype), shared by every layer.
    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def normal(sub, shape, scale, dtype):
        return (jax.random.normal(sub, shape, jnp.bfloat16) * jnp.bfloat16(scale)).astype(dtype)

    def make(shape: tuple[int, ...], scale: float | None, dtype) -> jax.Array:
        nonlocal key
        key, sub = jax.random.split(key)
        if scale is None:  # layer-norm scales
            return jnp.ones(shape, dtype)
        return normal(sub, shape, scale, dtype)

    params = {n: make(s, sc, jnp.float32 if n.endswith("rel_bias") else jnp.bfloat16)
              for n, (s, sc) in shapes.items()}
    params["encoder"] = [{n: make(s, sc, jnp.bfloat16) for n, (s, sc) in enc.items()}
                         for _ in range(le)]
    params["decoder"] = [{n: make(s, sc, jnp.bfloat16) for n, (s, sc) in dec.items()}
                         for _ in range(ld)]
    jax.block_until_ready(params)
    return params


def hardware_rates() -> dict:
    """Measured device-memory bandwidth (read + write of a 4 GiB copy) and bf16 matmul rate."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() == "cpu":
        n, m = 1 << 24, 1024
    else:
        n, m = 1 << 31, 8192
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    copy(x).block_until_ready()
    t = min(timed(lambda: copy(x).block_until_ready(), 5))
    bandwidth = 2 * n * 2 / t
    a = jnp.ones((m, m), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    mm(a, a).block_until_ready()
    t = min(timed(lambda: mm(a, a).block_until_ready(), 5))
    return {"bandwidth_GBps": bandwidth / 1e9, "bf16_TFLOPs": 2 * m ** 3 / t / 1e12,
            "device": str(jax.devices()[0].device_kind)}


def bandwidth_bound(cfg: T5Config, batch: int, in_len: int, out_len: int,
                    rates: dict, devices: int = 1) -> dict:
    """Lower bounds (seconds) from bytes that must move and FLOPs that must run.

    Encoder: max(read encoder weights, 2 * params * tokens FLOPs at the measured rate).
    Each decoder step: :func:`step_bytes` (decoder weights + LM head + cross K/V
    [L, B, H, S, K] x 2) plus the self cache so far, all bf16.
    """
    d, i, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    mlp = d * f * (3 if cfg.gated else 2)
    enc_params = cfg.num_encoder_layers * (4 * d * i + mlp) + v * d
    # tensor parallelism splits every weight and cache over the devices: their rates add up
    bw = rates["bandwidth_GBps"] * 1e9 * devices
    flops = rates["bf16_TFLOPs"] * 1e12 * devices
    enc_s = max(2 * enc_params / bw, 2 * enc_params * batch * in_len / flops)
    fixed = step_bytes(cfg, in_len, batch)
    step_s = []
    for t in range(out_len):
        self_kv = 2 * cfg.num_decoder_layers * batch * t * i * 2
        step_s.append((fixed + self_kv) / bw)
    return {"encoder_s": enc_s, "decode_s": sum(step_s), "total_s": enc_s + sum(step_s),
            "tokens_per_s": batch * out_len / (enc_s + sum(step_s))}


# H200 SXM datasheet HBM3e bandwidth (bytes/s): the specification the bound is stated against.
H200_SPEC_BPS = 4.8e12


def read_bandwidth(gib: int = 8) -> dict:
    """HBM read bandwidth from a read-only kernel: an fp32-accumulated sum over `gib` GiB of
    bf16 (reads every byte once, writes one scalar), best of 5 after a compiling run."""
    import jax
    import jax.numpy as jnp

    n = (gib << 30) // 2 if jax.default_backend() != "cpu" else 1 << 24
    x = jnp.ones((n,), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    total(x).block_until_ready()
    t = min(timed(lambda: total(x).block_until_ready(), 5))
    return {"read_GB": 2 * n / 1e9, "read_GBps": 2 * n / t / 1e9,
            "spec_GBps": H200_SPEC_BPS / 1e9, "read_over_spec": 2 * n / t / H200_SPEC_BPS}


def step_bytes(cfg: T5Config, in_len: int, batch: int = 1) -> int:
    """Bytes one greedy decoder step must read at `batch` rows (bf16): the decoder's weights,
    the LM head and the cross-attention keys/values (the self cache is under 1 % here)."""
    d, i, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    mlp = d * f * (3 if cfg.gated else 2)
    dec_params = cfg.num_decoder_layers * (8 * d * i + mlp) + v * d
    cross = 2 * cfg.num_decoder_layers * batch * in_len * i
    return 2 * (dec_params + cross)


def big_copies(engine, in_len: int) -> list[str]:
    """Copy / transpose instructions of at least 4M elements in the batch-1 decode program's
    optimized HLO: a per-step relayout of a weight would show here."""
    import re

    import jax
    import jax.numpy as jnp

    from serving.engine import engine as engine_mod
    from serving.engine import generate

    def spec(shape: tuple, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    i32, f32, u32 = jnp.int32, jnp.float32, jnp.uint32
    r = generate.Rows(spec((1, in_len), i32), *(spec((1,), t) for t in (
        i32, i32, i32, i32, i32, f32, f32, f32, f32, u32, u32)))
    cross = jax.eval_shape(lambda p, i, n: generate.encode_cross(engine.config, p, i, n),
                           engine.params, r.ids, r.lengths)
    hlo = engine_mod._sampling.lower(engine.config, engine.params, r, cross, out_len=64,
                                     sample=False).compile().as_text()
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[([\d,]+)\]\{[^}]*\} (copy|transpose)\(", line)
        if m and np.prod([int(x) for x in m.group(1).split(",")]) >= 1 << 22:
            found.append(line.strip()[:160])
    return found


def step_times(engine, rows: list[np.ndarray], repeats: int) -> dict:
    """Time per decoder step at ``len(rows)`` rows: the same compiled program (output bucket
    64) run with max_output_len 64 and 8; (t64 - t8) / 56 removes the encoder and the fixed
    costs. The LM-head row of the end id must be zero (see zero_end_row) so no row ends early.

    Returns the median ``generate_64_s`` and ``generate_8_s`` and ``step_s``.
    """
    from serving.engine import SamplingParams

    engine.min_len_bucket = 64  # both lengths run the output-64 program: only the steps differ
    times = {}
    for n in (64, 8):
        p = [SamplingParams(max_output_len=n)] * len(rows)
        res = engine.generate(rows, p)  # the first call compiles
        assert {int(r.sequence_length[0]) for r in res} == {n}, "a row ended early"
        times[n] = statistics.median(timed(lambda p=p: engine.generate(rows, p), repeats))
    return {"generate_64_s": times[64], "generate_8_s": times[8],
            "step_s": (times[64] - times[8]) / 56}


def decode_step_time(engine, cfg: T5Config, in_len: int, read: dict,
                     repeats: int = 5) -> dict:
    """Batch-1 time per decoder step (:func:`step_times`) against the bytes a step reads."""
    times = step_times(engine, [input_rows(cfg, 1, in_len, seed=7)[0]], repeats)
    per_step = times["step_s"]
    nbytes = step_bytes(cfg, in_len)
    spec_s = nbytes / H200_SPEC_BPS
    read_s = nbytes / (read["read_GBps"] * 1e9)
    return {"generate_64_s": times["generate_64_s"], "generate_8_s": times["generate_8_s"],
            "step_ms": per_step * 1e3,
            "step_bytes_GB": nbytes / 1e9, "spec_bound_ms": spec_s * 1e3,
            "read_bound_ms": read_s * 1e3, "over_spec": per_step / spec_s,
            "over_measured_read": per_step / read_s,
            "achieved_GBps": nbytes / per_step / 1e9}


def zero_end_row(params: dict, cfg: T5Config) -> dict:
    """Zero the LM head's row of the end id: its logit is then exactly 0 while the greedy
    argmax over ~32k random logits is positive, so greedy never ends a row early."""
    params["lm_head"] = params["lm_head"].at[cfg.eos_token_id].set(0)
    return params


def run_bound(cfg: T5Config, in_len: int) -> dict:
    """Issue 13 part 5: read bandwidth vs spec; batch-1 decode step vs the bytes it reads."""
    from serving.engine import T5Engine

    read = read_bandwidth()
    log(f"read-only bandwidth: {read}")
    rates = hardware_rates()
    log(f"copy bandwidth and matmul: {rates}")
    engine = T5Engine(cfg, zero_end_row(jax_random_params(cfg), cfg), dtype="bf16")
    step = decode_step_time(engine, cfg, in_len, read)
    log(f"batch-1 decode step: {step}")
    try:
        copies = big_copies(engine, in_len)
    except Exception as exc:  # the HLO look is a diagnosis only; never fail the numbers
        copies = [f"not inspected: {exc!r}"[:200]]
    log(f"large copies/transposes in the decode program: {len(copies)}")
    return {"read": read, "rates": rates, "batch1_step": step, "large_copies": copies}


def run_jax(engine, cfg: T5Config, batches: list[int], in_len: int, out_lens: list[int],
            repeats: int, rates: dict) -> dict:
    """Time greedy generate at each batch and output length, every row decoding exactly the
    output length; a batch runs as one program (max_batch = the largest batch), timed to its
    last row, as TensorRT-LLM's published encoder-decoder numbers are."""
    import jax

    from serving.engine import SamplingParams, attention

    engine.max_batch = max(engine.max_batch, *batches)
    paths = attention.choose(engine.params["embedding"].dtype, cfg.d_kv)
    out = {"impl": "jax", "jax": jax.__version__, "devices": engine.devices,
           "attention": dataclasses.asdict(paths), "runs": []}
    for batch, out_len in ((b, n) for b in batches for n in out_lens):
        rows = list(input_rows(cfg, batch, in_len, seed=batch))
        # Warm-up compiles; then pick an end_id greedy never produces on these inputs, so every
        # row generates exactly out_len tokens (greedy is deterministic).
        t = time.perf_counter()
        first = engine.generate(rows, [SamplingParams(max_output_len=out_len)] * batch)
        compile_s = time.perf_counter() - t
        used = set(np.concatenate([r.output_ids.ravel() for r in first]).tolist())
        end_id = next(x for x in range(2, cfg.vocab_size) if x not in used)
        params = [SamplingParams(max_output_len=out_len, end_id=end_id)] * batch
        res = engine.generate(rows, params)
        assert all(int(r.sequence_length[0]) == out_len for r in res), "ended early"
        times = timed(lambda rows=rows, params=params: engine.generate(rows, params), repeats)
        run = summarise(out["runs"], batch, out_len, times, compile_s)
        run["bound"] = bandwidth_bound(cfg, batch, in_len, out_len, rates, engine.devices)
        log(f"jax batch {batch}, {out_len} out: {run['seconds']:.3f}s, "
            f"{run['tokens_per_s']:.1f} tok/s (bound {run['bound']['total_s']:.3f}s)")
    return out


def compare(engine, hf: dict, rows: np.ndarray, dec: np.ndarray, out_len: int) -> dict:
    """Our greedy outputs and logits against HF's on the same weights and rows (reported)."""

    from serving.engine import SamplingParams

    ours = engine.generate(list(rows), [SamplingParams(max_output_len=out_len)] * len(rows))
    end = engine.config.eos_token_id
    same_rows, prefix = 0, []
    for r, theirs in zip(ours, hf["tokens"], strict=True):
        a = r.output_ids[0, :int(r.sequence_length[0])]
        b = theirs[:np.argmax(theirs == end) + 1] if (theirs == end).any() else theirs
        same_rows += int(np.array_equal(a, b))
        n = min(len(a), len(b))
        prefix.append(int(np.argmin(a[:n] == b[:n])) if (a[:n] != b[:n]).any() else n)
    logits = engine.logits(rows[:len(dec)], dec)
    scale = float(np.abs(hf["logits"]).max())
    return {"rows": len(rows), "greedy_rows_identical": same_rows,
            "mean_common_prefix_tokens": float(np.mean(prefix)),
            "logits_max_abs_over_max_logit":
                float(np.abs(logits - hf["logits"]).max()) / scale,
            "logits_argmax_agreement": float((logits.argmax(-1) == hf["logits"].argmax(-1)).mean())}


# --- driver ----------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    by = {r["impl"]: {(x["batch"], x["output_len"]): x for x in r.get("runs", [])}
          for r in results}
    keys = sorted({b for runs in by.values() for b in runs})
    lines = ["| batch | out | ours s | ours tok/s | HF s | HF tok/s | ours / HF | bound s | "
             "ours / bound |", "|---" * 9 + "|"]
    for b in keys:
        j, h = by.get("jax", {}).get(b), by.get("hf", {}).get(b)

        def cell(x, key, fmt=".3f"):
            return format(x[key], fmt) if x else "-"
        speed = f"{h['seconds'] / j['seconds']:.2f}x" if j and h else "-"
        bound = j["bound"]["total_s"] if j else None
        ratio = f"{j['seconds'] / bound:.2f}x" if j else "-"
        lines.append(f"| {b[0]} | {b[1]} | {cell(j, 'seconds')} | {cell(j, 'tokens_per_s', '.1f')} | "
                     f"{cell(h, 'seconds')} | {cell(h, 'tokens_per_s', '.1f')} | {speed} | "
                     f"{f'{bound:.3f}' if bound else '-'} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["both", "jax", "hf", "check", "bound"], default="both",
                    help="both: HF then ours on the same weights (default); jax / hf: one "
                         "side on its own random weights; check: correctness only; bound: "
                         "read-only HBM bandwidth and the batch-1 decode step against it")
    ap.add_argument("--model", choices=sorted(MODELS), default="ul2-20b")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 8, 32], help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=lambda s: [int(x) for x in s.split(",")],
                    default=[64], help="comma-separated output lengths, each timed at every "
                    "batch (default 64)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the GPU-vs-CPU correctness check (a second run of the same "
                         "code in one lease)")
    ap.add_argument("--attention", choices=["auto", "reference"], default="auto",
                    help="auto: the engine's per-shape choice (serving/engine/attention.py); "
                         "reference: the formulations before issue 23 (the baseline)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch (median)")
    ap.add_argument("--devices", type=int, default=1,
                    help="GPUs our engine is tensor-parallel over (FT's head / d_ff split); "
                         "HF runs on the first")
    args = ap.parse_args()
    cfg = MODELS[args.model]
    if args.attention == "auto":  # the engine's per-shape choice is opt-in (attention.py)
        os.environ["T5FT_ATTENTION"] = "auto"
    if args.attention == "reference":
        from serving.engine import attention

        attention.force(attention.REFERENCE).__enter__()  # for the whole process
    runs = (cfg, args.batches, args.input_len, args.output_len, args.repeats)
    if args.impl == "check":
        result = run_check()
        print(json.dumps(result))
        sys.exit(0 if result["passed"] else 1)
    if args.impl == "bound":
        print(json.dumps({"model": args.model, "input_len": args.input_len,
                          **run_bound(cfg, args.input_len)}))
        return

    results, extra = [], {}
    if args.impl in ("both", "jax"):
        import jax

        log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
        extra["check"] = ({"passed": True, "skipped": True} if args.no_check
                          else run_check(devices=args.devices))
        if not extra["check"]["passed"]:
            sys.exit(f"correctness check failed: {extra['check']}")
        extra["rates"] = hardware_rates()
        log(f"measured {extra['rates']}")
    if args.impl in ("both", "hf"):
        t = time.perf_counter()
        model = hf_model(cfg)
        log(f"HF model, random bf16 weights, on {model.device} in {time.perf_counter() - t:.1f}s")
        results.append(run_hf(model, *runs))
        probe_rows = input_rows(cfg, min(8, max(args.batches)), args.input_len, seed=99)
        probe_dec = np.concatenate([np.zeros((2, 1), np.int64),
                                    input_rows(cfg, 2, 15, seed=98)], axis=1)
        probe = hf_probe(model, cfg, probe_rows, probe_dec, args.output_len[0])
    if args.impl in ("both", "jax"):
        from serving.engine import T5Engine

        t = time.perf_counter()
        if args.impl == "both":
            import torch

            params = hf_to_engine(model, cfg)
            del model
            if torch.cuda.is_available():  # hand freed HF blocks back for JAX's working memory
                torch.cuda.empty_cache()
            log(f"HF weights moved to the engine in {time.perf_counter() - t:.1f}s")
        else:
            params = jax_random_params(cfg)
            log(f"random bf16 weights on device in {time.perf_counter() - t:.1f}s")
        engine = T5Engine(cfg, params, dtype="bf16", devices=args.devices)
        del params  # the engine may hold stacked copies (attention.fuse_weights): free these
        results.append(run_jax(engine, *runs, extra["rates"]))
        if args.impl == "both":
            extra["same_weights"] = compare(engine, probe, probe_rows, probe_dec,
                                            args.output_len[0])
            log(f"ours vs HF on the same weights: {extra['same_weights']}")
    print(f"{args.model}: input {args.input_len}, output {args.output_len}, greedy, "
          f"attention {args.attention}\n")
    print(table(results))
    print(json.dumps({"model": args.model, "config": dataclasses.asdict(cfg),
                      "input_len": args.input_len, "output_len": args.output_len,
                      "attention": args.attention,
                      "results": results, **extra}))


if __name__ == "__main__":
    main()
    # With torch and jax both loaded, interpreter teardown sometimes aborts in a C++ thread pool
    # ("terminate called without an active exception", exit -6) after every result is out:
    # leave without that teardown once the output is flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
