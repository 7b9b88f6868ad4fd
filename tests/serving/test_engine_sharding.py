"""Tensor-parallel execution with FT's split over 2 devices (XLA host devices, in a child
process because the device count is fixed when jax starts) gives the single-device results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from core import ft_format
from testing.ft_writer import UL2_TINY, random_ft_weights, write_ft_folder
from tests.conversion.reference import to_bytes

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from serving.engine import SamplingParams, T5Engine

    one = T5Engine.load(sys.argv[1])
    two = T5Engine.load(sys.argv[1], devices=2)
    q = two.params["decoder"][0]["q"]
    own = two.params["decoder"][2].get("rel_bias")
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
        "own_table_shard": None if own is None else list(own.addressable_shards[0].data.shape),
        "same_tokens": all(np.array_equal(x.output_ids, y.output_ids) for x, y in zip(a, b)),
        "same_lengths": all(np.array_equal(x.sequence_length, y.sequence_length)
                            for x, y in zip(a, b)),
        "logit_diff": float(np.abs(one.logits(ids, dec) - two.logits(ids, dec)).max()),
    }))
""")


def _write_layer_tables(folder, seed: int) -> None:
    """Every layer's own relative-bias table (ft_format.layer_relative_bias_files), random."""
    rng = np.random.default_rng(seed)
    for side, depth in (("encoder", UL2_TINY.num_encoder_layers),
                        ("decoder", UL2_TINY.num_decoder_layers)):
        for layer in range(1, depth):
            for spec in ft_format.layer_relative_bias_files(UL2_TINY, side, layer, 1):
                table = rng.standard_normal(spec.shape(1)).astype(np.float32)
                (folder / spec.name).write_bytes(to_bytes(table, "fp32"))


@pytest.mark.parametrize("layer_tables", [False, True])
def test_two_device_tensor_parallel_matches_one_device(tmp_path, repo_root,
                                                       layer_tables: bool) -> None:
    folder = write_ft_folder(tmp_path, UL2_TINY, 1, random_ft_weights(UL2_TINY, seed=3))
    if layer_tables:
        _write_layer_tables(folder, seed=4)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=env, cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    h, d, k = UL2_TINY.num_heads, UL2_TINY.d_model, UL2_TINY.d_kv
    assert got["q_devices"] == 2
    assert got["q_shard_shape"] == [d, h // 2, k]  # heads split
    own = [h // 2, UL2_TINY.relative_attention_num_buckets] if layer_tables else None
    assert got["own_table_shard"] == own  # a layer's own table split on heads too
    assert got["same_tokens"] and got["same_lengths"]
    assert got["logit_diff"] < 1e-5
