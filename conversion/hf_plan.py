"""The Hugging Face conversion plan: every tensor of transformers' T5 state dict, its T5X
sources and its transform, one safetensors shard per layer task. Pure.

The tensors, their names and [out, in] shapes are :mod:`core.hf_format`'s. Their T5X sources
are the FT plan's (:mod:`conversion.plan`): transformers' T5 names are the names FT's own
converter started from, so each tensor maps to the FT stem of the same weight (``wi_0`` /
``wi_1`` are FT's ``wi`` / ``wi2``, ``shared.weight`` FT's ``shared.weight_T``) and reads the same
parameters, scanned or not, through the same head-axis views. Only the layout differs: torch
``nn.Linear`` weights and the relative-bias embedding are the transposes of t5x's kernels and
tables, the embedding, the norms and the LM head (already transposed from
``decoder.logits_dense``) are as FT stores them.

A scanned side whose per-layer relative-position tables differ cannot be held by transformers'
T5 (one table, in block 0): the tables are compared before anything is written
(``transpose_identical``) and such a checkpoint is refused in one line.
"""

from __future__ import annotations

from collections.abc import Mapping

from conversion.arch import T5Arch
from conversion.plan import (
    ConversionPlan,
    LayerTask,
    OutputTensor,
    ParamInfo,
    PlanError,
    Shard,
    Transform,
    checked_source,
    weight_sources,
)
from core import ft_format, hf_format
from core.ft_format import FileSpec
from core.hf_format import TensorSpec

# transformers' names -> FT's, where they differ.
_FT_NAMES = {"shared.weight": "shared.weight_T", "DenseReluDense.wi_0.weight":
             "DenseReluDense.wi.weight", "DenseReluDense.wi_1.weight": "DenseReluDense.wi2.weight"}


def ft_stem(name: str) -> str:
    """The FT stem of the weight transformers calls ``name``."""
    for hf, ft in _FT_NAMES.items():
        if name == hf or name.endswith("." + hf):
            return name[: len(name) - len(hf)] + ft
    return name


def _transform(name: str) -> Transform:
    """As the weight is stored by t5x (copy) or transposed for torch."""
    if name == "shared.weight" or name.endswith("layer_norm.weight"):
        return "copy"
    return "transpose"  # nn.Linear [out, in] of a [in, out] kernel; lm_head; [B, H] of [H, B]


def _tensor(spec: TensorSpec, params: Mapping[str, ParamInfo],
            shapes: Mapping[str, tuple[int, ...]], arch: T5Arch,
            weight_dtype: str) -> OutputTensor:
    refs, ft_transform = weight_sources(ft_stem(spec.name), arch, shapes)
    transform = _transform(spec.name)
    if ft_transform == "copy_identical":  # a scanned side's tables, one per layer
        transform = "transpose_identical"
    refs = tuple(checked_source(ref, params, shapes, spec.shape, transform, arch, spec.name)
                 for ref in refs)
    return OutputTensor(refs, transform, spec.shape, "none",
                        (FileSpec(spec.name, spec.shape, "none"),), weight_dtype)


def make_hf_plan(params: Mapping[str, ParamInfo], arch: T5Arch,
                 weight_dtype: str = "fp32") -> ConversionPlan:
    """Plan the conversion of ``params`` for ``arch`` into transformers' T5 checkpoint: one
    task and one shard per layer (and one for the globals), in schedule order.

    Raises PlanError naming the first problem (missing parameter, wrong shape, non-float
    dtype, unknown weight dtype).
    """
    if weight_dtype not in ft_format.WEIGHT_DTYPES:
        raise PlanError(f"weight dtype {weight_dtype!r} is not one of "
                        f"{list(ft_format.WEIGHT_DTYPES)}")
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    groups = hf_format.tensor_groups(arch.config)
    tasks = []
    for i, (group, specs) in enumerate(groups):
        tensors = tuple(_tensor(s, params, shapes, arch, weight_dtype) for s in specs)
        header, offsets = hf_format.safetensors_header(specs, weight_dtype)
        shard = Shard(hf_format.shard_name(i, len(groups)), header, tuple(offsets),
                      hf_format.shard_bytes(specs, weight_dtype))
        tasks.append(LayerTask(group, tensors, shard))
    return ConversionPlan(arch.config, 1, weight_dtype, tuple(tasks), output_format="hf")


def shard_tensors(plan: ConversionPlan) -> list[tuple[str, list[TensorSpec]]]:
    """(shard file, its tensors) of every task, for the index."""
    return [(task.shard.name, [TensorSpec(t.files[0].name, t.full_shape) for t in task.tensors])
            for task in plan.tasks if task.shard is not None]
