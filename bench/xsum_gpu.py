"""XSum-size benchmark on one GPU (issue 13): UL2 20B's widths, 11,334 rows of 512 tokens,
exactly 64 new tokens per row, three ways of serving them.

    python bench/xsum_gpu.py write --repo /tmp/ul2          # random bf16 FT weights, on the GPU
    python bench/xsum_gpu.py inproc --repo /tmp/ul2 --batch 128 --budget 200
    python bench/xsum_gpu.py triton --repo /tmp/ul2 --budget 200
    python bench/xsum_gpu.py write --repo /tmp/t --model tiny   # CPU smoke test of each step

``write`` builds a jax-engine model repository ``<repo>/t5`` (bf16 FT files, Triton config,
model.py) whose weights are drawn on the default device with jax and written file by file:
20 billion numpy normals would take minutes. The LM head's row of the end id is zero, so that
row's logit is exactly 0 while the greedy arg-max over ~32k random logits is positive: no row
ever ends early, and every row generates exactly 64 tokens (checked on every answer).

``inproc`` (c): the in-process evaluation loop without Ray (evaluation.batching.predict_rows
over evaluation.engine_predictor.EngineGenerate: the engine loaded from that repository in
this process), requests of ``--batch`` rows one after another. ``triton`` (a) and (b): one tritonserver
(serving.tritonserver, no Ray) serving the same folder; (a) the original pattern, one row per
request and a new gRPC client for each, timed on ``--single-rows`` rows and extrapolated;
(b) evaluation.client.T5Client with ``--concurrency`` requests of ``--request-rows`` rows in
flight, which Triton's dynamic batcher merges up to the model's max_batch_size.

Each mode stops sending new work once ``--budget`` seconds (load and compile included) would
be exceeded, and then states the rows done and the time extrapolated linearly to all rows.
Prints progress on stderr and one JSON line per mode on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# The engine may take the GPU's memory for large batches; nothing else shares it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gpu import MODELS, log  # noqa: E402
from core.t5config import T5Config  # noqa: E402

XSUM_TEST_ROWS = 11_334


def write_repository(repo: Path, cfg: T5Config, seed: int = 0, max_batch_size: int = 0
                     ) -> Path:
    """``<repo>/t5``: bf16 FT weights drawn on the default jax device, Triton config, model.py.

    Each tensor follows testing.ft_writer's init (same offsets and scales); the LM head's end-id
    row is zero (see the module doc)."""
    import jax
    import jax.numpy as jnp

    from core import ft_format, repository
    from testing.ft_writer import _init_scale, tensor_stem

    version = repo / "t5" / "1"
    folder = version / ft_format.weights_dir_name(1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ft_format.CONFIG_INI).write_text(ft_format.config_ini(cfg, "bf16", 1))
    key = jax.random.key(seed)
    for n, spec in enumerate(ft_format.all_files(cfg, 1)):
        stem = tensor_stem(spec)
        offset, scale = _init_scale(stem, cfg)
        if stem.endswith(".q.weight"):  # T5 folds 1/sqrt(K) into q
            scale *= cfg.d_kv ** -0.5
        w = jax.random.normal(jax.random.fold_in(key, n), spec.full_shape, jnp.bfloat16)
        w = (w * scale + offset).astype(jnp.bfloat16)
        if stem == "lm_head.weight":
            w = w.at[cfg.eos_token_id].set(0)
        # FT reads raw C-order bytes of the file dtype, no header.
        np.asarray(w).tofile(folder / spec.name)
    (version / "model.py").write_text(repository.JAX_MODEL_PY)
    config = repository.model_config("t5", "jax", 1, data_type="bf16")
    if max_batch_size:  # requests of more rows than the default are refused by the contract
        config.max_batch_size = max_batch_size
    (repo / "t5" / "config.pbtxt").write_text(repository.to_pbtxt(config))
    return folder


def xsum_rows(cfg: T5Config, n: int, in_len: int, seed: int = 0) -> list[np.ndarray]:
    """n random rows of in_len tokens, each ending in the end id as a tokenised article."""
    ids = np.random.default_rng(seed).integers(2, cfg.vocab_size, size=(n, in_len))
    ids[:, -1] = cfg.eos_token_id
    return list(ids.astype(np.int32))


def drive(batches: Sequence[list[np.ndarray]], send: Callable[[list[np.ndarray]], list[int]],
          concurrency: int, stop_at: float) -> dict:
    """Send batches (concurrency in flight) until done or ``stop_at`` (perf_counter) would be
    passed by another round; returns rows done, wall time from the first request to the last
    answer, and the generated lengths seen. ``send`` returns each row's generated length."""
    lengths: list[int] = []
    t0 = time.perf_counter()
    round_s = 0.0
    with ThreadPoolExecutor(concurrency) as pool:
        for i in range(0, len(batches), concurrency):
            if time.perf_counter() + round_s > stop_at:
                break
            t = time.perf_counter()
            for got in pool.map(send, batches[i:i + concurrency]):
                lengths += got
            round_s = time.perf_counter() - t
            if (i // concurrency) % 10 == 0:
                log(f"{len(lengths)} rows in {time.perf_counter() - t0:.1f}s")
    return {"rows_done": len(lengths), "wall_s": time.perf_counter() - t0,
            "lengths": sorted(set(lengths))}


def rates(res: dict, total_rows: int, out_len: int) -> dict:
    """examples/s and tokens/s of a (partial) run, and its wall time extrapolated to all rows."""
    n, wall = res["rows_done"], res["wall_s"]
    return {**res, "examples_per_s": n / wall, "tokens_per_s": n * out_len / wall,
            "all_rows": total_rows, "extrapolated": n < total_rows,
            "wall_all_rows_s": wall * total_rows / n}


def run_inproc(args: argparse.Namespace, cfg: T5Config) -> dict:
    """(c) the in-process evaluation loop, without Ray: evaluation.batching.predict_rows (the
    loop `evaluate --backend in-process` runs in its actors) over EngineGenerate (the
    repository's engine, loaded from config.pbtxt as the Triton model loads it), requests of
    --batch rows. If the first request fails (out of GPU memory at a large batch), the run
    goes on at --fallback-batch rows and says so."""
    from evaluation.batching import predict_rows
    from evaluation.engine_predictor import EngineGenerate

    start = time.perf_counter()
    gen = EngineGenerate(str(args.repo), "t5", max_output_len=args.output_len)
    load_s = time.perf_counter() - start
    rows = [r.tolist() for r in xsum_rows(cfg, args.rows, args.input_len)]

    def decode(ids: Sequence[int]) -> str:  # no vocabulary here: the ids as text
        return " ".join(map(str, ids))

    def answers(part: list[list[int]], size: int):
        # never split a failed request into single rows: a failure must show, not slow down
        return predict_rows(part, gen, decode, batch_size=size, should_split=lambda e: False)

    batch, first_error = args.batch, ""
    t = time.perf_counter()
    first = list(answers(rows[:batch], batch))
    if first[0].error:
        first_error = first[0].error
        log(f"inproc: batch {batch} failed ({first_error[:200]}); using {args.fallback_batch}")
        batch = args.fallback_batch
        t = time.perf_counter()
        list(answers(rows[:batch], batch))
    compile_s = time.perf_counter() - t
    log(f"inproc: load {load_s:.1f}s, compile + first batch {compile_s:.1f}s")

    lengths: list[int] = []
    errors = 0
    t0 = time.perf_counter()
    stop_at = start + args.budget
    per_request = 0.0
    for answer in answers(rows, batch):
        if answer.error:
            errors += len(answer.ids)
        else:
            lengths += [len(g) for g in answer.generated or []]
        per_request = answer.latency_ms / 1000
        done = len(lengths) + errors
        if (done // batch) % 10 == 0:
            log(f"{done} rows in {time.perf_counter() - t0:.1f}s")
        if time.perf_counter() + per_request > stop_at:
            break
    res = {"rows_done": len(lengths) + errors, "wall_s": time.perf_counter() - t0,
           "lengths": sorted(set(lengths)), "failed_rows": errors}
    return {"mode": "inproc (c)", "loop": "evaluation.batching.predict_rows + EngineGenerate",
            "batch": batch, "asked_batch": args.batch, "first_error": first_error[:300],
            "load_s": load_s, "compile_and_first_batch_s": compile_s,
            **rates(res, args.rows, args.output_len)}


def single_pattern(url: str, rows: list[np.ndarray], out_len: int) -> list[int]:
    """(a) one row per request, a new gRPC client for each (the tutorial's loop)."""
    import tritonclient.grpc as grpcclient

    from evaluation.client import build_request_arrays, parse_response, to_infer_inputs

    lengths = []
    for row in rows:
        client = grpcclient.InferenceServerClient(url)
        arrays = build_request_arrays([row.tolist()], max_output_len=out_len)
        res = client.infer("t5", to_infer_inputs(arrays))
        lengths += [len(x) for x in parse_response(res.as_numpy("output_ids"),
                                                    res.as_numpy("sequence_length"))]
        client.close()
    return lengths


def run_triton(args: argparse.Namespace, cfg: T5Config) -> dict:
    """(a) and (b) through one tritonserver serving the written repository."""
    from bench.serve import server_device, start_plain_server
    from core import repository
    from evaluation.client import T5Client

    start = time.perf_counter()
    log_dir = args.repo / "log"
    server, url = start_plain_server(args.repo, log_dir)
    try:
        load_s = time.perf_counter() - start
        log(f"triton: ready in {load_s:.1f}s at {url}")
        rows = xsum_rows(cfg, args.rows, args.input_len)
        client = T5Client([url], "t5")

        def send(batch: list[np.ndarray]) -> list[int]:
            out = client.generate([r.tolist() for r in batch], max_output_len=args.output_len)
            return [len(x) for x in out]

        # compile every program the runs use: 1 row, and k merged requests for each k the
        # dynamic batcher can form (up to the model's max_batch_size)
        t = time.perf_counter()
        limit = int(repository.parse_pbtxt(
            (args.repo / "t5" / "config.pbtxt").read_text()).max_batch_size)
        merged = range(1, min(args.concurrency, limit // args.request_rows) + 1)
        for n in sorted({1} | {k * args.request_rows for k in merged}):
            send(rows[:n])
        compile_s = time.perf_counter() - t
        log(f"triton: compile (batch 1, {args.request_rows}, merged) {compile_s:.1f}s")
        t = time.perf_counter()
        lengths = single_pattern(url, rows[:args.single_rows], args.output_len)
        single = rates({"rows_done": len(lengths), "wall_s": time.perf_counter() - t,
                        "lengths": sorted(set(lengths))}, args.rows, args.output_len)
        log(f"(a) one row per request, new client each: {single}")
        batches = [rows[i:i + args.request_rows]
                   for i in range(0, len(rows), args.request_rows)]
        res = drive(batches, send, args.concurrency, start + args.budget)
        client.close()
    finally:
        server.stop()
    return {"mode": "triton", "load_s": load_s, "compile_s": compile_s,
            "server_engine_device": server_device(log_dir / "tritonserver.log"),
            "a_single": {"pattern": "one row per request, a new gRPC client each", **single},
            "b_client": {"request_rows": args.request_rows, "concurrency": args.concurrency,
                         **rates(res, args.rows, args.output_len)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["write", "inproc", "triton"])
    ap.add_argument("--repo", type=Path, required=True, help="model repository folder")
    ap.add_argument("--model", choices=sorted(MODELS), default="ul2-20b")
    ap.add_argument("--rows", type=int, default=XSUM_TEST_ROWS)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128, help="inproc: rows per request")
    ap.add_argument("--fallback-batch", type=int, default=128,
                    help="inproc: rows per request if the first request of --batch fails")
    ap.add_argument("--max-batch-size", type=int, default=0,
                    help="write: the model's max_batch_size (0: the repository default)")
    ap.add_argument("--request-rows", type=int, default=32, help="triton: rows per request")
    ap.add_argument("--concurrency", type=int, default=4, help="triton: requests in flight")
    ap.add_argument("--single-rows", type=int, default=8,
                    help="triton: rows sent one per request, new client each (extrapolated)")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds for the mode, load and compile included; then extrapolate")
    args = ap.parse_args()
    cfg = MODELS[args.model]
    if args.mode == "write":
        t = time.perf_counter()
        folder = write_repository(args.repo, cfg, max_batch_size=args.max_batch_size)
        size = sum(f.stat().st_size for f in folder.iterdir())
        result = {"mode": "write", "folder": str(folder), "GB": size / 1e9,
                  "seconds": time.perf_counter() - t}
    elif args.mode == "inproc":
        result = run_inproc(args, cfg)
    else:
        result = run_triton(args, cfg)
    import jax

    result.update(model=args.model, input_len=args.input_len, output_len=args.output_len,
                  device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    log(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
