"""bench/gpu.py on CPU with its tiny model: the benchmark's own correctness checks hold.

On the GPU machine the same script times UL2 20B; here it guards what the numbers rest on:
HF's weights handed to our engine through DLPack give the same model (logits and greedy
tokens), and the fp32 / bf16 checks pass. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_gpu_bench_tiny_same_weights_and_checks(repo_root) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--model", "tiny", "--input-len", "32",
         "--output-len", "8", "--batches", "1,4", "--repeats", "1"],
        cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["check"]["passed"] and out["check"]["fp32_greedy_identical"]
    same = out["same_weights"]
    # both sides bf16 on the same weights: the logits agree closely, so the layouts match
    assert same["logits_max_abs_over_max_logit"] < 0.05
    assert same["logits_argmax_agreement"] >= 0.95
    assert same["greedy_rows_identical"] >= same["rows"] // 2
    impls = {r["impl"]: r for r in out["results"]}
    assert [r["batch"] for r in impls["jax"]["runs"]] == [1, 4]
    assert [r["batch"] for r in impls["hf"]["runs"]] == [1, 4]
    assert all(r["bound"]["total_s"] > 0 for r in impls["jax"]["runs"])
