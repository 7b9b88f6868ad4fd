"""The in-process path's Ray Data actor: the repository's JAX engine answers, no server.

``--backend in-process`` runs :class:`EnginePredictor` where the Triton path runs
:class:`evaluation.predictor.Predictor`: the same requests (evaluation.batching), the same
request tensors (:func:`evaluation.client.build_request_arrays`, less the optional inputs the
model does not declare), parsed and answered by the same contract code the Triton model runs
(``serving.engine.parse_request`` / ``assemble_outputs``) and read back as the client reads a
response (:func:`evaluation.client.parse_response`). So predictions equal the Triton path's row
for row, and a request the Triton model would refuse is refused here with the same message.

:class:`EngineGenerate` is that answer as a plain callable (no Ray): a benchmark passes it to
:func:`evaluation.batching.predict_rows`. The engine is built as serving/triton_model/model.py
builds it, from the same handle (core.repository.ConvertedModel): the weights folder,
``data_type`` and ``max_input_len`` parameters, and ``max_batch_size``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from evaluation.client import build_request_arrays, declared_only, parse_response
from evaluation.predictor import BatchPredictor
from evaluation.tokenizer import open_model

if TYPE_CHECKING:
    from evaluation.options import EvalSettings


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What config.pbtxt says about how the model is served."""

    weights_dir: str  # the <T>-gpu folder with config.ini
    data_type: str  # fp32 | fp16 | bf16
    max_input_len: int  # 0: the engine's own limit
    max_batch_size: int  # 0: no limit
    inputs: frozenset[str]  # the declared input names


def read_engine_spec(model_repository: str, model_name: str) -> EngineSpec:
    """Read ``<repo>/<model>/config.pbtxt`` as the Triton model reads its configuration.

    Raises:
      FileNotFoundError: no config.pbtxt, or no config.ini in the weights folder it names.
      evaluation.tokenizer.VocabError: config.pbtxt is not a readable ModelConfig.
    """
    from core import storage
    from core.repository import config_url

    model = open_model(model_repository, model_name)
    if model is None:
        pbtxt = config_url(model_repository, model_name)
        raise FileNotFoundError(f"no {pbtxt}: --model-repository holds no model {model_name!r}")
    if not storage.exists(model.config_ini_url):
        raise FileNotFoundError(f"no FT weights folder at {model.weights_dir} (config.ini missing)")
    return EngineSpec(weights_dir=model.weights_dir, data_type=model.data_type,
                      max_input_len=model.max_input_len, max_batch_size=model.max_batch_size,
                      inputs=model.inputs)


class EngineGenerate:
    """A ``generate`` for :mod:`evaluation.batching`: the repository's engine, no Ray, no server.

        gen = EngineGenerate(repo, "t5", max_output_len=64)
        answers = predict_rows(rows, gen, tokenizer.decode, batch_size=8)

    Each call builds the request a Triton client would send (less the optional inputs the model
    does not declare), checks it with the Triton model's contract and runs ``T5Engine.generate``;
    a request the Triton model would refuse raises ``serving.engine.RequestError`` with its
    message.
    """

    def __init__(self, model_repository: str, model_name: str, *, max_output_len: int,
                 beam_width: int = 1, top_k: int = 1, random_seed: int = 0):
        """Load the engine as the Triton model does (config.pbtxt; on the default JAX device)."""
        from serving.engine import T5Engine

        self.spec = read_engine_spec(model_repository, model_name)
        self.engine = T5Engine.load(self.spec.weights_dir, dtype=self.spec.data_type,
                                    max_batch=self.spec.max_batch_size)
        self.max_input_len = T5Engine.input_limit(self.spec.max_input_len)
        self.settings = {"max_output_len": max_output_len, "beam_width": beam_width,
                         "top_k": top_k, "random_seed": random_seed}

    def __call__(self, rows: list[list[int]]) -> list[list[int]]:
        """Generated ids (beam 0, no start token) of each row."""
        from serving.engine import assemble_outputs, parse_request

        arrays = declared_only(build_request_arrays(rows, **self.settings), set(self.spec.inputs))
        request = parse_request(arrays, max_input_len=self.max_input_len,
                                vocab_size=self.engine.config.vocab_size,
                                max_batch_size=self.spec.max_batch_size)
        results = self.engine.generate(request.tokens, request.params)
        out = assemble_outputs(request, results, self.engine.config.eos_token_id)
        return parse_response(out["output_ids"], out["sequence_length"])


class EnginePredictor(BatchPredictor):
    """Ray Data callable class answering each request with :class:`EngineGenerate` (one
    engine per actor, on its GPU when Ray gave it one)."""

    def __init__(self, model_repository: str, opts: EvalSettings, vocab: bytes):
        """Args: the converted repository (local), the run's options, the SentencePiece bytes."""
        super().__init__(opts, vocab)
        self.generate = EngineGenerate(model_repository, opts.model_name,
                                       **self._request_settings())

    def _generate(self, rows: list[list[int]]) -> list[list[int]]:
        return self.generate(rows)

    def _describe(self, exc: BaseException) -> str:
        """The contract's message as a Triton client would read it; else type and text."""
        from serving.engine import RequestError

        return str(exc) if isinstance(exc, RequestError) else super()._describe(exc)
