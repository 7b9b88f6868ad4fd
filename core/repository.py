"""A converted model's repository: its layout, its config.pbtxt and config.ini, in one place.

:class:`ConvertedModel` is the handle every stage passes around: it reads config.pbtxt (as
Triton's ``ModelConfig`` protobuf) once and answers where the weights are, which engine, which
tensor parallelism, which vocabulary; :func:`read_config_ini` reads a weights folder's
config.ini. Nothing else in the library reads either file or knows the layout
(tests/core/test_repository.py checks that).

Layout: ``<repository>/<name>/config.pbtxt``, ``<name>/spiece.model``, ``<name>/1/<T>-gpu/``
(config.ini, the .bin files, manifest.json); FT's ``model_checkpoint_path`` may name another
weights folder.

Two backends answer the same request contract (ft-t5-format.md section 4):

- ``fastertransformer``: NVIDIA's FT backend reading ``<T>-gpu`` (default_model_filename).
- ``jax``: our Triton Python-backend model (serving/triton_model/model.py) reading the same
  folder; ``1/model.py`` is a one-line import shim written next to it.

Both share :func:`io_tensors`, so a client cannot tell them apart by their inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core import ft_format, storage
from core.ft_format import weights_dir_name
from core.t5config import T5Config

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
) -> mc.ModelConfig:
    """The ModelConfig for ``engine``.

    Args:
      name: the model name (its folder in the repository).
      engine: "fastertransformer" or "jax".
      tensor_parallel / pipeline_parallel: FT's tensor_para_size / pipeline_para_size.
      data_type: the inference dtype, fp32 | fp16 | bf16.
      model_checkpoint_path: FT only, an explicit weights folder (default: 1/<T>-gpu).
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
                         "max_input_len": "1024"})
    return config


def to_pbtxt(config: mc.ModelConfig) -> str:
    """Protobuf text format, as Triton reads config.pbtxt."""
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse a config.pbtxt (raises text_format.ParseError on a malformed one)."""
    return text_format.Parse(text, mc.ModelConfig())


# --- the layout and the handle --------------------------------------------------------------

CONFIG_PBTXT = "config.pbtxt"
VOCAB = "spiece.model"
VERSION = "1"  # the one model version a conversion writes


def model_dir(repository: str, name: str) -> str:
    """``<repository>/<name>``: the model's folder (local path or gs:// URL)."""
    return storage.join(repository, name)


def config_url(repository: str, name: str) -> str:
    """``<repository>/<name>/config.pbtxt``."""
    return storage.join(repository, name, CONFIG_PBTXT)


def vocab_url(repository: str, name: str) -> str:
    """Where a conversion copies the SentencePiece model: ``<repository>/<name>/spiece.model``."""
    return storage.join(repository, name, VOCAB)


def weights_url(repository: str, name: str, tensor_parallel: int, version: str = VERSION) -> str:
    """The weights folder a conversion at ``tensor_parallel`` writes: ``<name>/1/<T>-gpu``."""
    return storage.join(repository, name, version, weights_dir_name(tensor_parallel))


def read_config_ini(weights_dir: str) -> tuple[T5Config, str]:
    """(model config, weight dtype) from ``<weights_dir>/config.ini`` (local path or gs://).

    Raises FileNotFoundError when there is none, ValueError/KeyError when it is malformed.
    """
    return ft_format.parse_config_ini(
        storage.read_text(storage.join(weights_dir, ft_format.CONFIG_INI)))


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
    """One model of a repository, as its config.pbtxt describes it (read once, in :meth:`open`).

    Every stage asks this handle rather than the files: serve (GPU count), evaluate (weights,
    vocabulary, both backends) and the Triton model (from the folder Triton hands it).
    """

    repository: str
    name: str
    config: mc.ModelConfig
    version: str = VERSION

    @classmethod
    def open(cls, repository: str, name: str, version: str = VERSION) -> ConvertedModel:
        """Read ``<repository>/<name>/config.pbtxt``.

        Raises FileNotFoundError when there is none, text_format.ParseError when it is not a
        ModelConfig.
        """
        return cls(repository, name, parse_pbtxt(storage.read_text(config_url(repository, name))),
                   version)

    @classmethod
    def unconfigured(cls, repository: str, name: str) -> ConvertedModel:
        """A model without config.pbtxt: every answer is the default (weights in ``1/1-gpu``)."""
        return cls(repository, name, mc.ModelConfig(name=name))

    @classmethod
    def find(cls, repository: str, name: str) -> ConvertedModel | None:
        """:meth:`open`, or None when the repository holds no ``<name>/config.pbtxt``."""
        if not storage.exists(config_url(repository, name)):
            return None
        return cls.open(repository, name)

    @property
    def model_dir(self) -> str:
        return model_dir(self.repository, self.name)

    @property
    def config_url(self) -> str:
        return config_url(self.repository, self.name)

    @property
    def vocab_url(self) -> str:
        """Where a conversion copies the SentencePiece model: ``<name>/spiece.model``."""
        return vocab_url(self.repository, self.name)

    @functools.cached_property
    def parameters(self) -> dict[str, str]:
        """config.pbtxt's ``parameters`` as strings (every one: the FT backend's, ours, new ones)."""
        return {k: v.string_value for k, v in self.config.parameters.items()}

    def parameter(self, key: str, default: str = "") -> str:
        """One parameter's string value, ``default`` when absent or empty."""
        return self.parameters.get(key) or default

    @property
    def engine(self) -> str:
        """"fastertransformer" or "jax" (our Python-backend model), else Triton's backend name."""
        return "jax" if self.config.backend == "python" else self.config.backend

    @property
    def tensor_parallel(self) -> int:
        return int(self.parameter("tensor_para_size", "1"))

    @property
    def pipeline_parallel(self) -> int:
        return int(self.parameter("pipeline_para_size", "1"))

    @property
    def data_type(self) -> str:
        """The inference dtype (``data_type``), fp32 when the config does not say."""
        return self.parameter("data_type", "fp32")

    @property
    def max_input_len(self) -> int:
        """0: the engine's own limit."""
        return int(self.parameter("max_input_len", "0"))

    @property
    def max_batch_size(self) -> int:
        return int(self.config.max_batch_size)

    @property
    def inputs(self) -> frozenset[str]:
        """The declared input names."""
        return frozenset(i.name for i in self.config.input)

    @property
    def weights_dir(self) -> str:
        """The FT weights folder, found as both backends find it.

        ``model_checkpoint_path`` (FT, an explicit folder), else ``1/<weights_dir>`` (our jax
        engine) or ``1/<default_model_filename>`` (FT), else ``1/<tensor_para_size>-gpu``.
        """
        if self.parameter("model_checkpoint_path"):
            return self.parameter("model_checkpoint_path")
        sub = (self.parameter("weights_dir") or self.config.default_model_filename
               or weights_dir_name(self.tensor_parallel))
        return storage.join(self.model_dir, self.version, sub)

    @property
    def config_ini_url(self) -> str:
        return storage.join(self.weights_dir, ft_format.CONFIG_INI)

    @property
    def manifest_url(self) -> str:
        return storage.join(self.weights_dir, ft_format.MANIFEST)

    def config_ini(self) -> tuple[T5Config, str]:
        """(model config, weight dtype) of the weights folder: :func:`read_config_ini`."""
        return read_config_ini(self.weights_dir)
