"""Write real T5X checkpoints: the legacy msgpack + zarr layout, and OCDBT through orbax.

The legacy layout is written exactly as t5x's ``checkpoints.py`` does (``save``,
``_write_state_to_tensorstore``, ``_get_spec``, ``_choose_chunk_shape``): a msgpack
``checkpoint`` file holding ``{"version": 3, "optimizer": {"target": PARAMS, "state": {"step":
STEP, "param_states": {}}}}`` whose array leaves are tensorstore spec dicts, and one gzip zarr v2
array per parameter in a folder named by the dotted tree path (``target.encoder.layers_0...``).
Scalars (the step) are stored inline as flax's msgpack ndarray extension.

Used by the demo model to save what it trained, by tests to build fixture checkpoints, and by
``bench/convert.py``. ``random_t5x_params`` gives every parameter name of t5x's
``examples/t5`` network for a :class:`core.T5Config`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import ml_dtypes
import msgpack
import numpy as np

from core.t5config import T5Config

# t5x/checkpoints.py
VERSION = 3
_DESIRED_CHUNK_SIZE_BYTES = 64 * 1024 * 1024
# flax/serialization.py: _MsgpackExtType.ndarray
_MSGPACK_EXT_NDARRAY = 1

SaveDtype = Literal["float32", "bfloat16"]
Layout = Literal["legacy", "ocdbt"]

_NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def choose_chunk_shape(write_shape: Sequence[int], target_elements: int) -> list[int]:
    """t5x's ``_choose_chunk_shape``: the largest chunk of at most ``target_elements`` elements
    whose every dimension divides the array's, shrinking the largest dimension first."""
    target_elements = max(target_elements, 1)
    dim_factors = [[i for i in range(1, size + 1) if size % i == 0] for size in write_shape]

    def total() -> int:
        return int(np.prod([f[-1] for f in dim_factors], dtype=np.int64))

    while total() > target_elements:
        dim, dim_size = -1, 1
        for i, factors in enumerate(dim_factors):
            if factors[-1] > dim_size:
                dim, dim_size = i, factors[-1]
        assert dim_size > 1
        dim_factors[dim].pop()
    return [f[-1] for f in dim_factors]


def _msgpack_default(obj):
    # flax serialises numpy arrays and numpy scalars as ext type 1: msgpack (shape, dtype, bytes).
    if isinstance(obj, np.generic):
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(_MSGPACK_EXT_NDARRAY, payload)
    raise TypeError(f"cannot serialise {type(obj).__name__} in a T5X checkpoint")


