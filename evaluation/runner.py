"""Sharded evaluation: examples -> Ray Data actor pool of Triton clients -> outputs as they come.

The driver reads the data, keeps what a resumed run already has, tokenises the rest and cuts it
into requests of ``batch_size`` examples of similar length (fixed by the data, so 1 or N actors
send exactly the same requests and greedy decoding gives the same predictions). Each request is
one row of a Ray Dataset; ``map_batches(Predictor, concurrency=num_actors)`` runs a pool of
actors (evaluation/predictor.py), each holding a ``tritonclient.grpc`` client over every
endpoint with ``requests_per_actor`` requests in flight. Results stream back unordered; the
driver scores each example and appends it to predictions.jsonl at once. At the end the files are
put in example order and metrics.json and report.html are written.

:func:`evaluate` is those steps in order: ``_load`` -> ``_resume`` -> ``_stream`` -> ``_score``
-> ``_render``.

Ray Data gives the pool, streaming, backpressure and actor restarts; the actor never raises
(a failed request becomes error rows), so one bad example cannot fail the dataset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from evaluation import metrics as eval_metrics
from evaluation import report as eval_report
from evaluation.batching import group_rows
from evaluation.client import NotReady, served_model_config, wait_ready
from evaluation.data import Example, LoadedData, load_examples
from evaluation.engine_predictor import EnginePredictor, read_engine_spec
from evaluation.errors import EvaluationError  # noqa: F401 - public name
from evaluation.options import EvalOptions, EvalSettings  # noqa: F401 - EvalSettings kept
from evaluation.outputs import METRICS, PREDICTIONS, REPORT, OutputDir, prediction_line
from evaluation.predictor import LATENCY_BOUNDARIES_MS, Predictor  # noqa: F401 - public names
from evaluation.tokenizer import (
    Tokenizer,
    check_vocab_fits,
    load_tokenizer,
    model_vocab_size,
    open_model,
)

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class _Inputs:
    """What ``_load`` read and checked before anything is sent."""

    settings: EvalSettings
    urls: list[str]
    tokenizer: Tokenizer
    model_vocab: int | None  # the served model's vocab_size, when its config.ini was found
    data: LoadedData


@dataclasses.dataclass
class _Run:
    """The run's state: what the output folder holds so far and what is left to send."""

    done: dict[str, str]  # example id -> its predictions.jsonl line (earlier runs' and new)
    errors: list[dict]  # errors.jsonl records: rejected rows, then failed requests
    pending: list[Example]  # examples still without a prediction
    scorer: Any = dataclasses.field(default_factory=eval_metrics.make_scorer)
    scores: dict[str, dict] = dataclasses.field(default_factory=dict)  # id -> ROUGE scores
    latencies: list[float] = dataclasses.field(default_factory=list)  # ms, one per new example
    request_seconds: float = 0.0
    request_rows: int = 0  # examples per request this run sent (:func:`request_rows`)
    served: ServedModel | None = None  # read once, when requests start (:func:`served_model`)
    ordered_ids: list[str] = dataclasses.field(default_factory=list)  # done ids, example order


def request_batches(
    examples: Sequence[Example], tokenizer: Tokenizer, batch_size: int, max_input_len: int
) -> list[dict[str, list]]:
    """Tokenise ``examples`` and cut them into requests of ``batch_size`` rows of similar length.

    The grouping is :func:`evaluation.batching.group_rows` (longest first, ties in the order of
    ``examples``), so the requests depend only on the examples and the settings, never on the
    number of actors.

    Returns:
      One dict per request: ``ids`` [b] example ids, ``lengths`` [b] row lengths (EOS
      included), ``tokens`` [sum(lengths)] the rows' token ids concatenated.
    """
    encoded = [tokenizer.encode(e.input_text, max_input_len) for e in examples]
    batches = []
    for group in group_rows([len(t) for t in encoded], batch_size):
        batches.append({
            "ids": [examples[i].id for i in group],
            "lengths": [len(encoded[i]) for i in group],
            "tokens": [tok for i in group for tok in encoded[i]],
        })
    return batches


def vocab_against_model(s: EvalSettings, tokenizer: Tokenizer) -> int | None:
    """The model's vocab_size (config.ini) when ``--model-repository`` is given, else None.

    Logs how the vocabulary compares; raises VocabError, before any request, when the
    vocabulary has more pieces than the model has logits.
    """
    if not s.model_repository:
        return None
    found = model_vocab_size(s.model_repository, s.model_name)
    if found is None:
        LOG.info("evaluate: no config.ini for %r in %s; the model's vocab_size is not checked "
                 "against the vocabulary", s.model_name, s.model_repository)
        return None
    vocab_size, ini = found
    LOG.info("evaluate: %s", check_vocab_fits(tokenizer, vocab_size, ini))
    return vocab_size


