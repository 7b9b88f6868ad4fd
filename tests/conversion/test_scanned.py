"""Scanned (scalable_t5, scan_layers=True) checkpoints in both namings: current t5x's
``encoder.encoder.*`` (heads on their own axis, a relative-bias table in every layer) and the
older ``encoder.layers.*``; the scan axis from gin, a flag or the shapes; FT's refusal of
per-layer tables that differ and the JAX engine serving them exactly, against an independent
numpy forward pass (tests/conversion/t5x_forward.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from conversion.arch import ArchError, infer_arch
from conversion.plan import make_plan
from conversion.run import ConversionError, ConvertOptions, convert
from core.errors import UserError
from core.t5config import T5Config
from demo.t5x_writer import gin_config, random_t5x_params, write_t5x_checkpoint
from ray_jobs import convert as convert_cli
from serving.engine import SamplingParams, T5Engine
from tests.conversion import t5x_forward
from tests.conversion.conftest import MODELS, SMALL_CHUNK_BYTES
from tests.conversion.reference import reference_files, scan_params

UL2 = MODELS["ul2"]  # D 24, H 4, K 8, F 48, 2 encoder / 3 decoder layers, gated-silu, untied
# D == H == F == both depths: the layer axis cannot be told from the shapes.
SQUARE = T5Config(d_model=4, num_heads=4, d_kv=2, d_ff=4, vocab_size=20,
                  num_encoder_layers=4, num_decoder_layers=4,
                  feed_forward_proj="relu", tie_word_embeddings=True)


def _shapes(params: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {n: a.shape for n, a in params.items()}


def _tables(cfg: T5Config, seed: int) -> dict[str, list[np.ndarray]]:
    """A different random [H, B] table for every layer of each side."""
    rng = np.random.default_rng(seed)
    shape = (cfg.num_heads, cfg.relative_attention_num_buckets)
    return {side: [rng.standard_normal(shape).astype(np.float32) for _ in range(depth)]
            for side, depth in (("encoder", cfg.num_encoder_layers),
                                ("decoder", cfg.num_decoder_layers))}


def test_current_naming_is_scalable_t5s_tree():
    scanned = scan_params(random_t5x_params(UL2, seed=1), UL2, naming="current")
    shapes = _shapes(scanned)
    # network.py: scan_with_axes(...)(name='encoder') inside Encoder; layers.py: DenseGeneral
    # kernels [D, H, K] / [H, K, D], LayerNorm scale [D], rel_embedding [H, B]; the layer axis
    # inserted at param_scan_axis = 1.
    assert shapes["encoder.encoder.attention.query.kernel"] == (24, 2, 4, 8)
    assert shapes["encoder.encoder.attention.out.kernel"] == (4, 2, 8, 24)
    assert shapes["decoder.decoder.pre_cross_attention_layer_norm.scale"] == (24, 3)
    assert shapes["decoder.decoder.mlp.wo.kernel"] == (48, 3, 24)
    assert shapes["encoder.encoder.relpos_bias.rel_embedding"] == (4, 2, 32)
    assert "encoder.relpos_bias.rel_embedding" not in shapes


@pytest.mark.parametrize("naming", ["current", "layers"])
@pytest.mark.parametrize("axis", [0, 1])
def test_scan_axis_from_shapes_gin_or_flag(naming: str, axis: int):
    shapes = _shapes(scan_params(random_t5x_params(UL2, seed=2), UL2, axis=axis, naming=naming))
    arch = infer_arch(shapes, activation="gated-silu")
    assert (arch.scanned, arch.scan_axis, arch.sources["param_scan_axis"]) == (True, axis,
                                                                               "shapes")
    assert arch.config == UL2
    assert arch.scan_prefix["decoder"] == ("decoder.decoder." if naming == "current"
                                           else "decoder.layers.")
    gin = {"param_scan_axis": axis, "feed_forward_proj": "gated-silu"}
    assert infer_arch(shapes, gin).sources["param_scan_axis"] == "gin"
    flagged = infer_arch(shapes, gin, param_scan_axis=axis)
    assert (flagged.scan_axis, flagged.sources["param_scan_axis"]) == (axis, "flag")
    with pytest.raises(ArchError, match=f"--param-scan-axis {1 - axis}, but the scanned"):
        infer_arch(shapes, gin, param_scan_axis=1 - axis)
    with pytest.raises(ArchError, match="--param-scan-axis -1, but the scanned"):
        infer_arch(shapes, gin, param_scan_axis=-1)
    with pytest.raises(ArchError, match=f"config.gin sets param_scan_axis = {1 - axis}"):
        infer_arch(shapes, {"param_scan_axis": 1 - axis})


def test_heads_equal_to_layers_is_told_apart_by_the_other_shapes():
    # The tables [H, L, B] alone read either way; the kernels ([D, L, H, K]) do not.
    cfg = dataclasses.replace(UL2, num_heads=3, d_kv=8, num_encoder_layers=3)
    shapes = _shapes(scan_params(random_t5x_params(cfg, seed=12), cfg, naming="current"))
    assert shapes["decoder.decoder.relpos_bias.rel_embedding"] == (3, 3, 32)
    arch = infer_arch(shapes, activation="gated-silu")
    assert (arch.scan_axis, arch.sources["param_scan_axis"], arch.config) == (1, "shapes", cfg)


def test_ambiguous_scan_axis_asks_for_the_flag():
    params = random_t5x_params(SQUARE, seed=3)
    shapes = _shapes(scan_params(params, SQUARE, axis=1, naming="current"))
    with pytest.raises(ArchError, match=r"axes 0 and 1 both fit .* pass --param-scan-axis N"):
        infer_arch(shapes)
    assert infer_arch(shapes, param_scan_axis=1).config == SQUARE
    assert infer_arch(shapes, {"param_scan_axis": 1}).sources["param_scan_axis"] == "gin"


def test_plan_reads_head_split_kernels_through_a_view_and_keeps_layer_tables_for_jax():
    scanned = scan_params(random_t5x_params(UL2, seed=4), UL2, naming="current")

    @dataclasses.dataclass
    class P:
        shape: tuple[int, ...]
        dtype: str = "float32"

    params = {n: P(a.shape) for n, a in scanned.items()}
    arch = infer_arch(_shapes(scanned), activation="gated-silu")
    ft = {f.name: f for f in make_plan(params, arch, 2).files()}
    q = ft["encoder.block.1.layer.0.SelfAttention.q.weight.0.bin"].sources[0]
    assert (q.param, q.layer_axis, q.layer, q.view) == (
        "encoder.encoder.attention.query.kernel", 1, 1, (24, 32))
    o = ft["decoder.block.2.layer.1.EncDecAttention.o.weight.1.bin"].sources[0]
    assert o.view == (32, 24)
    bias = ft["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight.0.bin"]
    assert bias.transform == "copy_identical" and [s.layer for s in bias.sources] == [0, 1, 2]
    assert not any(".block.1.layer.0.SelfAttention.relative_attention_bias" in n for n in ft)

    jax = {f.name: f for f in make_plan(params, arch, 2, layer_tables=True).files()}
    assert set(jax) - set(ft) == {
        f"{side}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight.{r}.bin"
        for side, depth in (("encoder", 2), ("decoder", 3)) for i in range(1, depth)
        for r in range(2)}
    own = jax["decoder.block.2.layer.0.SelfAttention.relative_attention_bias.weight.1.bin"]
    assert own.transform == "copy" and [(s.param, s.layer) for s in own.sources] == [
        ("decoder.decoder.relpos_bias.rel_embedding", 2)]


def _assert_matches(out: Path, expected: dict[str, bytes]) -> None:
    assert {p.name for p in out.iterdir()} - {"config.ini", "manifest.json"} == set(expected)
    for name, data in expected.items():
        assert (out / name).read_bytes() == data, name


def test_current_naming_converts_like_the_unscanned_one(ray_local, tmp_path):
    """Legacy layout in multi-chunk arrays (chunks cut K: the head view reassembles them),
    scan axis from gin; then an OCDBT checkpoint written by orbax at axis 0, axis from shapes."""
    params = random_t5x_params(UL2, seed=5)
    src = write_t5x_checkpoint(
        tmp_path / "legacy", scan_params(params, UL2, naming="current"), step=1,
        gin=gin_config(UL2, ["  scan_layers = True", "  param_scan_axis = 1"]),
        chunk_bytes=SMALL_CHUNK_BYTES)
    summary = convert(ConvertOptions(src=str(src), dst=str(tmp_path / "out"),
                                     tensor_parallel=2, progress=False))
    assert (summary["scanned"], summary["param_scan_axis"]) == (True, 1)
    assert summary["arch_sources"]["param_scan_axis"] == "gin"
    _assert_matches(tmp_path / "out" / "t5" / "1" / "2-gpu", reference_files(params, UL2, 2,
                                                                             "fp32"))

    cfg = MODELS["t5v1"]  # D == H*K: q and out kernels have the same 2-D shape
    params = random_t5x_params(cfg, seed=6)
    src = write_t5x_checkpoint(tmp_path / "ocdbt", scan_params(params, cfg, axis=0,
                                                               naming="current"),
                               step=2, layout="ocdbt")
    summary = convert(ConvertOptions(src=str(src), dst=str(tmp_path / "out2"),
                                     weight_dtype="bf16", progress=False))
    assert (summary["param_scan_axis"], summary["arch_sources"]["param_scan_axis"]) == (
        0, "shapes")
    assert summary["layer_relative_bias"] == []
    _assert_matches(tmp_path / "out2" / "t5" / "1" / "1-gpu",
                    reference_files(params, cfg, 1, "bf16"))


@pytest.mark.parametrize("naming", ["current", "layers"])
def test_per_layer_tables_refused_by_ft_served_exactly_by_jax(ray_local, tmp_path, naming):
    params = random_t5x_params(UL2, seed=7)
    tables = _tables(UL2, seed=8)
    src = write_t5x_checkpoint(tmp_path / "ckpt", scan_params(params, UL2, naming=naming,
                                                              tables=tables),
                               step=1, gin=gin_config(UL2), chunk_bytes=SMALL_CHUNK_BYTES)

    with pytest.raises(ConversionError) as err:
        convert(ConvertOptions(src=str(src), dst=str(tmp_path / "ft"), progress=False))
    assert "\n" not in str(err.value)
    assert "per-layer relative-position tables differ" in str(err.value)
    assert "FasterTransformer holds one table per stack" in str(err.value)
    assert "--engine jax" in str(err.value)
    assert not (tmp_path / "ft").exists()

    summary = convert(ConvertOptions(src=str(src), dst=str(tmp_path / "repo"), engine="jax",
                                     tensor_parallel=2, progress=False))
    assert summary["layer_relative_bias"] == ["encoder", "decoder"]
    folder = tmp_path / "repo" / "t5" / "1" / "2-gpu"
    # FT's files are there unchanged (layer 0's table is FT's one per side), plus our
    # per-layer tables.
    expected = reference_files({**params, "encoder.relpos_bias.rel_embedding":
                                tables["encoder"][0], "decoder.relpos_bias.rel_embedding":
                                tables["decoder"][0]}, UL2, 2, "fp32")
    for side, depth in (("encoder", 2), ("decoder", 3)):
        for i in range(1, depth):
            for r, part in enumerate(np.split(tables[side][i], 2, axis=0)):
                expected[f"{side}.block.{i}.layer.0.SelfAttention.relative_attention_bias"
                         f".weight.{r}.bin"] = part.tobytes()
    _assert_matches(folder, expected)

    engine = T5Engine.load(str(folder))
    assert "rel_bias" in engine.params["decoder"][2]
    rng = np.random.default_rng(9)
    ids = rng.integers(2, UL2.vocab_size, size=13)
    dec = np.concatenate([[0], rng.integers(2, UL2.vocab_size, size=8)])
    ours = engine.logits(ids[None], dec[None])[0]
    want = t5x_forward.logits(UL2, params, tables, ids, dec)
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
    # The same weights with FT's one table per side are a different model here.
    ft_like = {side: [t[0]] * len(t) for side, t in tables.items()}
    assert np.abs(t5x_forward.logits(UL2, params, ft_like, ids, dec) - want).max() > 1e-2

    # Incremental decoding (the KV-cache step) uses each layer's table too.
    rows = [ids, ids[:5]]
    results = engine.generate(rows, [SamplingParams(max_output_len=10)] * 2)
    for row, res in zip(rows, results, strict=True):
        gen = t5x_forward.greedy(UL2, params, tables, row, 10)
        assert int(res.sequence_length[0]) == len(gen)
        assert res.output_ids[0, :len(gen)].tolist() == gen


def test_cli_asks_for_the_scan_axis_and_takes_it(ray_local, tmp_path):
    params = random_t5x_params(SQUARE, seed=10)
    src = write_t5x_checkpoint(tmp_path / "square", scan_params(params, SQUARE, axis=1,
                                                                naming="current"), step=1)
    argv = ["--src", str(src), "--dst", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(UserError, match="scan axis is ambiguous.*pass --param-scan-axis N"):
        convert_cli.main(argv)
    assert not (tmp_path / "out").exists()
    help_text = convert_cli.build_parser().format_help()
    assert "--param-scan-axis N" in help_text and "param_scan_axis" in help_text
    args = convert_cli.build_parser().parse_args([*argv, "--param-scan-axis", "1"])
    assert args.param_scan_axis == 1
    summary = convert(ConvertOptions(src=str(src), dst=str(tmp_path / "out"),
                                     param_scan_axis=1, progress=False))
    assert summary["arch_sources"]["param_scan_axis"] == "flag"
    _assert_matches(tmp_path / "out" / "t5" / "1" / "1-gpu",
                    reference_files(params, SQUARE, 1, "fp32"))


def test_engine_refuses_a_folder_missing_one_layer_table(tmp_path):
    from core import ft_format
    from testing.ft_writer import UL2_TINY, random_ft_weights, write_ft_folder
    from tests.conversion.reference import to_bytes

    folder = write_ft_folder(tmp_path, UL2_TINY, 2, random_ft_weights(UL2_TINY, seed=11))
    table = np.ones((UL2_TINY.num_heads // 2, 32), np.float32)
    for spec in ft_format.layer_relative_bias_files(UL2_TINY, "decoder", 1, 2):
        (folder / spec.name).write_bytes(to_bytes(table, "fp32"))
    with pytest.raises(FileNotFoundError, match=r"decoder\.block\.2\.layer\.0\.SelfAttention"
                       r"\.relative_attention_bias\.weight\.0\.bin is missing: the folder "
                       "holds per-layer relative-bias tables"):
        T5Engine.load(str(folder))
