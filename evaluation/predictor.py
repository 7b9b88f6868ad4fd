"""The Ray Data actors of an evaluation: one request of token rows in, one output row per example.

``map_batches(Predictor, concurrency=num_actors)`` builds a pool of these; each holds one
:class:`evaluation.client.T5Client` over every endpoint and reports Ray metrics. The in-process
path's actor (evaluation/engine_predictor.py) is the same :class:`BatchPredictor` with the JAX
engine in place of the client. The actor
never raises: a failed request becomes error rows, so one bad example cannot fail the dataset
(Ray Data would otherwise retry and then abort the whole run).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from evaluation.batching import Answer, answer_request, describe_error
from evaluation.client import RequestFailed, T5Client, describe, is_transient
from evaluation.tokenizer import Tokenizer

if TYPE_CHECKING:
    from evaluation.options import EvalSettings

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]

class _Metrics:
    """The actor's Ray metrics, tagged with the model name (dashboards filter on it)."""

    def __init__(self, model_name: str):
        from ray.util import metrics as ray_metrics

        self.done = ray_metrics.Counter(
            "t5ft_eval_examples_done", "Examples with a prediction", tag_keys=("model",)
        )
        self.failed = ray_metrics.Counter(
            "t5ft_eval_examples_failed", "Examples whose request failed", tag_keys=("model",)
        )
        self.sent = ray_metrics.Counter(
            "t5ft_eval_requests_sent", "Triton requests sent (retries included)",
            tag_keys=("model",),
        )
        self.retried = ray_metrics.Counter(
            "t5ft_eval_request_retries", "Requests sent again after a transient error",
            tag_keys=("model",),
        )
        self.latency = ray_metrics.Histogram(
            "t5ft_eval_request_latency_ms", "Triton request latency (ms)",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model",),
        )
        for m in (self.done, self.failed, self.sent, self.retried, self.latency):
            m.set_default_tags({"model": model_name})


class BatchPredictor:
    """Ray Data callable class: one row = one request of up to ``batch_size`` examples.

    Input columns: ``ids`` (strings), ``lengths`` and ``tokens`` (the rows' token ids, EOS
    included, concatenated). Output: one row per example with ``id``,
    ``prediction``, ``latency_ms`` (the request's wall time) and ``error`` ("" when it worked).

    Subclasses say how a request is answered (``_generate``) and which failures split it
    (``_should_split``, ``_describe``); the loop is :func:`evaluation.batching.answer_request`,
    the same one the benchmark runs without Ray.
    """

    def __init__(self, opts: EvalSettings, vocab: bytes):
        """Args: the run's options, the SentencePiece model bytes."""
        self.tokenizer = Tokenizer(vocab)
        self.opts = opts
        self.metrics = _Metrics(opts.model_name)

    def _generate(self, rows: list[list[int]]) -> list[list[int]]:
        """Generated ids (no start token) of each row; raises when the request fails."""
        raise NotImplementedError

    def _request_settings(self) -> dict[str, int]:
        """The decoding settings every request carries (build_request_arrays' keywords)."""
        o = self.opts
        return {"max_output_len": o.max_output_len, "beam_width": o.beam_width,
                "top_k": o.top_k, "random_seed": o.random_seed}

    def _should_split(self, exc: BaseException) -> bool:
        """Whether a failed request is sent again row by row (the request, not the server,
        was at fault)."""
        return True

    def _describe(self, exc: BaseException) -> str:
        """The one-line reason recorded for the rows of a failed request."""
        return describe_error(exc)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """One output row per example of every request in ``batch`` (see the class doc).

        Args:
          batch: ``ids`` [n] object arrays of example ids, ``lengths`` [n] arrays of row
            lengths, ``tokens`` [n] arrays of the concatenated rows; ``n`` requests (Ray Data
            hands one at a time, ``batch_size=1``).
        """
        out: dict[str, list] = {"id": [], "prediction": [], "latency_ms": [], "error": []}
        for ids, lengths, flat in zip(batch["ids"], batch["lengths"], batch["tokens"],
                                      strict=True):
            ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
            rows = [r.tolist() for r in np.split(np.asarray(flat, dtype=np.int64), ends[:-1])]
            answers = answer_request([str(i) for i in ids], rows, self._count_sent,
                                     self.tokenizer.decode, should_split=self._should_split,
                                     describe=self._describe)
            for answer in answers:
                self._observe(answer)
                out["id"].extend(answer.ids)
                out["prediction"].extend(answer.predictions)
                out["latency_ms"].extend([answer.latency_ms] * len(answer.ids))
                out["error"].extend([answer.error] * len(answer.ids))
        return out

    def _count_sent(self, rows: list[list[int]]) -> list[list[int]]:
        self.metrics.sent.inc()
        return self._generate(rows)

    def _observe(self, answer: Answer) -> None:
        if answer.error:
            self.metrics.failed.inc(len(answer.ids))
        else:
            self.metrics.done.inc(len(answer.ids))
            self.metrics.latency.observe(answer.latency_ms)


class Predictor(BatchPredictor):
    """The Triton path: each request goes to a Triton endpoint through one
    :class:`evaluation.client.T5Client` over every endpoint (retries included)."""

    def __init__(self, urls: list[str], opts: EvalSettings, vocab: bytes):
        """Args: the endpoints (HOST:PORT), the run's options, the SentencePiece model bytes."""
        super().__init__(opts, vocab)
        # The process id picks the first endpoint, so the actors spread over the endpoints.
        self.client = T5Client(
            urls, opts.model_name, start=os.getpid(),
            max_attempts=opts.max_attempts,
            retry_timeout_s=opts.retry_timeout_s,
            on_retry=self._count_retry,
        )

    def _count_retry(self, url: str, exc: BaseException) -> None:
        self.metrics.retried.inc()
        self.metrics.sent.inc()

    def _generate(self, rows: list[list[int]]) -> list[list[int]]:
        return self.client.generate(rows, **self._request_settings())

    def _should_split(self, exc: BaseException) -> bool:
        """Split when Triton rejected the request; not when the server is away (all fail)."""
        cause = exc.__cause__ if isinstance(exc, RequestFailed) else exc
        return cause is not None and not is_transient(cause)

    def _describe(self, exc: BaseException) -> str:
        return str(exc) if isinstance(exc, RequestFailed) else describe(exc)
