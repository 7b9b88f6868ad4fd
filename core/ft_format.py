"""The FasterTransformer T5 weight format, in one place.

What FT's loaders open (docs/ft-t5-format.md, read from models/t5/*Weight.cc): one raw,
headerless, row-major file per tensor and per tensor-parallel rank, plus ``config.ini``.
This module is pure: names, shapes, the split rule, dtypes and config.ini (the manifest is
:mod:`core.manifest`). Conversion
writes what it describes and serving reads it back; neither imports the other.

Notation (as in the spec): D = d_model, H = num_heads, K = d_kv, I = H*K, F = d_ff,
V = vocab_size, B = relative attention buckets, T = tensor-parallel size, r = rank.
"""

from __future__ import annotations

import configparser
import dataclasses
import io
from collections.abc import Iterator
from typing import Literal

import ml_dtypes
import numpy as np

from core.t5config import ACTIVATIONS, Activation, T5Config  # noqa: F401 (re-exported)

Split = Literal["none", "last", "first"]

WEIGHT_DTYPES: dict[str, np.dtype] = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}

CONFIG_INI = "config.ini"
MANIFEST = "manifest.json"


def split_axis(split: Split, ndim: int) -> int | None:
    """The axis a tensor of rank ``ndim`` is cut on across tensor-parallel ranks.

    The one place the split rule is written: "none" -> None (every rank reads the whole
    file), "first" -> 0, "last" -> ``ndim - 1`` (FT's loaders cut ``[D, I]`` projections on
    the output axis and ``[I, D]`` / ``[F, D]`` on the input axis).
    """
    if split == "none":
        return None
    return 0 if split == "first" else ndim - 1


def weights_dir_name(tensor_parallel: int) -> str:
    """The FT weights folder inside a Triton model version folder: ``<T>-gpu``."""
    return f"{tensor_parallel}-gpu"


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file FT opens.

    Attributes:
      name: file name inside the ``<T>-gpu`` folder.
      full_shape: shape of the whole (unsplit) tensor as FT lays it out.
      split: "none" (one file, no rank suffix), "last" or "first": the axis of
        ``full_shape`` cut into T equal parts, one file per rank.
      rank: the rank this file holds (0 when split is "none").
    """

    name: str
    full_shape: tuple[int, ...]
    split: Split
    rank: int = 0

    def shape(self, tensor_parallel: int) -> tuple[int, ...]:
        """The shape of this rank's part."""
        axis = split_axis(self.split, len(self.full_shape))
        if axis is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[axis] //= tensor_parallel
        return tuple(shape)


def _ranked(stem: str, full_shape: tuple[int, ...], split: Split, t: int) -> list[FileSpec]:
    return [FileSpec(f"{stem}.{r}.bin", full_shape, split, r) for r in range(t)]


def global_files(cfg: T5Config, t: int) -> list[FileSpec]:
    """Embedding, LM head, final norms and the two relative-bias tables."""
    v, d = cfg.vocab_size, cfg.d_model
    files = [FileSpec("shared.weight_T.bin", (v, d), "none")]
    if not cfg.tie_word_embeddings:
        files.append(FileSpec("lm_head.weight.bin", (v, d), "none"))
    files += [
        FileSpec("encoder.final_layer_norm.weight.bin", (d,), "none"),
        FileSpec("decoder.final_layer_norm.weight.bin", (d,), "none"),
    ]
    for side in ("encoder", "decoder"):
        files += layer_relative_bias_files(cfg, side, 0, t)
    return files


def layer_relative_bias_files(cfg: T5Config, side: str, layer: int, t: int) -> list[FileSpec]:
    """A relative-bias table [H, B], split on heads (the first axis) like FT's.

    Layer 0's is FT's one table per side. Those of layers 1.. are our extension, written only
    for the JAX engine and only for models whose every layer has its own table (current t5x
    ``scalable_t5``): ``<side>.block.<i>.layer.0.SelfAttention.relative_attention_bias.weight
    .<rank>.bin``, named as FT names block 0's. FT never opens them.
    """
    stem = f"{side}.block.{layer}.layer.0.SelfAttention.relative_attention_bias.weight"
    return _ranked(stem, (cfg.num_heads, cfg.relative_attention_num_buckets), "first", t)


