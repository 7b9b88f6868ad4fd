"""config.gin, read with gin-config's own parser, without importing what it configures.

Two styles reach the converter (docs/gin.md):

- what t5x training writes into the model directory, ``gin.config_str()``: imports
  (``from __gin__ import dynamic_registration``, ``from t5x.examples.t5 import network``), a
  macro section, then fully qualified bindings (``network.T5Config.emb_dim = 768``), long values
  continued on the next line after a backslash;
- hand-written configs such as the UL2 release's: ``NUM_EMBEDDINGS = 32128``-style macros,
  ``network.T5Config:`` blocks, ``%MACRO`` references, comments and ``include`` lines.

:class:`gin.config_parser.ConfigParser` turns the text into statements; its delegate here
keeps ``@name``/``@name()`` and ``%MACRO`` as plain values (:class:`Reference`, :class:`Macro`)
instead of looking them up in gin's registry, so nothing t5x, seqio or flaxformer registers
has to be importable. Macros are resolved afterwards, chains included.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tokenize
from typing import Any

from gin import config_parser

from core import storage
from core.errors import UserError

# Where each size may be bound, first match wins: t5x's T5Config (t5x/examples/t5/network.py,
# scalable_t5/network.py), flaxformer's modules (the UL2 release's architecture), then the
# macros those configs define the sizes with.
_SIZES: dict[str, tuple[tuple[str, str], tuple[str, str], str]] = {
    "vocab_size": (("T5Config", "vocab_size"), ("Embed", "num_embeddings"), "NUM_EMBEDDINGS"),
    "d_model": (("T5Config", "emb_dim"), ("Embed", "features"), "EMBED_DIM"),
    "d_kv": (("T5Config", "head_dim"), ("MultiHeadDotProductAttention", "head_dim"), "HEAD_DIM"),
    "d_ff": (("T5Config", "mlp_dim"), ("MlpBlock", "intermediate_dim"), "MLP_DIM"),
    "num_heads": (("T5Config", "num_heads"), ("MultiHeadDotProductAttention", "num_heads"),
                  "NUM_HEADS"),
    "num_encoder_layers": (("T5Config", "num_encoder_layers"), ("Encoder", "num_layers"),
                           "NUM_ENCODER_LAYERS"),
    "num_decoder_layers": (("T5Config", "num_decoder_layers"), ("Decoder", "num_layers"),
                           "NUM_DECODER_LAYERS"),
}
# Flax's swish is silu; FT and Hugging Face call it silu.
_ACTIVATION_NAMES = {"swish": "silu"}
_MAX_INCLUDE_DEPTH = 16
_MAX_MACRO_CHAIN = 32


class GinError(UserError, ValueError):
    """config.gin is not valid gin syntax (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """A configurable reference, ``@name`` or ``@name()`` (``evaluate``), kept by name."""

    name: str
    evaluate: bool

    def __str__(self) -> str:
        return f"@{self.name}{'()' if self.evaluate else ''}"


@dataclasses.dataclass(frozen=True)
class Macro:
    """A ``%name`` reference that no macro binding defines (``%gin.REQUIRED``, a cycle)."""

    name: str

    def __str__(self) -> str:
        return f"%{self.name}"


class _KeepReferences(config_parser.ParserDelegate):
    """Gin's parser asks its delegate what ``@x`` and ``%X`` mean; we keep them as written."""

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> Reference:
        """``@name`` (or ``@name()``): kept as a Reference."""
        return Reference(scoped_configurable_name, evaluate)

    def macro(self, macro_name: str) -> Macro:
        """``%NAME``: kept as a Macro."""
        return Macro(macro_name)


@dataclasses.dataclass
class GinConfig:
    """The statements of a config.gin (and of the includes it could read), in effect order.

    Attributes:
      url: where it was read from (None for a string).
      bindings: (scope, configurable selector, parameter) -> value as written; a later binding
        replaces an earlier one, as in gin.
      macros: macro name (``scope/NAME`` when scoped) -> value as written.
      imports: the import lines, e.g. ``from t5x.examples.t5 import network``.
      includes: the included files that were read.
      warnings: what could not be read but did not stop the reading (absent includes).
    """

    url: str | None = None
    bindings: dict[tuple[str, str, str], Any] = dataclasses.field(default_factory=dict)
    macros: dict[str, Any] = dataclasses.field(default_factory=dict)
    imports: list[str] = dataclasses.field(default_factory=list)
    includes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def resolve(self, value: Any) -> Any:
        """``value`` with every ``%MACRO`` replaced by its value (through chains of macros,
        inside tuples, lists and dicts); undefined or cyclic macros stay :class:`Macro`."""
        for _ in range(_MAX_MACRO_CHAIN):
            if not (isinstance(value, Macro) and value.name in self.macros):
                break
            value = self.macros[value.name]
        if isinstance(value, tuple | list):
            return type(value)(self.resolve(v) for v in value)
        if isinstance(value, dict):
            return {self.resolve(k): self.resolve(v) for k, v in value.items()}
        return value

    def lookup(self, configurable: str, parameter: str) -> Any:
        """The resolved value bound to ``configurable.parameter``, or None.

        ``configurable`` matches its selector with or without module (``T5Config`` matches
        ``network.T5Config`` and ``t5x.examples.t5.network.T5Config``). Scopes: a binding in a
        scope the config references the configurable under (``@scope/network.T5Config()``)
        wins, then the unscoped binding, then a scoped one if all scoped ones agree.
        """
        found: dict[str, Any] = {}
        for (scope, selector, param), value in self.bindings.items():
            if param == parameter and _names(selector, configurable):
                found[scope] = self.resolve(value)
        for scope in [*self._reference_scopes(configurable), ""]:
            if scope in found:
                return found[scope]
        distinct = {repr(v): v for v in found.values()}
        return next(iter(distinct.values())) if len(distinct) == 1 else None

    def _reference_scopes(self, configurable: str) -> list[str]:
        """Scopes of ``@scope/x.Configurable`` references, innermost first (``a/b``, ``a``)."""
        scopes: list[str] = []

        def visit(value: Any) -> None:
            if isinstance(value, Reference) and "/" in value.name:
                scope, selector = value.name.rsplit("/", 1)
                if _names(selector, configurable):
                    parts = scope.split("/")
                    scopes.extend("/".join(parts[:i]) for i in range(len(parts), 0, -1))
            elif isinstance(value, tuple | list):
                for v in value:
                    visit(v)
            elif isinstance(value, dict):
                for v in value.values():
                    visit(v)

        for value in [*self.bindings.values(), *self.macros.values()]:
            visit(self.resolve(value))
        return list(dict.fromkeys(scopes))

    def macro(self, name: str) -> Any:
        """The resolved value of the unscoped macro ``name``, or None."""
        return self.resolve(self.macros[name]) if name in self.macros else None

    @property
    def vocab_file(self) -> str | None:
        """``seqio.SentencePieceVocabulary.sentencepiece_model_file``, when bound to a string."""
        value = self.lookup("SentencePieceVocabulary", "sentencepiece_model_file")
        return value if isinstance(value, str) and value else None

    @property
    def feature_lengths(self) -> dict[str, int] | None:
        """The sequence lengths the model was trained with, as t5x's run configs give them:
        the ``TASK_FEATURE_LENGTHS`` macro, else ``DatasetConfig.task_feature_lengths``."""
        value = self.macro("TASK_FEATURE_LENGTHS") or \
            self.lookup("DatasetConfig", "task_feature_lengths")
        if not isinstance(value, dict):
            return None
        lengths = {str(k): v for k, v in value.items() if _is_int(v)}
        return lengths or None

    def t5_values(self) -> dict[str, object]:
        """What this config says about the model, under :func:`parse_gin`'s keys."""
        out: dict[str, object] = {}
        for key, (t5x, flaxformer, macro) in _SIZES.items():
            values = (self.lookup(*t5x), self.lookup(*flaxformer), self.macro(macro))
            value = next((v for v in values if _is_int(v)), None)
            if value is not None:
                out[key] = value
        acts = (self.lookup("T5Config", "mlp_activations") or self.lookup("T5Config", "activations")
                or self.lookup("MlpBlock", "activations"))  # flaxformer (the UL2 release)
        proj = _feed_forward_proj(acts)
        if proj:
            out["feed_forward_proj"] = proj
        tied = self.lookup("T5Config", "logits_via_embedding")
        if isinstance(tied, bool):
            out["tie_word_embeddings"] = tied
        scan = self.lookup("T5Config", "scan_layers")
        if isinstance(scan, bool):
            out["scan_layers"] = scan
        axis = self.lookup("T5Config", "param_scan_axis")
        if _is_int(axis):
            out["param_scan_axis"] = axis
        if self.vocab_file:
            out["vocab_file"] = self.vocab_file
        return out


def _names(selector: str, configurable: str) -> bool:
    return selector == configurable or selector.endswith("." + configurable)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _feed_forward_proj(acts: Any) -> str | None:
    """('silu', 'linear') -> gated-silu; ('relu',) or 'relu' -> relu (t5x's mlp_activations:
    more than one activation means a gated MLP, the first one is the function)."""
    if isinstance(acts, str):
        acts = (acts,)
    if not (isinstance(acts, tuple | list) and acts and all(isinstance(a, str) for a in acts)):
        return None
    name = _ACTIVATION_NAMES.get(acts[0], acts[0])
    return f"gated-{name}" if len(acts) > 1 else name


def read_gin(text: str, url: str | None = None) -> GinConfig:
    """Parse a config.gin with gin's parser.

    Args:
      text: the file's contents.
      url: where it came from (local path or gs:// URL); relative includes are looked up in
        its folder first, then as written (relative to the working directory, as gin does).

    Includes that cannot be read are recorded in ``warnings`` and skipped: what they would
    have said is then inferred from the checkpoint's shapes, and reported as such.

    Raises:
      GinError: the text (or an included file) is not valid gin syntax.
    """
    config = GinConfig(url=url)
    _parse_into(config, text, url, depth=0)
    return config


def parse_gin(text: str, url: str | None = None) -> dict[str, object]:
    """The values a T5X config.gin gives for T5Config fields (those it binds; others absent).

    Keys: vocab_size, d_model, d_kv, d_ff, num_heads, num_encoder_layers, num_decoder_layers,
    feed_forward_proj, tie_word_embeddings, param_scan_axis, scan_layers and vocab_file. Read
    from ``network.T5Config`` bindings (any form: dotted, block, scoped, module-qualified),
    else flaxformer's (``embedding.Embed.features``, ``dense.MlpBlock.activations``, ...),
    else the UL2 release's macros (``NUM_EMBEDDINGS``, ``EMBED_DIM``, ...); docs/gin.md. Use
    :func:`read_gin` to also see the warnings (includes that could not be read).
    """
    return read_gin(text, url).t5_values()


def _parse_into(config: GinConfig, text: str, url: str | None, depth: int) -> None:
    where = url or "config.gin"
    try:
        for statement in config_parser.ConfigParser(text, _KeepReferences()):
            if isinstance(statement, config_parser.BindingStatement):
                scope, selector, param = statement.scope, statement.selector, statement.arg_name
                if not param:  # "NAME = value" defines a macro (gin binds NAME/macro.value)
                    config.macros[f"{scope}/{selector}" if scope else selector] = statement.value
                else:
                    config.bindings[(scope, selector, param)] = statement.value
            elif isinstance(statement, config_parser.ImportStatement):
                config.imports.append(statement.format())
            elif isinstance(statement, config_parser.IncludeStatement):
                _include(config, statement.filename, url, depth)
    except SyntaxError as exc:  # gin's parser reports every syntax problem this way
        line = f" line {exc.lineno}" if exc.lineno else ""
        raise GinError(f"{where}{line}: {exc.msg}") from None
    except (tokenize.TokenError, ValueError) as exc:
        raise GinError(f"{where}: {exc}") from None


def _include(config: GinConfig, filename: str, url: str | None, depth: int) -> None:
    """Read ``include 'filename'`` in place, or record why it could not be read."""
    if depth >= _MAX_INCLUDE_DEPTH:
        config.warnings.append(f"include '{filename}' skipped: includes nested more than "
                               f"{_MAX_INCLUDE_DEPTH} deep")
        return
    candidates = [filename]
    if url and not (storage.is_gcs(filename) or posixpath.isabs(filename)):
        folder = url.rstrip("/").rsplit("/", 1)[0] if "/" in url else ""
        if folder:
            candidates.insert(0, storage.join(folder, filename))
    problems = []
    for candidate in candidates:
        try:
            if not storage.exists(candidate):
                continue
            text = storage.read_text(candidate)
        except Exception as exc:  # e.g. no GCS credentials: reported, like an absent file
            problems.append(f"{candidate}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            continue
        config.includes.append(candidate)
        _parse_into(config, text, candidate, depth + 1)
        return
    why = f"; {'; '.join(problems)}" if problems else ""
    config.warnings.append(f"include '{filename}' not found (looked for "
                           f"{', '.join(candidates)}{why}); its bindings were not read")
