"""Architecture inference (shapes + config.gin) and the pure conversion plan."""

from __future__ import annotations

import dataclasses
import math

import pytest

from conversion.arch import ArchError, infer_arch, parse_gin
from conversion.plan import PlanError, make_plan
from core import ft_format
from demo.t5x_writer import gin_config, t5x_param_shapes
from tests.conversion.conftest import MODELS


@dataclasses.dataclass
class P:
    shape: tuple[int, ...]
    dtype: str = "float32"


def params_of(shapes):
    return {n: P(s) for n, s in shapes.items()}


def test_shapes_give_everything_but_the_activation_function():
    cfg = MODELS["ul2"]
    arch = infer_arch(t5x_param_shapes(cfg))
    assert arch.config == dataclasses.replace(cfg, feed_forward_proj="gated-gelu")
    assert arch.sources["num_decoder_layers"] == "shapes"
    assert arch.sources["tie_word_embeddings"] == "shapes"
    assert arch.sources["feed_forward_proj"] == "default"
    assert "feed_forward_proj" in arch.inferred()
    t5v1 = infer_arch(t5x_param_shapes(MODELS["t5v1"]))
    assert t5v1.config == MODELS["t5v1"]  # relu and tied, from shapes alone


def test_gin_supplies_the_activation_and_must_agree_with_shapes():
    cfg = MODELS["ul2"]
    gin = parse_gin(gin_config(cfg))
    assert gin["feed_forward_proj"] == "gated-silu" and gin["num_decoder_layers"] == 3
    assert gin["tie_word_embeddings"] is False
    arch = infer_arch(t5x_param_shapes(cfg), gin)
    assert arch.config == cfg and arch.sources["feed_forward_proj"] == "gin"
    # The dotted binding form, a macro reference and a comment.
    dotted = parse_gin("ACT = ('silu', 'linear')  # UL2\n"
                       "network.T5Config.mlp_activations = %ACT\n"
                       "network.T5Config.logits_via_embedding = False\n")
    assert dotted == {"feed_forward_proj": "gated-silu", "tie_word_embeddings": False}
    # A flag wins over gin.
    arch = infer_arch(t5x_param_shapes(cfg), gin, activation="gated-gelu")
    assert arch.config.feed_forward_proj == "gated-gelu" and arch.sources["feed_forward_proj"] \
        == "flag"
    with pytest.raises(ArchError, match="num_decoder_layers = 2 but the checkpoint's shapes give 3"):
        infer_arch(t5x_param_shapes(cfg), {**gin, "num_decoder_layers": 2})
    with pytest.raises(ArchError, match="does not match the checkpoint's MLP"):
        infer_arch(t5x_param_shapes(cfg), activation="relu")


def test_plan_lists_exactly_the_ft_files_with_their_sources():
    cfg = MODELS["ul2"]
    arch = infer_arch(t5x_param_shapes(cfg), parse_gin(gin_config(cfg)))
    plan = make_plan(params_of(t5x_param_shapes(cfg)), arch, tensor_parallel=2,
                     weight_dtype="bf16")
    files = {f.name: f for f in plan.files()}
    assert set(files) == {f.name for f in ft_format.all_files(cfg, 2)}
    assert [t.group for t in plan.tasks] == ["globals", "encoder.0", "encoder.1", "decoder.0",
                                             "decoder.1", "decoder.2"]
    lm = files["lm_head.weight.bin"]  # untied: the real LM head, transposed (spec 6.1)
    assert [s.param for s in lm.sources] == ["decoder.logits_dense.kernel"]
    assert lm.transform == "transpose" and lm.shape == (36, 24)
    qkv = files["decoder.block.2.layer.0.SelfAttention.qkv.weight.1.bin"]
    assert [s.param for s in qkv.sources] == [f"decoder.layers_2.self_attention.{p}.kernel"
                                              for p in ("query", "key", "value")]
    assert qkv.transform == "fuse_qkv" and qkv.shape == (24, 3, 16) and qkv.rank == 1
    wi2 = files["encoder.block.1.layer.1.DenseReluDense.wi2.weight.0.bin"]
    assert wi2.sources[0].param == "encoder.layers_1.mlp.wi_1.kernel" and wi2.split == "last"
    wo = files["decoder.block.0.layer.2.DenseReluDense.wo.weight.1.bin"]
    assert wo.split == "first" and wo.shape == (24, 24)
    # The embedding is written once (spec 6.5).
    assert not any(n.startswith("shared.weight.") for n in files)
    assert plan.total_bytes() == sum(2 * math.prod(f.shape) for f in files.values())


def test_plan_for_relu_tied_model_maps_wi_and_has_no_lm_head():
    cfg = MODELS["t5v1"]
    plan = make_plan(params_of(t5x_param_shapes(cfg)), infer_arch(t5x_param_shapes(cfg)), 4)
    files = {f.name: f for f in plan.files()}
    assert "lm_head.weight.bin" not in files
    wi = files["decoder.block.1.layer.2.DenseReluDense.wi.weight.3.bin"]
    assert wi.sources[0].param == "decoder.layers_1.mlp.wi.kernel" and wi.shape == (16, 8)
    assert not any("wi2" in n for n in files)


@pytest.mark.parametrize(("t", "message"), [
    (3, "tensor-parallel size 3 does not divide num_heads 4"),
    (8, "tensor-parallel size 8 does not divide num_heads 4"),
    (0, "tensor-parallel size must be >= 1"),
])
def test_plan_refuses_a_tensor_parallel_size_that_does_not_divide(t, message):
    cfg = MODELS["t5v1"]
    with pytest.raises(PlanError, match=message):
        make_plan(params_of(t5x_param_shapes(cfg)), infer_arch(t5x_param_shapes(cfg)), t)


def test_plan_refuses_d_ff_not_divisible():
    cfg = dataclasses.replace(MODELS["t5v1"], d_ff=30)
    with pytest.raises(PlanError, match="does not divide d_ff 30"):
        make_plan(params_of(t5x_param_shapes(cfg)), infer_arch(t5x_param_shapes(cfg)), 4)


def test_plan_names_a_missing_or_misshapen_parameter():
    cfg = MODELS["ul2"]
    shapes = t5x_param_shapes(cfg)
    arch = infer_arch(shapes)
    missing = dict(shapes)
    del missing["decoder.layers_1.encoder_decoder_attention.value.kernel"]
    with pytest.raises(PlanError,
                       match="missing parameter 'decoder.layers_1.encoder_decoder_attention"):
        make_plan(params_of(missing), arch)
    bad = {**shapes, "encoder.layers_0.mlp.wo.kernel": (48, 23)}
    with pytest.raises(PlanError, match=r"'encoder.layers_0.mlp.wo.kernel' has shape \[48, 23\]"):
        make_plan(params_of(bad), arch)
    ints = params_of(shapes)
    ints["encoder.encoder_norm.scale"] = P((24,), "int32")
    with pytest.raises(PlanError, match="dtype int32"):
        make_plan(ints, arch)
    with pytest.raises(ArchError, match="missing parameter 'token_embedder.embedding'"):
        infer_arch({k: v for k, v in shapes.items() if k != "token_embedder.embedding"})