def _nest(flat: dict[str, object]) -> dict:
    """``{"a.b.c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"parameter {name!r} nests under a leaf")
        if leaf in node:
            raise ValueError(f"parameter {name!r} given twice or nests under another")
        node[leaf] = value
    return tree


def _write_zarr(path: Path, array: np.ndarray, dtype_name: str, chunk_bytes: int) -> dict:
    """One gzip zarr v2 array as t5x writes it; returns the msgpack leaf (tensorstore spec)."""
    import tensorstore as ts

    chunks = choose_chunk_shape(array.shape, chunk_bytes // array.dtype.itemsize)
    metadata = {"compressor": {"id": "gzip"}, "shape": list(array.shape), "chunks": chunks}
    spec = {
        "driver": "zarr",
        "dtype": dtype_name,
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": metadata,
    }
    store = ts.open({**spec, "create": True, "delete_existing": True}).result()
    store.write(array).result()
    return {
        "driver": "zarr",
        "dtype": dtype_name,
        "kvstore": {"driver": "file", "path": path.name},
        "metadata": metadata,
    }


def write_t5x_checkpoint(
    dst_dir: str | os.PathLike,
    params: Mapping[str, np.ndarray],
    step: int,
    dtype: SaveDtype = "float32",
    layout: Layout = "legacy",
    gin: str | None = None,
    chunk_bytes: int = _DESIRED_CHUNK_SIZE_BYTES,
) -> Path:
    """Write ``params`` as the T5X checkpoint ``dst_dir/checkpoint_<step>``; return its path.

    Args:
      dst_dir: the model directory (created if missing); the checkpoint goes in
        ``checkpoint_<step>`` beneath it, replacing one already there.
      params: flat dotted names under ``target`` (``encoder.layers_0.attention.query.kernel``)
        to arrays; each is cast to ``dtype`` (t5x's ``save_dtype``).
      step: the training step, stored in the state and in the folder name.
      dtype: "float32" or "bfloat16", the dtype of every saved array.
      layout: "legacy" (msgpack + one zarr folder per parameter, as t5x's checkpoints.py) or
        "ocdbt" (orbax-checkpoint's PyTree format with OCDBT; needs orbax-checkpoint).
      gin: when given, written as ``dst_dir/config.gin`` (t5x writes it beside the steps).
      chunk_bytes: the chunk size target (t5x: 64 MiB); tests lower it to get multi-chunk
        arrays from tiny models. Legacy layout only.
    """
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(_NP_DTYPES)}")
    if not params:
        raise ValueError("no parameters to write")
    np_dtype = _NP_DTYPES[dtype]
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    ckpt = dst / f"checkpoint_{int(step)}"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    if gin is not None:
        (dst / "config.gin").write_text(gin)
    if layout == "ocdbt":
        _write_ocdbt(ckpt, {n: np.asarray(a).astype(np_dtype) for n, a in params.items()}, step)
        return ckpt
    if layout != "legacy":
        raise ValueError(f"layout {layout!r} is not 'legacy' or 'ocdbt'")
    # t5x writes into a temporary folder and renames it when complete.
    tmp = dst / f"checkpoint_{int(step)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    leaves: dict[str, object] = {}
    # One parameter at a time: ``params`` may be a lazy mapping (bench/convert.py generates
    # ~3 GB), so at most one array is held here.
    for name in params:
        array = np.asarray(params[name]).astype(np_dtype, copy=False)
        if array.ndim == 0:
            leaves[name] = array  # t5x keeps scalars inline in the msgpack file
            continue
        leaves[name] = _write_zarr(tmp / f"target.{name}", array, dtype, chunk_bytes)
    state = {
        "version": VERSION,
        "optimizer": {
            "target": _nest(leaves),
            "state": {"step": np.asarray(int(step), dtype=np.int32), "param_states": {}},
        },
    }
    (tmp / "checkpoint").write_bytes(
        msgpack.packb(state, default=_msgpack_default, use_bin_type=True)
    )
    tmp.rename(ckpt)
    return ckpt


def _write_ocdbt(ckpt: Path, params: dict[str, np.ndarray], step: int) -> None:
    """Save ``{"target": params, "state": {"step": step}}`` with orbax-checkpoint (OCDBT)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as exc:  # a dev dependency: the demo and conversion never need it
        raise RuntimeError("writing an OCDBT checkpoint needs orbax-checkpoint") from exc
    tree = {"target": _nest(params), "state": {"step": np.asarray(int(step), dtype=np.int32)}}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(ckpt.absolute(), tree)


# --- random parameters of t5x/examples/t5 -----------------------------------------------------


def t5x_param_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Every parameter of t5x's ``examples/t5`` network for ``cfg``, with its shape.

    Kernels are [in, out]; gated MLPs have ``wi_0``/``wi_1``, others ``wi``; untied models have
    ``decoder.logits_dense.kernel`` [D, V].
    """
    d, i, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    h, b = cfg.num_heads, cfg.relative_attention_num_buckets
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedder.embedding": (v, d),
        "encoder.relpos_bias.rel_embedding": (h, b),
        "decoder.relpos_bias.rel_embedding": (h, b),
        "encoder.encoder_norm.scale": (d,),
        "decoder.decoder_norm.scale": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["decoder.logits_dense.kernel"] = (d, v)

    def attention(prefix: str) -> None:
        for proj in ("query", "key", "value"):
            shapes[f"{prefix}.{proj}.kernel"] = (d, i)
        shapes[f"{prefix}.out.kernel"] = (i, d)

    def mlp(prefix: str) -> None:
        for name in ("wi_0", "wi_1") if cfg.gated else ("wi",):
            shapes[f"{prefix}.{name}.kernel"] = (d, f)
        shapes[f"{prefix}.wo.kernel"] = (f, d)

    for layer in range(cfg.num_encoder_layers):
        p = f"encoder.layers_{layer}"
        shapes[f"{p}.pre_attention_layer_norm.scale"] = (d,)
        attention(f"{p}.attention")
        shapes[f"{p}.pre_mlp_layer_norm.scale"] = (d,)
        mlp(f"{p}.mlp")
    for layer in range(cfg.num_decoder_layers):
        p = f"decoder.layers_{layer}"
        shapes[f"{p}.pre_self_attention_layer_norm.scale"] = (d,)
        attention(f"{p}.self_attention")
        shapes[f"{p}.pre_cross_attention_layer_norm.scale"] = (d,)
        attention(f"{p}.encoder_decoder_attention")
        shapes[f"{p}.pre_mlp_layer_norm.scale"] = (d,)
        mlp(f"{p}.mlp")
    return shapes


def random_t5x_params(
    cfg: T5Config, seed: int = 0, dtype: SaveDtype = "float32"
) -> dict[str, np.ndarray]:
    """Random parameters with t5x's names and initialiser scales (T5's fan-in scaling).

    Returns flat dotted names (under ``target``) to arrays of ``dtype``. Layer-norm scales are
    near 1 (not exactly, so that a misplaced norm file shows in a byte comparison).
    """
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(_NP_DTYPES)}")
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in t5x_param_shapes(cfg).items():
        if name.endswith(".scale"):
            a = 1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)
        elif name == "token_embedder.embedding":
            a = rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("rel_embedding"):
            a = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            fan_in = shape[0]
            if name.endswith("query.kernel"):
                fan_in *= cfg.d_kv  # t5x folds 1/sqrt(d_kv) into the query initialiser
            a = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        out[name] = a.astype(_NP_DTYPES[dtype])
    return out


def gin_config(cfg: T5Config, extra: Iterable[str] = ()) -> str:
    """A config.gin with the macros and ``network.T5Config`` bindings t5x training writes."""
    act = cfg.activation
    acts = f"('{act}', 'linear')" if cfg.gated else f"('{act}',)"
    lines = [
        "from __gin__ import dynamic_registration",
        "from t5x.examples.t5 import network",
        "",
        f"NUM_EMBEDDINGS = {cfg.vocab_size}",
        f"EMBED_DIM = {cfg.d_model}",
        f"NUM_HEADS = {cfg.num_heads}",
        f"HEAD_DIM = {cfg.d_kv}",
        f"MLP_DIM = {cfg.d_ff}",
        f"NUM_ENCODER_LAYERS = {cfg.num_encoder_layers}",
        f"NUM_DECODER_LAYERS = {cfg.num_decoder_layers}",
        "DROPOUT_RATE = 0.0",
        "",
        "network.T5Config:",
        "  vocab_size = %NUM_EMBEDDINGS",
        "  emb_dim = %EMBED_DIM",
        "  num_heads = %NUM_HEADS",
        "  num_encoder_layers = %NUM_ENCODER_LAYERS",
        "  num_decoder_layers = %NUM_DECODER_LAYERS",
        "  head_dim = %HEAD_DIM",
        "  mlp_dim = %MLP_DIM",
        f"  mlp_activations = {acts}",
        "  dropout_rate = %DROPOUT_RATE",
        f"  logits_via_embedding = {cfg.tie_word_embeddings}",
        "  dtype = 'bfloat16'",
        *extra,
    ]
    return "\n".join(lines) + "\n"