def warn_input_len(s: EvalSettings) -> None:
    """Warn when --max-input-len exceeds the input length the model was trained with, where
    the repository's manifest records it (convert copies config.gin's TASK_FEATURE_LENGTHS):
    a model scores lower on inputs longer than any it saw (the demo: ROUGE-L 0.87 at 512,
    1.0 at its 128)."""
    if not s.model_repository:
        return
    from core import ft_format, storage
    from core.manifest import ManifestError, read_manifest
    from core.repository import ConvertedModel
    from evaluation.tokenizer import VocabError, open_model

    try:
        model = (open_model(s.model_repository, s.model_name)
                 or ConvertedModel.unconfigured(s.model_repository, s.model_name))
        url = storage.join(model.weights_dir, ft_format.MANIFEST)
        header, _ = read_manifest(url) or ({}, {})
    except (ManifestError, VocabError, OSError, ValueError):
        return  # no manifest, or not ours to judge: nothing known
    trained = (header.get("task_feature_lengths") or {}).get("inputs")
    if isinstance(trained, int) and s.max_input_len > trained:
        LOG.warning("evaluate: warning: --max-input-len %d exceeds the %d input tokens the model "
                    "was trained with (its config.gin's TASK_FEATURE_LENGTHS, recorded in %s); "
                    "it may score lower on the longer inputs: consider --max-input-len %d",
                    s.max_input_len, trained, url, trained)


def wait_until_ready(urls: Sequence[str], model_name: str, timeout_s: float) -> None:
    """Fail early and clearly when no endpoint serves the model (wrong URL or model name).

    Raises:
      EvaluationError: no endpoint had the model ready within ``timeout_s``.
    """
    try:
        wait_ready(urls, model_name, timeout_s)
    except NotReady as exc:
        raise EvaluationError(str(exc)) from exc


def _stream_results(
    batches: list[dict[str, list]], urls: list[str], s: EvalSettings, vocab: bytes
) -> Iterator[dict[str, Any]]:
    """The Predictor pool's output rows (``id``, ``prediction``, ``latency_ms``, ``error``),
    unordered, as soon as each request answers."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar in examples, not Ray's in blocks
    ctx.print_on_execution_start = False
    # One block per request: every request can go to any actor as soon as one is free.
    ds = ray.data.from_items(batches, override_num_blocks=len(batches))
    if s.backend == "in-process":
        # One request at a time per actor: the engine serialises device work anyway.
        actor, kwargs, in_flight = EnginePredictor, {"model_repository": s.model_repository}, 1
        gpus = _gpus_per_actor(s)
        resources = {"num_gpus": gpus} if gpus else {"num_cpus": 1}
    else:
        actor, kwargs, in_flight = Predictor, {"urls": urls}, s.requests_per_actor
        resources = {"num_cpus": s.actor_num_cpus}
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs={**kwargs, "opts": s, "vocab": vocab},
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(
            size=s.num_actors,
            max_concurrent_calls_per_actor=in_flight,
            enable_true_multi_threading=True,
        ),
        **resources,
    )
    yield from ds.iter_rows()


def _check_engine(s: EvalSettings) -> None:
    """Fail on the driver, before Ray starts actors, when the repository has no engine to run.

    Called after ``s.checked_urls()``, which refused a missing or gs:// ``--model-repository``.
    """
    try:
        read_engine_spec(s.model_repository, s.model_name)
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluationError(f"--backend in-process: {exc}") from exc


def _gpus_per_actor(s: EvalSettings) -> float:
    """``--num-gpus-per-actor``, else 1 when the Ray cluster has GPUs and 0 when it has none."""
    import ray

    if s.num_gpus_per_actor is not None:
        return s.num_gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


# Examples per request when --batch-size is not given and the served model does not decode
# batch-invariantly (a FasterTransformer model, a free-batching jax model, an unreadable config).
DEFAULT_REQUEST_ROWS = 8


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The served model's ModelConfig (None when unknown) and where it was read: "server"
    (``--backend triton``: what answers), "repository" (``--model-repository``'s
    config.pbtxt, or the server gave none) or "unknown". Read once per run
    (:func:`served_model`): the request size and metrics.json both come from it."""

    config: Any
    source: str

    @property
    def batch_invariant(self) -> bool | None:
        """The jax engine's mode; None for a FasterTransformer model, an unknown config, or
        one the engine refuses (nothing was served from it)."""
        from core import repository

        if self.config is None:
            return None
        try:
            return repository.batch_invariant(self.config)
        except ValueError:
            return None

    def record(self) -> dict[str, Any]:
        """metrics.json's ``serving``: how the answers were computed, so two runs' metrics can
        be compared knowingly: the inference ``data_type``, the ``batch_invariant`` mode, and
        where they were read (``source``)."""
        if self.config is None:
            return {"data_type": None, "batch_invariant": None, "source": self.source}
        params = {k: v.string_value for k, v in self.config.parameters.items()}
        return {"data_type": params.get("data_type") or None,
                "batch_invariant": self.batch_invariant, "source": self.source}


