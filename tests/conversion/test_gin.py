"""config.gin read with gin-config's parser: t5x's written config_str, the UL2 release's macros,
includes (present and absent), scopes, continuations; the vocabulary it names."""

from __future__ import annotations

import dataclasses
import json

import pytest
import sentencepiece as spm

from conversion import run
from conversion.arch import infer_arch
from conversion.arch import parse_gin as parse_gin_from_arch
from conversion.gin_config import GinError, Macro, Reference, parse_gin, read_gin
from conversion.run import ConversionError, ConvertOptions, choose_vocab, convert
from demo.t5x_writer import random_t5x_params, t5x_param_shapes, write_t5x_checkpoint
from tests.conversion.conftest import MODELS
from tests.conversion.gin_fixtures import t5x_base_gin, t5x_config_str, ul2_release_gin

UL2 = MODELS["ul2"]
# What a config.gin for MODELS["ul2"] tells, under parse_gin's keys.
UL2_VALUES = {"vocab_size": 36, "d_model": 24, "d_kv": 8, "d_ff": 48, "num_heads": 4,
              "num_encoder_layers": 2, "num_decoder_layers": 3,
              "feed_forward_proj": "gated-silu"}
FINETUNE = "t5x/configs/runs/finetune.gin"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, xsum_sample):
    """A real SentencePiece model, trained on the bundled XSum rows by demo.vocab."""
    from demo.vocab import train_sentencepiece

    rows = [json.loads(line) for line in xsum_sample.read_text().splitlines() if line.strip()]
    texts = [r["document"] for r in rows] + [r["summary"] for r in rows]
    # A long folder name: gin's config_str continues the binding on the next line.
    folder = tmp_path_factory.mktemp("vocabs") / "cc_all.32000.100extra"
    return train_sentencepiece(texts, folder / "sentencepiece.model", 128)


def test_t5x_config_str_is_read_with_references_and_macros_kept(tmp_path):
    vocab = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
    text = t5x_config_str(tmp_path, t5x_base_gin(UL2, vocab), ("DROPOUT_RATE = 0.0",))
    # What gin wrote: imports, the macro section, qualified bindings, a continued line.
    assert text.startswith("from __gin__ import dynamic_registration\n")
    assert "from t5x.examples.t5 import network" in text and "# Macros:" in text
    assert "network.T5Config.emb_dim = 24" in text
    assert "seqio.SentencePieceVocabulary.sentencepiece_model_file = \\\n    '" in text

    gin = read_gin(text, "gs://bucket/model/config.gin")
    assert gin.t5_values() == {**UL2_VALUES, "tie_word_embeddings": False, "vocab_file": vocab}
    assert gin.warnings == [] and gin.vocab_file == vocab
    assert "from __gin__ import dynamic_registration" in gin.imports
    # References stay references; macros resolve, through the run's override of %gin.REQUIRED.
    assert gin.lookup("Transformer", "config") == Reference("network.T5Config", True)
    assert gin.lookup("EncoderDecoderModel", "input_vocabulary") == \
        Reference("seqio.SentencePieceVocabulary", True)
    assert gin.lookup("T5Config", "dropout_rate") == 0.0
    assert gin.lookup("EncoderDecoderModel", "loss_normalizing_factor") is None
    assert str(gin.macros["OPTIMIZER"]) == "@adafactor.Adafactor()"

    arch = infer_arch(t5x_param_shapes(UL2), gin.t5_values())
    assert arch.config == UL2 and arch.sources["feed_forward_proj"] == "gin"


def test_scalable_t5_config_str_gives_the_scan_settings(tmp_path):
    extra = "network.T5Config.scan_layers = True\nnetwork.T5Config.param_scan_axis = 0\n"
    text = t5x_config_str(tmp_path, t5x_base_gin(UL2, "/v/spiece.model", "scalable_t5", extra),
                          ("DROPOUT_RATE = 0.1",))
    assert "from t5x.examples.scalable_t5 import network" in text
    values = parse_gin(text)
    assert values["scan_layers"] is True and values["param_scan_axis"] == 0
    assert values["d_ff"] == 48 and values["vocab_file"] == "/v/spiece.model"


def test_ul2_release_macros_and_an_absent_include(tmp_path):
    gin = read_gin(ul2_release_gin(include=FINETUNE), str(tmp_path / "config.gin"))
    # UL2 20B: sizes from the macros (one overrides %gin.REQUIRED), SwiGLU from dense.MlpBlock.
    assert gin.t5_values() == {
        "vocab_size": 32128, "d_model": 4096, "d_kv": 256, "d_ff": 16384, "num_heads": 16,
        "num_encoder_layers": 32, "num_decoder_layers": 32, "feed_forward_proj": "gated-silu",
        "vocab_file": "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"}
    assert gin.lookup("Embed", "num_embeddings") == 32128  # "num_embeddings= %NUM_EMBEDDINGS"
    assert gin.lookup("Embed", "embedding_init") == \
        Reference("token_embedder_init/linen.initializers.normal", True)
    assert gin.macro("DROPOUT_FACTORY") == Reference("dropout_factory/linen.Dropout", False)
    # The include is absent: reported with where it was looked for, and reading went on.
    [warning] = gin.warnings
    assert f"include '{FINETUNE}' not found" in warning
    assert str(tmp_path / FINETUNE) in warning
    assert gin.includes == []


