"""Bad input: a clear one-line error naming what is wrong, and nothing claimed complete."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conversion.run import ConversionError, ConvertOptions, convert
from demo.t5x_writer import gin_config, random_t5x_params, write_t5x_checkpoint
from tests.conversion.conftest import MODELS, SMALL_CHUNK_BYTES

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ray_jobs.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_tensor_parallel_that_does_not_divide(t5x_checkpoint, tmp_path):
    src, _ = t5x_checkpoint("ul2")
    proc = run_cli("--src", str(src), "--dst", str(tmp_path), "--tensor-parallel", "3", "--json")
    assert_one_line_error(proc, "tensor-parallel size 3 does not divide num_heads 4")
    assert not any(tmp_path.iterdir())


def test_tensor_parallel_that_does_not_divide_d_ff(tmp_path):
    # 4 heads split over 4 ranks, but d_ff 42 does not: the MLP split must be refused too.
    cfg = dataclasses.replace(MODELS["ul2"], d_ff=42)
    write_t5x_checkpoint(tmp_path / "ckpt", random_t5x_params(cfg, seed=0), step=1,
                         gin=gin_config(cfg))
    proc = run_cli("--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "out"),
                   "--tensor-parallel", "4", "--json")
    assert_one_line_error(proc, "tensor-parallel size 4 does not divide d_ff 42")
    assert not (tmp_path / "out").exists()


def test_missing_parameter(tmp_path):
    cfg = MODELS["t5v1"]
    params = random_t5x_params(cfg, seed=0)
    del params["decoder.layers_1.mlp.wo.kernel"]
    write_t5x_checkpoint(tmp_path / "ckpt", params, step=1)
    proc = run_cli("--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "out"))
    assert_one_line_error(proc, "missing parameter 'decoder.layers_1.mlp.wo.kernel'")
    assert not (tmp_path / "out").exists()


def test_source_that_is_not_a_t5x_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\0" * 16)
    proc = run_cli("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out"))
    assert_one_line_error(proc, "is not a T5X checkpoint")
    (tmp_path / "src" / "checkpoint").write_bytes(b"this is not msgpack")
    proc = run_cli("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out"))
    assert_one_line_error(proc, "is not a T5X")
    proc = run_cli("--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "out"))
    assert_one_line_error(proc, "does not exist")
    assert not (tmp_path / "out").exists()


def test_destination_holding_a_different_model(ray_local, t5x_checkpoint, tmp_path):
    ul2, _ = t5x_checkpoint("ul2")
    t5v1, params = t5x_checkpoint("t5v1")
    convert(ConvertOptions(src=str(ul2), dst=str(tmp_path), model_name="m", progress=False))

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(tmp_path)): p.read_bytes()
                for p in (tmp_path / "m").rglob("*") if p.is_file()}

    before = snapshot()
    proc = run_cli("--src", str(t5v1), "--dst", str(tmp_path), "--model-name", "m")
    assert_one_line_error(proc, "already holds a different model", "--overwrite")
    # Same model, other tensor-parallel size: also a different model in that folder.
    proc = run_cli("--src", str(ul2), "--dst", str(tmp_path), "--model-name", "m",
                   "--tensor-parallel", "2")
    assert_one_line_error(proc, "already holds a different model")
    assert snapshot() == before  # the refused runs wrote nothing over the existing model
    # Files that are no conversion at all.
    (tmp_path / "other" / "1").mkdir(parents=True)
    (tmp_path / "other" / "1" / "model.plan").write_bytes(b"x")
    proc = run_cli("--src", str(ul2), "--dst", str(tmp_path), "--model-name", "other")
    assert_one_line_error(proc, "already holds files that are not this conversion")

    # --overwrite replaces the whole model folder: nothing of the old model is left.
    summary = convert(ConvertOptions(src=str(t5v1), dst=str(tmp_path), model_name="m",
                                     overwrite=True, progress=False))
    out = tmp_path / "m" / "1" / "1-gpu"
    assert not (out / "lm_head.weight.bin").exists()  # the tied model has none
    assert not (out / "encoder.block.0.layer.1.DenseReluDense.wi2.weight.0.bin").exists()
    assert summary["model"]["tie_word_embeddings"] is True


def test_corrupt_chunk_names_the_parameter(ray_local, tmp_path):
    cfg = MODELS["ul2"]
    ckpt = write_t5x_checkpoint(tmp_path / "ckpt", random_t5x_params(cfg, seed=5), step=1,
                                chunk_bytes=SMALL_CHUNK_BYTES)
    chunk = ckpt / "target.encoder.layers_1.mlp.wo.kernel" / "1.0"
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])  # truncated
    opts = ConvertOptions(src=str(ckpt), dst=str(tmp_path / "out"), tensor_parallel=2,
                          progress=False)
    with pytest.raises(ConversionError) as info:
        convert(opts)
    message = str(info.value)
    assert "\n" not in message
    assert "'encoder.layers_1.mlp.wo.kernel'" in message and "encoder.1" in message
    # Nothing claims to be complete: no config.pbtxt, manifest says incomplete and lists only
    # files that are really there.
    model = tmp_path / "out" / "t5"
    assert not (model / "config.pbtxt").exists()
    manifest = json.loads((model / "1" / "2-gpu" / "manifest.json").read_text())
    assert manifest["model"]["complete"] is False
    for e in manifest["files"]:
        assert (model / "1" / "2-gpu" / e["name"]).stat().st_size == e["bytes"]
    assert not list((model / "1" / "2-gpu").glob("*.tmp-*"))
    assert not any(e["name"].startswith("encoder.block.1.layer.1.DenseReluDense.wo")
                   for e in manifest["files"])
