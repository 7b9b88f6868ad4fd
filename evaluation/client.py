"""Batched, retried ``tritonclient.grpc`` requests in the FasterTransformer T5 contract.

Request (ft-t5-format.md section 4), one row per example, ``b`` rows:
  input_ids UINT32 [b, L] (rows right-padded with 0 to the longest row), sequence_length UINT32
  [b, 1] (each row's real length), max_output_len UINT32 [b, 1], and, when the model declares
  them, beam_width UINT32 [b, 1], runtime_top_k UINT32 [b, 1], random_seed UINT64 [b, 1].
  FT reads max_output_len and beam_width from row 0 only, so every row carries the same values.
Response: output_ids UINT32 [b, beam, len] without the start token, sequence_length UINT32
  [b, beam] (generated tokens); beam 0 is the answer.

Only the optional inputs the served model declares are sent (read once from its metadata): FT's
config declares them all; a smaller engine may not, and Triton rejects undeclared inputs.

Transient failures (server down or restarting, connection refused, model not loaded yet,
overload) are retried with exponential backoff, moving to the next endpoint each time; anything
else (a malformed request, a model error) fails at once with Triton's message.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_fixed,
)
from tritonclient.utils import InferenceServerException

from evaluation.batching import describe_error

OPTIONAL_INPUTS = ("beam_width", "runtime_top_k", "random_seed")
TRANSIENT_STATUS = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CANCELLED",
)
TRANSIENT_TEXT = (
    "connection refused",
    "failed to connect",
    "connect failed",
    "socket closed",
    "connection reset",
    "unavailable",
    "not ready",
    "unknown model",
    "is not found",
    "restarting",
    "shutting down",
    "exceeds timeout",
)


class RequestFailed(RuntimeError):
    """A request that failed for good (non-transient, or out of retries)."""


class NotReady(RuntimeError):
    """No endpoint served the model within the readiness timeout (message names the last why)."""


def parse_urls(url: str | Sequence[str]) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` (or a list) -> list of ``HOST:PORT``; ValueError when bad."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = [p.strip() for p in parts if p and p.strip()]
    if not urls:
        raise ValueError("--url: no endpoint given")
    for u in urls:
        host, _, port = u.removeprefix("grpc://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--url: {u!r} is not HOST:PORT")
    return [u.removeprefix("grpc://") for u in urls]


def build_request_arrays(
    token_rows: Sequence[Sequence[int]],
    *,
    max_output_len: int,
    beam_width: int = 1,
    top_k: int = 1,
    random_seed: int = 0,
) -> dict[str, np.ndarray]:
    """The FT T5 request tensors for ``b = len(token_rows)`` examples (see module doc)."""
    if not token_rows:
        raise ValueError("no rows to send")
    lengths = [len(r) for r in token_rows]
    if min(lengths) < 1:
        raise ValueError("every row needs at least one token")
    b, width = len(token_rows), max(lengths)
    input_ids = np.zeros((b, width), dtype=np.uint32)
    for i, row in enumerate(token_rows):
        input_ids[i, : len(row)] = row
    column = np.ones((b, 1), dtype=np.uint32)
    return {
        "input_ids": input_ids,
        "sequence_length": np.asarray(lengths, dtype=np.uint32).reshape(b, 1),
        "max_output_len": column * np.uint32(max_output_len),
        "beam_width": column * np.uint32(beam_width),
        "runtime_top_k": column * np.uint32(top_k),
        "random_seed": np.full((b, 1), random_seed, dtype=np.uint64),
    }


def declared_only(arrays: dict[str, np.ndarray], declared: set[str]) -> dict[str, np.ndarray]:
    """``arrays`` less the optional inputs the model does not declare (Triton rejects those)."""
    return {k: v for k, v in arrays.items() if k not in OPTIONAL_INPUTS or k in declared}


def to_infer_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """Triton inputs carrying ``arrays`` (any shape; the Triton dtype follows numpy's: UINT32
    ids, UINT64 seeds, FP32 settings, BOOL flags) under their names."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        inp = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def parse_response(output_ids: np.ndarray, sequence_length: np.ndarray) -> list[list[int]]:
    """Beam 0 of each row, cut to its sequence_length.

    Args:
      output_ids: [b, beam, len] (a [b, len] answer is read as beam 1).
      sequence_length: [b, beam] (or [b]).
    """
    ids = np.asarray(output_ids)
    lengths = np.asarray(sequence_length)
    if ids.ndim == 2:
        ids = ids[:, None, :]
    if lengths.ndim == 1:
        lengths = lengths[:, None]
    if ids.ndim != 3 or lengths.shape[0] != ids.shape[0]:
        raise RequestFailed(
            f"unexpected response shapes output_ids {list(output_ids.shape)}, "
            f"sequence_length {list(sequence_length.shape)}"
        )
    return [ids[i, 0, : int(lengths[i, 0])].tolist() for i in range(ids.shape[0])]


