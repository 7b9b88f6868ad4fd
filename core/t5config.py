"""The model description: one T5-family encoder-decoder, as every stage sees it.

The only description of a model in this repository: conversion infers one from a checkpoint's
shapes (and config.gin), the FT format writes it to and reads it from ``config.ini``, the JAX
engine builds its network from it, and the demo builds its small model from one.

Notation (docs/ft-t5-format.md): D = d_model, H = num_heads, K = d_kv, I = H*K, F = d_ff,
V = vocab_size, B = relative attention buckets.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Activation = Literal["relu", "gelu", "gated-gelu", "gated-silu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gated-gelu", "gated-silu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """A T5-family encoder-decoder as FT sees it.

    Attributes:
      d_model: D, the residual width.
      num_heads: H.
      d_kv: K, the per-head width (I = H*K need not equal D).
      d_ff: F, the MLP inner width.
      vocab_size: V.
      num_encoder_layers / num_decoder_layers: the two depths (they may differ).
      relative_attention_num_buckets: B, 32 for T5 and UL2.
      relative_attention_max_distance: 128 for T5 and UL2.
      feed_forward_proj: relu | gelu | gated-gelu | gated-silu.
      tie_word_embeddings: True when the LM head is the input embedding (T5 1.0); FT then
        scales the last hidden state by D^-0.5 before the head.
      decoder_start_token_id / eos_token_id: 0 and 1 for T5 vocabularies.
    """

    d_model: int
    num_heads: int
    d_kv: int
    d_ff: int
    vocab_size: int
    num_encoder_layers: int
    num_decoder_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: Activation = "gated-gelu"
    tie_word_embeddings: bool = False
    decoder_start_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not one of {ACTIVATIONS}"
            )
        for field in ("d_model", "num_heads", "d_kv", "d_ff", "vocab_size",
                      "num_encoder_layers", "num_decoder_layers",
                      "relative_attention_num_buckets"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")

    @property
    def inner_dim(self) -> int:
        """I = H*K, the attention projection width."""
        return self.num_heads * self.d_kv

    @property
    def gated(self) -> bool:
        """Whether the MLP is gated (two input projections, wi and wi2)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The elementwise function: relu, gelu or silu."""
        return self.feed_forward_proj.removeprefix("gated-")

    def check_tensor_parallel(self, tensor_parallel: int) -> None:
        """Raise ValueError unless T divides every axis FT splits (heads and d_ff)."""
        if tensor_parallel < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {tensor_parallel}")
        if self.num_heads % tensor_parallel:
            raise ValueError(
                f"tensor-parallel size {tensor_parallel} does not divide num_heads "
                f"{self.num_heads}"
            )
        if self.d_ff % tensor_parallel:
            raise ValueError(
                f"tensor-parallel size {tensor_parallel} does not divide d_ff {self.d_ff}"
            )

    def num_parameters(self) -> int:
        """Parameters FT holds (the relative-bias tables once per side)."""
        d, i, f, v = self.d_model, self.inner_dim, self.d_ff, self.vocab_size
        mlp = d * f * (3 if self.gated else 2)
        enc = self.num_encoder_layers * (4 * d * i + mlp + 2 * d)
        dec = self.num_decoder_layers * (8 * d * i + mlp + 3 * d)
        glob = v * d * (1 if self.tie_word_embeddings else 2) + 2 * d
        glob += 2 * self.num_heads * self.relative_attention_num_buckets
        return enc + dec + glob
