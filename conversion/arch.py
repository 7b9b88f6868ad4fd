"""The model's architecture, from the checkpoint's shapes, completed by config.gin.

Shapes tell almost everything (t5x-checkpoint-format.md section 3): V and D from the embedding,
H and B from a relative-bias table, K = I / H, F from ``wi``/``wi_0``, the depths from the highest
``layers_i``, gated from ``wi_1``, tied from the absence of ``decoder.logits_dense``. What they
cannot tell, the elementwise activation (gelu or silu), comes from ``config.gin`` or a flag; when
neither gives it a default is used and reported as such. Every field records where it came from.

Scanned checkpoints (``t5x/examples/scalable_t5`` with ``scan_layers=True``) stack each kind of
per-layer parameter into one array with a layer axis at ``param_scan_axis``; :class:`T5Arch`
records the naming and the axis so the plan can unstack it. Two namings are read:

- current t5x: ``scan_with_axes(..., name='encoder')`` inside the ``encoder`` module, so
  ``encoder.encoder.attention.query.kernel``; attention kernels keep heads on their own axis
  ([D, H, K] and [H, K, D] per layer) and every layer has its own relative-bias table
  (``encoder.encoder.relpos_bias.rel_embedding``, [H, B] per layer);
- older: ``encoder.layers.*`` with flattened [D, H*K] kernels and the tables either per layer
  (``encoder.layers.relative_posemb.rel_embedding``) or once (``encoder.relpos_bias``).

The scan axis comes from a flag, else config.gin, else the shapes where only one axis fits
every stacked parameter; otherwise a flag is asked for. ``sources["param_scan_axis"]`` says
which.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal

import numpy as np

# config.gin is read by conversion.gin_config; parse_gin stays importable from here.
from conversion.gin_config import parse_gin as parse_gin
from core.errors import UserError
from core.t5config import T5Config

Source = Literal["shapes", "gin", "flag", "default"]

_LAYER = re.compile(r"^(encoder|decoder)\.layers_(\d+)\.")
# Scanned (scalable_t5) parameter prefixes, by naming. Current t5x names the scanned module
# like its parent (network.py: scan_with_axes(...)(config=cfg, name='encoder')), e.g.
# encoder.encoder.attention.query.kernel [D, L, H, K] at param_scan_axis=1; older checkpoints
# used name='layers', e.g. encoder.layers.attention.query.kernel [D, L, H*K].
SCANNED_PREFIXES: dict[str, dict[str, str]] = {
    "current": {"encoder": "encoder.encoder.", "decoder": "decoder.decoder."},
    "layers": {"encoder": "encoder.layers.", "decoder": "decoder.layers."},
}
SCANNED_PREFIX = SCANNED_PREFIXES["layers"]
# Where a scanned layer keeps its relative-bias table (per layer, stacked): current t5x's
# EncoderLayer/DecoderLayer own a RelativePositionBiases named 'relpos_bias'.
_SCANNED_RELPOS = ("relpos_bias.rel_embedding", "relative_posemb.rel_embedding")
FLAG_HINT = "--param-scan-axis"


class ArchError(UserError, ValueError):
    """The parameters do not describe a T5 encoder-decoder we can convert."""


@dataclasses.dataclass(frozen=True)
class T5Arch:
    """What conversion needs to know about the source model.

    Attributes:
      config: the FT model config.
      sources: field name -> where its value came from ("shapes", "gin", "flag", "default").
      scanned: True for scalable_t5 checkpoints with stacked layers.
      scan_axis: the layer axis of stacked parameters (``param_scan_axis``, 1 by default).
      scan_prefix: side -> the stacked parameters' name prefix (``SCANNED_PREFIXES``).
    """

    config: T5Config
    sources: dict[str, Source]
    scanned: bool = False
    scan_axis: int = 1
    scan_prefix: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(SCANNED_PREFIX))

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
    param_scan_axis: int | None = None,
) -> T5Arch:
    """Infer the architecture from parameter shapes, then complete and check it with gin.

    Args:
      shapes: parameter name (under ``target``) -> shape.
      gin: values from :func:`parse_gin`, if a config.gin was found.
      activation: a ``feed_forward_proj`` given on the command line; wins over gin.
      param_scan_axis: the layer axis of a scanned checkpoint given on the command line; wins
        over gin's ``param_scan_axis``. Ignored for unscanned checkpoints.

    Raises ArchError when a needed parameter is missing, gin contradicts the shapes, or the
    scan axis of a scanned checkpoint is neither given nor told apart by the shapes.
    """
    gin = dict(gin or {})
    sources: dict[str, Source] = {}
    prefix = _scanned_naming(shapes)
    scanned = prefix is not None

    v, d = _shape(shapes, "token_embedder.embedding")
    vals: dict[str, object] = {"vocab_size": v, "d_model": d}
    scan_axis = 1
    if prefix is not None:
        scan_axis, sources["param_scan_axis"] = _scan_axis(shapes, prefix, d, gin,
                                                           param_scan_axis)
        enc, dec = prefix["encoder"], prefix["decoder"]
        q = _unstacked(shapes, f"{enc}attention.query.kernel", scan_axis)
        num_enc = _shape(shapes, f"{enc}attention.query.kernel")[scan_axis]
        num_dec = _shape(shapes, f"{dec}self_attention.query.kernel")[scan_axis]
        inner = int(np.prod(q[1:]))
        h, b = _relpos_table_shape(shapes, prefix, "encoder", scan_axis)
        gated = f"{enc}mlp.wi_1.kernel" in shapes
        f = _unstacked(shapes, f"{enc}mlp.wi_0.kernel" if gated else f"{enc}mlp.wi.kernel",
                       scan_axis)[-1]
    else:
        depths = {"encoder": 0, "decoder": 0}
        for name in shapes:
            m = _LAYER.match(name)
            if m:
                depths[m.group(1)] = max(depths[m.group(1)], int(m.group(2)) + 1)
        num_enc, num_dec = depths["encoder"], depths["decoder"]
        if not num_enc or not num_dec:
            raise ArchError("missing parameter 'encoder.layers_0.*' or 'decoder.layers_0.*' "
                            "(unscanned) and 'encoder.encoder.*' or 'encoder.layers.*' "
                            "(scanned): not a T5X T5 encoder-decoder checkpoint")
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
    return T5Arch(cfg, sources, scanned=scanned, scan_axis=scan_axis,
                  scan_prefix=prefix or dict(SCANNED_PREFIX))


# --- scanned checkpoints -----------------------------------------------------------------------


def _scanned_naming(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str] | None:
    """The stacked parameters' prefixes of a scanned checkpoint; None when it is unscanned."""
    if any(_LAYER.match(n) for n in shapes):
        return None
    for prefix in SCANNED_PREFIXES.values():
        if any(n.startswith(prefix["encoder"]) for n in shapes):
            return dict(prefix)
    return None


