"""SentencePiece encode/decode the way a T5 model expects it.

T5 vocabularies: pad 0, EOS 1, unk 2, no BOS. Inputs end with EOS; when a document is longer than
``max_input_len`` it is cut to ``max_input_len - 1`` pieces and EOS is appended after the cut
(seqio's ``append_eos_after_trim``), so the encoder always sees the end marker. Decoding stops at
the first EOS: whatever the server generated after it is not part of the summary.
"""

from __future__ import annotations

from collections.abc import Sequence

import sentencepiece as spm

EOS_ID = 1
PAD_ID = 0


class VocabError(ValueError):
    """The vocabulary cannot be found or is not a T5-style SentencePiece model."""


class Tokenizer:
    """A SentencePiece model held in memory (so it can be shipped to Ray actors as bytes)."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
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
        return self._sp.get_piece_size()

    def encode(self, text: str, max_len: int) -> list[int]:
        """Token ids of ``text`` ending with EOS, at most ``max_len`` long (``max_len >= 1``)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = self._sp.encode(text)
        return [*ids[: max_len - 1], EOS_ID]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to (not including) the first EOS; pad ids are dropped."""
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i != PAD_ID:
                out.append(i)
        return self._sp.decode(out)


def vocab_location(
    vocab: str | None, model_repository: str | None, model_name: str
) -> str:
    """Where the vocabulary lives: ``--vocab``, else ``<model-repository>/<model-name>/spiece.model``."""
    if vocab:
        return vocab
    if model_repository:
        return f"{model_repository.rstrip('/')}/{model_name}/spiece.model"
    raise VocabError("no vocabulary: give --vocab SPIECE.model or --model-repository DST")


def load_tokenizer(
    vocab: str | None, model_repository: str | None, model_name: str
) -> Tokenizer:
    """Read the vocabulary (local path or gs:// URL) and open it."""
    from conversion import storage

    location = vocab_location(vocab, model_repository, model_name)
    if not storage.exists(location):
        raise VocabError(f"vocabulary {location} does not exist")
    return Tokenizer(storage.read_bytes(location), source=location)
