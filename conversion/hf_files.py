"""The small files of a Hugging Face T5 folder, written by the driver once every shard is:
the shard index, generation_config.json and the tokenizer (config.json, the folder's
completion mark, is written by :mod:`conversion.run` last).

The tokenizer is what transformers 5.23's ``T5Tokenizer`` writes with ``save_pretrained`` for a
SentencePiece model (models/t5/tokenization_t5.py, convert_slow_tokenizer.py
``SentencePieceExtractor`` and ``T5Converter.convert_from_spm``), built here with the
``tokenizers`` library so that converting needs no transformers:

- ``tokenizer.json``: a Unigram model over the SentencePiece pieces and scores (unk id 2)
  followed by the sentinels ``<extra_id_{N-1}>`` .. ``<extra_id_0>``; the model's
  ``precompiled_charsmap`` normalizer; WhitespaceSplit + Metaspace("▁", always, split)
  pre-tokenizer and Metaspace decoder; ``$A </s>`` post-processor; pad, eos, unk and the
  sentinels as special added tokens.
- ``tokenizer_config.json``: the class, the special tokens, ``extra_ids``.
- ``spiece.model`` itself, the vocabulary file older transformers and other tools read.

The sentinel count: T5's vocabularies give the model 100 sentinel ids after the pieces (seqio
``extra_ids=100``; vocab_size 32128 = 32000 + 100 + padding), so 100 is written when the
embedding has room for them after the pieces, else 0.

The charsmap is read from the model's protobuf (sentencepiece_model.proto: ``ModelProto``
field 3 ``normalizer_spec``, ``NormalizerSpec`` field 2 ``precompiled_charsmap``) through a
descriptor of those two fields built here: the generated modules of sentencepiece and
transformers need a newer protobuf runtime than the one this project pins.
"""

from __future__ import annotations

import json

from conversion.hf_plan import shard_tensors
from conversion.plan import ConversionPlan
from core import hf_format, storage

SPIECE = "spiece.model"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
T5_SENTINELS = 100
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def known_files() -> tuple[str, ...]:
    """The folder's files that are not shards (a verify does not report them as foreign)."""
    return (hf_format.INDEX, hf_format.CONFIG, hf_format.GENERATION_CONFIG, SPIECE, TOKENIZER,
            TOKENIZER_CONFIG)


def precompiled_charsmap(model: bytes) -> bytes:
    """The normalizer's precompiled charsmap of a serialized SentencePiece model (b"" if none)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="t5ft_spm_subset.proto",
                                               package="t5ft_spm", syntax="proto2")
    proto.message_type.add(name="NormalizerSpec").field.add(
        name="precompiled_charsmap", number=2, type=field.TYPE_BYTES,
        label=field.LABEL_OPTIONAL)
    proto.message_type.add(name="ModelProto").field.add(
        name="normalizer_spec", number=3, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
        type_name=".t5ft_spm.NormalizerSpec")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    message = message_factory.GetMessageClass(pool.FindMessageTypeByName("t5ft_spm.ModelProto"))()
    message.ParseFromString(model)  # the fields not described are kept as unknown, unread
    return message.normalizer_spec.precompiled_charsmap


def tokenizer_files(model: bytes, vocab_size: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json for the SentencePiece model ``model`` serving an
    embedding of ``vocab_size`` rows."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    sp = spm.SentencePieceProcessor(model_proto=model)
    pieces = sp.get_piece_size()
    extra = T5_SENTINELS if vocab_size >= pieces + T5_SENTINELS else 0
    sentinels = [f"<extra_id_{i}>" for i in range(extra)]
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(pieces)]
    vocab += [(s, 0.0) for s in reversed(sentinels)]
    tok = Tokenizer(Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    charsmap = precompiled_charsmap(model)
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in (PAD, EOS, UNK, *sentinels)])
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", EOS], pair=["$A", EOS, "$B", EOS],
        special_tokens=[(EOS, tok.token_to_id(EOS))])
    config = {"backend": "tokenizers", "eos_token": EOS, "extra_ids": extra,
              "extra_special_tokens": sentinels, "pad_token": PAD,
              "tokenizer_class": "T5Tokenizer", "unk_token": UNK}
    return {TOKENIZER: tok.to_str(pretty=True),
            TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n"}


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
