"""Served end to end: a current-t5x scanned (scalable_t5) checkpoint whose layers each have
their own relative-position table -> ``convert --engine jax`` -> tritonserver -> tritonclient,
its greedy answers equal to an independent numpy forward pass (tests/conversion/t5x_forward.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conversion.run import ConvertOptions, convert
from demo.t5x_writer import gin_config, random_t5x_params, write_t5x_checkpoint
from tests.conversion import t5x_forward
from tests.conversion.conftest import MODELS
from tests.conversion.reference import scan_params
from tests.serving.conftest import ft_inputs, sample_rows

pytestmark = pytest.mark.slow


def test_served_per_layer_tables_match_the_reference(ray_local, tmp_path):
    from serving.local import LocalServers

    cfg = MODELS["ul2"]
    params = random_t5x_params(cfg, seed=21)
    rng = np.random.default_rng(22)
    tables = {side: [rng.standard_normal((cfg.num_heads, 32)).astype(np.float32)
                     for _ in range(depth)]
              for side, depth in (("encoder", cfg.num_encoder_layers),
                                  ("decoder", cfg.num_decoder_layers))}
    src = write_t5x_checkpoint(tmp_path / "ckpt", scan_params(params, cfg, naming="current",
                                                              tables=tables),
                               step=1, gin=gin_config(cfg))
    repo = tmp_path / "repo"
    summary = convert(ConvertOptions(src=str(src), dst=str(repo), model_name="scanned",
                                     engine="jax", inference_dtype="fp32", progress=False))
    assert summary["layer_relative_bias"] == ["encoder", "decoder"]

    rows = sample_rows(3, seed=5, vocab=cfg.vocab_size)
    max_out = 8
    with LocalServers(str(repo), "scanned", replicas=1, num_cpus=0,
                      ready_timeout=240) as servers:
        client = grpcclient.InferenceServerClient(servers.endpoints[0]["grpc"])
        res = client.infer("scanned", ft_inputs(rows, max_out, runtime_top_k=1))
        client.close()
    out_ids, lengths = res.as_numpy("output_ids"), res.as_numpy("sequence_length")
    for r, row in enumerate(rows):
        want = t5x_forward.greedy(cfg, params, tables, row.astype(np.int64), max_out)
        assert int(lengths[r, 0]) == len(want)
        assert out_ids[r, 0, :len(want)].tolist() == want
