"""Serving throughput: requests/s and generated tokens/s through tritonclient.grpc.

CPU mode, the whole served path: a random T5X checkpoint (demo.t5x_writer) -> ``ray_jobs.convert
--engine jax`` -> ``ray_jobs.serve`` (tritonserver + the JAX engine in Triton's Python backend)
-> gRPC requests of B rows each, from C client threads.

    .venv/bin/python bench/serve.py [--runs 1:1,8:1,32:1,1:8] [--seconds 20]
                                    [--no-batch-invariant]

GPU mode (``--gpu``), for a machine with a CUDA jax and no Ray: random FT weights written
straight into a model repository (the test fixtures' writer; conversion itself needs Ray), one
tritonserver started by the plain launcher :mod:`serving.tritonserver`, the engine inside it on
the GPU (checked from the model's log line), and the in-process baseline on the same GPU.

    python bench/serve.py --gpu --runs 1:1,8:1,32:1 [--seconds 20]

Each run is BATCH:CLIENTS (rows per request : concurrent client threads; 1:8 shows Triton's
dynamic batching merging single-row requests). Prints one JSON line per run and a final
summary line. Greedy decoding with ``max_output_len`` tokens per row; generated tokens are
counted from ``sequence_length`` (rows that stop at EOS count fewer). The baseline is the same
engine called in this process on the same rows (no Triton, no gRPC), measured after the server
has stopped: the ratio is what the serving path costs.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_repository(work: Path, cfg, dtype: str, invariant: bool = True) -> Path:
    from demo.t5x_writer import random_t5x_params, write_t5x_checkpoint

    ckpt = work / "ckpt"
    write_t5x_checkpoint(ckpt, random_t5x_params(cfg, seed=0, dtype="float32"), step=1)
    repo = work / "repo"
    subprocess.run([sys.executable, "-m", "ray_jobs.convert", "--src", str(ckpt), "--dst",
                    str(repo), "--model-name", "t5", "--engine", "jax", "--inference-dtype",
                    dtype, "--json", *([] if invariant else ["--no-batch-invariant"])],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return repo


def start_server(repo: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.serve", "--model-repository",
                             str(repo), "--model-name", "t5", "--json"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                return proc, json.loads(line)["endpoints"][0]["grpc"]
    proc.kill()
    raise SystemExit("ray_jobs.serve did not become ready")


def build_repository_plain(work: Path, cfg, dtype: str, invariant: bool = True,
                           weights: dict | None = None) -> Path:
    """A jax-engine model repository ``t5`` from FT-layout weights (default: random, seed 0),
    without Ray."""
    from core import repository
    from testing.ft_writer import random_ft_weights, write_ft_folder

    repo = work / "repo"
    version = repo / "t5" / "1"
    write_ft_folder(version, cfg, 1, random_ft_weights(cfg, seed=0) if weights is None
                    else weights)
    (version / "model.py").write_text(repository.JAX_MODEL_PY)
    (repo / "t5" / "config.pbtxt").write_text(
        repository.to_pbtxt(repository.model_config("t5", "jax", 1, data_type=dtype,
                                                    batch_invariant=invariant)))
    return repo


def start_plain_server(repo: Path, log_dir: Path):
    """One tritonserver through serving.tritonserver (no Ray); returns (server, gRPC url)."""
    from serving.tritonserver import TritonServer

    server = TritonServer(str(repo), "t5", log_dir=str(log_dir))
    server.start()
    try:
        server.wait_ready(600)
    except BaseException:
        server.stop()
        raise
    return server, server.endpoints["grpc"]


def server_device(log_path: Path) -> str:
    """The device the served engine reports in its load line (model.py logs it)."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "T5 engine loaded from" in line and " on " in line:
            return line.split(" on ", 1)[1].split(";", 1)[0].strip()
    return "unknown"


def make_inputs(batch: int, in_len: int, out_len: int, vocab: int, seed: int):
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, in_len)).astype(np.uint32)
    ids[:, -1] = 1
    arrays = {"input_ids": ids,
              "sequence_length": np.full((batch, 1), in_len, np.uint32),
              "max_output_len": np.full((batch, 1), out_len, np.uint32),
              "runtime_top_k": np.ones((batch, 1), np.uint32)}
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), "UINT32")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def measure(url: str, batch: int, concurrency: int, seconds: float, in_len: int,
            out_len: int, vocab: int, warmup: float) -> dict:
    import tritonclient.grpc as grpcclient

    # The first request of a shape compiles the engine's program for its bucket.
    warm = grpcclient.InferenceServerClient(url)
    t0 = time.perf_counter()
    warm.infer("t5", make_inputs(batch, in_len, out_len, vocab, 0))
    compile_s = time.perf_counter() - t0
    warm.close()
    if concurrency > 1 and warmup > 0:
        # Concurrent clients make the dynamic batcher form batches of several sizes, each a
        # new compile: run the same load untimed first.
        _load(url, batch, concurrency, warmup, in_len, out_len, vocab)
    before = _triton_counts(url)
    latencies, tokens, wall = _load(url, batch, concurrency, seconds, in_len, out_len, vocab)
    after = _triton_counts(url)
    lat = np.array(latencies) * 1000
    return {"batch": batch, "concurrency": concurrency, "requests": len(latencies),
            # Triton's own counters: rows inferred vs model executions (dynamic batching
            # merges concurrent requests into one execution).
            "triton_inferences": after[0] - before[0],
            "triton_executions": after[1] - before[1],
            "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            "rows_per_s": round(len(latencies) * batch / wall, 2),
            "generated_tokens_per_s": round(tokens / wall, 1),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
            "latency_ms_p90": round(float(np.percentile(lat, 90)), 1),
            "first_request_s": round(compile_s, 2)}


