"""Evaluation throughput: our Ray actor pool against the seed's evaluator loop, same run.

    .venv/bin/python bench/eval.py [--examples 120] [--actors 1,2,4] [--batch-size 8[,1...]]
    .venv/bin/python bench/eval.py --baseline          # the seed's loop only
    .venv/bin/python bench/eval.py --url HOST:PORT --http-url HOST:PORT --model-name t5 \
        --vocab spiece.model --dataset data.jsonl      # against a server you run

Without --url it builds a random T5 of --d-model / --layers (a SentencePiece vocabulary trained
on the bundled XSum sample, demo.t5x_writer, ``ray_jobs.convert --engine jax``) and serves it
with ``serving.local.LocalServers``; the data is the bundled sample repeated to --examples rows.
The default size (D 512, 6 + 6 layers) makes a request cost the server real work, as on a GPU
serving a large model; with the tests' 2-layer toy, a request costs ~15 ms and what is measured
is only client overhead.

The baseline is the seed's ``eval_summarization.py`` mode (ft-t5-format.md section 7), kept for
comparison only: sequential, one example per request, a new HTTP client for every request.
It is run with our decoding settings (greedy, same max_output_len) so both do the same work.
Results: a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evaluation.client import build_request_arrays, parse_response  # noqa: E402
from evaluation.data import load_examples  # noqa: E402
from evaluation.runner import EvalSettings, evaluate  # noqa: E402
from evaluation.tokenizer import load_tokenizer  # noqa: E402

MODEL = "t5"


def build_model(work: Path, d_model: int, layers: int) -> tuple[Path, Path]:
    """Vocabulary + converted model repository (random weights), as in
    tests/evaluation/conftest.py but at the given width and depth."""
    import sentencepiece as spm

    from core.t5config import T5Config
    from demo.t5x_writer import random_t5x_params, write_t5x_checkpoint
    from demo.vocab import train_sentencepiece

    rows = [json.loads(line) for line in (REPO / "demo/data/xsum_sample.jsonl").open()]
    vocab = train_sentencepiece([r["document"] for r in rows] + [r["summary"] for r in rows],
                                work / "spiece.model", 200)
    size = spm.SentencePieceProcessor(model_file=str(vocab)).get_piece_size()
    cfg = T5Config(d_model=d_model, num_heads=8, d_kv=d_model // 8, d_ff=4 * d_model,
                   vocab_size=size, num_encoder_layers=layers, num_decoder_layers=layers,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    write_t5x_checkpoint(work / "ckpt", random_t5x_params(cfg, seed=0, dtype="float32"), step=1)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-m", "ray_jobs.convert", "--src", str(work / "ckpt"),
                    "--dst", str(work / "repo"), "--model-name", MODEL, "--engine", "jax",
                    "--inference-dtype", "fp32", "--vocab", str(vocab)],
                   cwd=REPO, env=env, check=True, capture_output=True)
    return vocab, work / "repo"


def write_dataset(path: Path, examples: int) -> Path:
    rows = [json.loads(line) for line in (REPO / "demo/data/xsum_sample.jsonl").open()]
    with path.open("w") as f:
        for i in range(examples):
            f.write(json.dumps({"id": f"ex{i:05d}", **rows[i % len(rows)]}) + "\n")
    return path


def baseline(http_url: str | None, grpc_url: str, model: str, vocab: str, dataset: str,
             max_input_len: int, max_output_len: int) -> dict:
    """The seed's loop: one example per request, a fresh client each time, sequential."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    tok = load_tokenizer(vocab, None, model)
    data = load_examples(dataset)
    lib = httpclient if http_url else grpcclient
    url = http_url or grpc_url
    t0 = time.perf_counter()
    for ex in data.examples:
        client = lib.InferenceServerClient(url)
        arrays = build_request_arrays([tok.encode(ex.input_text, max_input_len)],
                                      max_output_len=max_output_len)
        inputs = []
        for name in ("input_ids", "sequence_length", "max_output_len", "runtime_top_k"):
            inp = lib.InferInput(name, list(arrays[name].shape), "UINT32")
            inp.set_data_from_numpy(arrays[name])
            inputs.append(inp)
        result = client.infer(model, inputs)
        tok.decode(parse_response(result.as_numpy("output_ids"),
                                  result.as_numpy("sequence_length"))[0])
        client.close()
    seconds = time.perf_counter() - t0
    n = len(data.examples)
    return {"mode": "baseline (seed loop)", "examples": n, "seconds": round(seconds, 3),
            "examples_per_second": round(n / seconds, 3)}


