"""SentencePiece encode/decode the way a T5 model expects it.

T5 vocabularies: pad 0, EOS 1, unk 2, no BOS. Inputs end with EOS; when a document is longer than
``max_input_len`` it is cut to ``max_input_len - 1`` pieces and EOS is appended after the cut
(seqio's ``append_eos_after_trim``), so the encoder always sees the end marker.

Decoding follows seqio's ``Vocabulary.decode`` / ``SentencePieceVocabulary._decode``
(seqio/vocabularies.py): every id at or beyond the vocabulary's piece count becomes the unk id,
the ids are cut after the first EOS, and SentencePiece decodes the rest (control pieces such as
pad 0 and EOS decode to nothing, unk to SentencePiece's unk surface " \u2047 "). A T5's output layer
has more logits than the vocabulary has pieces (T5 1.1: 32128 logits, 32000 pieces), so a served
model can emit such ids; they are text, not errors.

The model's logit count is its config.ini ``vocab_size``, found from the model repository the
way serving finds it (:func:`model_vocab_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import sentencepiece as spm

from core.errors import UserError

if TYPE_CHECKING:
    from core.repository import ConvertedModel

EOS_ID = 1
PAD_ID = 0


class VocabError(UserError, ValueError):
    """The vocabulary cannot be found or is not a T5-style SentencePiece model."""


class Tokenizer:
    """A SentencePiece model held in memory (so it can be shipped to Ray actors as bytes)."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        """Load a serialized SentencePiece model; ``source`` names it in errors.

        Raises:
          VocabError: not a SentencePiece model, or not T5's special ids.
        """
        self.model_proto = model_proto
        self.source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
            raise VocabError(f"{source}: not a SentencePiece model ({exc})") from exc
        if self._sp.eos_id() != EOS_ID:
            raise VocabError(
                f"{source}: EOS id is {self._sp.eos_id()}, a T5 vocabulary has EOS {EOS_ID}"
            )

    @property
    def vocab_size(self) -> int:
        """Pieces in the SentencePiece model (seqio's ``_base_vocab_size``, no extra ids)."""
        return self._sp.get_piece_size()

    def encode(self, text: str, max_len: int) -> list[int]:
        """Token ids of ``text`` ending with EOS, at most ``max_len`` long (``max_len >= 1``)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = self._sp.encode(text)
        return [*ids[: max_len - 1], EOS_ID]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` as seqio's ``SentencePieceVocabulary.decode`` gives it.

        Same steps as seqio (vocabularies.py, ``Vocabulary.decode``): ids at or beyond the
        piece count -> unk id; cut just after the first EOS; SentencePiece ``DecodeIds``, which
        renders pad and EOS (control pieces) as nothing. Never raises for an id the server can
        send (any non-negative integer).

        The vocabulary is the bare spiece.model, i.e. seqio's ``SentencePieceVocabulary`` with
        ``extra_ids=0``: sentinel ids (T5 1.1's 32000..32099) are beyond it and decode as unk.
        (With ``extra_ids=100`` seqio would add pieces "<extra_id_N>" and print those instead.)
        """
        pieces, unk = self._sp.get_piece_size(), self._sp.unk_id()
        clean = [unk if int(i) >= pieces else int(i) for i in ids]
        if EOS_ID in clean:
            clean = clean[: clean.index(EOS_ID) + 1]
        return self._sp.decode_ids(clean)


def vocab_location(
    vocab: str | None, model_repository: str | None, model_name: str
) -> str:
    """Where the vocabulary lives: ``--vocab``, else ``<model-repository>/<model-name>/spiece.model``."""
    if vocab:
        return vocab
    if model_repository:
        from core.repository import vocab_url

        return vocab_url(model_repository, model_name)
    raise VocabError("no vocabulary: give --vocab SPIECE.model or --model-repository DST")


def load_tokenizer(
    vocab: str | None, model_repository: str | None, model_name: str
) -> Tokenizer:
    """Read the vocabulary (local path or gs:// URL) and open it."""
    from core import storage

    location = vocab_location(vocab, model_repository, model_name)
    if not storage.exists(location):
        hint = "" if vocab else (
            ": the conversion wrote none (it copies --vocab, or the SentencePiece model its "
            "config.gin names when that can be read); pass --vocab SPIECE.model")
        raise VocabError(f"vocabulary {location} does not exist{hint}")
    return Tokenizer(storage.read_bytes(location), source=location)


def open_model(model_repository: str, model_name: str) -> ConvertedModel | None:
    """The repository's handle for ``model_name`` (core.repository); None when it has no
    config.pbtxt.

    Raises:
      VocabError: the file is there but is not a readable ModelConfig.
    """
    from google.protobuf import text_format

    from core.repository import ConvertedModel, config_url

    try:
        return ConvertedModel.find(model_repository, model_name)
    except text_format.ParseError as exc:
        raise VocabError(f"{config_url(model_repository, model_name)}: unreadable config.pbtxt "
                         f"({exc})") from exc


def model_vocab_size(model_repository: str, model_name: str) -> tuple[int, str] | None:
    """(config.ini ``vocab_size``, that config.ini's location), or None when there is none.

    ``vocab_size`` is the number of logits the model's output layer has: the ids it can emit.
    The config.ini is the one the served model loads (core.repository.ConvertedModel).
    """
    from core import storage
    from core.repository import ConvertedModel

    # No config.pbtxt: the folder a conversion at T=1 writes.
    model = (open_model(model_repository, model_name)
             or ConvertedModel.unconfigured(model_repository, model_name))
    ini = model.config_ini_url
    if not storage.exists(ini):
        return None
    try:
        cfg, _ = model.config_ini()
    except (ValueError, KeyError) as exc:
        raise VocabError(f"{ini}: unreadable config.ini ({exc})") from exc
    return cfg.vocab_size, ini


def check_vocab_fits(tokenizer: Tokenizer, model_vocab: int, ini: str) -> str:
    """A line comparing the vocabulary with the model's logits; VocabError when it cannot fit.

    Fewer pieces than logits is normal (T5 1.1: 32000 pieces, 32128 logits): the extra ids
    decode as unk. More pieces than logits means the vocabulary belongs to another model.
    """
    pieces = tokenizer.vocab_size
    if pieces > model_vocab:
        raise VocabError(
            f"vocabulary {tokenizer.source} has {pieces} pieces but the model has only "
            f"{model_vocab} logits (vocab_size in {ini}): it is not this model's vocabulary"
        )
    if pieces == model_vocab:
        return f"vocabulary {pieces} pieces = model vocab_size {model_vocab}"
    return (f"vocabulary {pieces} pieces, model vocab_size {model_vocab}: the "
            f"{model_vocab - pieces} ids {pieces}..{model_vocab - 1} decode as unk")
