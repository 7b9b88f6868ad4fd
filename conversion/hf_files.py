"""The small files of a Hugging Face T5 folder, written by the driver once every shard is:
the shard index, generation_config.json and the tokenizer (config.json, the folder's
completion mark, is written by :mod:`conversion.run` last).

The tokenizer is the SentencePiece model as ``spiece.model`` (what transformers' T5Tokenizer
loads and names its vocabulary file, ``VOCAB_FILES_NAMES`` in models/t5/tokenization_t5.py)
with a ``tokenizer_config.json`` naming the class, T5's special tokens and the sentinel count
(``extra_ids``): T5's vocabularies give the model 100 sentinel ids after the SentencePiece
pieces (seqio ``extra_ids=100``, vocab_size 32128 = 32000 + 100 + padding), so 100 is written
when the embedding has room for them after the pieces, else 0.
"""

from __future__ import annotations

import json

from conversion.hf_plan import shard_tensors
from conversion.plan import ConversionPlan
from core import hf_format, storage

SPIECE = "spiece.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
T5_SENTINELS = 100


def known_files() -> tuple[str, ...]:
    """The folder's files that are not shards (a verify does not report them as foreign)."""
    return (hf_format.INDEX, hf_format.CONFIG, hf_format.GENERATION_CONFIG, SPIECE,
            TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)


def extra_ids(vocab_bytes: bytes, vocab_size: int) -> int:
    """The sentinel count of a SentencePiece model serving an embedding of ``vocab_size``."""
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_proto=vocab_bytes).get_piece_size()
    return T5_SENTINELS if vocab_size >= pieces + T5_SENTINELS else 0


def tokenizer_files(vocab_bytes: bytes, vocab_size: int) -> dict[str, str]:
    """tokenizer_config.json and special_tokens_map.json for T5Tokenizer over ``spiece.model``."""
    n = extra_ids(vocab_bytes, vocab_size)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": [f"<extra_id_{i}>" for i in range(n)]}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": n, "model_max_length": 512,
              "clean_up_tokenization_spaces": False, **special}
    return {TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n",
            SPECIAL_TOKENS_MAP: json.dumps(special, indent=2) + "\n"}


def write_model_files(plan: ConversionPlan, out_dir: str, vocab: str | None) -> None:
    """The index, generation_config.json and (with a vocabulary) the tokenizer files."""
    storage.write_text(storage.join(out_dir, hf_format.INDEX),
                       hf_format.index_json(shard_tensors(plan), plan.weight_dtype))
    storage.write_text(storage.join(out_dir, hf_format.GENERATION_CONFIG),
                       hf_format.generation_config_json(plan.config))
    if vocab:
        data = storage.read_bytes(vocab)
        storage.write_bytes(storage.join(out_dir, SPIECE), data)
        for name, text in tokenizer_files(data, plan.config.vocab_size).items():
            storage.write_text(storage.join(out_dir, name), text)
