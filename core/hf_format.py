"""The Hugging Face T5 checkpoint format, in one place: tensor names and shapes, the safetensors
shard header, the shard index, config.json and generation_config.json. Pure.

Facts relied on, with their sources:

- Tensor names and layouts: transformers 5.23 ``models/t5/modeling_t5.py``:
  ``T5ForConditionalGeneration`` holds ``shared`` (nn.Embedding [V, D]), ``encoder`` and
  ``decoder`` ``T5Stack``s of ``block.<i>.layer.<k>`` and ``lm_head`` (nn.Linear, weight
  [V, D]). Every ``nn.Linear`` weight is [out, in], the transpose of a t5x kernel [in, out].
  ``T5Attention`` has ``q``, ``k``, ``v`` ([I, D]) and ``o`` ([D, I]) and, only where
  ``has_relative_attention_bias`` (block 0 of each stack), ``relative_attention_bias``, an
  nn.Embedding [B, H] (t5x's ``rel_embedding`` is [H, B]). ``T5DenseActDense`` has ``wi``
  [F, D] and ``wo`` [D, F]; ``T5DenseGatedActDense`` ``wi_0``, ``wi_1`` [F, D] and ``wo``.
  ``encoder.embed_tokens`` / ``decoder.embed_tokens`` are ``_tied_weights_keys`` of
  ``shared`` and are not stored (``save_pretrained`` drops tied keys too).
- Tied vs untied (transformers 5.23 ``models/t5/configuration_t5.py``): T5Config forces
  ``tie_word_embeddings = True`` and keeps the JSON value only as ``scale_decoder_outputs``
  (the D^-0.5 scale of the last hidden state, t5x's ``logits_via_embedding``). So T5 1.1,
  Flan-T5 and UL2 are written with ``tie_word_embeddings: false`` and both ``shared`` and
  ``lm_head``: loading finds both and does not tie them (it warns that it will not).
- safetensors (huggingface/safetensors, ``safetensors/src/tensor.rs``): an 8-byte little-endian
  header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
  "__metadata__": {str: str}}`` (space-padded, N a multiple of 8), then the data; offsets are
  relative to the data, contiguous from 0, and each tensor is row-major little-endian.
  transformers' ``save_pretrained`` writes ``__metadata__ = {"format": "pt"}``
  (modeling_utils.py, 5.23); transformers 4.x refused shards without such a format on load, so
  we write the same.
- Sharded checkpoints (transformers ``utils/hub.py``, ``modeling_utils.py``):
  ``model.safetensors.index.json`` = ``{"metadata": {"total_size": bytes},
  "weight_map": {tensor name: shard file}}``, shards named ``model-XXXXX-of-YYYYY.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

from core.ft_format import WEIGHT_DTYPES
from core.t5config import T5Config

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
MANIFEST = "manifest.json"

# safetensors' dtype names of our weight dtypes; transformers' config.json "dtype" names.
SAFETENSORS_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# t5x's gelu is the tanh approximation (flax ``nn.gelu`` defaults to approximate=True), as is
# transformers' "gated-gelu" (configuration_t5.py maps it to "gelu_new"); its plain "gelu" is
# the exact function, so a non-gated gelu MLP is written as "gelu_new".
_FEED_FORWARD = {"gelu": "gelu_new"}

# Block 0 of each stack holds the stack's one relative-position table.
RELATIVE_BIAS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the Hugging Face state dict: its name and [out, in] (torch) shape."""

    name: str
    shape: tuple[int, ...]


def shard_name(index: int, count: int) -> str:
    """transformers' name of shard ``index`` (0-based) of ``count``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _attention(prefix: str, cfg: T5Config) -> list[TensorSpec]:
    d, i = cfg.d_model, cfg.inner_dim
    return [TensorSpec(f"{prefix}.{p}.weight", (i, d)) for p in ("q", "k", "v")] + [
        TensorSpec(f"{prefix}.o.weight", (d, i))]


def _mlp(prefix: str, cfg: T5Config) -> list[TensorSpec]:
    d, f = cfg.d_model, cfg.d_ff
    wi = ["wi_0", "wi_1"] if cfg.gated else ["wi"]
    return [TensorSpec(f"{prefix}.DenseReluDense.{w}.weight", (f, d)) for w in wi] + [
        TensorSpec(f"{prefix}.DenseReluDense.wo.weight", (d, f))]


def _norm(prefix: str, cfg: T5Config) -> TensorSpec:
    return TensorSpec(f"{prefix}.layer_norm.weight", (cfg.d_model,))


def _relative_bias(side: str, cfg: T5Config) -> TensorSpec:
    return TensorSpec(f"{side}.{RELATIVE_BIAS}",
                      (cfg.relative_attention_num_buckets, cfg.num_heads))


def global_tensors(cfg: T5Config) -> list[TensorSpec]:
    """The embedding, the LM head (untied models only) and the two final norms."""
    out = [TensorSpec("shared.weight", (cfg.vocab_size, cfg.d_model))]
    if not cfg.tie_word_embeddings:
        out.append(TensorSpec("lm_head.weight", (cfg.vocab_size, cfg.d_model)))
    return out + [TensorSpec(f"{side}.final_layer_norm.weight", (cfg.d_model,))
                  for side in ("encoder", "decoder")]


def encoder_block(cfg: T5Config, layer: int) -> list[TensorSpec]:
    """Encoder block ``layer``: layer.0 self-attention, layer.1 MLP, each with its norm; block
    0 also holds the encoder's relative-position table."""
    p = f"encoder.block.{layer}"
    out = _attention(f"{p}.layer.0.SelfAttention", cfg)
    if layer == 0:
        out.append(_relative_bias("encoder", cfg))
    return out + [_norm(f"{p}.layer.0", cfg), *_mlp(f"{p}.layer.1", cfg),
                  _norm(f"{p}.layer.1", cfg)]