def ours(url: str, model: str, vocab: str, dataset: str, actors: int, batch_size: int,
         max_input_len: int, max_output_len: int, out: Path) -> dict:
    m = evaluate(EvalSettings(url=url, model_name=model, output=str(out), dataset=dataset,
                              vocab=vocab, num_actors=actors, batch_size=batch_size,
                              max_input_len=max_input_len, max_output_len=max_output_len,
                              progress=False))
    assert m["failed"] == 0, f"{m['failed']} examples failed"
    return {"mode": f"ours, {actors} actor(s), batch {batch_size}", "examples": m["examples"],
            "seconds": m["request_seconds"], "examples_per_second": m["examples_per_second"],
            "latency_ms_p50": m["latency_ms"]["p50"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", action="store_true", help="run the seed's loop only")
    p.add_argument("--url", help="gRPC HOST:PORT[,...] of a running server (default: build one)")
    p.add_argument("--http-url", help="HTTP HOST:PORT for the baseline (the seed used HTTP)")
    p.add_argument("--model-name", default=MODEL)
    p.add_argument("--vocab")
    p.add_argument("--dataset", help="jsonl/json/parquet/tsv (default: the sample, repeated)")
    p.add_argument("--examples", type=int, default=120)
    p.add_argument("--d-model", type=int, default=512, help="width of the built model")
    p.add_argument("--layers", type=int, default=6, help="encoder and decoder depth each")
    p.add_argument("--actors", default="1,2,4")
    p.add_argument("--batch-size", default="8", help="examples per request; a list runs each")
    p.add_argument("--replicas", type=int, default=1, help="servers when building one")
    p.add_argument("--max-input-len", type=int, default=512)
    p.add_argument("--max-output-len", type=int, default=32)
    args = p.parse_args()

    import ray

    from ray_jobs._cli import init_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    dataset = args.dataset or str(write_dataset(work / "data.jsonl", args.examples))
    init_ray(None, log_to_driver=False)
    servers = None
    try:
        if args.url:
            url, http_url, vocab = args.url, args.http_url, args.vocab
        else:
            from serving.local import LocalServers

            vocab_path, repo = build_model(work, args.d_model, args.layers)
            vocab = str(vocab_path)
            servers = LocalServers(str(repo), args.model_name, replicas=args.replicas)
            servers.start()
            url = ",".join(e["grpc"] for e in servers.endpoints)
            http_url = servers.endpoints[0]["http"]
        # The engine compiles one program per (batch, input, output) size bucket, and Triton's
        # dynamic batching merges concurrent requests into new batch sizes: every mode runs
        # once unmeasured so that neither side pays for compilation in the measured pass.
        modes = [] if args.baseline else [
            (int(a), int(b)) for a in args.actors.split(",") for b in args.batch_size.split(",")]

        def run_base() -> dict:
            return baseline(http_url, url.split(",")[0], args.model_name, vocab, dataset,
                            args.max_input_len, args.max_output_len)

        def run_ours(n: int, b: int, tag: str) -> dict:
            return ours(url, args.model_name, vocab, dataset, n, b, args.max_input_len,
                        args.max_output_len, work / f"{tag}{n}-{b}")

        run_base()
        for n, b in modes:
            run_ours(n, b, "warm")
        rows = [run_base()] + [run_ours(n, b, "ours") for n, b in modes]
        base = rows[0]["examples_per_second"]
        for r in rows:
            r["speedup_vs_baseline"] = round(r["examples_per_second"] / base, 2)
            print(f"{r['mode']:<34} {r['examples']:>5} ex  {r['seconds']:>8.2f} s  "
                  f"{r['examples_per_second']:>8.2f} ex/s  x{r['speedup_vs_baseline']}",
                  file=sys.stderr)
        print(json.dumps({"results": rows, "dataset": dataset, "url": url}))
    finally:
        if servers is not None:
            servers.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
