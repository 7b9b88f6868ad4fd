"""evaluation.tokenizer with a real SentencePiece model trained by demo.vocab."""

from __future__ import annotations

import shutil

import pytest
import sentencepiece as spm

from evaluation.tokenizer import (
    EOS_ID,
    Tokenizer,
    VocabError,
    check_vocab_fits,
    load_tokenizer,
    model_vocab_size,
    vocab_location,
)


def test_encode_appends_eos_and_truncates(eval_vocab):
    tok = Tokenizer(eval_vocab.read_bytes())
    ids = tok.encode("The Met Office has issued a yellow weather warning.", max_len=512)
    assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
    short = tok.encode("The Met Office has issued a yellow weather warning.", max_len=4)
    assert short == [*ids[:3], EOS_ID]
    assert tok.encode("", max_len=8) == [EOS_ID]


def test_decode_stops_at_eos_and_round_trips(eval_vocab):
    tok = Tokenizer(eval_vocab.read_bytes())
    text = "The Met Office has issued a yellow weather warning for ice across most of Wales."
    ids = tok.encode(text, max_len=512)
    assert tok.decode(ids) == text
    # What a server sends back: tokens, EOS, then whatever padding or junk follows.
    assert tok.decode([*ids[:-1], EOS_ID, 57, 58, 0, 0]) == text
    assert tok.decode([0, *ids]) == text  # pad ids are not text


def test_decode_maps_ids_beyond_the_vocabulary_to_unk(eval_vocab):
    """seqio's rule: ids >= the piece count become unk, then SentencePiece decodes."""
    sp = spm.SentencePieceProcessor(model_file=str(eval_vocab))
    tok = Tokenizer(eval_vocab.read_bytes())
    pieces, unk = sp.get_piece_size(), sp.unk_id()
    ids = sp.encode("The Met Office has issued a yellow weather warning.")
    generated = [*ids[:3], pieces, *ids[3:], pieces + 99, 2**32 - 1, EOS_ID, pieces + 5, 7]
    with pytest.raises(IndexError):  # what SentencePiece alone does with such ids
        sp.decode_ids([*ids[:3], pieces])
    expected = sp.decode_ids([*ids[:3], unk, *ids[3:], unk, unk, EOS_ID])
    assert tok.decode(generated) == expected
    assert "\u2047" in expected  # SentencePiece's unk surface, as seqio's decode shows it
    assert tok.decode([pieces + 1]) == sp.decode_ids([unk])
    assert tok.decode([EOS_ID, pieces + 1]) == ""  # nothing after the first EOS counts


def test_model_vocab_size_from_the_served_repository(tmp_path, eval_vocab, eval_model_repo):
    tok = Tokenizer(eval_vocab.read_bytes(), source="v.model")
    size, ini = model_vocab_size(str(eval_model_repo), "t5")
    assert size == tok.vocab_size and ini == f"{eval_model_repo}/t5/1/1-gpu/config.ini"
    assert check_vocab_fits(tok, size, ini) == (
        f"vocabulary {size} pieces = model vocab_size {size}")
    assert check_vocab_fits(tok, size + 56, ini) == (
        f"vocabulary {size} pieces, model vocab_size {size + 56}: the 56 ids "
        f"{size}..{size + 55} decode as unk")
    with pytest.raises(VocabError, match=f"v.model has {size} pieces but the model has only "
                       f"{size - 1} logits"):
        check_vocab_fits(tok, size - 1, ini)
    # A repository with only the vocabulary has nothing to compare with.
    (tmp_path / "t5").mkdir()
    shutil.copy(eval_vocab, tmp_path / "t5" / "spiece.model")
    assert model_vocab_size(str(tmp_path), "t5") is None
    broken = tmp_path / "broken"
    shutil.copytree(eval_model_repo, broken)
    (broken / "t5" / "1" / "1-gpu" / "config.ini").write_text("[encoder]\nd_model = 4\n")
    with pytest.raises(VocabError, match="unreadable config.ini"):
        model_vocab_size(str(broken), "t5")


def test_vocab_from_model_repository_and_errors(tmp_path, eval_vocab):
    repo = tmp_path / "repo"
    (repo / "t5").mkdir(parents=True)
    (repo / "t5" / "spiece.model").write_bytes(eval_vocab.read_bytes())
    assert vocab_location(None, str(repo), "t5") == f"{repo}/t5/spiece.model"
    assert vocab_location("gs://b/v.model", str(repo), "t5") == "gs://b/v.model"
    assert load_tokenizer(None, str(repo), "t5").vocab_size == Tokenizer(
        eval_vocab.read_bytes()).vocab_size
    with pytest.raises(VocabError, match="give --vocab"):
        load_tokenizer(None, None, "t5")
    with pytest.raises(VocabError, match="does not exist"):
        load_tokenizer(None, str(repo), "other")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(VocabError, match="not a SentencePiece model"):
        load_tokenizer(str(bad), None, "t5")


def test_requests_group_similar_lengths_independently_of_actors(eval_vocab, eval_jsonl):
    from evaluation.data import load_examples
    from evaluation.runner import request_batches

    tok = Tokenizer(eval_vocab.read_bytes())
    examples = load_examples(str(eval_jsonl)).examples
    batches = request_batches(examples, tok, batch_size=3, max_input_len=300)
    assert sum(len(b["ids"]) for b in batches) == len(examples)
    assert [len(b["ids"]) for b in batches] == [3] * 6 + [2]
    lengths = [n for b in batches for n in b["lengths"]]
    assert lengths == sorted(lengths, reverse=True) and max(lengths) <= 300
    first = batches[0]
    # The flat token list holds each row whole, EOS last, in the order of ids.
    by_id = {e.id: tok.encode(e.input_text, 300) for e in examples}
    assert first["tokens"] == [t for i in first["ids"] for t in by_id[i]]
    assert request_batches(examples, tok, 3, 300) == batches  # a pure function of its inputs