def test_includes_are_read_in_place_relative_to_the_including_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.gin").write_text(
        "include 'absent/run.gin'  # nested, absent\n"
        "EMBED_DIM = 16\n"
        "network.T5Config:\n"
        "  emb_dim = %EMBED_DIM\n"
        "  num_heads = 2\n")
    main = ("network.T5Config.num_heads = 8  # before the include: the include overrides it\n"
            "include 'configs/base.gin'\n"
            "EMBED_DIM = 32  # after it: overrides the included macro\n")
    gin = read_gin(main, str(tmp_path / "config.gin"))
    assert gin.includes == [str(tmp_path / "configs" / "base.gin")]
    assert parse_gin(main, str(tmp_path / "config.gin")) == {"d_model": 32, "num_heads": 2}
    [warning] = gin.warnings
    assert "include 'absent/run.gin' not found" in warning
    assert str(tmp_path / "configs" / "absent" / "run.gin") in warning


def test_binding_forms_scopes_continuations_and_macro_chains():
    text = """
# Every form a T5Config field may be bound in.
from __gin__ import dynamic_registration
import t5x.examples.t5.network as network
HIDDEN = %WIDTH
WIDTH = %BASE_WIDTH  # a chain of macros
BASE_WIDTH = 64
LOOP_A = %LOOP_B
LOOP_B = %LOOP_A
T5Config.emb_dim = %HIDDEN
t5x.examples.t5.network.T5Config.mlp_dim = \\
    256
network.T5Config:
  # a comment inside the block
  num_heads = 8  # unscoped: loses to the scope the model uses
  head_dim = 8

  mlp_activations = (
      'gelu',
      'linear',
  )
model/network.T5Config.num_heads = 4
network.Transformer.config = @model/network.T5Config()
other/network.T5Config.num_encoder_layers = 5
a/network.T5Config.num_decoder_layers = 5
b/network.T5Config.num_decoder_layers = 6
network.T5Config.vocab_size = %LOOP_A
network.T5Config.param_scan_axis = %gin.REQUIRED
"""
    gin = read_gin(text)
    assert gin.t5_values() == {"d_model": 64, "d_ff": 256, "num_heads": 4, "d_kv": 8,
                               "feed_forward_proj": "gated-gelu", "num_encoder_layers": 5}
    # Cycles and undefined macros stay unresolved, so they give no value.
    assert isinstance(gin.lookup("T5Config", "vocab_size"), Macro)
    assert gin.lookup("T5Config", "param_scan_axis") == Macro("gin.REQUIRED")
    assert gin.lookup("T5Config", "num_decoder_layers") is None  # two scopes disagree
    assert "import t5x.examples.t5.network as network" in gin.imports


def test_flaxformer_bindings_without_macros():
    text = ("NUM_HEADS = 8  # defined but unused: the binding the model reads wins\n"
            "embedding.Embed.num_embeddings = 32128\n"
            "embedding.Embed.features = 4096\n"
            "dense_attention.MultiHeadDotProductAttention.num_heads = 16\n"
            "dense_attention.MultiHeadDotProductAttention.head_dim = 256\n"
            "dense.MlpBlock.intermediate_dim = 16384\n"
            "t5_architecture.Encoder.num_layers = 32\n"
            "t5_architecture.Decoder.num_layers = 32\n")
    assert parse_gin(text) == {"vocab_size": 32128, "d_model": 4096, "num_heads": 16,
                               "d_kv": 256, "d_ff": 16384, "num_encoder_layers": 32,
                               "num_decoder_layers": 32}


def test_single_activation_and_swish():
    assert parse_gin("network.T5Config.mlp_activations = ('relu',)\n") == \
        {"feed_forward_proj": "relu"}
    assert parse_gin("dense.MlpBlock.activations = ('swish', 'linear')\n") == \
        {"feed_forward_proj": "gated-silu"}
    assert parse_gin("network.T5Config.logits_via_embedding = True\n") == \
        {"tie_word_embeddings": True}


def test_syntax_errors_name_the_file_and_line():
    with pytest.raises(GinError, match=r"^gs://b/config\.gin line 2: .*"):
        read_gin("EMBED_DIM = 4\nnetwork.T5Config.emb_dim 4\n", "gs://b/config.gin")
    with pytest.raises(GinError, match="config.gin"):
        read_gin("X = (1, 2\n")


def test_parse_gin_stays_importable_from_arch():
    assert parse_gin_from_arch is parse_gin