def is_transient(exc: BaseException) -> bool:
    """Whether retrying (maybe elsewhere) can help: the server is away, not the request bad."""
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        if any(s in status for s in TRANSIENT_STATUS):
            return True
        text = f"{exc.message()} {status}".lower()
    elif isinstance(exc, ConnectionError | TimeoutError):
        return True
    else:
        text = str(exc).lower()
    return any(t in text for t in TRANSIENT_TEXT)


def describe(exc: BaseException) -> str:
    """One line for an error: Triton's status and message, else the exception type and text."""
    if isinstance(exc, InferenceServerException):
        status = exc.status() or ""
        return f"{status}: {exc.message()}".strip(": ")
    return describe_error(exc)


def _first_ready(urls: Sequence[str], model_name: str) -> str | None:
    """None when some endpoint has the model ready, else why the last one has not."""
    last = ""
    for url in urls:
        client = grpcclient.InferenceServerClient(url)
        try:
            if not client.is_server_ready():
                last = f"{url}: server is not ready"
            elif client.is_model_ready(model_name):
                return None
            else:
                last = f"{url}: model {model_name!r} is not ready"
        except Exception as exc:  # noqa: BLE001 - any failure means "not this one"
            last = f"{url}: {describe(exc)}"
        finally:
            client.close()
    return last


def served_model_config(urls: Sequence[str], model_name: str):
    """The model's configuration (Triton's ``ModelConfig``, as loaded) from the first endpoint
    that answers; None when none does."""
    for url in urls:
        client = grpcclient.InferenceServerClient(url)
        try:
            return client.get_model_config(model_name).config
        except Exception:  # noqa: BLE001, S112 - any failure means "ask the next one"
            continue
        finally:
            client.close()
    return None


# How long every endpoint may refuse connections before evaluation gives up (a server that is
# starting listens within this; a wrong --url or a server that is down never does).
_REFUSED_GRACE_S = 5.0


def _some_listening(urls: Sequence[str], grace_s: float) -> None:
    """Raise NotReady, naming the endpoints, when none accepts a TCP connection within
    ``grace_s`` seconds (instead of polling readiness for the whole timeout)."""
    from core import reach

    deadline = time.monotonic() + grace_s
    while True:
        whys = [why for url in urls
                if (why := reach.why_unreachable(*reach.host_port(url), timeout_s=2.0))]
        if len(whys) < len(urls):
            return
        if time.monotonic() >= deadline:
            raise NotReady(f"nothing listens at --url {','.join(urls)} ({whys[-1]}): is the "
                           "server up, and is this its gRPC port?")
        time.sleep(1.0)


def wait_ready(urls: Sequence[str], model_name: str, timeout_s: float,
               period_s: float = 1.0) -> None:
    """Return as soon as one endpoint's server and model ``model_name`` report ready.

    Polls every endpoint with tritonclient's readiness calls every ``period_s`` seconds.

    Raises:
      NotReady: none was ready after ``timeout_s``; the message names the last reason.
    """
    _some_listening(urls, min(timeout_s, _REFUSED_GRACE_S))

    def give_up(state: RetryCallState) -> None:
        raise NotReady(f"no endpoint serves model {model_name!r} after {timeout_s:.0f}s "
                       f"({state.outcome.result()})")

    Retrying(
        retry=retry_if_result(lambda reason: reason is not None),
        stop=stop_before_delay(timeout_s + period_s),
        wait=wait_fixed(period_s),
        retry_error_callback=give_up,
    )(_first_ready, urls, model_name)