def decoder_block(cfg: T5Config, layer: int) -> list[TensorSpec]:
    """Decoder block ``layer``: layer.0 self-attention, layer.1 cross-attention (EncDecAttention),
    layer.2 MLP, each with its norm; block 0 also holds the decoder's relative-position table."""
    p = f"decoder.block.{layer}"
    out = _attention(f"{p}.layer.0.SelfAttention", cfg)
    if layer == 0:
        out.append(_relative_bias("decoder", cfg))
    return out + [_norm(f"{p}.layer.0", cfg), *_attention(f"{p}.layer.1.EncDecAttention", cfg),
                  _norm(f"{p}.layer.1", cfg), *_mlp(f"{p}.layer.2", cfg),
                  _norm(f"{p}.layer.2", cfg)]


def tensor_groups(cfg: T5Config) -> list[tuple[str, list[TensorSpec]]]:
    """Every tensor, grouped as conversion schedules them (one shard each): the globals, then
    each encoder and each decoder block."""
    groups = [("globals", global_tensors(cfg))]
    groups += [(f"encoder.{i}", encoder_block(cfg, i)) for i in range(cfg.num_encoder_layers)]
    groups += [(f"decoder.{i}", decoder_block(cfg, i)) for i in range(cfg.num_decoder_layers)]
    return groups


def tensor_bytes(shape: tuple[int, ...], weight_dtype: str) -> int:
    """The bytes of one tensor's data."""
    return int(np.prod(shape, dtype=np.int64)) * WEIGHT_DTYPES[weight_dtype].itemsize


def safetensors_header(tensors: list[TensorSpec], weight_dtype: str) -> tuple[bytes, list[int]]:
    """(the shard's first bytes: length prefix and JSON header, each tensor's byte offset in the
    file), the tensors' data following the header in the order given."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    starts, offset = [], 0
    for t in tensors:
        end = offset + tensor_bytes(t.shape, weight_dtype)
        meta[t.name] = {"dtype": SAFETENSORS_DTYPES[weight_dtype], "shape": list(t.shape),
                        "data_offsets": [offset, end]}
        starts.append(offset)
        offset = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it: the data starts 8-byte aligned
    head = struct.pack("<Q", len(text)) + text
    return head, [len(head) + s for s in starts]


def shard_bytes(tensors: list[TensorSpec], weight_dtype: str) -> int:
    """The size of a shard holding ``tensors``."""
    head, _ = safetensors_header(tensors, weight_dtype)
    return len(head) + sum(tensor_bytes(t.shape, weight_dtype) for t in tensors)


def index_json(shards: list[tuple[str, list[TensorSpec]]], weight_dtype: str) -> str:
    """model.safetensors.index.json for (shard file, its tensors) pairs."""
    weight_map = {t.name: name for name, tensors in shards for t in tensors}
    total = sum(tensor_bytes(t.shape, weight_dtype) for _, ts in shards for t in ts)
    return json.dumps({"metadata": {"total_size": total},
                       "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"


def config_json(cfg: T5Config, weight_dtype: str) -> str:
    """config.json: T5ForConditionalGeneration with this model's sizes (transformers T5Config
    fields; ``tie_word_embeddings`` false for untied heads, module docstring)."""
    obj = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": _FEED_FORWARD.get(cfg.feed_forward_proj, cfg.feed_forward_proj),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        # t5x's LayerNorm epsilon (layers.py) and HF's dropout default for fine-tuning.
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.1,
        "is_encoder_decoder": True,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": 0,
        "dtype": TORCH_DTYPES[weight_dtype],
    }
    return json.dumps(obj, indent=2) + "\n"


def generation_config_json(cfg: T5Config) -> str:
    """generation_config.json: T5's start, end and pad tokens."""
    return json.dumps({"decoder_start_token_id": cfg.decoder_start_token_id,
                       "eos_token_id": cfg.eos_token_id, "pad_token_id": 0}, indent=2) + "\n"
