"""Batch invariance of the JAX engine, and what it costs (issue 22), on JAX's default device.

    python bench/batch_invariance.py check [--model small]   # rows alone vs in batches
    python bench/batch_invariance.py cost [--model mid] [--rows 1024] [--batch 128]
    python bench/batch_invariance.py served [--model small]  # needs tritonserver, no Ray

``check``: random rows of different lengths, each decoded alone and inside batches of several
sizes and orders, for fp32 / fp16 / bf16 x greedy / seeded sampling / beam 2. Counts the rows
whose output ids, and ids plus every log prob, are bit-identical to their alone run, with the
engine batch-invariant (the default) and, for bf16 greedy, batching freely (the engine before
issue 22). One JSON line per case.

``served``: a bf16 model repository (random FT weights, bench/serve.py's plain writer) served
by one tritonserver (serving.tritonserver, no Ray); 6 clients at once send requests of 1 to 3
of 12 rows (the dynamic batcher merges them); each row's ids and log probs are compared with
the same engine in this process decoding that row alone (max_batch 128, as the Triton model).

``cost``: the same rows (lengths drawn like XSum documents, 64 to 512 tokens, sorted by length
and cut into requests of ``--batch`` rows as ``evaluation.batching`` cuts them; exactly
``--output-len`` new tokens per row: the end id's LM-head row is zero, as bench/xsum_gpu.py)
decoded by one engine (bf16, max_batch 128 as the Triton model loads it), batch-invariant and
not, alternately, ``--repeats`` times each after a warm-up pass that compiles every program.
Prints one JSON line with the median seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.t5config import T5Config  # noqa: E402
from testing.ft_writer import UL2_TINY  # noqa: E402

MODELS = {
    "tiny": UL2_TINY,
    "small": T5Config(d_model=256, num_heads=4, d_kv=64, d_ff=1024, vocab_size=32128,
                      num_encoder_layers=4, num_decoder_layers=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mid": T5Config(d_model=1024, num_heads=16, d_kv=64, d_ff=2816, vocab_size=32128,
                    num_encoder_layers=8, num_decoder_layers=8,
                    feed_forward_proj="gated-silu", tie_word_embeddings=False),
}


def _weights(cfg: T5Config, no_end: bool = False) -> dict:
    from testing.ft_writer import random_ft_weights

    weights = random_ft_weights(cfg, seed=11)
    if no_end:  # the end id's logit is exactly 0 while the arg-max is positive: never ends
        for name, arr in weights.items():
            if "lm_head" in name:
                arr[cfg.eos_token_id] = 0
    return weights


def _folder(cfg: T5Config, work: Path, no_end: bool = False) -> Path:
    from testing.ft_writer import write_ft_folder

    return write_ft_folder(work, cfg, 1, _weights(cfg, no_end))


def _cost_rows(cfg: T5Config, rows_n: int, max_len: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Lengths 64..max_len (uniform, sorted as evaluation.batching sorts them) and the rows:
    random ids ending in the end id."""
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(min(64, max_len), max_len + 1, size=rows_n))[::-1]
    rows = [np.append(rng.integers(2, cfg.vocab_size, size=int(n) - 1), 1) for n in lengths]
    return lengths, rows


def _key(r) -> tuple[bytes, ...]:
    return (r.output_ids.tobytes(), r.sequence_length.tobytes(), r.cum_log_probs.tobytes(),
            r.output_log_probs.tobytes())


