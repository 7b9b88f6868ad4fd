"""Fixture checkpoints for the conversion tests: tiny T5X models written by demo.t5x_writer.

Two architectures (the two ends of what users convert):
- UL2-style: gated-silu MLP, untied LM head (decoder.logits_dense), I = H*K != D, and unequal
  encoder/decoder depths (NVIDIA's template wrote the encoder depth for both);
- T5 1.0-style: relu MLP (a single wi), tied embedding, no logits_dense.
Legacy checkpoints use a small chunk target so that arrays are multi-chunk and chunks straddle
tensor-parallel rank boundaries; OCDBT ones are written by orbax-checkpoint itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.t5config import T5Config
from demo.t5x_writer import gin_config, random_t5x_params, write_t5x_checkpoint

MODELS: dict[str, T5Config] = {
    "ul2": T5Config(d_model=24, num_heads=4, d_kv=8, d_ff=48, vocab_size=36,
                    num_encoder_layers=2, num_decoder_layers=3,
                    feed_forward_proj="gated-silu", tie_word_embeddings=False),
    "t5v1": T5Config(d_model=16, num_heads=4, d_kv=4, d_ff=32, vocab_size=30,
                     num_encoder_layers=2, num_decoder_layers=2,
                     feed_forward_proj="relu", tie_word_embeddings=True),
}
# 48 fp32 elements per chunk: [6, 8] chunks of a [24, 48] wi, crossing the 12-column ranks.
SMALL_CHUNK_BYTES = 192


class CheckpointFactory:
    """Builds (and caches for the session) a checkpoint per (model, layout, save dtype)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple[str, str, str], tuple[Path, dict[str, np.ndarray]]] = {}

    def __call__(self, model: str, layout: str = "legacy", dtype: str = "float32"
                 ) -> tuple[Path, dict[str, np.ndarray]]:
        """(model directory, the arrays as saved) for the fixture checkpoint."""
        key = (model, layout, dtype)
        if key not in self.cache:
            cfg = MODELS[model]
            params = random_t5x_params(cfg, seed=len(self.cache), dtype=dtype)
            d = self.root / f"{model}-{layout}-{dtype}"
            # The UL2 model carries its config.gin (gelu vs silu is not in the shapes); the
            # T5 1.0 one has none, so its activation is inferred from the shapes alone.
            gin = gin_config(cfg) if model == "ul2" else None
            write_t5x_checkpoint(d, params, step=10, dtype=dtype, layout=layout, gin=gin,
                                 chunk_bytes=SMALL_CHUNK_BYTES)
            self.cache[key] = (d, params)
        return self.cache[key]


@pytest.fixture(scope="session")
def t5x_checkpoint(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("t5x"))
