"""The batching loop both evaluation paths share: token rows -> requests -> decoded predictions.

Pure Python, no Ray, no Triton: the Triton path's actor (evaluation/predictor.py, ``generate`` =
one Triton request), the in-process path's actor (``generate`` = the JAX engine) and the GPU
benchmark (bench/, ``generate`` = anything) all run these functions, so the same rows make the
same requests and the same predictions whatever answers them.

    from evaluation.batching import predict_rows
    for answer in predict_rows(rows, generate, tokenizer.decode, batch_size=8):
        ...  # answer.ids, answer.predictions, answer.latency_ms, answer.error

- :func:`group_rows`: which rows go in which request (similar lengths, ``batch_size`` each).
- :func:`answer_request`: one request, timed; a rejected request is split into single rows so
  one row the model cannot take fails alone.
- :func:`predict_rows`: both, over all rows (what a caller without Ray wants).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

# generate(rows) -> the generated ids of each row (no start token; EOS and after may be there:
# decode stops at EOS). Raises when the request fails.
Generate = Callable[[list[list[int]]], list[list[int]]]
Decode = Callable[[Sequence[int]], str]


@dataclasses.dataclass(frozen=True)
class Answer:
    """One request's outcome (or one row's, after a rejected request was split).

    ids: the rows' ids, in the order they were sent.
    generated: each row's generated ids, or None when the request failed.
    predictions: each row's decoded text ("" for every row when the request failed).
    latency_ms: the request's wall time, ``generate`` only (decoding excluded).
    error: "" when it worked, else one line saying why.
    """

    ids: list[str]
    generated: list[list[int]] | None
    predictions: list[str]
    latency_ms: float
    error: str


def describe_error(exc: BaseException) -> str:
    """The default one-line reason for a failed request: the exception's type and text."""
    return f"{type(exc).__name__}: {exc}"


def group_rows(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions of the rows of each request: ``batch_size`` rows of similar length.

    A request is padded to its longest row and padding costs as much as real tokens, so rows
    are ordered longest first (ties keep their order) before cutting. The grouping depends only
    on the lengths and ``batch_size``, never on how many workers send the requests.

    Args:
      lengths: each row's length (tokens, EOS included).
      batch_size: rows per request, >= 1; the last request may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def answer_request(
    ids: Sequence[str],
    rows: Sequence[Sequence[int]],
    generate: Generate,
    decode: Decode,
    *,
    should_split: Callable[[BaseException], bool] = lambda exc: True,
    describe: Callable[[BaseException], str] = describe_error,
) -> Iterator[Answer]:
    """Send one request of ``rows`` through ``generate`` and decode its answer; never raises.

    When ``generate`` raises and ``should_split(exc)`` is true (the request was rejected, not
    the server away), each row is sent again alone, so only the rows that cannot be answered
    fail; otherwise every row fails with ``describe(exc)``. Decoding happens outside the error
    handling: it cannot fail (seqio's rule maps every id), so a row fails only when its request
    does.

    Yields:
      One :class:`Answer` for the request, or one per row after a split.
    """
    t0 = time.perf_counter()
    try:
        generated = generate([list(r) for r in rows])
        if len(generated) != len(rows):
            raise RuntimeError(f"{len(generated)} answers for {len(rows)} rows")
    except Exception as exc:  # noqa: BLE001 - becomes a failed Answer, never raised
        ms = (time.perf_counter() - t0) * 1000.0
        if len(rows) > 1 and should_split(exc):
            for i in range(len(rows)):
                yield from answer_request(ids[i : i + 1], rows[i : i + 1], generate, decode,
                                          should_split=should_split, describe=describe)
            return
        yield Answer(list(ids), None, [""] * len(ids), ms, describe(exc))
        return
    ms = (time.perf_counter() - t0) * 1000.0
    generated = [list(g) for g in generated]
    yield Answer(list(ids), generated, [decode(g) for g in generated], ms, "")


def predict_rows(
    rows: Sequence[Sequence[int]],
    generate: Generate,
    decode: Decode,
    *,
    batch_size: int,
    ids: Sequence[str] | None = None,
    should_split: Callable[[BaseException], bool] = lambda exc: True,
    describe: Callable[[BaseException], str] = describe_error,
) -> Iterator[Answer]:
    """Group ``rows`` into requests (:func:`group_rows`) and answer each (:func:`answer_request`).

    The loop an evaluation actor runs, without Ray: call it directly to time a ``generate``
    (a benchmark) on exactly the requests an evaluation would send.

    Args:
      rows: token ids of each row (EOS included), e.g. ``Tokenizer.encode(text, max_len)``.
      generate: rows -> generated ids per row (see ``Generate``); raises when it fails.
      decode: generated ids -> text, e.g. ``evaluation.tokenizer.Tokenizer.decode``.
      batch_size: rows per request.
      ids: each row's id (default: its position, as a string).
      should_split, describe: see :func:`answer_request`.

    Yields:
      :class:`Answer` per request, longest rows first, as each finishes.
    """
    names = [str(i) for i in range(len(rows))] if ids is None else [str(i) for i in ids]
    if len(names) != len(rows):
        raise ValueError(f"{len(names)} ids for {len(rows)} rows")
    for group in group_rows([len(r) for r in rows], batch_size):
        yield from answer_request([names[i] for i in group], [rows[i] for i in group],
                                  generate, decode, should_split=should_split,
                                  describe=describe)
