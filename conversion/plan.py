"""The conversion plan: every FT output file, its source tensors and its transform. Pure.

All the rules that turn T5X parameters into FasterTransformer files live here, on top of the
file list of :mod:`core.ft_format` (ft-t5-format.md sections 2 and 6), so they can be read
and tested in one place. Nothing here reads or writes data.

An :class:`OutputTensor` is one FT tensor in its full (unsplit) layout ``F``, built from its
sources ``S_0, S_1, ...`` by its transform, then cut into ranks and cast:

- ``copy``:           F = S_0
- ``transpose``:      F = S_0.T                    (decoder.logits_dense [D, V] -> lm_head [V, D])
- ``fuse_qkv``:       F[:, j, :] = S_j for j in 0..2, F of shape [D, 3, I]   (decoder self-attn)
- ``copy_identical``: F = S_0, and every other S_j must equal S_0   (a scanned side's per-layer
  relative-bias tables, which FT can only hold once)
- ``transpose_identical``: F = S_0.T, and every other S_j must equal S_0   (the same, for the
  Hugging Face layout [B, H], :mod:`conversion.hf_plan`)

File r of T is part r of F cut into T equal parts on ``ft_format.split_axis(split, F.ndim)``,
cast to the weight dtype (cast from any source float dtype). A scanned source is indexed at
``layer`` on its ``layer_axis`` first;
an attention kernel stored with heads on their own axis ([D, H, K] or [H, K, D], current
scalable_t5) is then read as its row-major [D, H*K] or [H*K, D] ``view``.

For the JAX engine (``layer_tables=True``) a scanned side whose layers each have their own
relative-bias table gets every layer's table (``ft_format.layer_relative_bias_files``) and no
``copy_identical``: the model is served exactly.

Fixes to NVIDIA's converter (spec section 6) are here: the untied LM head comes from
``decoder.logits_dense``, non-gated ``mlp.wi`` is mapped, each side has its own depth, every
weight dtype is supported, and the embedding is written once (``shared.weight_T.bin``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, Protocol

import numpy as np

from conversion.arch import T5Arch, scanned_relpos_name
from core import ft_format
from core.errors import UserError
from core.ft_format import FileSpec, Split
from core.t5config import T5Config

Transform = Literal["copy", "transpose", "fuse_qkv", "copy_identical", "transpose_identical"]
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


class PlanError(UserError, ValueError):
    """The checkpoint cannot be converted with these options (missing or misshapen tensor,
    tensor-parallel size that does not divide, unsupported dtype)."""


class ParamInfo(Protocol):
    """What the plan reads of a parameter: its shape and dtype name."""

    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class SourceRef:
    """A source tensor: a T5X parameter, or one layer of a stacked (scanned) parameter.

    Attributes:
      param: name under ``target``.
      layer_axis: for scanned parameters, the layer axis to index; None otherwise.
      layer: the layer index on ``layer_axis``.
      view: the 2-D shape one layer is read as when it is stored with heads on their own
        axis (row-major merge of consecutive axes); None when stored as the transform reads it.
    """

    param: str
    layer_axis: int | None = None
    layer: int = 0
    view: tuple[int, ...] | None = None

    def __str__(self) -> str:
        if self.layer_axis is None:
            return self.param
        return f"{self.param}[layer {self.layer} on axis {self.layer_axis}]"


@dataclasses.dataclass(frozen=True)
class OutputTensor:
    """One FT tensor and the files (one, or one per rank) it is written as.

    Attributes:
      sources: the source tensors, in transform order (q, k, v for fuse_qkv).
      transform: how F is built from the sources (module docstring).
      full_shape: F's shape, the FT layout before splitting.
      split: the axis of F cut into ranks ("none", "first" or "last").
      files: the ft_format file specs, one per rank (one when split is "none").
      weight_dtype: fp32 | fp16 | bf16, the files' element type.
    """

    sources: tuple[SourceRef, ...]
    transform: Transform
    full_shape: tuple[int, ...]
    split: Split
    files: tuple[FileSpec, ...]
    weight_dtype: str

    @property
    def tensor_parallel(self) -> int:
        """T: the number of rank files (1 when the tensor is not split)."""
        return 1 if self.split == "none" else len(self.files)

    def file_shape(self) -> tuple[int, ...]:
        """The shape of one rank file's array (every rank's is the same)."""
        return self.files[0].shape(self.tensor_parallel)

    def file_bytes(self) -> int:
        """The size in bytes of one rank file."""
        itemsize = ft_format.WEIGHT_DTYPES[self.weight_dtype].itemsize
        return int(np.prod(self.file_shape(), dtype=np.int64)) * itemsize


@dataclasses.dataclass(frozen=True)
class OutputFile:
    """A flat view of one output file, for listing and checking a plan."""

    name: str
    shape: tuple[int, ...]
    weight_dtype: str
    sources: tuple[SourceRef, ...]
    transform: Transform
    split: Split
    rank: int
    tensor_parallel: int


@dataclasses.dataclass(frozen=True)
class Shard:
    """One file holding every tensor of a task (a safetensors shard, core.hf_format).

    Attributes:
      name: the file name.
      header: the file's first bytes (written as they are).
      offsets: each tensor's byte offset in the file, in the task's tensor order.
      nbytes: the file's size.
    """

    name: str
    header: bytes
    offsets: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class LayerTask:
    """The unit of scheduling: one layer (or the globals), its own sources and files.

    ``shard``: None for FT (one file per tensor and rank, named by each tensor's files); else
    the one file all of the task's tensors are written into, each at its offset.
    """

    group: str
    tensors: tuple[OutputTensor, ...]
    shard: Shard | None = None

    def file_names(self) -> list[str]:
        """Every output file name of this task, in the plan's order."""
        if self.shard is not None:
            return [self.shard.name]
        return [f.name for t in self.tensors for f in t.files]

    def params(self) -> list[str]:
        """The source parameter names this task reads, sorted."""
        return sorted({s.param for t in self.tensors for s in t.sources})

    def bytes(self) -> int:
        """The bytes this task writes, over every rank file."""
        if self.shard is not None:
            return self.shard.nbytes
        return sum(t.file_bytes() * len(t.files) for t in self.tensors)


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """Every task of a conversion; ``layer_tables``: the sides whose every layer's own
    relative-bias table is written (JAX engine, scanned checkpoints with per-layer tables);
    ``output_format``: "ft" (FT weight files) or "hf" (safetensors shards, one per task)."""

    config: T5Config
    tensor_parallel: int
    weight_dtype: str
    tasks: tuple[LayerTask, ...]
    layer_tables: tuple[str, ...] = ()
    output_format: Literal["ft", "hf"] = "ft"

    def file_names(self) -> set[str]:
        """Every file the plan's tasks write."""
        return {name for task in self.tasks for name in task.file_names()}

    def files(self) -> list[OutputFile]:
        """Every output file of the plan, flattened (one entry per rank file)."""
        out = []
        for task in self.tasks:
            for t in task.tensors:
                for f in t.files:
                    out.append(OutputFile(f.name, t.file_shape(), t.weight_dtype, t.sources,
                                          t.transform, t.split, f.rank, t.tensor_parallel))
        return out

    def total_bytes(self) -> int:
        """The bytes the whole conversion writes."""
        return sum(task.bytes() for task in self.tasks)


# --- the name mapping --------------------------------------------------------------------------

# FT attention projections -> T5X DenseGeneral names.
_PROJ = {"q": "query", "k": "key", "v": "value", "o": "out"}


def _stem(spec: FileSpec) -> str:
    """``x.y.0.bin`` / ``x.y.bin`` -> ``x.y``."""
    name = spec.name.removesuffix(".bin")
    return name.rsplit(".", 1)[0] if spec.split != "none" else name


def _t5x_sources(stem: str, cfg: T5Config) -> tuple[list[str], Transform]:
    """The T5X parameters an FT tensor is built from, for an unscanned checkpoint."""
    glob = {
        "shared.weight_T": (["token_embedder.embedding"], "copy"),
        "lm_head.weight": (["decoder.logits_dense.kernel"], "transpose"),
        "encoder.final_layer_norm.weight": (["encoder.encoder_norm.scale"], "copy"),
        "decoder.final_layer_norm.weight": (["decoder.decoder_norm.scale"], "copy"),
    }
    if stem in glob:
        names, transform = glob[stem]
        return list(names), transform  # type: ignore[return-value]
    side, _, i, _, sub, rest = stem.split(".", 5)
    prefix = f"{side}.layers_{i}"
    mlp_sub = "1" if side == "encoder" else "2"
    mlp = {"wi": "wi_0" if cfg.gated else "wi", "wi2": "wi_1", "wo": "wo"}
    if rest == "layer_norm.weight":
        norms = ({"0": "pre_attention_layer_norm", "1": "pre_mlp_layer_norm"} if side == "encoder"
                 else {"0": "pre_self_attention_layer_norm", "1": "pre_cross_attention_layer_norm",
                       "2": "pre_mlp_layer_norm"})
        return [f"{prefix}.{norms[sub]}.scale"], "copy"
    if sub == mlp_sub and rest.startswith("DenseReluDense."):
        kind = rest.split(".")[1]
        return [f"{prefix}.mlp.{mlp[kind]}.kernel"], "copy"
    module, proj = rest.split(".")[:2]
    if module == "SelfAttention":
        attn = "attention" if side == "encoder" else "self_attention"
    elif module == "EncDecAttention":
        attn = "encoder_decoder_attention"
    else:
        raise AssertionError(f"no T5X source known for FT tensor {stem}")
    if proj == "qkv":
        return [f"{prefix}.{attn}.{p}.kernel" for p in ("query", "key", "value")], "fuse_qkv"
    return [f"{prefix}.{attn}.{_PROJ[proj]}.kernel"], "copy"


def _scanned_ref(name: str, arch: T5Arch) -> SourceRef:
    """Map an unscanned T5X name (``encoder.layers_3.mlp.wo.kernel``) to its stacked source."""
    for side, prefix in arch.scan_prefix.items():
        head = f"{side}.layers_"
        if name.startswith(head):
            layer, rest = name[len(head):].split(".", 1)
            return SourceRef(prefix + rest, arch.scan_axis, int(layer))
    return SourceRef(name)


def _depth(cfg: T5Config, side: str) -> int:
    return cfg.num_encoder_layers if side == "encoder" else cfg.num_decoder_layers


def layer_table_sides(arch: T5Arch, shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The sides of a scanned checkpoint whose every layer has its own relative-bias table."""
    if not arch.scanned:
        return ()
    return tuple(side for side in ("encoder", "decoder")
                 if (scanned_relpos_name(shapes, side, arch.scan_prefix) or "").startswith(
                     arch.scan_prefix[side]))


def _table_sources(stem: str, arch: T5Arch, shapes: Mapping[str, tuple[int, ...]],
                   layer_tables: bool) -> tuple[tuple[SourceRef, ...], Transform]:
    """A relative-bias table's sources: ``<side>.block.<i>....relative_attention_bias.weight``."""
    side, _, layer = stem.split(".", 3)[:3]
    if not arch.scanned:
        return (SourceRef(f"{side}.relpos_bias.rel_embedding"),), "copy"
    table = scanned_relpos_name(shapes, side, arch.scan_prefix)
    if table is None:
        raise PlanError(f"missing parameter {arch.scan_prefix[side]}relpos_bias.rel_embedding: "
                        f"no relative-bias table for the scanned {side}")
    if not table.startswith(arch.scan_prefix[side]):  # one table beside the scanned layers
        return (SourceRef(table),), "copy"
    if layer_tables:  # every layer's own table, each in its own file
        return (SourceRef(table, arch.scan_axis, int(layer)),), "copy"
    refs = tuple(SourceRef(table, arch.scan_axis, i) for i in range(_depth(arch.config, side)))
    return refs, "copy_identical"


def weight_sources(stem: str, arch: T5Arch, shapes: Mapping[str, tuple[int, ...]],
                   layer_tables: bool = False) -> tuple[tuple[SourceRef, ...], Transform]:
    """The T5X sources of the weight FT names ``stem`` (``x.y`` of ``x.y[.rank].bin``) and the
    transform FT's layout needs (also used by conversion/hf_plan.py, whose names map to FT's)."""
    if stem.endswith("relative_attention_bias.weight"):
        return _table_sources(stem, arch, shapes, layer_tables)
    names, transform = _t5x_sources(stem, arch.config)
    if not arch.scanned:
        return tuple(SourceRef(n) for n in names), transform
    return tuple(_scanned_ref(n, arch) for n in names), transform


def _heads_view(ref: SourceRef, stored: tuple[int, ...], want: tuple[int, ...],
                cfg: T5Config) -> SourceRef | None:
    """``ref`` read through a [D, H*K] / [H*K, D] view when its layer is stored as
    [D, H, K] / [H, K, D] (scalable_t5's DenseGeneral keeps the head axis); else None."""
    axis = ref.layer_axis
    one = stored if axis is None else stored[:axis] + stored[axis + 1:]
    flat = want if axis is None else want[:axis] + want[axis + 1:]
    if len(flat) != 2 or not ref.param.endswith(".kernel") or "attention." not in ref.param:
        return None
    h, k = cfg.num_heads, cfg.d_kv
    if ref.param.endswith(".out.kernel"):
        split = (h, k, flat[1]) if flat[0] == h * k else None
    else:
        split = (flat[0], h, k) if flat[1] == h * k else None
    if split != one:
        return None
    if axis is not None and stored[axis] != want[axis]:
        return None
    return dataclasses.replace(ref, view=flat)


def _expected_source_shape(full_shape: tuple[int, ...], transform: Transform, ref: SourceRef,
                           arch: T5Arch) -> tuple[int, ...]:
    if transform in ("transpose", "transpose_identical"):
        shape = tuple(reversed(full_shape))
    elif transform == "fuse_qkv":
        shape = (full_shape[0], full_shape[2])
    else:
        shape = full_shape
    if ref.layer_axis is not None:
        depth = _depth(arch.config, ref.param.split(".", 1)[0])
        shape = shape[:ref.layer_axis] + (depth,) + shape[ref.layer_axis:]
    return shape


def make_plan(
    params: Mapping[str, ParamInfo],
    arch: T5Arch,
    tensor_parallel: int = 1,
    weight_dtype: str = "fp32",
    layer_tables: bool = False,
) -> ConversionPlan:
    """Plan the conversion of ``params`` (name -> shape and dtype) for ``arch``.

    Returns the tasks in schedule order (globals, encoder layers, decoder layers), each with
    its output tensors. Raises PlanError naming the first problem: a tensor-parallel size that
    does not divide the heads or d_ff, a missing parameter, a parameter of the wrong shape, or
    a non-float dtype.

    layer_tables: keep a scanned checkpoint's per-layer relative-bias tables, one file per
    layer (the JAX engine serves them); False plans FT's one table per side.
    """
    cfg = arch.config
    if weight_dtype not in ft_format.WEIGHT_DTYPES:
        raise PlanError(f"weight dtype {weight_dtype!r} is not one of "
                        f"{list(ft_format.WEIGHT_DTYPES)}")
    try:
        cfg.check_tensor_parallel(tensor_parallel)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    sides = layer_table_sides(arch, shapes) if layer_tables else ()
    tasks = []
    for group, specs in ft_format.iter_layer_groups(cfg, tensor_parallel, sides):
        by_stem: dict[str, list[FileSpec]] = {}
        for spec in specs:
            by_stem.setdefault(_stem(spec), []).append(spec)
        tensors = []
        for stem, files in by_stem.items():
            refs, transform = weight_sources(stem, arch, shapes, bool(sides))
            full_shape = files[0].full_shape
            refs = tuple(checked_source(ref, params, shapes, full_shape, transform, arch,
                                        stem) for ref in refs)
            tensors.append(OutputTensor(refs, transform, full_shape, files[0].split,
                                        tuple(files), weight_dtype))
        tasks.append(LayerTask(group, tuple(tensors)))
    return ConversionPlan(cfg, tensor_parallel, weight_dtype, tuple(tasks), sides)


def checked_source(ref: SourceRef, params: Mapping[str, ParamInfo],
                   shapes: Mapping[str, tuple[int, ...]], full_shape: tuple[int, ...],
                   transform: Transform, arch: T5Arch, stem: str) -> SourceRef:
    """``ref`` once its parameter is there, a float, and of the shape the transform reads
    (with a heads ``view`` where it is stored with heads on their own axis)."""
    if ref.param not in params:
        raise PlanError(f"missing parameter {ref.param!r} (needed for output tensor {stem})")
    want = _expected_source_shape(full_shape, transform, ref, arch)
    if shapes[ref.param] != want:
        viewed = _heads_view(ref, shapes[ref.param], want, arch.config)
        if viewed is None:
            raise PlanError(f"parameter {ref.param!r} has shape {list(shapes[ref.param])}, "
                            f"expected {list(want)}")
        ref = viewed
    if params[ref.param].dtype not in _FLOAT_DTYPES:
        raise PlanError(f"parameter {ref.param!r} has dtype {params[ref.param].dtype}, "
                        "expected a float type")
    return ref
