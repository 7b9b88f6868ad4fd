"""ConvertOptions: everything ``ray_jobs.convert`` accepts (interfaces.md), as one model.

The --help texts live here (ray_jobs/_cli.py builds the flags from this model) and so do the
pipeline's ``convert:`` keys (pipeline/config.py).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pydantic
from pydantic import ConfigDict

from core import ft_format
from core.manifest import DIGESTS
from core.options import OptionsError, StageOptions, option
from core.repository import ENGINES
from core.t5config import ACTIVATIONS

# The choices come from the tables the converter uses, so a new dtype or engine is a flag at once.
WeightDtype = Literal[tuple(ft_format.WEIGHT_DTYPES)]  # type: ignore[valid-type]
Engine = Literal[ENGINES]  # type: ignore[valid-type]
Activation = Literal[ACTIVATIONS]  # type: ignore[valid-type]
DigestName = Literal[DIGESTS]  # type: ignore[valid-type]


class ConvertOptions(StageOptions):
    """Everything ``ray_jobs.convert`` accepts (interfaces.md)."""

    # The --help description of python -m ray_jobs.convert.
    COMMAND_HELP: ClassVar[str] = (
        "Convert a T5X checkpoint (T5 1.1, Flan-T5, UL2; legacy or OCDBT, local or "
        "gs://) into FasterTransformer weight shards in a Triton model repository: "
        "DST/<model>/config.pbtxt, DST/<model>/1/<T>-gpu/{config.ini, *.bin, manifest.json}; "
        "or, with --format hf, into a Hugging Face T5 checkpoint in DST/<model>."
    )

    # Frozen, as the dataclass it replaces: copy with a change, ConvertOptions(**{**o.__dict__}).
    model_config = ConfigDict(frozen=True)

    src: str = option(
        help="T5X checkpoint folder (checkpoint_<step>), or a folder holding several "
        "(the newest step is used); local path or gs:// URL")
    dst: str = option(help="Triton model repository root (local or gs://); with --format hf "
                      "the checkpoint is written to DST/<model>")
    model_name: str = option("t5", help="model folder name in DST (default t5)")
    format: Literal["ft", "hf"] = option(
        "ft", help="ft (default): FasterTransformer shards in a Triton model repository; hf: a "
        "Hugging Face T5 checkpoint in DST/<model> (sharded safetensors, one shard per layer, "
        "model.safetensors.index.json, config.json, generation_config.json, tokenizer files) "
        "that transformers, TensorRT-LLM, CTranslate2, Optimum and vLLM load; "
        "--tensor-parallel, --engine and --inference-dtype do not apply to it")
    tensor_parallel: int = option(
        1, help="T: split attention heads and d_ff over T GPUs (default 1)")
    pipeline_parallel: int = option(
        1, help="pipeline_para_size written to config.pbtxt (default 1)")
    weight_dtype: WeightDtype = option(
        "fp32", help="dtype of the stored weights, .bin files or safetensors (default fp32)")
    inference_dtype: WeightDtype = option(
        "bf16", help="data_type in config.pbtxt (default bf16)")
    gin: str | None = option(
        None, help="config.gin giving what shapes cannot tell (activation) and the "
        "vocabulary; default: a config.gin beside or up to two folders above the "
        "checkpoint (docs/gin.md)")
    activation: Activation | None = option(
        None, help="feed_forward_proj, overriding config.gin (default: from gin, else "
        "gated-gelu for gated MLPs and relu otherwise, reported as inferred)")
    param_scan_axis: int | None = option(
        None, metavar="N",
        help="layer axis of a scanned (scalable_t5) checkpoint's stacked parameters, "
        "t5x's param_scan_axis, overriding config.gin (default: from gin, else from "
        "the shapes when only one axis fits; ignored for unscanned checkpoints)")
    vocab: str | None = option(
        None, help="SentencePiece model copied to DST/<model>/spiece.model, with --format hf "
        "also written as tokenizer.json (default: the one config.gin names, "
        "seqio.SentencePieceVocabulary.sentencepiece_model_file, when it exists)")
    engine: Engine = option(
        "fastertransformer",
        help="Triton backend config.pbtxt is written for (default fastertransformer)")
    resume: bool = option(
        False, help="keep files whose manifest entry, size and digest (crc32c or sha256, "
        "whichever the manifest holds) check out")
    overwrite: bool = option(
        False, help="delete DST/<model> first, even when it holds a different model")
    verify: bool = option(
        False, help="check every written file against the manifest (local: read once; "
        "gs://: crc32c from the object's metadata, no download); also report files in "
        "the weights folder that nothing accounts for")
    digest: DigestName = option(
        "crc32c", help="digest recorded per file in manifest.json: crc32c (default; the "
        "checksum GCS keeps for every object) or sha256")
    # One task per core: each task inflates the chunks it reads ahead on its own thread
    # (conversion/inflate.py) while it writes, so two tasks fill two cores; a third task on two
    # cores only added a worker start and contention (bench/convert.py: 17.5-19.1 s at 0.5
    # against 11.6-12.7 s at 1, TP 2, loaded machine; docs/benchmarks.md).
    task_cpus: float = option(
        1.0, help="CPUs each per-layer Ray task requests (default 1: one task per core, "
        "each inflating the chunks it reads ahead on its own thread while it writes)")
    task_gpus: float = option(
        0.0, help="GPUs each per-layer Ray task requests, to run on GPU workers "
        "(default 0)")
    progress: bool = option(True, help="no progress output",
                           flag="--no-progress")

    @pydantic.model_validator(mode="after")
    def _check(self) -> ConvertOptions:
        """What no checkpoint could make right, refused the same way on every path."""
        if self.overwrite and self.resume:
            raise OptionsError("--resume and --overwrite exclude each other")
        if self.pipeline_parallel < 1:
            raise OptionsError(f"pipeline-parallel size must be >= 1, got "
                               f"{self.pipeline_parallel}")
        return self