def _unstacked(shapes: Mapping[str, tuple[int, ...]], name: str, axis: int) -> tuple[int, ...]:
    """One layer's shape of a stacked parameter: its shape without the layer axis."""
    shape = _shape(shapes, name)
    return shape[:axis] + shape[axis + 1:]


def _relpos_table_shape(shapes: Mapping[str, tuple[int, ...]], prefix: Mapping[str, str],
                        side: str, axis: int) -> tuple[int, ...]:
    """One relative-bias table's shape [H, B] of a scanned side."""
    name = scanned_relpos_name(shapes, side, prefix)
    if name is None:
        raise ArchError(f"missing parameter {prefix[side]}relpos_bias.rel_embedding: no "
                        f"relative-bias table for the scanned {side}")
    return _unstacked(shapes, name, axis) if name.startswith(prefix[side]) else _shape(shapes, name)


def _axis_fits(shapes: Mapping[str, tuple[int, ...]], prefix: Mapping[str, str], d: int,
               axis: int) -> bool:
    """Whether every stacked parameter reads as a T5 layer with its layer axis at ``axis``.

    Each side needs one layer count; per layer, norms are [D], q/k/v [D, H*K] or [D, H, K],
    out [H*K, D] or [H, K, D], wi [D, F], wo [F, D] and the tables [H, B], with one H and F.
    """
    stacked = {n: tuple(s) for n, s in shapes.items()
               if n.startswith((prefix["encoder"], prefix["decoder"]))}
    if not stacked or any(len(s) <= axis for s in stacked.values()):
        return False
    for side in ("encoder", "decoder"):
        if len({s[axis] for n, s in stacked.items() if n.startswith(prefix[side])}) > 1:
            return False
    per = {n: s[:axis] + s[axis + 1:] for n, s in stacked.items()}
    tables = [s for n, s in per.items() if n.endswith(_SCANNED_RELPOS)]
    tables += [tuple(shapes[n]) for n in ("encoder.relpos_bias.rel_embedding",)
               if n in shapes and not tables]
    if not tables or len(set(tables)) > 1 or len(tables[0]) != 2:
        return False
    h = tables[0][0]
    f = {s[-1] for n, s in per.items() if n.endswith(("wi.kernel", "wi_0.kernel", "wi_1.kernel"))}
    for n, s in per.items():
        kind = n.rsplit(".", 2)[-2]
        if n.endswith(".scale"):
            ok = s == (d,)
        elif kind in ("query", "key", "value"):
            ok = s[0] == d and ((len(s) == 3 and s[1] == h) or (len(s) == 2 and s[1] % h == 0))
        elif kind == "out":
            ok = s[-1] == d and ((len(s) == 3 and s[0] == h) or (len(s) == 2 and s[0] % h == 0))
        elif kind in ("wi", "wi_0", "wi_1"):
            ok = len(s) == 2 and s[0] == d and len(f) == 1
        elif kind == "wo":
            ok = len(s) == 2 and s[1] == d and {s[0]} == f
        else:  # the tables, checked above
            ok = True
        if not ok:
            return False
    return True


