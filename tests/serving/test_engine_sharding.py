"""Tensor-parallel execution with FT's split over 2 devices (XLA host devices, in a child
process because the device count is fixed when jax starts) gives the single-device results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.serving.engine_fixtures import UL2_TINY, random_ft_weights, write_ft_folder

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from serving.engine import SamplingParams, T5Engine

    one = T5Engine.load(sys.argv[1])
    two = T5Engine.load(sys.argv[1], devices=2)
    q = two.params["decoder"][0]["q"]
    rng = np.random.default_rng(0)
    rows = [rng.integers(2, 100, n) for n in (5, 9, 3)]
    ps = [SamplingParams(max_output_len=10),
          SamplingParams(max_output_len=8, top_k=0, top_p=0.9, random_seed=3),
          SamplingParams(max_output_len=12, beam_width=2)]
    a, b = one.generate(rows, ps), two.generate(rows, ps)
    ids, dec = rng.integers(2, 100, (2, 7)), rng.integers(0, 100, (2, 5))
    print(json.dumps({
        "q_devices": len(q.sharding.device_set),
        "q_shard_shape": list(q.addressable_shards[0].data.shape),
        "same_tokens": all(np.array_equal(x.output_ids, y.output_ids) for x, y in zip(a, b)),
        "same_lengths": all(np.array_equal(x.sequence_length, y.sequence_length)
                            for x, y in zip(a, b)),
        "logit_diff": float(np.abs(one.logits(ids, dec) - two.logits(ids, dec)).max()),
    }))
""")


def test_two_device_tensor_parallel_matches_one_device(tmp_path, repo_root) -> None:
    folder = write_ft_folder(tmp_path, UL2_TINY, 1, random_ft_weights(UL2_TINY, seed=3))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=env, cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    h, d, k = UL2_TINY.num_heads, UL2_TINY.d_model, UL2_TINY.d_kv
    assert got["q_devices"] == 2
    assert got["q_shard_shape"] == [d, h // 2, k]  # heads split
    assert got["same_tokens"] and got["same_lengths"]
    assert got["logit_diff"] < 1e-5
