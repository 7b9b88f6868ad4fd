"""Load an FT weights folder (``<T>-gpu/``) into one full-size parameter tree.

The folder's layout is described by :mod:`core.ft_format` (the only module serving shares
with conversion). Files of any tensor-parallel size T are read and the ranks re-joined with
``ft_format.join_ranks``, so one engine serves a folder written for any T.

Beyond FT's files, a folder may hold every layer's own relative-bias table
(``ft_format.layer_relative_bias_files``, our extension, written by ``--engine jax`` for
scalable_t5 checkpoints whose layers each have one); they are read when present, so such a
model is served exactly.

The tree keeps heads as their own axis ([D, H, K] rather than [D, I]): FT splits the attention
projections on the head axis and the MLP on d_ff, so sharding this tree later over T devices
along H and F reproduces FT's split exactly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from core import ft_format
from core.repository import read_config_ini
from core.t5config import T5Config

_RANK_FILE = re.compile(r"^encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight\.(\d+)\.bin$")

Params = dict[str, "np.ndarray | list[dict[str, np.ndarray]]"]


def detect_tensor_parallel(weights_dir: Path) -> int:
    """T from the rank files present (config.ini's tensor_para_size is optional in FT)."""
    ranks = sorted(int(m.group(1)) for p in weights_dir.iterdir()
                   if (m := _RANK_FILE.match(p.name)))
    if not ranks:
        raise FileNotFoundError(
            f"{weights_dir} holds no encoder.block.0.layer.0.SelfAttention.q.weight.<rank>.bin: "
            "not an FT T5 weights folder")
    if ranks != list(range(len(ranks))):
        raise FileNotFoundError(
            f"{weights_dir}: rank files of encoder.block.0 q are {ranks}, expected 0..T-1")
    return len(ranks)


def read_ft_folder(weights_dir: str | Path) -> tuple[T5Config, str, int, dict[str, np.ndarray]]:
    """Read every file FT opens and join the ranks.

    Returns:
      (config, weight dtype of the files, T the folder was split for,
       {FT tensor name without rank suffix and .bin: full FT-layout array}).
    Raises FileNotFoundError / ValueError naming the missing or malformed file.
    """
    weights_dir = Path(weights_dir)
    ini = weights_dir / ft_format.CONFIG_INI
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"weights folder {weights_dir} does not exist")
    if not ini.is_file():
        raise FileNotFoundError(f"{ini} is missing: an FT weights folder needs its config.ini")
    cfg, weight_dtype = read_config_ini(str(weights_dir))
    t = detect_tensor_parallel(weights_dir)
    cfg.check_tensor_parallel(t)

    parts: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    splits: dict[str, ft_format.Split] = {}
    per_layer_tables = _layer_table_files(weights_dir, cfg, t)
    table_names = {spec.name for spec in per_layer_tables}
    for spec in [*ft_format.all_files(cfg, t), *per_layer_tables]:
        path = weights_dir / spec.name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the folder holds per-layer relative-bias tables, so every "
                "layer needs one" if spec.name in table_names
                else f"{path} is missing (expected shape {spec.shape(t)})")
        try:
            arr = ft_format.from_bytes(path.read_bytes(), spec.shape(t), weight_dtype)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        stem = spec.name.removesuffix(".bin")
        if spec.split != "none":
            stem = stem.rsplit(".", 1)[0]  # drop the rank suffix
        parts[stem].append((spec.rank, arr))
        splits[stem] = spec.split
    full = {
        stem: ft_format.join_ranks([a for _, a in sorted(ps, key=lambda x: x[0])], splits[stem])
        for stem, ps in parts.items()
    }
    return cfg, weight_dtype, t, full


def _layer_table_files(weights_dir: Path, cfg: T5Config, t: int) -> list[ft_format.FileSpec]:
    """The per-layer relative-bias files (layers 1..) of each side that has them: a side has
    them when its block 1 table is there."""
    files: list[ft_format.FileSpec] = []
    for side, depth in (("encoder", cfg.num_encoder_layers),
                        ("decoder", cfg.num_decoder_layers)):
        if depth > 1 and (weights_dir / ft_format.layer_relative_bias_files(
                cfg, side, 1, t)[0].name).is_file():
            for layer in range(1, depth):
                files += ft_format.layer_relative_bias_files(cfg, side, layer, t)
    return files


def _heads(w: np.ndarray, cfg: T5Config) -> np.ndarray:
    """[D, I] -> [D, H, K]: FT's I axis is head-major, as t5x's DenseGeneral features."""
    return w.reshape(w.shape[0], cfg.num_heads, cfg.d_kv)


def _heads_out(w: np.ndarray, cfg: T5Config) -> np.ndarray:
    """[I, D] -> [H, K, D]."""
    return w.reshape(cfg.num_heads, cfg.d_kv, w.shape[-1])


def _attention(full: dict[str, np.ndarray], prefix: str, cfg: T5Config,
               key_prefix: str = "") -> dict[str, np.ndarray]:
    """One unfused attention block (encoder self, decoder cross) from FT's ``prefix.{q,k,v,o}``:
    ``{q, k, v: [D, H, K], o: [H, K, D]}``, each key prefixed with ``key_prefix``."""
    out = {f"{key_prefix}{n}": _heads(full[f"{prefix}.{n}.weight"], cfg) for n in "qkv"}
    out[f"{key_prefix}o"] = _heads_out(full[f"{prefix}.o.weight"], cfg)
    return out


