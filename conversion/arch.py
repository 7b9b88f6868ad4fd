"""The model's architecture, from the checkpoint's shapes, completed by config.gin.

Shapes tell almost everything (t5x-checkpoint-format.md section 3): V and D from the embedding,
H and B from a relative-bias table, K = I / H, F from ``wi``/``wi_0``, the depths from the highest
``layers_i``, gated from ``wi_1``, tied from the absence of ``decoder.logits_dense``. What they
cannot tell, the elementwise activation (gelu or silu), comes from ``config.gin`` or a flag; when
neither gives it a default is used and reported as such. Every field records where it came from.

Scanned checkpoints (``t5x/examples/scalable_t5`` with ``scan_layers=True``) stack each kind of
per-layer parameter into one array with a layer axis; :class:`T5Arch` records that so the plan
can unstack it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal

from conversion.ft_format import T5Config

# config.gin is read by conversion.gin_config; parse_gin stays importable from here.
from conversion.gin_config import parse_gin as parse_gin

Source = Literal["shapes", "gin", "flag", "default"]

_LAYER = re.compile(r"^(encoder|decoder)\.layers_(\d+)\.")
# Scanned (scalable_t5) parameter prefixes: scan_with_axes(..., name='layers') stacks every
# layer's parameters under one module, e.g. encoder.layers.attention.query.kernel [D, L, H*K].
SCANNED_PREFIX = {"encoder": "encoder.layers.", "decoder": "decoder.layers."}


class ArchError(ValueError):
    """The parameters do not describe a T5 encoder-decoder we can convert."""


@dataclasses.dataclass(frozen=True)
class T5Arch:
    """What conversion needs to know about the source model.

    Attributes:
      config: the FT model config.
      sources: field name -> where its value came from ("shapes", "gin", "flag", "default").
      scanned: True for scalable_t5 checkpoints with stacked layers.
      scan_axis: the layer axis of stacked parameters (``param_scan_axis``, 1 by default).
    """

    config: T5Config
    sources: dict[str, Source]
    scanned: bool = False
    scan_axis: int = 1

    def inferred(self) -> list[str]:
        """Fields not read from shapes, gin or a flag: defaults that may be wrong."""
        return sorted(k for k, v in self.sources.items() if v == "default")


# --- inference from shapes ---------------------------------------------------------------------


def _shape(params: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    try:
        return tuple(params[name])
    except KeyError:
        raise ArchError(f"missing parameter {name!r}: not a T5X T5 encoder-decoder checkpoint") \
            from None


def infer_arch(
    shapes: Mapping[str, tuple[int, ...]],
    gin: Mapping[str, object] | None = None,
    activation: str | None = None,
) -> T5Arch:
    """Infer the architecture from parameter shapes, then complete and check it with gin.

    Args:
      shapes: parameter name (under ``target``) -> shape.
      gin: values from :func:`parse_gin`, if a config.gin was found.
      activation: a ``feed_forward_proj`` given on the command line; wins over gin.

    Raises ArchError when a needed parameter is missing or gin contradicts the shapes.
    """
    gin = dict(gin or {})
    sources: dict[str, Source] = {}
    scanned = not any(_LAYER.match(n) for n in shapes) and any(
        n.startswith(SCANNED_PREFIX["encoder"]) for n in shapes
    )
    scan_axis = int(gin.get("param_scan_axis", 1))  # type: ignore[arg-type]

    v, d = _shape(shapes, "token_embedder.embedding")
    vals: dict[str, object] = {"vocab_size": v, "d_model": d}

    if scanned:
        enc, dec = SCANNED_PREFIX["encoder"], SCANNED_PREFIX["decoder"]
        q = _shape(shapes, f"{enc}attention.query.kernel")
        if len(q) != 3:
            raise ArchError(f"scanned parameter {enc}attention.query.kernel has shape {q}, "
                            "expected [D, layers, H*K]")
        num_enc = q[scan_axis]
        num_dec = _shape(shapes, f"{dec}self_attention.query.kernel")[scan_axis]
        inner = q[-1]
        rel = _scanned_relpos(shapes, "encoder")
        h, b = (rel[0], rel[-1])
        gated = f"{enc}mlp.wi_1.kernel" in shapes
        wi = _shape(shapes, f"{enc}mlp.wi_0.kernel" if gated else f"{enc}mlp.wi.kernel")
        f = wi[-1]
    else:
        depths = {"encoder": 0, "decoder": 0}
        for name in shapes:
            m = _LAYER.match(name)
            if m:
                depths[m.group(1)] = max(depths[m.group(1)], int(m.group(2)) + 1)
        num_enc, num_dec = depths["encoder"], depths["decoder"]
        if not num_enc or not num_dec:
            raise ArchError("missing parameter 'encoder.layers_0.*' or 'decoder.layers_0.*': "
                            "not a T5X T5 encoder-decoder checkpoint")
        h, b = _shape(shapes, "encoder.relpos_bias.rel_embedding")
        inner = _shape(shapes, "encoder.layers_0.attention.query.kernel")[-1]
        gated = "encoder.layers_0.mlp.wi_1.kernel" in shapes
        wi_name = "encoder.layers_0.mlp.wi_0.kernel" if gated else "encoder.layers_0.mlp.wi.kernel"
        f = _shape(shapes, wi_name)[-1]
    if inner % h:
        raise ArchError(f"attention width {inner} is not a multiple of the {h} heads")
    vals.update(num_heads=h, d_kv=inner // h, d_ff=f, num_encoder_layers=num_enc,
                num_decoder_layers=num_dec, relative_attention_num_buckets=b,
                tie_word_embeddings="decoder.logits_dense.kernel" not in shapes)
    sources.update({k: "shapes" for k in vals})

    # What shapes can say, gin must agree with.
    for field, value in gin.items():
        if field in vals and vals[field] != value:
            raise ArchError(f"config.gin sets {field} = {value} but the checkpoint's shapes give "
                            f"{vals[field]}")

    # The activation: shapes give gated or not; the function comes from a flag or gin.
    if activation is not None:
        act, sources["feed_forward_proj"] = activation, "flag"
    elif "feed_forward_proj" in gin:
        act, sources["feed_forward_proj"] = str(gin["feed_forward_proj"]), "gin"
    else:
        # T5 1.1 / Flan-T5 use gated-gelu, T5 1.0 relu: the common cases, reported as defaults.
        act, sources["feed_forward_proj"] = ("gated-gelu" if gated else "relu"), "default"
    if act.startswith("gated-") != gated:
        have = "wi_0/wi_1 (gated)" if gated else "a single wi (not gated)"
        raise ArchError(f"activation {act!r} does not match the checkpoint's MLP, which has {have}")
    vals["feed_forward_proj"] = act
    for field in ("relative_attention_max_distance", "decoder_start_token_id", "eos_token_id"):
        sources[field] = "default"
    try:
        cfg = T5Config(**vals)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ArchError(str(exc)) from exc
    return T5Arch(cfg, sources, scanned=scanned, scan_axis=scan_axis)


def _scanned_relpos(shapes: Mapping[str, tuple[int, ...]], side: str) -> tuple[int, ...]:
    """The (stacked) relative-bias table's shape of a scanned side: [H, (layers,) B]."""
    name = scanned_relpos_name(shapes, side)
    if name is None:
        raise ArchError(f"missing parameter: no relative-bias table for the scanned {side}")
    return tuple(shapes[name])


def scanned_relpos_name(shapes: Mapping[str, tuple[int, ...]], side: str) -> str | None:
    """Where a scanned side keeps its relative-bias table: per layer inside the scanned module
    (scalable_t5: ``<side>.layers.relative_posemb.rel_embedding``, stacked to [H, L, B]) or
    once beside it (``<side>.relpos_bias.rel_embedding``)."""
    prefix = SCANNED_PREFIX[side]
    for name in (f"{prefix}relative_posemb.rel_embedding",
                 f"{side}.relpos_bias.rel_embedding"):
        if name in shapes:
            return name
    return None
