"""The Ray Data actor of an evaluation: one request of token rows in, one output row per example.

``map_batches(Predictor, concurrency=num_actors)`` builds a pool of these; each holds one
:class:`evaluation.client.T5Client` over every endpoint and reports Ray metrics. The actor
never raises: a failed request becomes error rows, so one bad example cannot fail the dataset
(Ray Data would otherwise retry and then abort the whole run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from evaluation.client import RequestFailed, T5Client, describe, is_transient
from evaluation.tokenizer import Tokenizer

if TYPE_CHECKING:
    from evaluation.runner import EvalSettings

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]

# (ids of the examples, generated ids per example or None when it failed, latency ms, error)
RequestResult = tuple[list[str], list[list[int]] | None, float, str]


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


class Predictor:
    """Ray Data callable class: one row = one request of up to ``batch_size`` examples.

    Input columns: ``ids`` (strings), ``lengths`` and ``tokens`` (the rows' token ids, EOS
    included, concatenated). Output: one row per example with ``id``,
    ``prediction``, ``latency_ms`` (the request's wall time) and ``error`` ("" when it worked).
    """

    def __init__(self, urls: list[str], opts: EvalSettings, vocab: bytes):
        """Args: the endpoints (HOST:PORT), the run's options, the SentencePiece model bytes."""
        self.tokenizer = Tokenizer(vocab)
        self.opts = opts
        self.metrics = _Metrics(opts.model_name)
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
        self.metrics.sent.inc()
        return self.client.generate(
            rows,
            max_output_len=self.opts.max_output_len,
            beam_width=self.opts.beam_width,
            top_k=self.opts.top_k,
            random_seed=self.opts.random_seed,
        )

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
            for group_ids, preds, ms, err in self._request([str(i) for i in ids], rows):
                for i, ex_id in enumerate(group_ids):
                    out["id"].append(ex_id)
                    out["prediction"].append(self.tokenizer.decode(preds[i]) if preds else "")
                    out["latency_ms"].append(ms)
                    out["error"].append(err)
        return out

    def _request(self, ids: list[str], rows: list[list[int]]) -> Iterator[RequestResult]:
        """Yield (ids, generated ids or None, latency ms, error) for one request.

        Decoding happens after this, outside the request's error handling: it cannot fail
        (seqio's rule maps every id, in range or not), so an example fails only when its
        request does.

        A request the server rejects is split into single examples, so one example it cannot
        take (too long, say) fails alone; when the server is away, all of them fail with the
        reason.
        """
        t0 = time.perf_counter()
        try:
            preds = self._generate(rows)
        except Exception as exc:  # noqa: BLE001 - becomes error rows, never fails the dataset
            ms = (time.perf_counter() - t0) * 1000.0
            cause = exc.__cause__ if isinstance(exc, RequestFailed) else exc
            if len(ids) > 1 and cause is not None and not is_transient(cause):
                for i in range(len(ids)):
                    yield from self._request(ids[i : i + 1], rows[i : i + 1])
                return
            self.metrics.failed.inc(len(ids))
            reason = str(exc) if isinstance(exc, RequestFailed) else describe(exc)
            yield ids, None, ms, reason
            return
        ms = (time.perf_counter() - t0) * 1000.0
        self.metrics.done.inc(len(ids))
        self.metrics.latency.observe(ms)
        yield ids, preds, ms, ""
