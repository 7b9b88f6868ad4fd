"""GPU benchmark (issue 8): our JAX T5 engine vs HF transformers T5 generate on UL2 20B.

Random bf16 weights are built directly on the GPU (no checkpoint, no host copy), input 512
tokens, exactly 64 greedy output tokens, batch 1 / 8 / 32. Each implementation runs in its own
child process (JAX preallocates GPU memory; 2 x 40 GB of weights do not fit one 80 GB GPU
together). Also reports the memory-bandwidth bound: the least time any implementation needs
to read the weights (and the key/value caches) once per decoder step, with the bandwidth and
bf16 matmul rate measured on the same GPU.

    python bench/gpu.py                          # both, UL2 20B, batches 1 8 32, on the GPU
    python bench/gpu.py --impl jax --batches 1   # one side only
    python bench/gpu.py --model tiny --input-len 32 --output-len 8   # CPU smoke test

Prints a table and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conversion.ft_format import T5Config  # noqa: E402

MODELS = {
    # UL2 20B (google/ul2): 32 + 32 layers, D 4096, 16 heads of 256, F 16384, gated-silu, untied.
    "ul2-20b": T5Config(d_model=4096, num_heads=16, d_kv=256, d_ff=16384, vocab_size=32128,
                        num_encoder_layers=32, num_decoder_layers=32,
                        feed_forward_proj="gated-silu", tie_word_embeddings=False),
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


# --- JAX side --------------------------------------------------------------------------------


def jax_random_params(cfg: T5Config, seed: int = 0) -> dict:
    """The engine's weights.py tree, bf16, generated on the default device leaf by leaf."""
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

    def make(shape: tuple[int, ...], scale: float | None, dtype) -> jax.Array:
        nonlocal key
        key, sub = jax.random.split(key)
        if scale is None:  # layer-norm scales
            return jnp.ones(shape, dtype)
        fn = jax.jit(lambda s: (jax.random.normal(s, shape, jnp.bfloat16)
                                * jnp.bfloat16(scale)).astype(dtype))
        return fn(sub)

    params = {n: make(s, sc, jnp.float32 if n.endswith("rel_bias") else jnp.bfloat16)
              for n, (s, sc) in shapes.items()}
    params["encoder"] = {n: make((le, *s), sc, jnp.bfloat16) for n, (s, sc) in enc.items()}
    params["decoder"] = {n: make((ld, *s), sc, jnp.bfloat16) for n, (s, sc) in dec.items()}
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
                    rates: dict) -> dict:
    """Lower bounds (seconds) from bytes that must move and FLOPs that must run.

    Encoder: max(read encoder weights, 2 * params * tokens FLOPs at the measured rate).
    Each decoder step: read decoder weights + LM head + cross K/V [L, B, H, S, K] x 2 +
    the self cache so far, all bf16.
    """
    d, i, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    mlp = d * f * (3 if cfg.gated else 2)
    enc_params = cfg.num_encoder_layers * (4 * d * i + mlp) + v * d
    dec_params = cfg.num_decoder_layers * (8 * d * i + mlp) + v * d
    bw, flops = rates["bandwidth_GBps"] * 1e9, rates["bf16_TFLOPs"] * 1e12
    enc_s = max(2 * enc_params / bw, 2 * enc_params * batch * in_len / flops)
    cross = 2 * cfg.num_decoder_layers * batch * in_len * i * 2
    step_s = []
    for t in range(out_len):
        self_kv = 2 * cfg.num_decoder_layers * batch * t * i * 2
        step_s.append((2 * dec_params + cross + self_kv) / bw)
    return {"encoder_s": enc_s, "decode_s": sum(step_s), "total_s": enc_s + sum(step_s),
            "tokens_per_s": batch * out_len / (enc_s + sum(step_s))}


def run_jax(cfg: T5Config, batches: list[int], in_len: int, out_len: int,
            repeats: int) -> dict:
    import jax
    import numpy as np

    from serving.engine import SamplingParams, T5Engine

    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    rates = hardware_rates()
    log(f"measured {rates}")
    t = time.perf_counter()
    engine = T5Engine(cfg, jax_random_params(cfg), dtype="bf16")
    log(f"random bf16 weights on device in {time.perf_counter() - t:.1f}s")
    rng = np.random.default_rng(0)
    out = {"impl": "jax", "jax": jax.__version__, "rates": rates, "runs": []}
    for batch in batches:
        rows = [rng.integers(2, cfg.vocab_size, size=in_len) for _ in range(batch)]
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
        med = statistics.median(times)
        run = {"batch": batch, "seconds": med, "tokens_per_s": batch * out_len / med,
               "first_call_s": compile_s, "all_s": times,
               "bound": bandwidth_bound(cfg, batch, in_len, out_len, rates)}
        log(f"jax batch {batch}: {med:.3f}s, {run['tokens_per_s']:.1f} tok/s "
            f"(bound {run['bound']['total_s']:.3f}s)")
        out["runs"].append(run)
    return out


