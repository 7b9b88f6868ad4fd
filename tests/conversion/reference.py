"""An independent reference for the conversion: the FT files, in plain numpy, from the spec.

Written from ft-t5-format.md section 2's tables, without the conversion code: for each FT file,
the numpy expression of the T5X source arrays that it must hold, byte for byte.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from core.t5config import T5Config

NP = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def reference_files(p: dict[str, np.ndarray], cfg: T5Config, t: int, wd: str
                    ) -> dict[str, bytes]:
    """File name -> the exact bytes FT must find, for source arrays ``p`` (as saved)."""
    out: dict[str, bytes] = {}

    def put(stem: str, full: np.ndarray, axis: int | None) -> None:
        full = np.asarray(full).astype(NP[wd])
        if axis is None:
            out[f"{stem}.bin"] = np.ascontiguousarray(full).tobytes()
            return
        for r, part in enumerate(np.split(full, t, axis=axis)):
            out[f"{stem}.{r}.bin"] = np.ascontiguousarray(part).tobytes()

    put("shared.weight_T", p["token_embedder.embedding"], None)
    if not cfg.tie_word_embeddings:
        put("lm_head.weight", p["decoder.logits_dense.kernel"].T, None)
    put("encoder.final_layer_norm.weight", p["encoder.encoder_norm.scale"], None)
    put("decoder.final_layer_norm.weight", p["decoder.decoder_norm.scale"], None)
    for side in ("encoder", "decoder"):
        put(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            p[f"{side}.relpos_bias.rel_embedding"], 0)

    def mlp(src: str, dst: str) -> None:
        if cfg.gated:
            put(f"{dst}.DenseReluDense.wi.weight", p[f"{src}.mlp.wi_0.kernel"], -1)
            put(f"{dst}.DenseReluDense.wi2.weight", p[f"{src}.mlp.wi_1.kernel"], -1)
        else:
            put(f"{dst}.DenseReluDense.wi.weight", p[f"{src}.mlp.wi.kernel"], -1)
        put(f"{dst}.DenseReluDense.wo.weight", p[f"{src}.mlp.wo.kernel"], 0)

    for i in range(cfg.num_encoder_layers):
        s, d = f"encoder.layers_{i}", f"encoder.block.{i}"
        put(f"{d}.layer.0.layer_norm.weight", p[f"{s}.pre_attention_layer_norm.scale"], None)
        for ft, tx in (("q", "query"), ("k", "key"), ("v", "value")):
            put(f"{d}.layer.0.SelfAttention.{ft}.weight", p[f"{s}.attention.{tx}.kernel"], -1)
        put(f"{d}.layer.0.SelfAttention.o.weight", p[f"{s}.attention.out.kernel"], 0)
        put(f"{d}.layer.1.layer_norm.weight", p[f"{s}.pre_mlp_layer_norm.scale"], None)
        mlp(s, f"{d}.layer.1")
    for i in range(cfg.num_decoder_layers):
        s, d = f"decoder.layers_{i}", f"decoder.block.{i}"
        put(f"{d}.layer.0.layer_norm.weight", p[f"{s}.pre_self_attention_layer_norm.scale"], None)
        q, k, v = (p[f"{s}.self_attention.{n}.kernel"] for n in ("query", "key", "value"))
        # The spec's construction: concatenate on the last axis to [D, 3I], view as [D, 3, I].
        qkv = np.concatenate([q, k, v], axis=-1).reshape(cfg.d_model, 3, cfg.inner_dim)
        put(f"{d}.layer.0.SelfAttention.qkv.weight", qkv, -1)
        put(f"{d}.layer.0.SelfAttention.o.weight", p[f"{s}.self_attention.out.kernel"], 0)
        put(f"{d}.layer.1.layer_norm.weight", p[f"{s}.pre_cross_attention_layer_norm.scale"],
            None)
        for ft, tx in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            put(f"{d}.layer.1.EncDecAttention.{ft}.weight",
                p[f"{s}.encoder_decoder_attention.{tx}.kernel"], 0 if ft == "o" else -1)
        put(f"{d}.layer.2.layer_norm.weight", p[f"{s}.pre_mlp_layer_norm.scale"], None)
        mlp(s, f"{d}.layer.2")
    return out


def scan_params(p: dict[str, np.ndarray], cfg: T5Config, axis: int = 1,
                relpos: dict[str, np.ndarray] | None = None, naming: str = "layers",
                tables: dict[str, list[np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """The same model as a scalable_t5 (scan_layers=True) checkpoint: per-layer parameters
    stacked on ``axis``, each layer with its own relative-bias table.

    naming "current" is current t5x's scalable_t5 (network.py, layers.py): the scanned module
    is named like its parent (``encoder.encoder.*``), DenseGeneral keeps the head axis (q/k/v
    [D, H, K], out [H, K, D] per layer) and every layer owns ``relpos_bias.rel_embedding``.
    naming "layers" is the older ``encoder.layers.*`` with [D, H*K] kernels and
    ``relative_posemb`` tables. ``tables`` gives each layer's table per side (default: the
    unscanned table in every layer); ``relpos`` overrides stacked arrays by name.
    """
    h, k = cfg.num_heads, cfg.d_kv
    out: dict[str, np.ndarray] = {}
    per_layer: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, value in p.items():
        side, _, rest = name.partition(".")
        scope = f"{side}.{side}." if naming == "current" else f"{side}.layers."
        if rest.startswith("layers_"):
            layer, sub = rest.split(".", 1)
            if naming == "current" and sub.endswith("out.kernel"):
                value = value.reshape(h, k, -1)
            elif naming == "current" and "attention." in sub:
                value = value.reshape(-1, h, k)
            per_layer.setdefault(scope + sub, []).append(
                (int(layer.removeprefix("layers_")), value))
        elif rest == "relpos_bias.rel_embedding":
            depth = cfg.num_encoder_layers if side == "encoder" else cfg.num_decoder_layers
            table = (tables or {}).get(side) or [value] * depth
            sub = "relpos_bias" if naming == "current" else "relative_posemb"
            out[f"{scope}{sub}.rel_embedding"] = np.stack(table, axis=axis)
        else:
            out[name] = value
    for name, items in per_layer.items():
        out[name] = np.stack([v for _, v in sorted(items, key=lambda x: x[0])], axis=axis)
    out.update(relpos or {})
    return out


def split_for_rank(full: np.ndarray, split: str, rank: int, t: int) -> np.ndarray:
    """The part of a full FT-layout tensor that rank ``rank`` of ``t`` holds (test helper;
    the conversion places chunks directly and never materialises a full tensor)."""
    from core.ft_format import split_axis

    axis = split_axis(split, full.ndim)  # type: ignore[arg-type]
    return full if axis is None else np.split(full, t, axis=axis)[rank]


def to_bytes(array: np.ndarray, weight_dtype: str) -> bytes:
    """A tensor as FT reads it: cast to the file dtype, C order, no header (test helper)."""
    return np.ascontiguousarray(array.astype(NP[weight_dtype])).tobytes()
