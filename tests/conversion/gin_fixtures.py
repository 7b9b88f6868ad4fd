"""config.gin files in the two styles the converter meets.

:func:`t5x_config_str` makes the file the way t5x training does (t5x/gin_utils.py:
``parse_gin_flags`` parses the model and run gins with gin-config, then
``summarize_gin_config`` writes ``gin.config_str()`` to ``MODEL_DIR/config.gin``). The
configurables those gins name are stood in for by modules with t5x's and seqio's module paths
and signatures (``t5x.examples.t5.network.T5Config`` ...), written to a temporary folder and
imported through gin's ``dynamic_registration``, so gin itself writes the imports, the macro
section, the fully qualified bindings and the backslash continuations.

:func:`ul2_release_gin` reproduces the shape of the UL2 release's hand-written config.gin
(flaxformer architecture, ``NUM_EMBEDDINGS``-style macros, blocks, comments).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import gin

from core.t5config import T5Config

# Stand-ins with the real module paths and signatures (t5x/examples/t5/network.py,
# t5x/examples/scalable_t5/network.py, seqio/vocabularies.py, t5x/adafactor.py, t5x/models.py).
_T5CONFIG_FIELDS = """
    vocab_size: int
    dtype: Any = 'float32'
    emb_dim: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    head_dim: int = 64
    mlp_dim: int = 2048
    mlp_activations: Sequence[str] = ('relu',)
    dropout_rate: float = 0.1
    logits_via_embedding: bool = False
"""
_NETWORK = """
import dataclasses
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class T5Config:
{fields}

class Transformer:
    def __init__(self, config):
        self.config = config
"""
_MODULES = {
    "t5x/__init__.py": "",
    "t5x/examples/__init__.py": "",
    "t5x/examples/t5/__init__.py": "",
    "t5x/examples/t5/network.py": _NETWORK.format(fields=_T5CONFIG_FIELDS),
    "t5x/examples/scalable_t5/__init__.py": "",
    "t5x/examples/scalable_t5/network.py": _NETWORK.format(
        fields=_T5CONFIG_FIELDS + "    remat_policy: str = 'none'\n    scan_layers: bool = True\n"
        "    param_scan_axis: int = 1\n"),
    "t5x/adafactor.py": textwrap.dedent("""
        def standard_logical_factor_rules():
            return {}

        class Adafactor:
            def __init__(self, learning_rate=None, decay_rate=0.8, step_offset=0,
                         logical_factor_rules=None):
                pass
        """),
    "t5x/models.py": textwrap.dedent("""
        class EncoderDecoderModel:
            def __init__(self, module, input_vocabulary, output_vocabulary, optimizer_def,
                         z_loss=0.0, label_smoothing=0.0, loss_normalizing_factor=None):
                pass
        """),
    "seqio/__init__.py": textwrap.dedent("""
        class SentencePieceVocabulary:
            def __init__(self, sentencepiece_model_file, extra_ids=0, normalizer_spec_overrides=None,
                         reverse_extra_ids=True):
                self.sentencepiece_model_file = sentencepiece_model_file
        """),
}


def t5x_base_gin(cfg: T5Config, vocab_file: str, network: str = "t5", extra: str = "") -> str:
    """t5x/examples/<network>/t5_1_1/base.gin, with ``cfg``'s sizes and ``vocab_file``."""
    act = cfg.feed_forward_proj.removeprefix("gated-")
    acts = f"('{act}', 'linear')" if cfg.gated else f"('{act}',)"
    return textwrap.dedent(f"""\
        # T5.1.1 Base model.
        from __gin__ import dynamic_registration

        import seqio
        from t5x import adafactor
        from t5x import models
        from t5x.examples.{network} import network

        # ------------------- Loss HParam ----------------------------------------------
        Z_LOSS = 0.0001
        LABEL_SMOOTHING = 0.0
        LOSS_NORMALIZING_FACTOR = None
        # Dropout should be specified in the "run" files
        DROPOUT_RATE = %gin.REQUIRED

        # Vocabulary (shared by encoder and decoder)
        VOCABULARY = @seqio.SentencePieceVocabulary()
        seqio.SentencePieceVocabulary.sentencepiece_model_file = "{vocab_file}"

        # ------------------- Optimizer ------------------------------------------------
        OPTIMIZER = @adafactor.Adafactor()
        adafactor.Adafactor:
          decay_rate = 0.8
          step_offset = 0
          logical_factor_rules = @adafactor.standard_logical_factor_rules()

        # ------------------- Model ----------------------------------------------------
        MODEL = @models.EncoderDecoderModel()
        models.EncoderDecoderModel:
          module = @network.Transformer()
          input_vocabulary = %VOCABULARY
          output_vocabulary = %VOCABULARY
          optimizer_def = %OPTIMIZER
          z_loss = %Z_LOSS
          label_smoothing = %LABEL_SMOOTHING
          loss_normalizing_factor = %LOSS_NORMALIZING_FACTOR

        # ------------------- Network specification ------------------------------------
        network.Transformer.config = @network.T5Config()
        network.T5Config:
          vocab_size = {cfg.vocab_size}  # vocab size rounded to a multiple of 128 for TPU
          dtype = 'bfloat16'
          emb_dim = {cfg.d_model}
          num_heads = {cfg.num_heads}
          num_encoder_layers = {cfg.num_encoder_layers}
          num_decoder_layers = {cfg.num_decoder_layers}
          head_dim = {cfg.d_kv}
          mlp_dim = {cfg.d_ff}
          mlp_activations = {acts}
          dropout_rate = %DROPOUT_RATE
          logits_via_embedding = {cfg.tie_word_embeddings}
        """) + extra


