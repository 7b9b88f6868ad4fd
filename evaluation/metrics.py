"""ROUGE with bootstrap confidence intervals, latency percentiles, throughput.

Per-example scores come from ``rouge_score.rouge_scorer`` (with the Porter stemmer, as the T5
paper's evaluation); corpus scores from ``rouge_score.scoring.BootstrapAggregator``, which resamples
with numpy's global generator, so numpy is seeded first: the same predictions always give the same
``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from rouge_score import rouge_scorer, scoring

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BOOTSTRAP_SEED = 0
BOOTSTRAP_SAMPLES = 1000


def make_scorer() -> rouge_scorer.RougeScorer:
    """The ROUGE scorer of every evaluation: the four ROUGE_TYPES, with Porter stemming."""
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def score_example(
    scorer: rouge_scorer.RougeScorer, prediction: str, reference: str
) -> dict[str, scoring.Score]:
    """ROUGE precision/recall/F of one prediction against its reference."""
    return scorer.score(target=reference, prediction=prediction)


def f_measures(scores: Mapping[str, scoring.Score]) -> dict[str, float]:
    """The F-measure of each ROUGE type, as plain floats (JSON-ready)."""
    return {t: float(scores[t].fmeasure) for t in ROUGE_TYPES}


def aggregate_rouge(
    scores: Iterable[Mapping[str, scoring.Score]],
    seed: int = BOOTSTRAP_SEED,
    n_samples: int = BOOTSTRAP_SAMPLES,
) -> dict[str, dict[str, float]]:
    """Bootstrap low/mid/high F-measures over examples, in example order.

    Returns:
      {rouge type: {"low", "mid", "high"}}; all zeros when there is no example.
    """
    aggregator = scoring.BootstrapAggregator(n_samples=n_samples)
    count = 0
    for s in scores:
        aggregator.add_scores(dict(s))
        count += 1
    if count == 0:
        return {t: {"low": 0.0, "mid": 0.0, "high": 0.0} for t in ROUGE_TYPES}
    np.random.seed(seed)  # BootstrapAggregator resamples with np.random
    result = aggregator.aggregate()
    return {
        t: {
            "low": float(result[t].low.fmeasure),
            "mid": float(result[t].mid.fmeasure),
            "high": float(result[t].high.fmeasure),
        }
        for t in ROUGE_TYPES
    }


def latency_percentiles(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 of per-example latency (ms); zeros when nothing was timed."""
    if len(latencies_ms) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    p50, p90, p99 = np.percentile(np.asarray(latencies_ms, dtype=np.float64), [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summary_metrics(
    rouge: Mapping[str, Mapping[str, float]],
    *,
    examples: int,
    failed: int,
    seconds: float,
    request_seconds: float,
    sent: int,
    latencies_ms: Sequence[float],
    resumed: int,
) -> dict:
    """metrics.json's content.

    Args:
      rouge: :func:`aggregate_rouge`'s result.
      examples: examples with a prediction (including ones kept from a resumed run).
      failed: examples in errors.jsonl.
      seconds: wall time of this run (reading data to writing the report).
      request_seconds: wall time of its request phase (actors started to last answer).
      sent: examples predicted by this run (throughput counts only these, over
        request_seconds).
      latencies_ms: per-example request latency of this run.
      resumed: predictions kept from an earlier run.
    """
    return {
        **{t: dict(rouge[t]) for t in ROUGE_TYPES},
        "examples": examples,
        "failed": failed,
        "resumed": resumed,
        "seconds": round(seconds, 3),
        "request_seconds": round(request_seconds, 3),
        "examples_per_second": round(sent / request_seconds, 3) if request_seconds > 0 else 0.0,
        "latency_ms": latency_percentiles(latencies_ms),
        "bootstrap": {"seed": BOOTSTRAP_SEED, "samples": BOOTSTRAP_SAMPLES},
    }
