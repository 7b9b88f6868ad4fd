"""Every output file equals, byte for byte, the spec's transform of the source array.

The expected bytes come from tests/conversion/reference.py (plain numpy from the spec tables),
not from the plan. Combinations: 2 architectures x 4 sources (legacy/OCDBT x fp32/bf16) x
tensor-parallel 1, 2, 4, with the weight dtype rotated so that each architecture sees every
(tensor-parallel, weight dtype) pair.
"""

from __future__ import annotations

import base64
import configparser
import json

import google_crc32c
import pytest

from conversion.run import ConvertOptions, convert
from core.repository import parse_pbtxt
from tests.conversion.conftest import MODELS
from tests.conversion.reference import reference_files

SOURCES = [("legacy", "float32"), ("ocdbt", "bfloat16"), ("ocdbt", "float32"),
           ("legacy", "bfloat16")]
TPS = [1, 2, 4]
WDS = ["fp32", "fp16", "bf16"]
CASES = [(layout, dtype, t, WDS[(i + s) % 3])
         for s, (layout, dtype) in enumerate(SOURCES) for i, t in enumerate(TPS)]


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize(("layout", "save_dtype", "t", "wd"), CASES)
def test_files_match_reference(ray_local, t5x_checkpoint, tmp_path, model, layout, save_dtype,
                               t, wd):
    cfg = MODELS[model]
    src, params = t5x_checkpoint(model, layout, save_dtype)
    inference = "fp16" if wd == "fp32" else "fp32"
    summary = convert(ConvertOptions(src=str(src), dst=str(tmp_path), model_name="m",
                                     tensor_parallel=t, weight_dtype=wd,
                                     inference_dtype=inference, progress=False))
    out = tmp_path / "m" / "1" / f"{t}-gpu"
    assert summary["output"] == str(out)
    assert summary["layout"] == layout and summary["step"] == 10

    expected = reference_files(params, cfg, t, wd)
    written = {p.name for p in out.iterdir()} - {"config.ini", "manifest.json"}
    assert written == set(expected)
    for name, data in expected.items():
        assert (out / name).read_bytes() == data, name
    assert summary["files"] == len(expected)
    assert summary["bytes"] == sum(len(d) for d in expected.values())

    # config.ini: each side's own depth, the real activation and tied flag, the file dtype.
    ini = configparser.ConfigParser()
    ini.read_string((out / "config.ini").read_text())
    for side, depth in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        sec = ini[side]
        assert sec.getint("num_layers") == depth
        assert (sec.getint("d_model"), sec.getint("d_kv"), sec.getint("d_ff")) == \
            (cfg.d_model, cfg.d_kv, cfg.d_ff)
        assert (sec.getint("num_heads"), sec.getint("vocab_size")) == \
            (cfg.num_heads, cfg.vocab_size)
        assert sec.getint("relative_attention_num_buckets_or_max_pos_seq_len") == 32
        assert sec["weight_data_type"] == wd
    assert ini["encoder"]["feed_forward_proj"] == cfg.feed_forward_proj
    assert ini["decoder"]["tie_word_embeddings"] == str(cfg.tie_word_embeddings).lower()
    assert ini["structure"]["use_gated_activation"] == ("1" if cfg.gated else "0")

    # config.pbtxt: FT backend, parallel sizes and inference dtype.
    pb = parse_pbtxt((tmp_path / "m" / "config.pbtxt").read_text())
    assert (pb.name, pb.backend, pb.default_model_filename) == ("m", "fastertransformer",
                                                                 f"{t}-gpu")
    params_pb = {k: v.string_value for k, v in pb.parameters.items()}
    assert params_pb["tensor_para_size"] == str(t)
    assert params_pb["pipeline_para_size"] == "1"
    assert params_pb["data_type"] == inference
    assert params_pb["model_type"] == "T5"

    # manifest.json: one entry per file with the right size, crc32c (as GCS writes it: base64
    # of the big-endian value), dtype and shape.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["complete"] is True
    entries = {e["name"]: e for e in manifest["files"]}
    assert set(entries) == set(expected)
    for name, data in expected.items():
        e = entries[name]
        assert e["bytes"] == len(data) and e["dtype"] == wd
        assert e["crc32c"] == base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")
                                               ).decode()