def t5x_config_str(workdir: Path, model_gin: str, bindings: tuple[str, ...] = ()) -> str:
    """What t5x writes to MODEL_DIR/config.gin after parsing ``model_gin`` and ``bindings``
    (the run's ``--gin.X=v`` flags), made by gin-config itself; gin's state is cleared after."""
    root = workdir / "t5x_stand_ins"
    for rel, source in _MODULES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    (workdir / "model.gin").write_text(model_gin)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(root))
    # Interactive mode lets a later call register the re-imported stand-ins again.
    gin.enter_interactive_mode()
    try:
        # t5x/gin_utils.py parse_gin_flags, then summarize_gin_config's get_gin_config_str().
        gin.parse_config_files_and_bindings([str(workdir / "model.gin")], list(bindings),
                                            finalize_config=False)
        return gin.config_str()
    finally:
        gin.clear_config()
        gin.exit_interactive_mode()
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if name.split(".")[0] in ("t5x", "seqio"):
                del sys.modules[name]


def ul2_release_gin(num_embeddings: int = 32128, embed_dim: int = 4096, num_heads: int = 16,
                    head_dim: int = 256, mlp_dim: int = 16384, num_encoder_layers: int = 32,
                    num_decoder_layers: int = 32,
                    vocab_file: str = "gs://t5-data/vocabs/cc_all.32000.100extra/"
                    "sentencepiece.model", include: str = "") -> str:
    """The UL2 release's config.gin as published (defaults: UL2 20B), hand-written in
    flaxformer's style: macros for the sizes, blocks, scoped initialisers, comments."""
    text = textwrap.dedent(f"""\
        # Gin config for public UL2 20B model.
        # This is for the external cloud version of T5X.
        # ginlint: disable
        from __gin__ import dynamic_registration
        from flax import linen
        from flaxformer.architectures.t5 import t5_architecture
        from flaxformer.components.attention import dense_attention
        from flaxformer.components import dense
        from flaxformer.components import embedding
        from flaxformer.components import layer_norm
        from flaxformer.components import relative_position_biases
        from t5x import adafactor
        from t5x import models
        from t5x import utils
        import seqio

        # Architecture overrides
        NUM_ENCODER_LAYERS = %gin.REQUIRED
        NUM_ENCODER_LAYERS = {num_encoder_layers}
        NUM_DECODER_LAYERS = {num_decoder_layers}
        NUM_HEADS = {num_heads}
        HEAD_DIM = {head_dim}
        EMBED_DIM = {embed_dim}
        MLP_DIM = {mlp_dim}
        NUM_EMBEDDINGS = {num_embeddings}  # vocab size rounded to a multiple of 128

        # Constants (may be overridden)
        ACTIVATION_DTYPE = 'bfloat16'
        DROPOUT_RATE = 0.0
        BIAS_INIT = @bias_init/linen.initializers.normal()
        bias_init/linen.initializers.normal.stddev = 1e-6
        DROPOUT_FACTORY = @dropout_factory/linen.Dropout
        dropout_factory/linen.Dropout:
          rate = %DROPOUT_RATE
          broadcast_dims = (-2,)

        # Vocabulary (shared by encoder and decoder)
        VOCABULARY = @seqio.SentencePieceVocabulary()
        seqio.SentencePieceVocabulary.sentencepiece_model_file = \\
            "{vocab_file}"
        seqio.SentencePieceVocabulary.extra_ids = 100

        # Model
        MODEL = @models.EncoderDecoderModel()
        models.EncoderDecoderModel:
          module = %ARCHITECTURE
          input_vocabulary = %VOCABULARY
          output_vocabulary = %VOCABULARY
          z_loss = 0.0001

        ARCHITECTURE = @t5_architecture.EncoderDecoder()
        t5_architecture.EncoderDecoder:
          encoder_factory = @t5_architecture.Encoder
          decoder_factory = @t5_architecture.Decoder
          shared_token_embedder_factory = @embedding.Embed
          dtype = %ACTIVATION_DTYPE

        t5_architecture.Encoder:
          num_layers = %NUM_ENCODER_LAYERS
          layer_factory = @t5_architecture.EncoderLayer
          input_dropout_factory = %DROPOUT_FACTORY
          shared_relative_position_bias_factory = @relative_position_biases.RelativePositionBiases

        t5_architecture.Decoder:
          num_layers = %NUM_DECODER_LAYERS
          layer_factory = @t5_architecture.DecoderLayer
          output_logits_factory = @output_logits/dense.DenseGeneral

        # Token Embedder (shared)
        embedding.Embed:
          num_embeddings= %NUM_EMBEDDINGS
          features = %EMBED_DIM
          attend_dtype = 'float32'  # for logit training stability
          embedding_init = @token_embedder_init/linen.initializers.normal()
        token_embedder_init/linen.initializers.normal.stddev = 1.0

        dense_attention.MultiHeadDotProductAttention:
          num_heads = %NUM_HEADS
          head_dim = %HEAD_DIM
          kernel_init =  @attention_kernel_init/linen.initializers.variance_scaling()

        relative_position_biases.RelativePositionBiases:
          num_heads = %NUM_HEADS
          num_buckets = 32
          max_distance = 128

        # MLP (encoder, decoder): SwiGLU; flax's swish is silu.
        dense.MlpBlock:
          use_bias = False
          intermediate_dim = %MLP_DIM
          activations = ('swish', 'linear')
          intermediate_dropout_rate = %DROPOUT_RATE
        """)
    if include:
        text = text.replace("import seqio\n", f"import seqio\ninclude '{include}'\n", 1)
    return text
