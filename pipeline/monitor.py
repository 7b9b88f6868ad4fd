"""What the pipeline shows on the Ray dashboard (metrics view, Prometheus export).

The stages emit their own metrics (conversion: ``t5ft_convert_tasks_done``,
``t5ft_convert_tasks_total``, ``t5ft_convert_bytes_done``; evaluation:
``t5ft_eval_examples_done``, ``t5ft_eval_examples_failed``, ``t5ft_eval_requests_sent``,
``t5ft_eval_request_retries``, ``t5ft_eval_request_latency_ms``); these add the pipeline's view,
tagged by pipeline name and run:

- ``t5ft_pipeline_stage``: the stage a run is in (see STAGE_VALUES; -1 failed);
- ``t5ft_pipeline_progress``: stages finished or skipped / stages planned, over all runs;
- ``t5ft_pipeline_stage_seconds``: how long each stage of each run took (0 when skipped);
- ``t5ft_pipeline_rouge_l`` and ``t5ft_pipeline_examples_per_second``: each run's result.
"""

from __future__ import annotations

from typing import Any

STAGE_VALUES = {"pending": 0, "convert": 1, "serve": 2, "evaluate": 3, "done": 4, "failed": -1}


class PipelineMetrics:
    """Ray metrics of one pipeline job; a no-op where Ray metrics are unavailable."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self._m: dict[str, Any] = {}
        try:
            from ray.util import metrics as rm

            tags = ("pipeline", "run")
            self._m = {
                "stage": rm.Gauge("t5ft_pipeline_stage", "Stage a run is in: 0 pending, "
                                  "1 convert, 2 serve, 3 evaluate, 4 done, -1 failed",
                                  tag_keys=tags),
                "progress": rm.Gauge("t5ft_pipeline_progress",
                                     "Fraction of the pipeline's stages done or skipped",
                                     tag_keys=("pipeline",)),
                "seconds": rm.Gauge("t5ft_pipeline_stage_seconds",
                                    "Wall time of a run's stage (0 when skipped)",
                                    tag_keys=(*tags, "stage")),
                "rouge_l": rm.Gauge("t5ft_pipeline_rouge_l", "A run's ROUGE-L F (mid)",
                                    tag_keys=tags),
                "eps": rm.Gauge("t5ft_pipeline_examples_per_second",
                                "A run's evaluation throughput", tag_keys=tags),
            }
        except Exception:  # noqa: BLE001 - metrics are a view, never a reason to fail
            self._m = {}

    def _set(self, name: str, value: float, **tags: str) -> None:
        metric = self._m.get(name)
        if metric is not None:
            try:
                metric.set(value, tags={"pipeline": self.pipeline, **tags})
            except Exception:  # noqa: BLE001
                pass

    def stage(self, run: str, stage: str) -> None:
        """The stage ``run`` is in now (a key of STAGE_VALUES)."""
        self._set("stage", STAGE_VALUES[stage], run=run)

    def progress(self, fraction: float) -> None:
        """Stages finished or skipped / stages planned, in [0, 1]."""
        self._set("progress", fraction)

    def stage_seconds(self, run: str, stage: str, seconds: float) -> None:
        """How long ``stage`` of ``run`` took (0 when skipped)."""
        self._set("seconds", seconds, run=run, stage=stage)

    def result(self, run: str, metrics: dict[str, Any]) -> None:
        """The run's ROUGE-L (mid) and examples/s from its metrics.json content."""
        rouge_l = (metrics.get("rougeL") or {}).get("mid")
        if rouge_l is not None:
            self._set("rouge_l", float(rouge_l), run=run)
        if metrics.get("examples_per_second") is not None:
            self._set("eps", float(metrics["examples_per_second"]), run=run)
