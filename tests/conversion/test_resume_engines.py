"""--resume, --verify, --engine jax, --vocab, and scanned (scalable_t5) checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from conversion import run
from conversion.run import ConversionError, ConvertOptions, convert
from core.repository import parse_pbtxt
from demo.t5x_writer import gin_config, write_t5x_checkpoint
from tests.conversion.conftest import MODELS, SMALL_CHUNK_BYTES
from tests.conversion.reference import reference_files, scan_params


def _assert_matches(out, expected):
    assert {p.name for p in out.iterdir()} - {"config.ini", "manifest.json"} == set(expected)
    for name, data in expected.items():
        assert (out / name).read_bytes() == data, name


def test_resume_keeps_good_files_and_redoes_bad_ones(ray_local, t5x_checkpoint, tmp_path):
    src, params = t5x_checkpoint("ul2")
    opts = ConvertOptions(src=str(src), dst=str(tmp_path), tensor_parallel=2, progress=False)
    first = convert(opts)
    out = tmp_path / "t5" / "1" / "2-gpu"
    flipped = out / "encoder.block.1.layer.0.SelfAttention.k.weight.1.bin"
    data = bytearray(flipped.read_bytes())
    data[5] ^= 0xFF  # same size, different bytes: only the digest tells
    flipped.write_bytes(bytes(data))
    (out / "decoder.final_layer_norm.weight.bin").unlink()

    resumed = convert(ConvertOptions(**{**opts.__dict__, "resume": True}))
    # Both rank files of the damaged k tensor, and the deleted file, are rewritten.
    assert resumed["skipped_files"] == first["files"] - 3
    _assert_matches(out, reference_files(params, MODELS["ul2"], 2, "fp32"))
    assert json.loads((out / "manifest.json").read_text())["model"]["complete"] is True


def test_old_sha256_manifest_resumes_and_verifies(ray_local, t5x_checkpoint, tmp_path):
    """A manifest as versions before crc32c wrote it (a sha256 per file, no crc32c) still
    resumes (good files kept, a changed one redone, with a crc32c entry) and verifies."""
    src, params = t5x_checkpoint("ul2")
    opts = ConvertOptions(src=str(src), dst=str(tmp_path), tensor_parallel=2, progress=False)
    first = convert(opts)
    out = tmp_path / "t5" / "1" / "2-gpu"
    manifest = json.loads((out / "manifest.json").read_text())
    for e in manifest["files"]:  # rewritten the old way: sha256 of each file, no crc32c
        del e["crc32c"]
        e["sha256"] = hashlib.sha256((out / e["name"]).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    changed = out / "encoder.block.0.layer.1.DenseReluDense.wo.weight.1.bin"
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))

    resumed = convert(ConvertOptions(**{**opts.__dict__, "resume": True, "verify": True}))
    assert resumed["skipped_files"] == first["files"] - 2  # both ranks of the changed tensor
    assert resumed["verified"] is True
    _assert_matches(out, reference_files(params, MODELS["ul2"], 2, "fp32"))
    entries = {e["name"]: e for e in json.loads((out / "manifest.json").read_text())["files"]}
    assert "crc32c" in entries[changed.name] and "sha256" not in entries[changed.name]
    kept = entries["decoder.final_layer_norm.weight.bin"]
    assert "sha256" in kept and "crc32c" not in kept


def test_digest_sha256_flag_writes_sha256(ray_local, t5x_checkpoint, tmp_path):
    src, _ = t5x_checkpoint("t5v1")
    convert(ConvertOptions(src=str(src), dst=str(tmp_path), digest="sha256", verify=True,
                           progress=False))
    out = tmp_path / "t5" / "1" / "1-gpu"
    for e in json.loads((out / "manifest.json").read_text())["files"]:
        assert "crc32c" not in e
        assert e["sha256"] == hashlib.sha256((out / e["name"]).read_bytes()).hexdigest()


def test_verify_catches_a_changed_file(ray_local, t5x_checkpoint, tmp_path):
    src, _ = t5x_checkpoint("t5v1")
    opts = ConvertOptions(src=str(src), dst=str(tmp_path), tensor_parallel=4, verify=True,
                          progress=False)
    summary = convert(opts)
    assert summary["verified"] is True
    ckpt, arch, plan, _ = run.prepare(opts)
    out = summary["output"]
    import core.manifest as ff

    _, manifest = ff.parse_manifest(open(f"{out}/manifest.json").read())
    task = plan.tasks[1]  # encoder.0
    assert run.verify_layer(task, out, manifest)["files"] == len(task.file_names())
    victim = f"{out}/{task.file_names()[3]}"
    with open(victim, "r+b") as f:
        f.write(b"\x00\x01")
    with pytest.raises(ConversionError, match="does not match its manifest crc32c"):
        run.verify_layer(task, out, manifest)


def test_jax_engine_config_and_vocab(ray_local, t5x_checkpoint, tmp_path, xsum_sample):
    from demo.vocab import train_sentencepiece

    src, _ = t5x_checkpoint("ul2", "ocdbt", "bfloat16")
    # A real SentencePiece model: --vocab refuses a file sentencepiece cannot load.
    texts = [line for line in xsum_sample.read_text().splitlines() if line.strip()]
    vocab = train_sentencepiece(texts, tmp_path / "spiece.model", 128)
    summary = convert(ConvertOptions(src=str(src), dst=str(tmp_path / "repo"), model_name="ul2",
                                     tensor_parallel=2, engine="jax", vocab=str(vocab),
                                     weight_dtype="bf16", progress=False))
    model = tmp_path / "repo" / "ul2"
    assert (model / "spiece.model").read_bytes() == vocab.read_bytes()
    assert (model / "1" / "model.py").read_text() == (
        "from serving.triton_model.model import TritonPythonModel  # noqa: F401\n")
    pb = parse_pbtxt((model / "config.pbtxt").read_text())
    assert (pb.name, pb.backend, pb.max_batch_size) == ("ul2", "python", 128)
    assert pb.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.kind, g.count) for g in pb.instance_group] == [(pb.instance_group[0].KIND_CPU, 1)]
    params = {k: v.string_value for k, v in pb.parameters.items()}
    assert params == {"tensor_para_size": "2", "pipeline_para_size": "1", "data_type": "bf16",
                      "model_type": "T5", "weights_dir": "2-gpu", "max_input_len": "1024",
                      "batch_invariant": "true"}
    inputs = {i.name: (i.data_type, list(i.dims), i.optional) for i in pb.input}
    assert inputs["input_ids"] == (pb.input[0].data_type, [-1], False)
    assert inputs["bad_words_list"][1:] == ([2, -1], True)
    assert {o.name: list(o.dims) for o in pb.output} == {
        "output_ids": [-1, -1], "sequence_length": [-1], "cum_log_probs": [-1],
        "output_log_probs": [-1, -1]}
    assert summary["arch_sources"]["feed_forward_proj"] == "gin"
    assert summary["read_from_gin"] == ["feed_forward_proj"]
    # convert returns the model's handle: the same answers serve and evaluate read from disk.
    from core.repository import ConvertedModel

    assert summary.model == ConvertedModel.open(str(tmp_path / "repo"), "ul2")
    assert (summary.model.engine, summary.model.tensor_parallel, summary.model.weights_dir) == (
        "jax", 2, str(model / "1" / "2-gpu"))
    assert summary.model.config_ini()[1] == "bf16"


def test_scanned_checkpoint_converts_like_the_unscanned_one(ray_local, tmp_path):
    cfg = MODELS["ul2"]
    from demo.t5x_writer import random_t5x_params

    params = random_t5x_params(cfg, seed=11)
    scanned = scan_params(params, cfg)
    assert scanned["encoder.layers.mlp.wi_0.kernel"].shape == (24, 2, 48)
    assert scanned["decoder.layers.relative_posemb.rel_embedding"].shape == (4, 3, 32)
    src = write_t5x_checkpoint(tmp_path / "scanned", scanned, step=1, gin=gin_config(cfg),
                               chunk_bytes=SMALL_CHUNK_BYTES)
    summary = convert(ConvertOptions(src=str(src), dst=str(tmp_path / "out"),
                                     tensor_parallel=2, weight_dtype="fp16", progress=False))
    assert summary["scanned"] is True and summary["model"]["num_decoder_layers"] == 3
    _assert_matches(tmp_path / "out" / "t5" / "1" / "2-gpu",
                    reference_files(params, cfg, 2, "fp16"))

    # Per-layer tables that differ cannot be held by FT: refused before anything is written.
    table = scanned["encoder.layers.relative_posemb.rel_embedding"].copy()
    table[:, 1, :] += np.float32(0.5)
    differing = {**scanned, "encoder.layers.relative_posemb.rel_embedding": table}
    src = write_t5x_checkpoint(tmp_path / "differing", differing, step=1, gin=gin_config(cfg))
    with pytest.raises(ConversionError, match="differs between layer 0 and layer 1"):
        convert(ConvertOptions(src=str(src), dst=str(tmp_path / "out2"), progress=False))
    assert not (tmp_path / "out2").exists()


def test_explicit_gin_gives_the_activation(ray_local, t5x_checkpoint, tmp_path):
    cfg = MODELS["t5v1"]  # relu by default: its checkpoint has no config.gin
    src, _ = t5x_checkpoint("t5v1")
    gin = tmp_path / "other.gin"
    gin.write_text(gin_config(dataclasses.replace(cfg, feed_forward_proj="gelu")))
    summary = convert(ConvertOptions(src=str(src), dst=str(tmp_path / "out"), gin=str(gin),
                                     progress=False))
    assert summary["gin"] == str(gin)
    assert summary["model"]["feed_forward_proj"] == "gelu"
    assert summary["arch_sources"]["feed_forward_proj"] == "gin"
    assert "feed_forward_proj" not in summary["inferred"]
    ini = (tmp_path / "out" / "t5" / "1" / "1-gpu" / "config.ini").read_text()
    assert "feed_forward_proj = gelu" in ini
