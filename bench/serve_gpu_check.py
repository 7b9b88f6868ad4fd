"""Check, on a GPU machine without Ray: ``python -m serving.tritonserver`` serves the JAX engine
on the GPU and answers like the same engine run in this process.

A tiny model repository is written from random FT weights (bench/serve.py's writer), the plain
command is started as a subprocess, one request of 4 rows with every kind of input (UINT32 ids,
a UINT64 seed, a BOOL flag) goes through tritonclient.grpc, and its outputs are compared with
``T5Engine.generate`` on the same rows here. SIGTERM must stop the server with exit code 0.

    python bench/serve_gpu_check.py        # prints one JSON line; exits 1 on a mismatch
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def request(batch: int, length: int, out_len: int, vocab: int) -> dict[str, np.ndarray]:
    """The FT contract's tensors: greedy, with a 64-bit seed and log probs asked for."""
    ids = np.random.default_rng(0).integers(2, vocab, size=(batch, length)).astype(np.uint32)
    ids[:, -1] = 1
    return {"input_ids": ids, "sequence_length": np.full((batch, 1), length, np.uint32),
            "max_output_len": np.full((batch, 1), out_len, np.uint32),
            "runtime_top_k": np.ones((batch, 1), np.uint32),
            "random_seed": np.full((batch, 1), 2**40 + 3, np.uint64),
            "is_return_log_probs": np.ones((batch, 1), np.bool_)}


def infer(url: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    client = grpcclient.InferenceServerClient(url)
    res = client.infer("t5", inputs)
    client.close()
    return {n: res.as_numpy(n) for n in ("output_ids", "sequence_length", "cum_log_probs")}


def main() -> int:
    import jax

    from bench.serve import build_repository_plain, server_device
    from serving.engine import SamplingParams, T5Engine
    from testing.ft_writer import UL2_TINY

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        repo = build_repository_plain(Path(tmp), UL2_TINY, "fp32")
        log_dir = Path(tmp) / "log"
        proc = subprocess.Popen([sys.executable, "-m", "serving.tritonserver",
                                 "--model-repository", str(repo), "--log-dir", str(log_dir)],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            ready = json.loads(proc.stdout.readline())
            arrays = request(4, 8, 8, UL2_TINY.vocab_size)
            got = infer(ready["endpoints"][0]["grpc"], arrays)
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        served_on = server_device(log_dir / "tritonserver.log")
        engine = T5Engine.load(str(repo / "t5" / "1" / "1-gpu"), dtype="fp32")
        params = SamplingParams(max_output_len=8, random_seed=2**40 + 3, return_log_probs=True)
        want = engine.generate(list(arrays["input_ids"]), [params] * 4)
    same_ids = all(np.array_equal(got["output_ids"][r, 0, : int(w.sequence_length[0])],
                                  w.output_ids[0, : int(w.sequence_length[0])])
                   and int(got["sequence_length"][r, 0]) == int(w.sequence_length[0])
                   for r, w in enumerate(want))
    cum_diff = max(abs(float(got["cum_log_probs"][r, 0]) - float(w.cum_log_probs[0]))
                   for r, w in enumerate(want))
    ok = same_ids and cum_diff < 1e-3 and rc == 0 and "cuda" in served_on.lower()
    print(json.dumps({"ok": ok, "server_engine_device": served_on,
                      "in_process_device": str(jax.devices()[0]), "same_output_ids": same_ids,
                      "max_cum_log_prob_diff": cum_diff, "sigterm_exit_code": rc,
                      "ready_line": ready, "numpy": np.__version__, "jax": jax.__version__,
                      "output_ids_row0": got["output_ids"][0, 0].tolist()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