def _scan_axis(shapes: Mapping[str, tuple[int, ...]], prefix: Mapping[str, str], d: int,
               gin: Mapping[str, object], flag: int | None) -> tuple[int, Source]:
    """The layer axis of the stacked parameters and where it came from (flag, gin, shapes)."""
    given: tuple[int, Source] | None = None
    if flag is not None:
        given = (flag, "flag")
    elif "param_scan_axis" in gin:
        given = (int(gin["param_scan_axis"]), "gin")  # type: ignore[call-overload]
    if given is not None:
        axis, source = given
        if axis < 0 or not _axis_fits(shapes, prefix, d, axis):
            where = f"{FLAG_HINT} {axis}" if source == "flag" else (
                f"config.gin sets param_scan_axis = {axis}")
            raise ArchError(f"{where}, but the scanned parameters under "
                            f"{prefix['encoder']!r} do not have their layer axis there")
        return axis, source
    most = min(len(s) for n, s in shapes.items() if n.startswith(prefix["encoder"]))
    fits = [a for a in range(most) if _axis_fits(shapes, prefix, d, a)]
    if len(fits) == 1:
        return fits[0], "shapes"
    if not fits:
        raise ArchError(f"the scanned parameters under {prefix['encoder']!r} have no layer "
                        "axis that fits every one of them: not a scalable_t5 checkpoint")
    raise ArchError(f"the scan axis is ambiguous: axes {' and '.join(map(str, fits))} both fit "
                    "the scanned parameters' shapes and no config.gin sets param_scan_axis; "
                    f"pass {FLAG_HINT} N (t5x's param_scan_axis, 1 by default)")


def scanned_relpos_name(shapes: Mapping[str, tuple[int, ...]], side: str,
                        prefix: Mapping[str, str] | None = None) -> str | None:
    """Where a scanned side keeps its relative-bias table: per layer inside the scanned module
    (current t5x: ``<side>.<side>.relpos_bias.rel_embedding``; older:
    ``<side>.layers.relative_posemb.rel_embedding``; stacked to [H, L, B] at axis 1) or once
    beside it (``<side>.relpos_bias.rel_embedding``)."""
    inside = (prefix or SCANNED_PREFIX)[side]
    for name in (*(inside + n for n in _SCANNED_RELPOS), f"{side}.relpos_bias.rel_embedding"):
        if name in shapes:
            return name
    return None
