"""config.gin on gs:// (fake-gcs-server): found above checkpoint_<step>, its relative includes
read from the bucket, and the SentencePiece model it names copied when it is there."""

from __future__ import annotations

import json

from conversion.gin_config import read_gin
from conversion.run import choose_vocab, find_gin
from core import storage


def test_config_gin_includes_and_vocabulary_on_gcs(gcs, gcs_prefix, tmp_path, xsum_sample):
    from demo.vocab import train_sentencepiece

    rows = [json.loads(line) for line in xsum_sample.read_text().splitlines() if line.strip()]
    spm_model = train_sentencepiece([r["document"] for r in rows], tmp_path / "spiece.model", 96)
    base = f"gs://{gcs.bucket}/{gcs_prefix}"
    vocab = f"{base}/vocabs/sentencepiece.model"
    storage.write_bytes(vocab, spm_model.read_bytes())
    storage.write_text(f"{base}/model/configs/size.gin", "EMBED_DIM = 24\nHEAD_DIM = 8\n")
    storage.write_text(f"{base}/model/config.gin", (
        "include 'configs/size.gin'\n"
        "include 'configs/absent.gin'\n"
        "network.T5Config.emb_dim = %EMBED_DIM\n"
        "network.T5Config.head_dim = %HEAD_DIM\n"
        f"seqio.SentencePieceVocabulary.sentencepiece_model_file = '{vocab}'\n"))

    url = find_gin(f"{base}/model/checkpoint_3")
    assert url == f"{base}/model/config.gin"
    gin = read_gin(storage.read_text(url), url)
    assert gin.includes == [f"{base}/model/configs/size.gin"]
    assert gin.t5_values() == {"d_model": 24, "d_kv": 8, "vocab_file": vocab}
    [absent] = gin.warnings
    assert absent.startswith("include 'configs/absent.gin' not found (looked for "
                             f"{base}/model/configs/absent.gin")
    assert choose_vocab(None, gin) == (vocab, "gin", [absent])

    storage.delete(vocab)
    assert choose_vocab(None, gin) == (None, None, [absent, (
        f"vocabulary {vocab} named by config.gin does not exist: no spiece.model written")])