def check(cfg: T5Config, rows_n: int) -> None:
    import jax

    from serving.engine import SamplingParams, T5Engine

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=rows_n)  # input buckets 8, 16, 32
    rows = [rng.integers(2, cfg.vocab_size, size=int(n)) for n in lengths]

    def params(mode: str, i: int) -> SamplingParams:
        common = {"max_output_len": 12 if i % 3 else 16, "return_log_probs": True}
        if mode == "sample":
            return SamplingParams(top_k=0, top_p=0.9, random_seed=500 + i, **common)
        if mode == "beam":
            return SamplingParams(beam_width=2, **common)
        return SamplingParams(**common)

    with tempfile.TemporaryDirectory() as tmp:
        folder = _folder(cfg, Path(tmp))
        cases = [(d, m, True) for d in ("fp32", "fp16", "bf16")
                 for m in ("greedy", "sample", "beam")] + [("bf16", "greedy", False)]
        for dtype, mode, invariant in cases:
            engine = T5Engine.load(str(folder), dtype=dtype, max_batch=128,
                                   batch_invariant=invariant)
            t0 = time.perf_counter()
            alone = [_key(engine.generate([r], [params(mode, i)])[0])
                     for i, r in enumerate(rows)]
            n = len(rows)
            worst_ids, worst_all = n, n
            layouts = ([n], [3, 5, n - 8], [2] * (n // 2))
            for sizes in layouts:
                order = [int(i) for i in rng.permutation(n)]
                got: dict[int, tuple] = {}
                start = 0
                for size in sizes:
                    part = order[start:start + size]
                    start += size
                    res = engine.generate([rows[i] for i in part],
                                          [params(mode, i) for i in part])
                    got.update({i: _key(r) for i, r in zip(part, res, strict=True)})
                worst_ids = min(worst_ids, sum(got[i][:2] == alone[i][:2] for i in range(n)))
                worst_all = min(worst_all, sum(got[i] == alone[i] for i in range(n)))
            print(json.dumps({"dtype": dtype, "mode": mode, "batch_invariant": invariant,
                              "rows": n, "layouts": [len(s) for s in layouts],
                              "rows_equal_ids": worst_ids,
                              "rows_equal_ids_and_log_probs": worst_all,
                              "seconds": round(time.perf_counter() - t0, 1),
                              "device": str(jax.devices()[0])}), flush=True)


def cost(cfg: T5Config, rows_n: int, batch: int, out_len: int, repeats: int,
         max_len: int = 512, fixed: Sequence[int] = (128,)) -> None:
    """``fixed``: the batch-invariant runs' fixed batch (the engine's ``max_batch``, which on a
    GPU is the fixed batch; a CPU caps it at ``cpu_invariant_batch``); the free runs keep 128."""
    import jax

    from serving.engine import SamplingParams, T5Engine

    lengths, rows = _cost_rows(cfg, rows_n, max_len)
    p = SamplingParams(max_output_len=out_len)
    modes = [("free", 128)] + [("invariant", f) for f in fixed]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine = T5Engine.load(str(_folder(cfg, Path(tmp), no_end=True)), dtype="bf16",
                               max_batch=128)
        load_s = time.perf_counter() - t0

        def run(mode: tuple[str, int]) -> float:
            engine.batch_invariant = mode[0] == "invariant"
            engine.max_batch = mode[1]
            t = time.perf_counter()
            toks = 0
            for s in range(0, rows_n, batch):
                part = rows[s:s + batch]
                toks += sum(int(r.sequence_length[0]) for r in engine.generate(part,
                                                                               [p] * len(part)))
            assert toks == rows_n * out_len, toks  # every row ran every step
            return time.perf_counter() - t

        name = {m: m[0] if m == ("free", 128) else f"invariant_{m[1]}" for m in modes}
        warm = {name[m]: round(run(m), 2) for m in modes}  # compiles every program
        times: dict[str, list[float]] = {name[m]: [] for m in modes}
        for _ in range(repeats):
            for m in modes:
                times[name[m]].append(run(m))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"model": dataclasses.asdict(cfg), "rows": rows_n, "batch": batch,
                      "input_lens": [int(lengths.min()), int(lengths.max())],
                      "output_len": out_len, "dtype": "bf16", "load_s": round(load_s, 1),
                      "first_pass_s": warm,
                      "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                      "median_s": {k: round(v, 3) for k, v in med.items()},
                      "vs_free": {k: round(v / med["free"], 3) for k, v in med.items()},
                      "device": str(jax.devices()[0])}), flush=True)


def _infer_inputs(rows: Sequence[np.ndarray], part: list[int], out_len: int,
                  extra: dict[str, tuple] | None = None) -> list:
    """The FT request of rows ``part`` (zero-padded ids, lengths, ``out_len`` new tokens),
    plus ``extra`` inputs (name: (value, dtype), one per row)."""
    from evaluation.client import to_infer_inputs

    ids = np.zeros((len(part), max(len(rows[i]) for i in part)), np.uint32)
    for j, i in enumerate(part):
        ids[j, :len(rows[i])] = rows[i]
    arrays = {"input_ids": ids,
              "sequence_length": np.array([[len(rows[i])] for i in part], np.uint32),
              "max_output_len": np.full((len(part), 1), out_len, np.uint32)}
    for name, (value, dtype) in (extra or {}).items():
        arrays[name] = np.full((len(part), 1), value, dtype)
    return to_infer_inputs(arrays)


