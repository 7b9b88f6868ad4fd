"""demo.t5x_writer writes the legacy layout exactly as t5x's checkpoints.py does."""

from __future__ import annotations

import json

import ml_dtypes
import msgpack
import numpy as np
import pytest
import tensorstore as ts

from conversion import t5x
from core.t5config import T5Config
from demo.t5x_writer import (
    choose_chunk_shape,
    random_t5x_params,
    t5x_param_shapes,
    write_t5x_checkpoint,
)
from tests.conversion.conftest import MODELS


def test_choose_chunk_shape_matches_t5x_on_ul2_shapes():
    # Worked by hand from t5x's greedy rule (halve the largest dimension's divisor list).
    target = 64 * 1024 * 1024 // 4
    assert choose_chunk_shape([32128, 4096], target) == [4016, 4096]
    assert choose_chunk_shape([4096, 16384], target) == [4096, 4096]
    assert choose_chunk_shape([4096, 4096], target) == [4096, 4096]
    assert choose_chunk_shape([4096], target) == [4096]
    assert choose_chunk_shape([24, 48], 48) == [6, 8]


def test_param_names_follow_t5x_examples_t5():
    ul2 = t5x_param_shapes(MODELS["ul2"])
    assert "decoder.logits_dense.kernel" in ul2 and ul2["decoder.logits_dense.kernel"] == (24, 36)
    assert "encoder.layers_1.mlp.wi_1.kernel" in ul2
    assert "decoder.layers_2.encoder_decoder_attention.out.kernel" in ul2
    assert ul2["encoder.layers_0.attention.query.kernel"] == (24, 32)  # I = H*K = 32 != D
    t5v1 = t5x_param_shapes(MODELS["t5v1"])
    assert "decoder.logits_dense.kernel" not in t5v1
    assert "encoder.layers_0.mlp.wi.kernel" in t5v1
    assert not any("wi_0" in n or "wi_1" in n for n in t5v1)
    params = random_t5x_params(MODELS["t5v1"], seed=0, dtype="bfloat16")
    assert set(params) == set(t5v1)
    assert all(a.dtype == ml_dtypes.bfloat16 for a in params.values())


def test_legacy_layout_on_disk(tmp_path):
    cfg = T5Config(d_model=8, num_heads=2, d_kv=4, d_ff=16, vocab_size=12,
                   num_encoder_layers=1, num_decoder_layers=1)
    params = random_t5x_params(cfg, seed=1)
    ckpt = write_t5x_checkpoint(tmp_path, params, step=42, dtype="bfloat16", chunk_bytes=64)
    assert ckpt == tmp_path / "checkpoint_42"
    state = msgpack.unpackb((ckpt / "checkpoint").read_bytes(), raw=False,
                            ext_hook=lambda code, data: (code, data))
    assert state["version"] == 3
    opt = state["optimizer"]
    assert set(opt) == {"target", "state"} and opt["state"]["param_states"] == {}
    code, payload = opt["state"]["step"]
    shape, dtype, raw = msgpack.unpackb(payload, raw=False)
    assert code == 1 and np.frombuffer(raw, dtype=dtype).item() == 42
    leaf = opt["target"]["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]
    assert leaf["driver"] == "zarr" and leaf["dtype"] == "bfloat16"
    assert leaf["kvstore"] == {"driver": "file",
                               "path": "target.encoder.layers_0.mlp.wo.kernel"}
    assert leaf["metadata"]["shape"] == [16, 8]
    zarray = json.loads((ckpt / "target.encoder.layers_0.mlp.wo.kernel" / ".zarray").read_text())
    assert zarray["compressor"]["id"] == "gzip" and zarray["dtype"] == "bfloat16"
    chunks = zarray["chunks"]
    assert chunks == leaf["metadata"]["chunks"] and np.prod(chunks) * 2 <= 64
    assert all(n % c == 0 for n, c in zip(zarray["shape"], chunks, strict=True))
    # Multi-chunk arrays: chunk files named with "." separated indices.
    assert (ckpt / "target.encoder.layers_0.mlp.wo.kernel" / "1.0").exists()
    store = ts.open({"driver": "zarr", "kvstore": {
        "driver": "file", "path": str(ckpt / "target.token_embedder.embedding")}}).result()
    np.testing.assert_array_equal(store.read().result(),
                                  params["token_embedder.embedding"].astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("layout", ["legacy", "ocdbt"])
def test_reader_lists_and_reads_both_layouts(tmp_path, layout):
    cfg = MODELS["t5v1"]
    params = random_t5x_params(cfg, seed=2)
    write_t5x_checkpoint(tmp_path, params, step=3, layout=layout, chunk_bytes=256)
    write_t5x_checkpoint(tmp_path, params, step=5, layout=layout, chunk_bytes=256)
    ckpt = t5x.open_checkpoint(str(tmp_path))  # the folder of steps: the newest wins
    assert (ckpt.layout, ckpt.step) == (layout, 5)
    assert set(ckpt.params) == set(params)
    name = "encoder.layers_1.attention.out.kernel"
    assert ckpt.params[name].shape == (16, 16) and ckpt.params[name].dtype == "float32"
    np.testing.assert_array_equal(ckpt.read(name), params[name])
    region = (slice(3, 11), slice(5, 16))
    np.testing.assert_array_equal(ckpt.read(name, region), params[name][region])
    if layout == "ocdbt":  # written by orbax-checkpoint itself
        assert (tmp_path / "checkpoint_5" / "_METADATA").exists()
        assert (tmp_path / "checkpoint_5" / "manifest.ocdbt").exists()
