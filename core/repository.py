"""config.pbtxt for a converted model, built as Triton's ``ModelConfig`` protobuf.

Two backends answer the same request contract (ft-t5-format.md section 4):

- ``fastertransformer``: NVIDIA's FT backend reading ``<T>-gpu`` (default_model_filename).
- ``jax``: our Triton Python-backend model (serving/triton_model/model.py) reading the same
  folder; ``1/model.py`` is a one-line import shim written next to it.

Both share :func:`io_tensors`, so a client cannot tell them apart by their inputs and outputs.
"""

from __future__ import annotations

from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core.ft_format import weights_dir_name

Engine = Literal["fastertransformer", "jax"]
ENGINES: tuple[str, ...] = ("fastertransformer", "jax")

# The Python backend loads 1/model.py; it imports the real model from this project's installed
# `serving` package, so a repository written here is served from any folder (self-contained).
JAX_MODEL_PY = "from serving.triton_model.model import TritonPythonModel  # noqa: F401\n"

# (name, type, dims without the batch dimension, optional)
_INPUTS: tuple[tuple[str, int, tuple[int, ...], bool], ...] = (
    ("input_ids", mc.TYPE_UINT32, (-1,), False),
    ("sequence_length", mc.TYPE_UINT32, (1,), False),
    ("max_output_len", mc.TYPE_UINT32, (1,), False),
    ("beam_width", mc.TYPE_UINT32, (1,), True),
    ("runtime_top_k", mc.TYPE_UINT32, (1,), True),
    ("runtime_top_p", mc.TYPE_FP32, (1,), True),
    ("beam_search_diversity_rate", mc.TYPE_FP32, (1,), True),
    ("temperature", mc.TYPE_FP32, (1,), True),
    ("len_penalty", mc.TYPE_FP32, (1,), True),
    ("repetition_penalty", mc.TYPE_FP32, (1,), True),
    ("random_seed", mc.TYPE_UINT64, (1,), True),
    ("is_return_log_probs", mc.TYPE_BOOL, (1,), True),
    ("start_id", mc.TYPE_UINT32, (1,), True),
    ("end_id", mc.TYPE_UINT32, (1,), True),
    ("bad_words_list", mc.TYPE_INT32, (2, -1), True),
    ("stop_words_list", mc.TYPE_INT32, (2, -1), True),
)
_OUTPUTS: tuple[tuple[str, int, tuple[int, ...]], ...] = (
    ("output_ids", mc.TYPE_UINT32, (-1, -1)),
    ("sequence_length", mc.TYPE_UINT32, (-1,)),
    ("cum_log_probs", mc.TYPE_FP32, (-1,)),
    ("output_log_probs", mc.TYPE_FP32, (-1, -1)),
)


def io_tensors() -> tuple[list[mc.ModelInput], list[mc.ModelOutput]]:
    """The FT T5 request contract: inputs and outputs, shapes without the batch dimension."""
    inputs = [mc.ModelInput(name=n, data_type=t, dims=list(d), optional=o)
              for n, t, d, o in _INPUTS]
    outputs = [mc.ModelOutput(name=n, data_type=t, dims=list(d)) for n, t, d in _OUTPUTS]
    return inputs, outputs


def _set_params(config: mc.ModelConfig, params: dict[str, str]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = value


def model_config(
    name: str,
    engine: Engine,
    tensor_parallel: int,
    pipeline_parallel: int = 1,
    data_type: str = "bf16",
    model_checkpoint_path: str | None = None,
    batch_invariant: bool = True,
) -> mc.ModelConfig:
    """The ModelConfig for ``engine``.

    Args:
      name: the model name (its folder in the repository).
      engine: "fastertransformer" or "jax".
      tensor_parallel / pipeline_parallel: FT's tensor_para_size / pipeline_para_size.
      data_type: the inference dtype, fp32 | fp16 | bf16.
      model_checkpoint_path: FT only, an explicit weights folder (default: 1/<T>-gpu).
      batch_invariant: jax only, the ``batch_invariant`` parameter ("true" / "false"): whether
        the engine decodes each row at shapes chosen by the row alone (serving/engine).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    if data_type not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"inference data type {data_type!r} is not fp32, fp16 or bf16")
    inputs, outputs = io_tensors()
    weights = weights_dir_name(tensor_parallel)
    common = {
        "tensor_para_size": str(tensor_parallel),
        "pipeline_para_size": str(pipeline_parallel),
        "data_type": data_type,
    }
    group = mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    if engine == "fastertransformer":
        config = mc.ModelConfig(name=name, backend="fastertransformer",
                                default_model_filename=weights, max_batch_size=1024,
                                input=inputs, output=outputs, instance_group=[group])
        _set_params(config, {**common, "enable_custom_all_reduce": "0", "model_type": "T5"})
        if model_checkpoint_path:
            _set_params(config, {"model_checkpoint_path": model_checkpoint_path})
        return config
    # 128 rows: on one H200, UL2 20B's decoder reads its weights once per step for 128 rows
    # instead of 64 (docs/benchmarks.md); the engine compiles one program per batch bucket.
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=128, input=inputs,
                            output=outputs, instance_group=[group])
    config.dynamic_batching.max_queue_delay_microseconds = 2000
    _set_params(config, {**common, "model_type": "T5", "weights_dir": weights,
                         "max_input_len": "1024",
                         BATCH_INVARIANT: "true" if batch_invariant else "false"})
    return config


# The jax model's config.pbtxt parameter naming the engine's batch-invariant mode.
BATCH_INVARIANT = "batch_invariant"


def batch_invariant(config: mc.ModelConfig) -> bool | None:
    """The ``batch_invariant`` parameter of a jax model's config: True unless it says "false"
    (the engine's default; repositories written before the parameter existed are served
    batch-invariant too). None for a model of another backend (FasterTransformer)."""
    if config.backend != "python":
        return None
    return batch_invariant_value(config.parameters[BATCH_INVARIANT].string_value
                                 if BATCH_INVARIANT in config.parameters else "")


def batch_invariant_value(text: str) -> bool:
    """The parameter's string as a bool: "" (absent) or "true" -> True, "false" -> False.

    Raises:
      ValueError: any other value.
    """
    value = text.strip().lower()
    if value not in ("", "true", "false"):
        raise ValueError(f"config.pbtxt parameter {BATCH_INVARIANT} is {text!r}; "
                         "expected \"true\" or \"false\"")
    return value != "false"


def to_pbtxt(config: mc.ModelConfig) -> str:
    """Protobuf text format, as Triton reads config.pbtxt."""
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse a config.pbtxt (raises text_format.ParseError on a malformed one)."""
    return text_format.Parse(text, mc.ModelConfig())