def _served_pass(url: str, groups: list[list[int]], request, concurrency: int,
                 tokens: int) -> float:
    """One pass of every request, ``concurrency`` in flight, one gRPC client per thread;
    seconds from the first request to the last answer (the first pass compiles)."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient

    local = threading.local()
    made: list = []

    def send(part: list[int]) -> int:
        if not hasattr(local, "c"):
            local.c = grpcclient.InferenceServerClient(url)
            made.append(local.c)
        return int(local.c.infer("t5", request(part)).as_numpy("sequence_length").sum())

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        got = sum(pool.map(send, groups))
    seconds = time.perf_counter() - t
    for c in made:
        c.close()
    assert got == tokens, got  # every row ran every step
    return seconds


def served_cost(cfg: T5Config, rows_n: int, sizes: dict[str, Sequence[int]],
                concurrency: int, out_len: int, repeats: int, max_len: int = 512) -> None:
    """The served path as ``ray_jobs.evaluate`` drives it: the same rows, sorted longest first
    and cut into requests of each size in ``sizes[mode]`` (evaluation.batching.group_rows),
    ``concurrency`` requests in flight (actors x requests per actor) that Triton's dynamic
    batcher merges, through one tritonserver serving the same bf16 weights batching freely
    ("free"), then another batch-invariant ("invariant"), one after the other on one device."""

    from bench.serve import build_repository_plain, server_device, start_plain_server
    from evaluation.batching import group_rows

    lengths, rows = _cost_rows(cfg, rows_n, max_len)
    weights = _weights(cfg, no_end=True)

    def request(part: list[int]) -> list:
        return _infer_inputs(rows, part, out_len)

    result: dict = {}
    for mode in ("free", "invariant"):
        with tempfile.TemporaryDirectory() as tmp:
            repo = build_repository_plain(Path(tmp), cfg, "bf16", mode == "invariant",
                                          weights=weights)
            t0 = time.perf_counter()
            server, url = start_plain_server(repo, Path(tmp) / "triton")
            ready_s = time.perf_counter() - t0
            try:
                for size in sizes[mode]:
                    groups = group_rows([len(r) for r in rows], size)
                    first = _served_pass(url, groups, request, concurrency, rows_n * out_len)
                    times = [_served_pass(url, groups, request, concurrency, rows_n * out_len)
                             for _ in range(repeats)]
                    result[f"{mode}_{size}"] = {
                        "ready_s": round(ready_s, 1), "first_pass_s": round(first, 2),
                        "seconds": [round(x, 3) for x in times],
                        "median_s": round(statistics.median(times), 3)}
            finally:
                server.stop()
            result[f"{mode}_device"] = server_device(server.log_path)
    base = result[f"free_{sizes['free'][0]}"]["median_s"]
    print(json.dumps({"served_cost": True, "model": dataclasses.asdict(cfg), "rows": rows_n,
                      "concurrency": concurrency,
                      "input_lens": [int(lengths.min()), int(lengths.max())],
                      "output_len": out_len, "dtype": "bf16", **result,
                      f"vs_free_{sizes['free'][0]}": {
                          k: round(v["median_s"] / base, 3) for k, v in result.items()
                          if isinstance(v, dict)}}), flush=True)


def served(cfg: T5Config, modes: tuple[str, ...] = ("greedy", "sample", "beam")) -> None:
    import jax
    import tritonclient.grpc as grpcclient

    from bench.serve import build_repository_plain, server_device, start_plain_server
    from serving.engine import SamplingParams, T5Engine

    rng = np.random.default_rng(1)
    rows = [np.append(rng.integers(2, cfg.vocab_size, size=int(k)), 1).astype(np.uint32)
            for k in rng.integers(2, 40, size=12)]
    plan = [[[0], [7]], [[1, 2]], [[3], [4, 5]], [[6, 8, 9]], [[10]], [[11]]]
    knobs = {"greedy": {}, "sample": {"runtime_top_k": (0, np.uint32),
                                      "runtime_top_p": (0.9, np.float32),
                                      "random_seed": (2**40 + 7, np.uint64)},
             "beam": {"beam_width": (2, np.uint32)}}

    def request(part: list[int], mode: str) -> list:
        return _infer_inputs(rows, part, 10, {"is_return_log_probs": (True, np.bool_),
                                              **knobs[mode]})

    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository_plain(Path(tmp), cfg, "bf16")
        server, url = start_plain_server(repo, Path(tmp) / "triton")
        answers: dict[str, dict[int, dict]] = {m: {} for m in modes}
        try:
            for mode in modes:
                barrier = threading.Barrier(len(plan))

                def client(parts: list[list[int]], mode: str = mode,
                           barrier: threading.Barrier = barrier) -> None:
                    c = grpcclient.InferenceServerClient(url)
                    barrier.wait()
                    for part in parts:
                        res = c.infer("t5", request(part, mode))
                        for j, i in enumerate(part):
                            answers[mode][i] = {n: res.as_numpy(n)[j] for n in (
                                "output_ids", "sequence_length", "cum_log_probs",
                                "output_log_probs")}
                    c.close()

                threads = [threading.Thread(target=client, args=(p,)) for p in plan]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        finally:
            server.stop()
        served_on = server_device(server.log_path)
        engine = T5Engine.load(str(repo / "t5" / "1" / "1-gpu"), dtype="bf16", max_batch=128)
        for mode in modes:
            k = {n: v[0] for n, v in knobs[mode].items()}
            same = 0
            for i, r in enumerate(rows):
                p = SamplingParams(max_output_len=10, return_log_probs=True,
                                   top_k=int(k.get("runtime_top_k", 1)),
                                   top_p=float(k.get("runtime_top_p", 0.0)),
                                   random_seed=int(k.get("random_seed", 0)),
                                   beam_width=int(k.get("beam_width", 1)))
                want = engine.generate([r], [p])[0]
                got = answers[mode][i]
                w, n = want.output_ids.shape
                same += bool(
                    np.array_equal(got["output_ids"][:w, :n], want.output_ids)
                    and np.array_equal(got["sequence_length"][:w], want.sequence_length)
                    and got["cum_log_probs"][:w].tobytes() == want.cum_log_probs.tobytes()
                    and got["output_log_probs"][:w, :n].tobytes()
                    == want.output_log_probs.tobytes())
            print(json.dumps({"served": mode, "dtype": "bf16", "rows": len(rows),
                              "requests": sum(len(p) for p in plan),
                              "rows_equal_to_alone_in_process": same,
                              "server_engine_device": served_on,
                              "in_process_device": str(jax.devices()[0])}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["check", "cost", "served", "served-cost"])
    ap.add_argument("--model", choices=sorted(MODELS), default=None,
                    help="default: small for check, mid for cost")
    ap.add_argument("--rows", type=int, default=None, help="default: 24 (check), 1024 (cost)")
    ap.add_argument("--batch", type=int, default=128, help="cost: rows per request")
    ap.add_argument("--fixed-batch", default="128",
                    help="cost: the invariant runs' fixed batches, comma-separated (GPU)")
    ap.add_argument("--request-rows", default="8",
                    help="served-cost: rows per request, comma-separated (evaluate's "
                    "--batch-size), for both servers")
    ap.add_argument("--invariant-request-rows", default=None,
                    help="served-cost: the batch-invariant server's, if other")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="served-cost: requests in flight (actors x requests per actor)")
    ap.add_argument("--output-len", type=int, default=64, help="cost: new tokens per row")
    ap.add_argument("--repeats", type=int, default=3, help="cost: timed passes of each mode")
    ap.add_argument("--max-input-len", type=int, default=512,
                    help="cost: input lengths are drawn from 64..this")
    args = ap.parse_args()
    if args.what == "check":
        check(MODELS[args.model or "small"], args.rows or 24)
    elif args.what == "served":
        served(MODELS[args.model or "small"])
    elif args.what == "served-cost":
        free = [int(x) for x in args.request_rows.split(",")]
        inv = [int(x) for x in (args.invariant_request_rows or args.request_rows).split(",")]
        served_cost(MODELS[args.model or "mid"], args.rows or 2048,
                    {"free": free, "invariant": inv}, args.concurrency, args.output_len,
                    args.repeats, args.max_input_len)
    else:
        cost(MODELS[args.model or "mid"], args.rows or 1024, args.batch, args.output_len,
             args.repeats, args.max_input_len,
             tuple(int(x) for x in args.fixed_batch.split(",")))


if __name__ == "__main__":
    main()
