"""Sharded evaluation: examples -> Ray Data actor pool of Triton clients -> outputs as they come.

The driver reads the data, keeps what a resumed run already has, tokenises the rest and cuts it
into requests of ``batch_size`` examples of similar length (fixed by the data, so 1 or N actors
send exactly the same requests and greedy decoding gives the same predictions). Each request is one row of a Ray
Dataset; ``map_batches(Predictor, concurrency=num_actors)`` runs a pool of actors, each holding a
``tritonclient.grpc`` client over every endpoint with ``requests_per_actor`` requests in flight.
Results stream back unordered; the driver scores each example and appends it to
predictions.jsonl at once. At the end the files are put in example order and metrics.json and
report.html are written.

Ray Data gives the pool, streaming, backpressure and actor restarts; the actor never raises
(a failed request becomes error rows), so one bad example cannot fail the dataset.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from evaluation import metrics as eval_metrics
from evaluation import report as eval_report
from evaluation.client import RequestFailed, T5Client, describe, is_transient
from evaluation.data import Example, load_examples
from evaluation.options import EvalOptions, EvalSettings  # noqa: F401 - EvalSettings kept
from evaluation.outputs import METRICS, PREDICTIONS, REPORT, OutputDir, prediction_line
from evaluation.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer, model_vocab_size

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class EvaluationError(ValueError):
    """Settings or preconditions that make the evaluation impossible (reported as one line)."""


class Predictor:
    """Ray Data callable class: one row = one request of up to ``batch_size`` examples.

    Input columns: ``ids`` (strings), ``lengths`` and ``tokens`` (the rows' token ids, EOS
    included, concatenated). Output: one row per example with ``id``,
    ``prediction``, ``latency_ms`` (the request's wall time) and ``error`` ("" when it worked).
    """

    def __init__(self, urls: list[str], model_name: str, vocab: bytes, settings: dict):
        import os

        from ray.util import metrics as ray_metrics

        self.tokenizer = Tokenizer(vocab)
        self.s = settings
        tags = {"model": model_name}
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
            m.set_default_tags(tags)
        self.client = T5Client(
            urls, model_name, start=os.getpid(),
            max_attempts=settings["max_attempts"],
            retry_timeout_s=settings["retry_timeout_s"],
            on_retry=lambda url, exc: (self.retried.inc(), self.sent.inc()),
        )

    def _generate(self, rows: list[list[int]]) -> list[list[int]]:
        self.sent.inc()
        return self.client.generate(
            rows,
            max_output_len=self.s["max_output_len"],
            beam_width=self.s["beam_width"],
            top_k=self.s["top_k"],
            random_seed=self.s["random_seed"],
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
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

    def _request(self, ids: list[str], rows: list[list[int]]):
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
            self.failed.inc(len(ids))
            reason = str(exc) if isinstance(exc, RequestFailed) else describe(exc)
            yield ids, None, ms, reason
            return
        ms = (time.perf_counter() - t0) * 1000.0
        self.done.inc(len(ids))
        self.latency.observe(ms)
        yield ids, preds, ms, ""


def request_batches(
    examples: Sequence[Example], tokenizer: Tokenizer, batch_size: int, max_input_len: int
) -> list[dict[str, list]]:
    """Tokenise ``examples`` and cut them into requests of ``batch_size`` rows of similar length.

    A request is padded to its longest row, and padding costs the server as much as real tokens,
    so rows are sorted by length (longest first, ties in example order) before cutting. The
    requests depend only on the examples and the settings, never on the number of actors.
    """
    encoded = [(tokenizer.encode(e.input_text, max_input_len), e) for e in examples]
    encoded.sort(key=lambda pair: (-len(pair[0]), pair[1].index))
    batches = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        batches.append({
            "ids": [e.id for _, e in chunk],
            "lengths": [len(t) for t, _ in chunk],
            "tokens": [tok for t, _ in chunk for tok in t],
        })
    return batches


def vocab_against_model(
    s: EvalSettings, tokenizer: Tokenizer, log: Callable[[str], None]
) -> int | None:
    """The model's vocab_size (config.ini) when ``--model-repository`` is given, else None.

    Logs how the vocabulary compares; raises VocabError, before any request, when the
    vocabulary has more pieces than the model has logits.
    """
    if not s.model_repository:
        return None
    found = model_vocab_size(s.model_repository, s.model_name)
    if found is None:
        log(f"evaluate: no config.ini for {s.model_name!r} in {s.model_repository}; the "
            "model's vocab_size is not checked against the vocabulary")
        return None
    vocab_size, ini = found
    log(f"evaluate: {check_vocab_fits(tokenizer, vocab_size, ini)}")
    return vocab_size


def wait_until_ready(urls: Sequence[str], model_name: str, timeout_s: float) -> None:
    """Fail early and clearly when no endpoint serves the model (wrong URL or model name)."""
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        for url in urls:
            client = grpcclient.InferenceServerClient(url)
            try:
                if client.is_model_ready(model_name):
                    return
                last = f"{url}: model {model_name!r} is not ready"
            except Exception as exc:  # noqa: BLE001 - any failure means "not this one"
                last = f"{url}: {describe(exc)}"
            finally:
                client.close()
        if time.monotonic() > deadline:
            raise EvaluationError(
                f"no endpoint serves model {model_name!r} after {timeout_s:.0f}s ({last})"
            )
        time.sleep(1.0)


def _stream_results(
    batches: list[dict[str, list]], urls: list[str], s: EvalSettings, vocab: bytes
) -> Iterator[dict[str, Any]]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar in examples, not Ray's in blocks
    ctx.print_on_execution_start = False
    settings = {k: getattr(s, k) for k in ("max_input_len", "max_output_len", "beam_width",
                                            "top_k", "random_seed", "max_attempts",
                                            "retry_timeout_s")}
    # One block per request: every request can go to any actor as soon as one is free.
    ds = ray.data.from_items(batches, override_num_blocks=len(batches))
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"urls": urls, "model_name": s.model_name, "vocab": vocab,
                               "settings": settings},
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(
            size=s.num_actors,
            max_concurrent_calls_per_actor=s.requests_per_actor,
            enable_true_multi_threading=True,
        ),
        num_cpus=s.actor_num_cpus,
    )
    yield from ds.iter_rows()


def evaluate(
    settings: EvalSettings,
    log: Callable[[str], None] | None = None,
    init_ray: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run one evaluation and write its outputs (see interfaces.md, ray_jobs.evaluate).

    Inputs are read and checked before Ray is needed; then ``init_ray`` is called (the CLI
    passes ``ray_jobs._cli.init_ray``); without it, a Ray not yet initialised is started locally.

    Returns:
      metrics.json's content plus ``output`` (OUT), ``predictions`` and ``report`` paths.

    Raises:
      EvaluationError, evaluation.data.DataError, evaluation.tokenizer.VocabError,
      evaluation.outputs.ResumeError: bad settings or inputs, each with a one-line reason.
    """
    import ray
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    s = settings
    urls = s.validate()
    tokenizer = load_tokenizer(s.vocab, s.model_repository, s.model_name)
    model_vocab = vocab_against_model(s, tokenizer, log)
    data = load_examples(
        s.dataset, split=s.split, max_examples=s.max_examples,
        document_field=s.document_field, summary_field=s.summary_field,
        input_template=s.input_template,
    )
    order = {e.id: e.index for e in data.examples}
    out = OutputDir(s.output, resume=s.resume)
    try:
        done = out.load_done({e.id: e.reference for e in data.examples})
        errors: list[dict] = []
        for row_error in data.errors:
            errors.append(row_error.to_json())
            out.append_error(errors[-1])
        pending = [e for e in data.examples if e.id not in done]
        log(f"evaluate: {data.total} rows, {len(data.errors)} rejected, "
            f"{len(done)} already predicted, {len(pending)} to send to {len(urls)} endpoint(s)")

        scorer = eval_metrics.make_scorer()
        scores: dict[str, dict] = {}
        latencies: list[float] = []
        references = {e.id: e.reference for e in pending}
        index_of = {e.id: e.index for e in pending}
        t_requests = time.perf_counter()
        if pending:
            wait_until_ready(urls, s.model_name, s.ready_timeout_s)
            if init_ray is not None:
                init_ray()
            if not ray.is_initialized():
                ray.init()
            batches = request_batches(pending, tokenizer, s.batch_size, s.max_input_len)
            bar = tqdm(total=len(pending), desc="evaluate", unit="ex", file=sys.stderr,
                       disable=not s.progress, dynamic_ncols=True)
            failed_now = 0
            for row in _stream_results(batches, urls, s, tokenizer.model_proto):
                ex_id = str(row["id"])
                if row["error"]:
                    failed_now += 1
                    errors.append({"id": ex_id, "index": index_of[ex_id],
                                   "reason": str(row["error"]), "stage": "request"})
                    out.append_error(errors[-1])
                else:
                    prediction = str(row["prediction"])
                    sc = eval_metrics.score_example(scorer, prediction, references[ex_id])
                    scores[ex_id] = sc
                    record = {"id": ex_id, "prediction": prediction,
                              "reference": references[ex_id], **eval_metrics.f_measures(sc)}
                    done[ex_id] = prediction_line(record)
                    out.append_prediction(record)
                    latencies.append(float(row["latency_ms"]))
                bar.update(1)
                bar.set_postfix(failed=failed_now, refresh=False)
            bar.close()
        request_seconds = time.perf_counter() - t_requests

        out.finalize(order, done, errors)
        ordered_ids = sorted(done, key=order.__getitem__)
        for ex_id in ordered_ids:
            if ex_id not in scores:  # kept from an earlier run: score it the same way again
                rec = json.loads(done[ex_id])
                scores[ex_id] = eval_metrics.score_example(
                    scorer, rec["prediction"], rec["reference"]
                )
        rouge = eval_metrics.aggregate_rouge(scores[i] for i in ordered_ids)
        sent = len(latencies)
        result = eval_metrics.summary_metrics(
            rouge, examples=len(done), failed=len(errors),
            seconds=time.perf_counter() - t_start, request_seconds=request_seconds, sent=sent,
            latencies_ms=latencies, resumed=len(data.examples) - len(pending),
        )
        result.update(vocab_pieces=tokenizer.vocab_size, model_vocab_size=model_vocab)
        out.write_file(METRICS, json.dumps(result, indent=2, sort_keys=True) + "\n")
        html = eval_report.render_report(
            result,
            per_example={t: [scores[i][t].fmeasure for i in ordered_ids]
                         for t in eval_metrics.ROUGE_TYPES},
            latencies_ms=latencies,
            samples=[json.loads(done[i]) for i in ordered_ids[:5]],
            errors=errors[:20],
            settings={"model": s.model_name, "dataset": s.dataset, "split": s.split,
                      "endpoints": ", ".join(urls), "actors": s.num_actors,
                      "batch size": s.batch_size, "max input len": s.max_input_len,
                      "max output len": s.max_output_len, "beam width": s.beam_width,
                      "top k": s.top_k, "vocabulary pieces": tokenizer.vocab_size,
                      "model vocab_size": "unknown" if model_vocab is None else model_vocab},
        )
        out.write_file(REPORT, html)
        result.update(output=s.output, predictions=out.remote(PREDICTIONS),
                      report=out.remote(REPORT))
        return result
    finally:
        out.cleanup()