class T5Client:
    """FT-contract requests over one or more Triton gRPC endpoints, with retries.

    Thread-safe for :meth:`generate` (gRPC clients are), so one actor can keep several requests
    in flight. ``start`` picks the first endpoint, so actors spread over the endpoints.
    """

    def __init__(
        self,
        urls: Sequence[str],
        model_name: str,
        *,
        start: int = 0,
        max_attempts: int = 8,
        retry_timeout_s: float = 120.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        request_timeout_s: float | None = 600.0,
        on_retry: Callable[[str, BaseException], None] | None = None,
    ):
        """Args:
          urls: HOST:PORT of every endpoint; ``start`` (mod their number) is tried first.
          max_attempts, retry_timeout_s: a request's retry budget (attempts, seconds).
          backoff_s, max_backoff_s: the first wait after a transient error, and its cap.
          request_timeout_s: one attempt's gRPC deadline.
          on_retry: called with (endpoint, error) before each retry (metrics).
        """
        self.urls = list(urls)
        self.model_name = model_name
        self.max_attempts = max_attempts
        self.retry_timeout_s = retry_timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.request_timeout_s = request_timeout_s
        self.on_retry = on_retry
        self._next = start % len(self.urls)
        self._clients = {u: grpcclient.InferenceServerClient(u) for u in self.urls}
        self._declared: set[str] | None = None
        self._rng = random.Random(start)
        self.retries = 0

    def _declared_inputs(self, client: grpcclient.InferenceServerClient) -> set[str]:
        if self._declared is None:
            meta = client.get_model_metadata(self.model_name, as_json=True)
            self._declared = {i["name"] for i in meta.get("inputs", [])}
        return self._declared

    def _pick(self) -> str:
        url = self.urls[self._next]
        self._next = (self._next + 1) % len(self.urls)
        return url

    def generate(
        self,
        token_rows: Sequence[Sequence[int]],
        *,
        max_output_len: int,
        beam_width: int = 1,
        top_k: int = 1,
        random_seed: int = 0,
    ) -> list[list[int]]:
        """Generated ids (beam 0, no start token) for each row.

        Raises:
          RequestFailed: a non-transient error, or transient ones past the retry budget;
            the message names the endpoint and Triton's reason.
        """
        arrays = build_request_arrays(
            token_rows,
            max_output_len=max_output_len,
            beam_width=beam_width,
            top_k=top_k,
            random_seed=random_seed,
        )
        url = ""

        def count_retry(state: RetryCallState) -> None:
            self.retries += 1
            if self.on_retry is not None:
                self.on_retry(url, state.outcome.exception())

        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            # stop_before_delay: give up when the next wait would end past the budget.
            stop=stop_after_attempt(self.max_attempts) | stop_before_delay(self.retry_timeout_s),
            wait=self._backoff,
            before_sleep=count_retry,
            reraise=True,
        )
        attempts = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    url = self._pick()  # each attempt moves on to the next endpoint
                    return self._infer(url, arrays)
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_transient(exc):
                raise RequestFailed(f"{url}: {describe(exc)}") from exc
            raise RequestFailed(
                f"{url}: {describe(exc)} (gave up after {attempts} attempts)"
            ) from exc
        raise AssertionError("unreachable: Retrying returns or raises")

    def _backoff(self, state: RetryCallState) -> float:
        """Exponential wait from ``backoff_s`` up to ``max_backoff_s``, times a jitter in
        [0.5, 1.5): the jitter spreads the actors' retries so a restarted server is not
        stampeded."""
        base = wait_exponential(multiplier=self.backoff_s, max=self.max_backoff_s)(state)
        return base * (0.5 + self._rng.random())

    def _infer(self, url: str, arrays: dict[str, np.ndarray]) -> list[list[int]]:
        """One request to one endpoint, sending only the optional inputs the model declares."""
        client = self._clients[url]
        declared = self._declared_inputs(client)
        sent = declared_only(arrays, declared)
        result = client.infer(
            self.model_name,
            to_infer_inputs(sent),
            outputs=[
                grpcclient.InferRequestedOutput("output_ids"),
                grpcclient.InferRequestedOutput("sequence_length"),
            ],
            client_timeout=self.request_timeout_s,
        )
        return parse_response(result.as_numpy("output_ids"), result.as_numpy("sequence_length"))

    def close(self) -> None:
        """Close every endpoint's gRPC channel."""
        for c in self._clients.values():
            c.close()