def served_model(s: EvalSettings, urls: Sequence[str]) -> ServedModel:
    """Read the served model's config: the server's for ``--backend triton``, else, or when no
    server answers, ``--model-repository``'s config.pbtxt."""
    if s.backend == "triton" and urls:
        config = served_model_config(urls, s.model_name)
        if config is not None:
            return ServedModel(config, "server")
    if s.model_repository:
        model = open_model(s.model_repository, s.model_name)
        if model is not None:
            return ServedModel(model.config, "repository")
    return ServedModel(None, "unknown")


def request_rows(s: EvalSettings, served: ServedModel) -> int:
    """Examples per request: ``--batch-size``; else, when the served model decodes
    batch-invariantly, its ``max_batch_size`` (the rows of one engine program on a GPU: there
    a smaller request still runs, and costs, a program of that many rows, so requests of 8
    made evaluation 3.2x slower on an H100, docs/benchmarks.md); else 8."""
    if s.batch_size is not None:
        return s.batch_size
    if served.batch_invariant and served.config.max_batch_size > 0:
        return int(served.config.max_batch_size)
    return DEFAULT_REQUEST_ROWS


def _where(s: EvalSettings, urls: Sequence[str]) -> str:
    """Who answers, for the log and the report."""
    if s.backend == "in-process":
        return f"the in-process engine of {s.model_repository}"
    return f"{len(urls)} endpoint(s)"


def _load(s: EvalSettings) -> _Inputs:
    """Check the settings and read the vocabulary and the data (no Ray, no request yet)."""
    urls = s.checked_urls()
    if s.backend == "in-process":
        _check_engine(s)
    tokenizer = load_tokenizer(s.vocab, s.model_repository, s.model_name)
    model_vocab = vocab_against_model(s, tokenizer)
    warn_input_len(s)
    data = load_examples(
        s.dataset, split=s.split, max_examples=s.max_examples,
        document_field=s.document_field, summary_field=s.summary_field,
        input_template=s.input_template,
    )
    return _Inputs(s, urls, tokenizer, model_vocab, data)


def _resume(inputs: _Inputs, out: OutputDir) -> _Run:
    """Keep what an earlier run predicted, record the rejected rows, and list what is left."""
    data = inputs.data
    done = out.load_done({e.id: e.reference for e in data.examples})
    errors: list[dict] = []
    for row_error in data.errors:
        errors.append(row_error.to_json())
        out.append_error(errors[-1])
    pending = [e for e in data.examples if e.id not in done]
    LOG.info("evaluate: %d rows, %d rejected, %d already predicted, %d to send to %s",
             data.total, len(data.errors), len(done), len(pending),
             _where(inputs.settings, inputs.urls))
    return _Run(done, errors, pending)


def _record(row: dict[str, Any], run: _Run, out: OutputDir, index_of: dict[str, int],
            references: dict[str, str]) -> bool:
    """Score one answered example and append it to its file at once; False when it failed."""
    ex_id = str(row["id"])
    if row["error"]:
        run.errors.append({"id": ex_id, "index": index_of[ex_id],
                           "reason": str(row["error"]), "stage": "request"})
        out.append_error(run.errors[-1])
        return False
    prediction = str(row["prediction"])
    sc = eval_metrics.score_example(run.scorer, prediction, references[ex_id])
    run.scores[ex_id] = sc
    record = {"id": ex_id, "prediction": prediction, "reference": references[ex_id],
              **eval_metrics.f_measures(sc)}
    run.done[ex_id] = prediction_line(record)
    out.append_prediction(record)
    run.latencies.append(float(row["latency_ms"]))
    return True