def _mlp_files(prefix: str, cfg: T5Config, t: int) -> list[FileSpec]:
    d, f = cfg.d_model, cfg.d_ff
    files = _ranked(f"{prefix}.DenseReluDense.wi.weight", (d, f), "last", t)
    if cfg.gated:
        files += _ranked(f"{prefix}.DenseReluDense.wi2.weight", (d, f), "last", t)
    files += _ranked(f"{prefix}.DenseReluDense.wo.weight", (f, d), "first", t)
    return files


def _attention_files(prefix: str, kind: str, cfg: T5Config, t: int) -> list[FileSpec]:
    """Unfused q, k, v [D, I] (split on heads: the last axis) and o [I, D] (the first).

    kind: "SelfAttention" (encoder) or "EncDecAttention" (decoder cross-attention).
    """
    d, i = cfg.d_model, cfg.inner_dim
    files: list[FileSpec] = []
    for proj in ("q", "k", "v"):
        files += _ranked(f"{prefix}.{kind}.{proj}.weight", (d, i), "last", t)
    return files + _ranked(f"{prefix}.{kind}.o.weight", (i, d), "first", t)


def _norm(prefix: str, cfg: T5Config) -> FileSpec:
    return FileSpec(f"{prefix}.layer_norm.weight.bin", (cfg.d_model,), "none")


def encoder_layer_files(cfg: T5Config, layer: int, t: int) -> list[FileSpec]:
    """Encoder block ``layer``: self-attention (layer.0) and MLP (layer.1), each after a norm."""
    p = f"encoder.block.{layer}"
    files = [_norm(f"{p}.layer.0", cfg)]
    files += _attention_files(f"{p}.layer.0", "SelfAttention", cfg, t)
    files.append(_norm(f"{p}.layer.1", cfg))
    return files + _mlp_files(f"{p}.layer.1", cfg, t)


def decoder_layer_files(cfg: T5Config, layer: int, t: int) -> list[FileSpec]:
    """Decoder block ``layer``: fused self-attention (layer.0), cross-attention (layer.1), MLP
    (layer.2), each after a norm."""
    d, i = cfg.d_model, cfg.inner_dim
    p = f"decoder.block.{layer}"
    files = [_norm(f"{p}.layer.0", cfg)]
    # q, k, v fused: [D, 3, I], split on the last axis.
    files += _ranked(f"{p}.layer.0.SelfAttention.qkv.weight", (d, 3, i), "last", t)
    files += _ranked(f"{p}.layer.0.SelfAttention.o.weight", (i, d), "first", t)
    files.append(_norm(f"{p}.layer.1", cfg))
    files += _attention_files(f"{p}.layer.1", "EncDecAttention", cfg, t)
    files.append(_norm(f"{p}.layer.2", cfg))
    return files + _mlp_files(f"{p}.layer.2", cfg, t)


def all_files(cfg: T5Config, t: int) -> list[FileSpec]:
    """Every weight file FT opens for this model at tensor-parallel size t."""
    cfg.check_tensor_parallel(t)
    files = global_files(cfg, t)
    for layer in range(cfg.num_encoder_layers):
        files += encoder_layer_files(cfg, layer, t)
    for layer in range(cfg.num_decoder_layers):
        files += decoder_layer_files(cfg, layer, t)
    return files


def join_ranks(parts: list[np.ndarray], split: Split) -> np.ndarray:
    """The full tensor from every rank's part (the inverse of cutting it on :func:`split_axis`).

    Args:
      parts: T arrays, rank order, each of the rank shape (:meth:`FileSpec.shape`).
      split: the file's split rule.

    Returns:
      The full array: ``parts[0]`` when unsplit, else the parts joined on the split axis.
    """
    axis = split_axis(split, parts[0].ndim)
    if axis is None:
        return parts[0]
    return np.concatenate(parts, axis=axis)