def _triton_counts(url: str) -> tuple[int, int]:
    """(inference_count, execution_count) of model t5 from Triton's statistics endpoint."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics("t5", as_json=True)["model_stats"][0]
    client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def _load(url: str, batch: int, concurrency: int, seconds: float, in_len: int, out_len: int,
          vocab: int) -> tuple[list[float], int, float]:
    """``concurrency`` clients sending back to back for ``seconds``: (latencies, tokens, wall)."""
    import tritonclient.grpc as grpcclient

    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0]

    def worker(k: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        inputs = make_inputs(batch, in_len, out_len, vocab, k + 1)
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            res = client.infer("t5", inputs)
            dt = time.perf_counter() - t
            n = int(res.as_numpy("sequence_length").sum())
            with lock:
                latencies.append(dt)
                tokens[0] += n
        client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return latencies, tokens[0], wall


def measure_engine(repo: Path, batch: int, seconds: float, in_len: int, out_len: int,
                   vocab: int, dtype: str, invariant: bool = True) -> dict:
    """The same rows through T5Engine.generate in this process: the no-serving baseline
    (loaded as the Triton model loads it: the repository's max_batch_size)."""
    from serving.engine import SamplingParams, T5Engine

    global _ENGINE
    if _ENGINE is None:
        _ENGINE = T5Engine.load(str(repo / "t5" / "1" / "1-gpu"), dtype=dtype, max_batch=128,
                                batch_invariant=invariant)
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(batch):
        ids = rng.integers(2, vocab, size=in_len).astype(np.uint32)
        ids[-1] = 1
        rows.append(ids)
    params = [SamplingParams(max_output_len=out_len)] * batch
    _ENGINE.generate(rows, params)  # compile
    calls, tokens = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        res = _ENGINE.generate(rows, params)
        calls += 1
        tokens += sum(int(r.sequence_length.sum()) for r in res)
    wall = time.perf_counter() - start
    return {"baseline": "engine in-process", "batch": batch, "calls": calls,
            "calls_per_s": round(calls / wall, 2),
            "generated_tokens_per_s": round(tokens / wall, 1)}


_ENGINE = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="1:1,8:1,32:1,1:8",
                   help="BATCH:CLIENTS pairs, comma-separated (default 1:1,8:1,32:1,1:8)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the in-process engine baseline")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per setting")
    p.add_argument("--warmup", type=float, default=30.0,
                   help="untimed seconds of the same load before a concurrent run")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="encoder and decoder depth each")
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--no-batch-invariant", dest="invariant", action="store_false",
                   help="convert with --no-batch-invariant (rows batched freely: the engine "
                   "before issue 22); default batch-invariant")
    p.add_argument("--repository", default=None,
                   help="serve this model repository (model t5) instead of building one")
    p.add_argument("--gpu", action="store_true",
                   help="GPU mode: no Ray; build the repository from random FT weights and "
                   "serve it with serving.tritonserver (the engine on JAX's default device)")
    args = p.parse_args()

    from core.t5config import T5Config

    cfg = T5Config(d_model=args.d_model, num_heads=4, d_kv=args.d_model // 4,
                   d_ff=args.d_model * 4, vocab_size=args.vocab,
                   num_encoder_layers=args.layers, num_decoder_layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.repository:
            repo = Path(args.repository)
        else:
            print(f"building a random model: {cfg}", file=sys.stderr, flush=True)
            build = build_repository_plain if args.gpu else build_repository
            repo = build(Path(tmp), cfg, args.dtype, args.invariant)
        if args.gpu:
            server, url = start_plain_server(repo, Path(tmp) / "triton")
            served_on = server_device(server.log_path)
            print(f"tritonserver pid {server.pid} ready at {url}; engine on {served_on}",
                  file=sys.stderr, flush=True)
            stop = server.stop
        else:
            proc, url = start_server(repo)
            served_on = "default"

            def stop() -> None:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=120)
        results = []
        try:
            for run in args.runs.split(","):
                b, c = (int(x) for x in run.split(":"))
                r = measure(url, b, c, args.seconds, args.input_len, args.output_len,
                            cfg.vocab_size, args.warmup)
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            stop()
        if not args.no_baseline:
            for b in sorted({r["batch"] for r in results}):
                base = measure_engine(repo, b, args.seconds, args.input_len, args.output_len,
                                      cfg.vocab_size, args.dtype, args.invariant)
                print(json.dumps(base), flush=True)
                for r in results:
                    if r["batch"] == b:
                        r["engine_tokens_per_s"] = base["generated_tokens_per_s"]
                        r["serving_vs_engine"] = round(
                            r["generated_tokens_per_s"] / base["generated_tokens_per_s"], 2)
    print(json.dumps({"model": {"d_model": cfg.d_model, "layers": args.layers,
                                "vocab": cfg.vocab_size, "dtype": args.dtype,
                                "params": cfg.num_parameters()},
                      "batch_invariant": args.invariant,
                      "input_len": args.input_len, "output_len": args.output_len,
                      "cpus": os.cpu_count(), "server": "serving.tritonserver" if args.gpu
                      else "ray_jobs.serve", "server_engine_device": served_on,
                      "baseline_device": _baseline_device(), "results": results}), flush=True)


def _baseline_device() -> str:
    import jax

    return str(jax.devices()[0])


if __name__ == "__main__":
    main()