# --- HF side ---------------------------------------------------------------------------------


def run_hf(cfg: T5Config, batches: list[int], in_len: int, out_len: int,
           repeats: int) -> dict:
    import torch
    import transformers
    from transformers import T5Config as HFT5Config
    from transformers import T5ForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"torch {torch.__version__}, transformers {transformers.__version__} on {device}")
    hf_cfg = HFT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=cfg.tie_word_embeddings, dropout_rate=0.0,
        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: fp32 20B does not fit
    with torch.device(device):
        model = T5ForConditionalGeneration(hf_cfg).eval()
        if not cfg.tie_word_embeddings:  # transformers 5 ties the head; UL2's is its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight)
                                                      * cfg.d_model ** -0.5)
    torch.set_default_dtype(torch.float32)
    log(f"random bf16 weights on {device} in {time.perf_counter() - t:.1f}s")
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = {"impl": "hf", "torch": torch.__version__, "transformers": transformers.__version__,
           "runs": []}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for batch in batches:
        ids = torch.randint(2, cfg.vocab_size, (batch, in_len), generator=gen).to(device)

        def go(ids=ids):
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
        times = timed(go, repeats)
        med = statistics.median(times)
        log(f"hf batch {batch}: {med:.3f}s, {batch * out_len / med:.1f} tok/s")
        out["runs"].append({"batch": batch, "seconds": med, "first_call_s": first,
                            "tokens_per_s": batch * out_len / med, "all_s": times})
    return out


# --- driver ----------------------------------------------------------------------------------


def child(impl: str, args: argparse.Namespace) -> dict:
    """Run one implementation in its own process; return its JSON."""
    cmd = [sys.executable, __file__, "--impl", impl, "--model", args.model,
           "--batches", ",".join(map(str, args.batches)), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--repeats", str(args.repeats)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        return {"impl": impl, "error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    by = {r["impl"]: {x["batch"]: x for x in r.get("runs", [])} for r in results}
    batches = sorted({b for runs in by.values() for b in runs})
    lines = ["| batch | jax s | jax tok/s | hf s | hf tok/s | jax/hf speedup | bound s | "
             "jax % of bound |", "|---" * 8 + "|"]
    for b in batches:
        j, h = by.get("jax", {}).get(b), by.get("hf", {}).get(b)

        def cell(x, key, fmt=".3f"):
            return format(x[key], fmt) if x else "-"
        speed = f"{h['seconds'] / j['seconds']:.2f}x" if j and h else "-"
        bound = j["bound"]["total_s"] if j else None
        pct = f"{100 * bound / j['seconds']:.0f}%" if j else "-"
        lines.append(f"| {b} | {cell(j, 'seconds')} | {cell(j, 'tokens_per_s', '.1f')} | "
                     f"{cell(h, 'seconds')} | {cell(h, 'tokens_per_s', '.1f')} | {speed} | "
                     f"{f'{bound:.3f}' if bound else '-'} | {pct} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["both", "jax", "hf"], default="both",
                    help="both: each in a child process (default)")
    ap.add_argument("--model", choices=sorted(MODELS), default="ul2-20b")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 8, 32], help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch (median)")
    args = ap.parse_args()
    cfg = MODELS[args.model]
    common = (cfg, args.batches, args.input_len, args.output_len, args.repeats)
    if args.impl == "jax":
        print(json.dumps(run_jax(*common)))
        return
    if args.impl == "hf":
        print(json.dumps(run_hf(*common)))
        return
    results = [child("jax", args), child("hf", args)]
    print(f"{args.model}: input {args.input_len}, output {args.output_len}, greedy\n")
    print(table(results))
    print(json.dumps({"model": args.model, "config": dataclasses.asdict(cfg),
                      "input_len": args.input_len, "output_len": args.output_len,
                      "results": results}))


if __name__ == "__main__":
    main()