def _stream(s: EvalSettings, inputs: _Inputs, run: _Run, out: OutputDir,
            init_ray: Callable[[], None] | None) -> None:
    """Send the pending examples through the actor pool, recording each answer as it comes."""
    t_requests = time.perf_counter()
    if run.pending:
        import ray
        from tqdm import tqdm

        # Readiness before Ray: a wrong URL or model name fails in seconds, not at the
        # first request after the actors started.
        if s.backend == "triton":
            wait_until_ready(inputs.urls, s.model_name, s.ready_timeout_s)
        if init_ray is not None:
            init_ray()
        if not ray.is_initialized():
            ray.init()
        run.served = served_model(s, inputs.urls)
        run.request_rows = request_rows(s, run.served)
        LOG.info("requests of %d examples%s", run.request_rows,
                 "" if s.batch_size is not None else " (the served model's max_batch_size)")
        batches = request_batches(run.pending, inputs.tokenizer, run.request_rows,
                                  s.max_input_len)
        references = {e.id: e.reference for e in run.pending}
        index_of = {e.id: e.index for e in run.pending}
        bar = tqdm(total=len(run.pending), desc="evaluate", unit="ex", file=sys.stderr,
                   disable=not s.progress, dynamic_ncols=True)
        failed_now = 0
        for row in _stream_results(batches, inputs.urls, s, inputs.tokenizer.model_proto):
            failed_now += not _record(row, run, out, index_of, references)
            bar.update(1)
            bar.set_postfix(failed=failed_now, refresh=False)
        bar.close()
    run.request_seconds = time.perf_counter() - t_requests


def _score(inputs: _Inputs, run: _Run, out: OutputDir, t_start: float) -> dict[str, Any]:
    """Put the files in example order and compute metrics.json's content."""
    order = {e.id: e.index for e in inputs.data.examples}
    out.finalize(order, run.done, run.errors)
    run.ordered_ids = ordered_ids = sorted(run.done, key=order.__getitem__)
    for ex_id in ordered_ids:
        if ex_id not in run.scores:  # kept from an earlier run: score it the same way again
            rec = json.loads(run.done[ex_id])
            run.scores[ex_id] = eval_metrics.score_example(
                run.scorer, rec["prediction"], rec["reference"]
            )
    rouge = eval_metrics.aggregate_rouge(run.scores[i] for i in ordered_ids)
    result = eval_metrics.summary_metrics(
        rouge, examples=len(run.done), failed=len(run.errors),
        seconds=time.perf_counter() - t_start, request_seconds=run.request_seconds,
        sent=len(run.latencies), latencies_ms=run.latencies,
        resumed=len(inputs.data.examples) - len(run.pending),
    )
    result.update(vocab_pieces=inputs.tokenizer.vocab_size, model_vocab_size=inputs.model_vocab,
                  request_rows=run.request_rows or None,
                  serving=(run.served or served_model(inputs.settings, inputs.urls)).record())
    return result


def _render(s: EvalSettings, inputs: _Inputs, run: _Run, out: OutputDir,
            result: dict[str, Any]) -> None:
    """Write metrics.json and report.html (plots, samples, errors, the settings used)."""
    out.write_file(METRICS, json.dumps(result, indent=2, sort_keys=True) + "\n")
    ordered_ids = run.ordered_ids
    model_vocab = inputs.model_vocab
    html = eval_report.render_report(
        result,
        per_example={t: [run.scores[i][t].fmeasure for i in ordered_ids]
                     for t in eval_metrics.ROUGE_TYPES},
        latencies_ms=run.latencies,
        samples=[json.loads(run.done[i]) for i in ordered_ids[:5]],
        errors=run.errors[:20],
        settings={"model": s.model_name, "dataset": s.dataset, "split": s.split,
                  "backend": s.backend, "endpoints": ", ".join(inputs.urls) or "none",
                  "actors": s.num_actors,
                  "batch size": run.request_rows or s.batch_size, "max input len": s.max_input_len,
                  "max output len": s.max_output_len, "beam width": s.beam_width,
                  "top k": s.top_k, "vocabulary pieces": inputs.tokenizer.vocab_size,
                  "model vocab_size": "unknown" if model_vocab is None else model_vocab,
                  "inference dtype": result["serving"]["data_type"],
                  "batch invariant": result["serving"]["batch_invariant"],
                  "read from": result["serving"]["source"]},
    )
    out.write_file(REPORT, html)


# What a prediction depends on besides the model: a resume must use the same values.
_RECORDED = ("model_name", "dataset", "split", "document_field", "summary_field",
             "input_template", "max_input_len", "max_output_len", "beam_width", "top_k",
             "random_seed")


def _recorded_settings(s: EvalSettings) -> dict[str, Any]:
    return {key: getattr(s, key) for key in _RECORDED}


def evaluate(
    settings: EvalSettings,
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
    t_start = time.perf_counter()
    s = settings
    inputs = _load(s)
    out = OutputDir(s.output, resume=s.resume, settings=_recorded_settings(s))
    try:
        run = _resume(inputs, out)
        _stream(s, inputs, run, out, init_ray)
        result = _score(inputs, run, out, t_start)
        _render(s, inputs, run, out, result)
        result.update(output=s.output, predictions=out.remote(PREDICTIONS),
                      report=out.remote(REPORT))
        return result
    finally:
        out.cleanup()