def _mlp(full: dict[str, np.ndarray], prefix: str, cfg: T5Config) -> dict[str, np.ndarray]:
    """``{wi: [D, F], wo: [F, D]}`` plus ``wi2: [D, F]`` for a gated activation."""
    out = {"wi": full[f"{prefix}.DenseReluDense.wi.weight"],
           "wo": full[f"{prefix}.DenseReluDense.wo.weight"]}
    if cfg.gated:
        out["wi2"] = full[f"{prefix}.DenseReluDense.wi2.weight"]
    return out


def to_param_tree(cfg: T5Config, full: dict[str, np.ndarray], dtype: np.dtype) -> Params:
    """FT tensors -> the engine's tree, one dict of arrays per layer.

    Tree (L_e / L_d = encoder / decoder depth):
      embedding [V, D], lm_head [V, D] (the embedding when tied),
      encoder_norm [D], decoder_norm [D], encoder_rel_bias [H, B], decoder_rel_bias [H, B],
      encoder: L_e x {ln_attn [D], q/k/v [D, H, K], o [H, K, D], ln_mlp [D],
                      wi (wi2) [D, F], wo [F, D], (rel_bias [H, B])}
      decoder: L_d x {ln_self [D], q/k/v [D, H, K], o [H, K, D], ln_cross [D],
                      cq/ck/cv [D, H, K], co [H, K, D], ln_mlp [D], wi (wi2), wo,
                      (rel_bias [H, B])}
    A layer has ``rel_bias``, its own relative-bias table, only when the folder holds
    per-layer tables for its side (layer 0's is then ``<side>_rel_bias``); without it the
    layer uses ``<side>_rel_bias`` as in FT.

    Layers are separate arrays, not stacked on a leading axis: XLA copies a slice of a stacked
    array before handing it to a GPU matmul, so a scan over stacked weights moved every weight
    three times per decoder step (bench/layer_layout.py on an H100: 960 GB/s effective against
    2,866 GB/s for separate arrays; docs/benchmarks.md).
    """
    def cast(a: np.ndarray) -> np.ndarray:
        return np.asarray(a).astype(dtype)

    enc_layers = []
    for i in range(cfg.num_encoder_layers):
        p = f"encoder.block.{i}"
        enc_layers.append({
            "ln_attn": full[f"{p}.layer.0.layer_norm.weight"],
            **_attention(full, f"{p}.layer.0.SelfAttention", cfg),
            "ln_mlp": full[f"{p}.layer.1.layer_norm.weight"],
            **_mlp(full, f"{p}.layer.1", cfg),
        })
    dec_layers = []
    for i in range(cfg.num_decoder_layers):
        p = f"decoder.block.{i}"
        s = f"{p}.layer.0.SelfAttention"
        qkv = full[f"{s}.qkv.weight"]  # [D, 3, I]: FT fuses the decoder's self-attention
        dec_layers.append({
            "ln_self": full[f"{p}.layer.0.layer_norm.weight"],
            "q": _heads(qkv[:, 0], cfg),
            "k": _heads(qkv[:, 1], cfg),
            "v": _heads(qkv[:, 2], cfg),
            "o": _heads_out(full[f"{s}.o.weight"], cfg),
            "ln_cross": full[f"{p}.layer.1.layer_norm.weight"],
            **_attention(full, f"{p}.layer.1.EncDecAttention", cfg, key_prefix="c"),
            "ln_mlp": full[f"{p}.layer.2.layer_norm.weight"],
            **_mlp(full, f"{p}.layer.2", cfg),
        })

    bias_stem = "layer.0.SelfAttention.relative_attention_bias.weight"

    def each(layers: list[dict[str, np.ndarray]], side: str) -> list[dict[str, np.ndarray]]:
        out = [{k: cast(a) for k, a in layer.items()} for layer in layers]
        if f"{side}.block.1.{bias_stem}" in full:  # per-layer tables (our extension)
            for i, layer in enumerate(out):
                # Bias tables stay fp32: they are added to fp32 attention logits.
                layer["rel_bias"] = np.asarray(full[f"{side}.block.{i}.{bias_stem}"],
                                               np.float32)
        return out

    emb = full["shared.weight_T"]
    return {
        "embedding": cast(emb),
        "lm_head": cast(emb if cfg.tie_word_embeddings else full["lm_head.weight"]),
        "encoder_norm": cast(full["encoder.final_layer_norm.weight"]),
        "decoder_norm": cast(full["decoder.final_layer_norm.weight"]),
        # Bias tables stay fp32: they are added to fp32 attention logits.
        "encoder_rel_bias": np.asarray(full[f"encoder.block.0.{bias_stem}"], np.float32),
        "decoder_rel_bias": np.asarray(full[f"decoder.block.0.{bias_stem}"], np.float32),
        "encoder": each(enc_layers, "encoder"),
        "decoder": each(dec_layers, "decoder"),
    }
