"""The FasterTransformer backend's T5 request contract, as plain numpy in and out.

ft-t5-format.md section 4: a request holds ``input_ids`` UINT32 [batch, len] (rows padded, the
real length in ``sequence_length`` [batch, 1]), ``max_output_len`` [batch, 1] and optional
per-row settings; the response holds ``output_ids`` UINT32 [batch, beam, len] without the start
token, ``sequence_length`` UINT32 [batch, beam] (generated tokens), and ``cum_log_probs``
[batch, beam] / ``output_log_probs`` [batch, beam, len] when asked.

Pure functions, no Triton import: :mod:`serving.triton_model.model` feeds them the tensors of
each request, and in-process evaluation (evaluation/engine_predictor.py) feeds them the very
arrays a Triton client would send, so both paths map request settings to SamplingParams here. FT reads ``max_output_len`` and ``beam_width`` from the first row only; here every
row keeps its own settings (the engine groups rows that can run together).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from serving.engine.engine import GenerationResult, SamplingParams

# name -> (numpy dtype the contract uses, SamplingParams field or None)
PER_ROW_INPUTS: dict[str, tuple[np.dtype, str | None]] = {
    "sequence_length": (np.dtype(np.uint32), None),
    "max_output_len": (np.dtype(np.uint32), "max_output_len"),
    "beam_width": (np.dtype(np.uint32), "beam_width"),
    "runtime_top_k": (np.dtype(np.uint32), "top_k"),
    "runtime_top_p": (np.dtype(np.float32), "top_p"),
    "temperature": (np.dtype(np.float32), "temperature"),
    "len_penalty": (np.dtype(np.float32), "len_penalty"),
    "repetition_penalty": (np.dtype(np.float32), "repetition_penalty"),
    "beam_search_diversity_rate": (np.dtype(np.float32), None),
    "random_seed": (np.dtype(np.uint64), "random_seed"),
    "start_id": (np.dtype(np.uint32), "start_id"),
    "end_id": (np.dtype(np.uint32), "end_id"),
    "is_return_log_probs": (np.dtype(np.bool_), "return_log_probs"),
}
WORD_LIST_INPUTS = ("bad_words_list", "stop_words_list")
KNOWN_INPUTS = ("input_ids", *PER_ROW_INPUTS, *WORD_LIST_INPUTS)

# Beyond this a request is almost surely a client bug, and it would hold the model for minutes.
MAX_OUTPUT_LEN_LIMIT = 4096
MAX_BEAM_WIDTH = 32


class RequestError(ValueError):
    """A request that breaks the contract; its message goes back to the client as is."""


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """One Triton request's rows, ready for ``T5Engine.generate``.

    Attributes:
      tokens: per row, the real tokens (1-D uint32, padding cut off).
      params: per row, its sampling settings.
      return_log_probs: whether the response carries the log-prob outputs.
    """

    tokens: list[np.ndarray]
    params: list[SamplingParams]
    return_log_probs: bool

    @property
    def batch(self) -> int:
        return len(self.tokens)


def _per_row(name: str, value: np.ndarray, batch: int) -> np.ndarray:
    """A [batch, 1] (or [batch]) per-row input as a 1-D array of length batch."""
    want = PER_ROW_INPUTS[name][0]
    if value.dtype != want:
        raise RequestError(f"{name} must be {_triton_type(want)}, got {_triton_type(value.dtype)}")
    if value.ndim == 0 or value.shape[0] != batch or value.size != batch:
        raise RequestError(
            f"{name} must have shape [batch, 1] = [{batch}, 1], got {list(value.shape)}"
        )
    return value.reshape(batch)


def _triton_type(dtype: np.dtype) -> str:
    names = {np.dtype(np.uint32): "UINT32", np.dtype(np.uint64): "UINT64",
             np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
             np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16",
             np.dtype(np.bool_): "BOOL"}
    return names.get(np.dtype(dtype), str(dtype))


def _check_word_list(name: str, value: np.ndarray, batch: int) -> None:
    """bad/stop words: INT32 [batch, 2, L]; accepted (and shape-checked) but not applied."""
    if value.dtype != np.int32:
        raise RequestError(f"{name} must be INT32, got {_triton_type(value.dtype)}")
    if value.ndim != 3 or value.shape[0] != batch or value.shape[1] != 2:
        raise RequestError(f"{name} must have shape [batch, 2, L], got {list(value.shape)}")


def parse_request(inputs: Mapping[str, np.ndarray], *, max_input_len: int, vocab_size: int,
                  max_batch_size: int = 0) -> ParsedRequest:
    """Validate one request's tensors and split it into rows.

    Args:
      inputs: tensor name -> array, as the client sent them (batch dimension first).
      max_input_len: the longest real input a row may have.
      vocab_size: every real token must be below it.
      max_batch_size: the model's limit (0: none).
    Raises RequestError naming the input that is wrong and why.
    """
    unknown = sorted(set(inputs) - set(KNOWN_INPUTS))
    if unknown:
        raise RequestError(f"unknown inputs {unknown}; the T5 contract accepts {list(KNOWN_INPUTS)}")
    if "input_ids" not in inputs:
        raise RequestError("input_ids is required: UINT32 [batch, len] token ids")
    ids = inputs["input_ids"]
    if ids.dtype != np.uint32:
        raise RequestError(f"input_ids must be UINT32, got {_triton_type(ids.dtype)}")
    if ids.ndim != 2:
        raise RequestError(f"input_ids must have shape [batch, len], got {list(ids.shape)}")
    batch, width = ids.shape
    if batch == 0:
        raise RequestError("input_ids has no rows")
    if max_batch_size and batch > max_batch_size:
        raise RequestError(f"batch of {batch} rows is over max_batch_size {max_batch_size}")
    if "max_output_len" not in inputs:
        raise RequestError("max_output_len is required: UINT32 [batch, 1]")

    rows = {name: _per_row(name, inputs[name], batch)
            for name in PER_ROW_INPUTS if name in inputs}
    for name in WORD_LIST_INPUTS:
        if name in inputs:
            _check_word_list(name, inputs[name], batch)

    lengths = rows.get("sequence_length", np.full(batch, width, np.uint32)).astype(np.int64)
    tokens: list[np.ndarray] = []
    params: list[SamplingParams] = []
    for r in range(batch):
        n = int(lengths[r])
        if n < 1:
            raise RequestError(f"row {r}: sequence_length must be >= 1, got {n}")
        if n > width:
            raise RequestError(
                f"row {r}: sequence_length {n} is larger than the row ({width} input_ids)"
            )
        if n > max_input_len:
            raise RequestError(
                f"row {r}: input of {n} tokens is over max_input_len {max_input_len}"
            )
        row = ids[r, :n]
        top = int(row.max())
        if top >= vocab_size:
            raise RequestError(f"row {r}: input_ids holds token {top} >= vocab_size {vocab_size}")
        tokens.append(np.ascontiguousarray(row))
        params.append(_row_params(rows, r, vocab_size))
    want_log_probs = bool(rows["is_return_log_probs"].any()) if "is_return_log_probs" in rows \
        else False
    if want_log_probs:
        params = [dataclasses.replace(p, return_log_probs=True) for p in params]
    beams = {p.beam_width for p in params}
    if len(beams) > 1:
        raise RequestError(
            f"rows of one request must agree on beam_width (output_ids is [batch, beam, len]), "
            f"got {sorted(beams)}; send them as separate requests"
        )
    return ParsedRequest(tokens, params, want_log_probs)


def _row_params(rows: dict[str, np.ndarray], r: int, vocab_size: int) -> SamplingParams:
    kwargs: dict[str, object] = {}
    for name, (_, field) in PER_ROW_INPUTS.items():
        if field is None or name not in rows:
            continue
        value = rows[name][r]
        kwargs[field] = bool(value) if value.dtype == np.bool_ else value.item()
    max_out = int(kwargs["max_output_len"])
    if not 1 <= max_out <= MAX_OUTPUT_LEN_LIMIT:
        raise RequestError(
            f"row {r}: max_output_len must be in [1, {MAX_OUTPUT_LEN_LIMIT}], got {max_out}"
        )
    beam = int(kwargs.get("beam_width", 1))
    if not 1 <= beam <= MAX_BEAM_WIDTH:
        raise RequestError(f"row {r}: beam_width must be in [1, {MAX_BEAM_WIDTH}], got {beam}")
    top_p = float(kwargs.get("top_p", 0.0))
    if not 0.0 <= top_p <= 1.0:
        raise RequestError(f"row {r}: runtime_top_p must be in [0, 1], got {top_p}")
    temperature = float(kwargs.get("temperature", 1.0))
    if not temperature > 0.0:
        raise RequestError(f"row {r}: temperature must be > 0, got {temperature}")
    rep = float(kwargs.get("repetition_penalty", 1.0))
    if not rep > 0.0:
        raise RequestError(f"row {r}: repetition_penalty must be > 0, got {rep}")
    for field, name in (("start_id", "start_id"), ("end_id", "end_id")):
        if field in kwargs and int(kwargs[field]) >= vocab_size:
            raise RequestError(f"row {r}: {name} {kwargs[field]} >= vocab_size {vocab_size}")
    return SamplingParams(**kwargs)  # type: ignore[arg-type]


def assemble_outputs(request: ParsedRequest, results: Sequence[GenerationResult],
                     end_id: int) -> dict[str, np.ndarray]:
    """One response's output tensors from its rows' results.

    Rows may ask for different ``max_output_len``; ``output_ids`` is as long as the longest
    and shorter rows are padded with their end id (their ``sequence_length`` says where the
    real tokens stop), as FT pads finished beams.

    Returns: output_ids UINT32 [batch, beam, len], sequence_length UINT32 [batch, beam], and
      with log probs cum_log_probs FP32 [batch, beam], output_log_probs FP32 [batch, beam, len].
    """
    if len(results) != request.batch:
        raise RuntimeError(f"engine returned {len(results)} results for {request.batch} rows")
    beam = request.params[0].beam_width
    length = max(p.max_output_len for p in request.params)
    output_ids = np.empty((request.batch, beam, length), np.uint32)
    seq_len = np.zeros((request.batch, beam), np.uint32)
    cum = np.zeros((request.batch, beam), np.float32)
    per_token = np.zeros((request.batch, beam, length), np.float32)
    for r, (res, p) in enumerate(zip(results, request.params, strict=True)):
        ids = np.asarray(res.output_ids, np.uint32)
        pad = end_id if p.end_id is None else int(p.end_id)
        output_ids[r].fill(pad)
        output_ids[r, :, : ids.shape[1]] = ids[:, :length]
        seq_len[r] = np.asarray(res.sequence_length, np.uint32)
        if request.return_log_probs:
            if res.cum_log_probs is not None:
                cum[r] = np.asarray(res.cum_log_probs, np.float32)
            if res.output_log_probs is not None:
                lp = np.asarray(res.output_log_probs, np.float32)
                per_token[r, :, : lp.shape[1]] = lp[:, :length]
    out = {"output_ids": output_ids, "sequence_length": seq_len}
    if request.return_log_probs:
        out["cum_log_probs"] = cum
        out["output_log_probs"] = per_token
    return out
