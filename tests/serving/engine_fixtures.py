"""Tiny FT weights folders from random numpy weights, written through core/ft_format.py.

Independent of the converter: the Triton tests may import `write_ft_folder` and the two
configs below to build a model repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core import ft_format
from core.t5config import T5Config

# UL2-style: gated-silu, untied LM head, unequal depths, I = H*K (48) != D (32).
UL2_TINY = T5Config(d_model=32, num_heads=4, d_kv=12, d_ff=64, vocab_size=100,
                    num_encoder_layers=2, num_decoder_layers=3,
                    feed_forward_proj="gated-silu", tie_word_embeddings=False)
# T5 1.0-style: relu, tied embedding (LM head scaled by D^-0.5).
T5_TINY = T5Config(d_model=32, num_heads=4, d_kv=8, d_ff=64, vocab_size=100,
                   num_encoder_layers=2, num_decoder_layers=2,
                   feed_forward_proj="relu", tie_word_embeddings=True)


def tensor_stem(spec: ft_format.FileSpec) -> str:
    """A file's tensor name without rank suffix and .bin."""
    stem = spec.name.removesuffix(".bin")
    return stem if spec.split == "none" else stem.rsplit(".", 1)[0]


def random_ft_weights(cfg: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
    """{tensor stem: full FT-layout fp32 array}, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    d, k, i, f = cfg.d_model, cfg.d_kv, cfg.inner_dim, cfg.d_ff
    out: dict[str, np.ndarray] = {}
    for spec in ft_format.all_files(cfg, 1):
        stem, shape = tensor_stem(spec), spec.full_shape
        if "layer_norm" in stem:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "relative_attention_bias" in stem:
            w = 0.5 * rng.standard_normal(shape)
        elif stem == "shared.weight_T":
            w = rng.standard_normal(shape)
        elif stem == "lm_head.weight":
            w = rng.standard_normal(shape) * d ** -0.5
        elif stem.endswith((".q.weight", ".qkv.weight")):
            w = rng.standard_normal(shape) * d ** -0.5
            if stem.endswith(".q.weight"):
                w *= k ** -0.5  # T5 folds 1/sqrt(K) into q
            else:
                w[:, 0] *= k ** -0.5
        elif stem.endswith((".k.weight", ".v.weight", ".wi.weight", ".wi2.weight")):
            w = rng.standard_normal(shape) * d ** -0.5
        elif stem.endswith(".o.weight"):
            w = rng.standard_normal(shape) * i ** -0.5
        elif stem.endswith(".wo.weight"):
            w = rng.standard_normal(shape) * f ** -0.5
        else:
            raise AssertionError(f"no init rule for {stem}")
        out[stem] = w.astype(np.float32)
    return out


def write_ft_folder(root: Path, cfg: T5Config, tensor_parallel: int,
                    weights: dict[str, np.ndarray], weight_dtype: str = "fp32") -> Path:
    """Write `<root>/<T>-gpu/` (config.ini + every rank file) and return that folder."""
    folder = Path(root) / ft_format.weights_dir_name(tensor_parallel)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ft_format.CONFIG_INI).write_text(
        ft_format.config_ini(cfg, weight_dtype, tensor_parallel))
    for spec in ft_format.all_files(cfg, tensor_parallel):
        part = ft_format.split_for_rank(weights[tensor_stem(spec)], spec.split, spec.rank,
                                        tensor_parallel)
        (folder / spec.name).write_bytes(ft_format.to_bytes(part, weight_dtype))
    return folder
