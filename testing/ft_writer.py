"""Tiny FT weights folders from random numpy weights, written through core/ft_format.py.

Independent of the converter, so the serving tests and the benchmarks can build a model
repository without a T5X checkpoint: `random_ft_weights` gives full FT-layout tensors and
`write_ft_folder` cuts them into rank files next to their config.ini.
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


def _init_scale(stem: str, cfg: T5Config) -> tuple[float, float]:
    """(offset, scale) of one tensor's normal init, chosen so activations stay O(1)."""
    d, i, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    if "layer_norm" in stem:
        return 1.0, 0.1
    if "relative_attention_bias" in stem:
        return 0.0, 0.5
    if stem == "shared.weight_T":
        return 0.0, 1.0
    if stem == "lm_head.weight" or stem.endswith(
            (".q.weight", ".qkv.weight", ".k.weight", ".v.weight", ".wi.weight", ".wi2.weight")):
        return 0.0, d ** -0.5
    if stem.endswith(".o.weight"):
        return 0.0, i ** -0.5
    if stem.endswith(".wo.weight"):
        return 0.0, f ** -0.5
    raise AssertionError(f"no init rule for {stem}")


def random_ft_weights(cfg: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
    """{tensor stem: full FT-layout fp32 array of `FileSpec.full_shape`} from one seed."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in ft_format.all_files(cfg, 1):
        stem, shape = tensor_stem(spec), spec.full_shape
        offset, scale = _init_scale(stem, cfg)
        w = rng.standard_normal(shape) * scale + offset
        # T5 folds 1/sqrt(K) into q, so the attention logits need no scaling.
        if stem.endswith(".q.weight"):
            w *= cfg.d_kv ** -0.5
        elif stem.endswith(".qkv.weight"):
            w[:, 0] *= cfg.d_kv ** -0.5
        out[stem] = w.astype(np.float32)
    return out


def _rank_part(full: np.ndarray, spec: ft_format.FileSpec, t: int) -> np.ndarray:
    """The slice of a full tensor that rank file ``spec`` holds, of ``t`` ranks.

    The axis follows core/ft_format.py's split rule (first or last axis, or none).
    """
    axis = {"none": None, "first": 0, "last": full.ndim - 1}[spec.split]
    if axis is None:
        return full
    n = full.shape[axis] // t
    return np.take(full, np.arange(spec.rank * n, (spec.rank + 1) * n), axis=axis)


def write_ft_folder(root: Path, cfg: T5Config, tensor_parallel: int,
                    weights: dict[str, np.ndarray], weight_dtype: str = "fp32") -> Path:
    """Write `<root>/<T>-gpu/` (config.ini + every rank file) and return that folder.

    Args:
      weights: {tensor stem: full array}, as `random_ft_weights` returns them.
    """
    folder = Path(root) / ft_format.weights_dir_name(tensor_parallel)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ft_format.CONFIG_INI).write_text(
        ft_format.config_ini(cfg, weight_dtype, tensor_parallel))
    dtype = ft_format.WEIGHT_DTYPES[weight_dtype]
    for spec in ft_format.all_files(cfg, tensor_parallel):
        part = _rank_part(weights[tensor_stem(spec)], spec, tensor_parallel)
        # FT reads raw C-order bytes of the file dtype, no header.
        (folder / spec.name).write_bytes(np.ascontiguousarray(part.astype(dtype)).tobytes())
    return folder