def from_bytes(data: bytes, shape: tuple[int, ...], weight_dtype: str) -> np.ndarray:
    """Read a weight file's bytes back; raises if the element count does not match."""
    dtype = WEIGHT_DTYPES[weight_dtype]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"weight file holds {len(data)} bytes, expected {expected} for shape {shape} "
            f"{weight_dtype}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# --- config.ini ------------------------------------------------------------------------------


def config_ini(cfg: T5Config, weight_dtype: str, tensor_parallel: int = 1) -> str:
    """The config.ini FT's Triton T5 model and PyTorch op read (spec section 3)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype {weight_dtype!r} is not one of {list(WEIGHT_DTYPES)}")
    parser = configparser.ConfigParser()
    common = {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets_or_max_pos_seq_len": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "weight_data_type": weight_dtype,
        "tensor_para_size": tensor_parallel,
    }
    parser["encoder"] = {
        **{k: str(v) for k, v in common.items()},
        "num_layers": str(cfg.num_encoder_layers),
        "feed_forward_proj": cfg.feed_forward_proj,
    }
    parser["decoder"] = {
        **{k: str(v) for k, v in common.items()},
        "num_layers": str(cfg.num_decoder_layers),
        "feed_forward_proj": cfg.feed_forward_proj,
        "decoder_start_token_id": str(cfg.decoder_start_token_id),
        "eos_token_id": str(cfg.eos_token_id),
        "tie_word_embeddings": "true" if cfg.tie_word_embeddings else "false",
    }
    parser["structure"] = {
        "t5_with_bias": "false",
        "use_gated_activation": "1" if cfg.gated else "0",
        "position_embedding_type": "relative",
    }
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def parse_config_ini(text: str) -> tuple[T5Config, str]:
    """(model config, weight dtype) from a config.ini written by :func:`config_ini` or NVIDIA."""
    parser = configparser.ConfigParser()
    parser.read_string(text)
    for section in ("encoder", "decoder"):
        if section not in parser:
            raise ValueError(f"config.ini has no [{section}] section")
    enc, dec = parser["encoder"], parser["decoder"]
    tie = dec.get("tie_word_embeddings", "true").strip().lower() in ("1", "true", "yes")
    cfg = T5Config(
        d_model=enc.getint("d_model"),
        num_heads=enc.getint("num_heads"),
        d_kv=enc.getint("d_kv"),
        d_ff=enc.getint("d_ff"),
        vocab_size=enc.getint("vocab_size"),
        num_encoder_layers=enc.getint("num_layers"),
        num_decoder_layers=dec.getint("num_layers"),
        relative_attention_num_buckets=enc.getint(
            "relative_attention_num_buckets_or_max_pos_seq_len", 32),
        relative_attention_max_distance=enc.getint("relative_attention_max_distance", 128),
        feed_forward_proj=enc.get("feed_forward_proj", "relu"),  # type: ignore[arg-type]
        tie_word_embeddings=tie,
        decoder_start_token_id=dec.getint("decoder_start_token_id", 0),
        eos_token_id=dec.getint("eos_token_id", 1),
    )
    weight_dtype = enc.get("weight_data_type", "fp32").strip()
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"config.ini weight_data_type {weight_dtype!r} is not supported")
    return cfg, weight_dtype


def iter_layer_groups(cfg: T5Config, t: int, layer_tables: tuple[str, ...] = ()
                      ) -> Iterator[tuple[str, list[FileSpec]]]:
    """Files grouped as conversion schedules them: globals, then each layer.

    layer_tables: the sides ("encoder", "decoder") whose layers 1.. also get their own
    relative-bias table (:func:`layer_relative_bias_files`, JAX engine only).
    """
    cfg.check_tensor_parallel(t)
    yield "globals", global_files(cfg, t)
    for side, depth, files in (("encoder", cfg.num_encoder_layers, encoder_layer_files),
                               ("decoder", cfg.num_decoder_layers, decoder_layer_files)):
        for layer in range(depth):
            extra = (layer_relative_bias_files(cfg, side, layer, t)
                     if side in layer_tables and layer else [])
            yield f"{side}.{layer}", files(cfg, layer, t) + extra