def test_choose_vocab_flag_then_gin_when_reachable(tmp_path, spm_model):
    named = read_gin(f"seqio.SentencePieceVocabulary.sentencepiece_model_file = '{spm_model}'\n")
    assert choose_vocab("/flag/spiece.model", named) == ("/flag/spiece.model", "flag", [])
    assert choose_vocab(None, named) == (str(spm_model), "gin", [])
    assert choose_vocab(None, None) == (None, None, [])
    absent = read_gin("VOCAB_FILE = '/nowhere/spiece.model'\n"
                      "seqio.SentencePieceVocabulary.sentencepiece_model_file = %VOCAB_FILE\n"
                      f"include '{FINETUNE}'\n", str(tmp_path / "config.gin"))
    vocab, source, warnings = choose_vocab(None, absent)
    assert (vocab, source) == (None, None)
    assert len(warnings) == 2 and f"include '{FINETUNE}' not found" in warnings[0]
    assert warnings[1] == ("vocabulary /nowhere/spiece.model named by config.gin does not "
                           "exist: no spiece.model written")


def test_prepare_reports_a_broken_config_gin_in_one_line(tmp_path):
    model = tmp_path / "model"
    write_t5x_checkpoint(model, random_t5x_params(UL2, seed=3), step=5,
                         gin="network.T5Config:\n  emb_dim 24\n")
    with pytest.raises(ConversionError, match=r"^gin file .*config\.gin line 2: ") as exc:
        run.prepare(ConvertOptions(src=str(model), dst=str(tmp_path / "out")))
    assert "\n" not in str(exc.value)


def test_convert_copies_the_vocabulary_t5x_config_gin_names(ray_local, tmp_path, spm_model):
    """A model directory as t5x leaves it: config.gin (gin's config_str) above the step."""
    model = tmp_path / "model"
    config_gin = t5x_config_str(tmp_path, t5x_base_gin(UL2, str(spm_model)),
                                ("DROPOUT_RATE = 0.1",))
    write_t5x_checkpoint(model, random_t5x_params(UL2, seed=4), step=7, gin=config_gin)
    dst = tmp_path / "repo"
    summary = convert(ConvertOptions(src=str(model / "checkpoint_7"), dst=str(dst),
                                     progress=False))
    assert summary["gin"] == str(model / "config.gin")
    assert (summary["vocab"], summary["vocab_source"]) == (str(spm_model), "gin")
    assert summary["gin_warnings"] == []
    copied = dst / "t5" / "spiece.model"
    assert copied.read_bytes() == spm_model.read_bytes()
    assert spm.SentencePieceProcessor(model_file=str(copied)).get_piece_size() == 128
    assert summary["read_from_gin"] == ["feed_forward_proj"]
    assert summary["model"] == dataclasses.asdict(UL2)


def test_convert_reports_gin_problems_and_carries_on(ray_local, tmp_path):
    """UL2-release style config.gin whose include and vocabulary are not there."""
    model = tmp_path / "model"
    missing = tmp_path / "vocabs" / "sentencepiece.model"
    config_gin = ul2_release_gin(
        num_embeddings=UL2.vocab_size, embed_dim=UL2.d_model, num_heads=UL2.num_heads,
        head_dim=UL2.d_kv, mlp_dim=UL2.d_ff, num_encoder_layers=UL2.num_encoder_layers,
        num_decoder_layers=UL2.num_decoder_layers, vocab_file=str(missing), include=FINETUNE)
    write_t5x_checkpoint(model, random_t5x_params(UL2, seed=5), step=9, gin=config_gin)
    dst = tmp_path / "repo"
    summary = convert(ConvertOptions(src=str(model), dst=str(dst), progress=False))
    assert summary["files"] > 0 and summary["model"] == dataclasses.asdict(UL2)
    assert summary["arch_sources"]["feed_forward_proj"] == "gin"
    assert (summary["vocab"], summary["vocab_source"]) == (None, None)
    include_warning, vocab_warning = summary["gin_warnings"]
    assert include_warning.startswith(f"include '{FINETUNE}' not found")
    assert vocab_warning == (f"vocabulary {missing} named by config.gin does not exist: "
                             "no spiece.model written")
    assert not (dst / "t5" / "spiece.model").exists()
    assert (dst / "t5" / "config.pbtxt").exists()


def test_task_feature_lengths_from_the_macro_or_the_dataset_config():
    from conversion.gin_config import read_gin

    macro = read_gin("TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 114}\n")
    assert macro.feature_lengths == {"inputs": 512, "targets": 114}
    bound = read_gin("train/utils.DatasetConfig.task_feature_lengths = "
                     "{'inputs': 1024, 'targets': 256}\n")
    assert bound.feature_lengths == {"inputs": 1024, "targets": 256}
    assert read_gin("DROPOUT_RATE = 0.0\n").feature_lengths is None
