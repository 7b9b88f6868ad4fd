"""A small SentencePiece vocabulary with T5's special ids, trained from text in memory.

T5 vocabularies reserve pad=0, eos=1, unk=2 and have no BOS; the decoder starts from id 0
(the pad id) and stops at 1. Training is single-threaded with a fixed seed-free algorithm
(unigram EM over the given sentences, no sampling, no shuffling), so the same texts give a
byte-identical model file.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train_sentencepiece(texts: Iterable[str], model_path: Path, vocab_size: int) -> Path:
    """Train a unigram SentencePiece model on ``texts`` and write it to ``model_path``.

    Args:
      texts: sentences or documents; newlines split a document into sentences.
      model_path: where the ``.model`` file goes (parent folders are created).
      vocab_size: the number of pieces, including pad, eos and unk.

    Returns:
      ``model_path``.

    Raises:
      ValueError: no text, or a vocabulary size the text cannot support (SentencePiece's own
        message says which size would fit).
    """
    sentences = [line.strip() for text in texts for line in str(text).splitlines()]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("train_sentencepiece: no text to train on")
    if vocab_size < 8:
        raise ValueError(f"train_sentencepiece: vocab_size {vocab_size} is too small")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            # Determinism: one thread, keep every sentence, in order.
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            character_coverage=1.0,
            # Long documents arrive as one "sentence" per paragraph; do not drop them.
            max_sentence_length=1 << 16,
            # The default normalizer folds compatibility characters the same way T5's does.
            normalization_rule_name="nmt_nfkc",
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(f"train_sentencepiece: {str(exc).splitlines()[0]}") from exc
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(model_path)
    return model_path


def load(model_path: Path) -> spm.SentencePieceProcessor:
    """Open a trained model, checking it has T5's special ids."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    if (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) != (PAD_ID, EOS_ID, UNK_ID, -1):
        raise ValueError(
            f"{model_path}: special ids pad/eos/unk/bos are "
            f"{(sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id())}, expected (0, 1, 2, -1)"
        )
    return sp
