"""Run a pipeline: for each run, convert, serve, evaluate; stop the servers; keep the outputs.

Output layout (OUT may be local or gs://)::

    OUT/pipeline_state.json     what finished, with which settings (lets a rerun skip it)
    OUT/<run>/                  the run's evaluation: metrics.json, predictions.jsonl,
                                errors.jsonl, report.html
    OUT/comparison.md, .json    every run side by side (ROUGE with bounds, examples/s)
    OUT/pipeline.json           the summary printed with --json

Runs that convert the same checkpoint the same way share one conversion; runs that also serve
it the same way share one set of servers (decoding settings differ only in evaluate). A stage
is skipped when its outputs exist and verify: a conversion whose manifest lists every file FT
needs with the right sizes and hashes, an evaluation whose metrics.json was written for the
same settings and the same model (manifest digest) with no failed example. Otherwise the
stage runs with ``resume`` where it was interrupted before, so a rerun continues.

Every stage is a library call in this process on this process's Ray (pipeline/stages.py); a
stage that fails fails its run with one line naming the stage, and the other runs go on.

A run starts by removing the scratch that killed pipelines left beside OUT's files (their
staged writes, core.scratch); each stage does the same for its own outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from core import scratch, storage
from core.manifest import manifest_digest
from pipeline import compare, stages
from pipeline.config import PipelineConfig, RunSpec, to_argv
from pipeline.monitor import PipelineMetrics

STATE = "pipeline_state.json"


LOG = logging.getLogger(__name__)


def _log(message: str) -> None:
    """One progress line on stderr (through the entry point's logging), as ``[pipeline] ...``."""
    LOG.info("[pipeline] %s", message)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class _State:
    """OUT/pipeline_state.json: per conversion and per run, settings and status."""

    url: str
    data: dict[str, Any]

    @classmethod
    def load(cls, output: str) -> _State:
        url = storage.join(output, STATE)
        try:
            data = json.loads(storage.read_text(url))
        except (FileNotFoundError, ValueError):
            data = {}
        data.setdefault("convert", {})
        data.setdefault("evaluate", {})
        return cls(url, data)

    def save(self) -> None:
        storage.write_text(self.url, json.dumps(self.data, indent=1, sort_keys=True,
                                                default=str))


class Pipeline:
    """One pipeline execution on the Ray this process has initialised.

    ``address`` is that cluster's address, kept for the log; the stages run in this process.
    """

    def __init__(self, cfg: PipelineConfig, address: str | None, name: str = "pipeline") -> None:
        self.cfg = cfg
        self.address = address
        self.metrics = PipelineMetrics(name)
        self.state = _State.load(cfg.output)
        self.results: dict[str, dict[str, Any]] = {
            r.name: {"run": r.name, "output": self.run_output(r), "stages": {},
                     "stage_seconds": {}, "metrics": None, "error": None}
            for r in cfg.runs
        }
        self._planned = 3 * len(cfg.runs)
        self._done = 0
        self.scratch_removed = scratch.Removed()

    def run_output(self, run: RunSpec) -> str:
        """OUT/<run>: where the run's evaluation outputs go."""
        return storage.join(self.cfg.output, run.name)

    # --- bookkeeping -------------------------------------------------------------------------

    def _finish_stage(self, run: RunSpec, stage: str, how: str, seconds: float) -> None:
        res = self.results[run.name]
        res["stages"][stage] = how
        res["stage_seconds"][stage] = round(seconds, 2)
        self.metrics.stage_seconds(run.name, stage, seconds)
        self._done += 1
        self.metrics.progress(self._done / self._planned)

    # --- stages ------------------------------------------------------------------------------

    def convert(self, run: RunSpec, converted: dict[str, dict]) -> None:
        """Convert the run's checkpoint unless this pipeline or an earlier one already did."""
        if run.convert is None:
            self._finish_stage(run, "convert", "none", 0.0)
            return
        key = _digest(run.convert)
        if key in converted:
            self._finish_stage(run, "convert", "shared", 0.0)
            return
        self.metrics.stage(run.name, "convert")
        start = time.monotonic()
        entry = self.state.data["convert"].get(key, {})
        opts = run.convert_options
        problem = stages.verify_conversion(opts)
        if entry.get("status") == "done" and problem is None:
            _log(f"{run.name}: convert skipped: {stages.weights_dir(opts)} verifies")
            converted[key] = entry.get("summary", {})
            self._finish_stage(run, "convert", "skipped", time.monotonic() - start)
            return
        if entry:
            _log(f"{run.name}: convert again ({problem or 'an earlier run did not finish'})")
        self.state.data["convert"][key] = {"settings": run.convert, "status": "started"}
        self.state.save()
        # resume keeps every file whose manifest entry, size and hash check out: a crash
        # resumes where it stopped.
        opts = opts.replace(resume=not opts.overwrite)
        _log(f"convert: {' '.join(to_argv('convert', {**run.convert, 'resume': opts.resume}))}")
        summary = stages.convert(opts)
        self.state.data["convert"][key] = {"settings": run.convert, "status": "done",
                                           "summary": summary}
        self.state.save()
        converted[key] = summary
        _log(f"{run.name}: converted {summary.get('files')} files "
                 f"({summary.get('bytes')} bytes) into {summary.get('output')}")
        self._finish_stage(run, "convert", "done", time.monotonic() - start)

    def model_identity(self, run: RunSpec) -> str | None:
        """The served model's manifest digest, or None when it has no manifest."""
        t = run.convert_options.tensor_parallel if run.convert_options else None
        return manifest_digest(run.serve_options.model_repository, run.serve_options.model_name,
                               t)

    def evaluation_done(self, run: RunSpec, identity: str | None) -> bool:
        """Whether an earlier evaluation of these settings and this model finished clean."""
        entry = self.state.data["evaluate"].get(run.name, {})
        if entry.get("status") != "done" or entry.get("settings") != run.evaluate \
                or entry.get("model") != identity:
            return False
        metrics = stages.read_metrics(self.run_output(run))
        return bool(metrics) and metrics.get("failed", 1) == 0

    def evaluate(self, run: RunSpec, urls: list[str], identity: str | None) -> None:
        """Evaluate the run against the servers at ``urls`` (gRPC host:port each; none for an
        in-process run)."""
        self.metrics.stage(run.name, "evaluate")
        start = time.monotonic()
        entry = self.state.data["evaluate"].get(run.name, {})
        resume = entry.get("settings") == run.evaluate and entry.get("model") == identity
        self.state.data["evaluate"][run.name] = {"settings": run.evaluate, "model": identity,
                                                 "status": "started"}
        self.state.save()
        settings = {**run.evaluate, "output": self.run_output(run), "resume": resume}
        if urls:
            settings["url"] = ",".join(urls)
        _log(f"evaluate: {' '.join(to_argv('evaluate', settings))}")
        opts = run.evaluate_options.replace(resume=resume, **({"url": ",".join(urls)} if urls
                                                              else {}))
        metrics = stages.evaluate(opts)
        self.state.data["evaluate"][run.name] = {"settings": run.evaluate, "model": identity,
                                                 "status": "done"}
        self.state.save()
        self.results[run.name]["metrics"] = metrics
        self.metrics.result(run.name, metrics)
        _log(f"{run.name}: ROUGE-L {metrics['rougeL']['mid']:.4f}; outputs in "
                 f"{self.run_output(run)} (metrics.json, predictions.jsonl, report.html)")
        self._finish_stage(run, "evaluate", "done", time.monotonic() - start)

    # --- the whole thing ---------------------------------------------------------------------

    def groups(self) -> list[list[RunSpec]]:
        """Runs that can share servers, in config order."""
        by_key: dict[str, list[RunSpec]] = {}
        for run in self.cfg.runs:
            by_key.setdefault(run.serve_key(), []).append(run)
        return list(by_key.values())

    def clear_scratch(self) -> scratch.Removed:
        """Remove what writers that are gone staged beside OUT's files (local OUT: a gs:// one
        is written without local scratch), and say so."""
        if not storage.is_gcs(self.cfg.output):
            self.scratch_removed = scratch.sweep(self.cfg.output)
        if self.scratch_removed.files:
            _log(f"removed {self.scratch_removed.files} scratch file(s) "
                     f"({self.scratch_removed.bytes} bytes) left by runs that are gone")
        return self.scratch_removed

    def run(self) -> dict[str, Any]:
        """Every run, group by group; returns the summary (also written to pipeline.json)."""
        start = time.monotonic()
        self.clear_scratch()
        for run in self.cfg.runs:
            self.metrics.stage(run.name, "pending")
        self.metrics.progress(0.0)
        converted: dict[str, dict] = {}
        for group in self.groups():
            self._run_group(group, converted)
        return self.summary(time.monotonic() - start)

    def _fail(self, runs: list[RunSpec], exc: Exception) -> None:
        for run in runs:
            self.results[run.name]["error"] = str(exc)
            self.metrics.stage(run.name, "failed")
            LOG.error("[pipeline] %s: FAILED: %s", run.name, exc)

    def _run_group(self, group: list[RunSpec], converted: dict[str, dict]) -> None:
        """Convert, then serve once and evaluate every run of the group not already done."""
        try:
            for run in group:
                self.convert(run, converted)
        except (stages.StageError, OSError, ValueError) as exc:
            self._fail(group, exc)
            return
        identity = self.model_identity(group[0])
        todo = [run for run in group if not self._skip_evaluated(run, identity)]
        # An in-process evaluation loads the engine in its own actors: no server to start.
        in_process = [run for run in todo if run.evaluate_options.backend == "in-process"]
        served = [run for run in todo if run.evaluate_options.backend != "in-process"]
        for run in in_process:
            self._evaluate_without_servers(run, identity)
        if served:
            self._serve_and_evaluate(served, identity)

    def _evaluate_without_servers(self, run: RunSpec, identity: str | None) -> None:
        """Evaluate an in-process run straight from its converted repository."""
        self._finish_stage(run, "serve", "skipped", 0.0)
        _log(f"{run.name}: serve skipped: evaluate runs the engine in-process")
        self._evaluate_or_fail(run, [], identity)

    def _evaluate_or_fail(self, run: RunSpec, urls: list[str], identity: str | None,
                          alive: Callable[[], bool] = lambda: True) -> None:
        """Evaluate the run (see :meth:`evaluate`); a failure fails this run alone.
        ``alive``: whether the servers still run, asked first."""
        try:
            if not alive():
                raise stages.StageError("serve failed: the servers stopped")
            self.evaluate(run, urls, identity)
            self.metrics.stage(run.name, "done")
        except (stages.StageError, OSError, ValueError, KeyError) as exc:
            self._fail([run], exc)

    def _skip_evaluated(self, run: RunSpec, identity: str | None) -> bool:
        """Take the run's earlier metrics when they are for these settings and this model."""
        if not self.evaluation_done(run, identity):
            return False
        _log(f"{run.name}: evaluate skipped: {self.run_output(run)}/metrics.json "
                 "is from these settings and this model")
        self.results[run.name]["metrics"] = stages.read_metrics(self.run_output(run))
        self.metrics.result(run.name, self.results[run.name]["metrics"])
        self._finish_stage(run, "serve", "skipped", 0.0)
        self._finish_stage(run, "evaluate", "skipped", 0.0)
        self.metrics.stage(run.name, "done")
        return True

    def _serve_and_evaluate(self, todo: list[RunSpec], identity: str | None) -> None:
        """Start one set of servers for the runs, evaluate each in turn, stop the servers."""
        for run in todo:
            self.metrics.stage(run.name, "serve")
        serve_start = time.monotonic()
        _log(f"serve: {' '.join(to_argv('serve', todo[0].serve))}")
        try:
            servers = stages.open_servers(todo[0].serve_options)
        except stages.StageError as exc:
            self._fail(todo, exc)
            return
        try:
            try:
                with stages.reported("serve"):
                    servers.start()
                    urls = servers.grpc_urls()
            except stages.StageError as exc:
                self._fail(todo, exc)
                return
            _log(f"serving {todo[0].serve_options.model_name} at {', '.join(urls)} (gRPC)")
            for run in todo:
                self._finish_stage(run, "serve", "done", time.monotonic() - serve_start)
            for run in todo:
                self._evaluate_or_fail(run, urls, identity, servers.alive)
        finally:
            _log("serve: stopping the servers")
            servers.stop()

    def summary(self, seconds: float) -> dict[str, Any]:
        """Write comparison.{md,json} and pipeline.json; return the summary."""
        rows = []
        for run in self.cfg.runs:
            res = self.results[run.name]
            rows.append({"run": run.name, "output": res["output"], "metrics": res["metrics"],
                         "settings": {"convert": run.convert, "serve": run.serve,
                                      "evaluate": run.evaluate}})
        done = [r for r in rows if r["metrics"]]
        comparison_md = comparison_json = None
        if done:
            table = compare.table(done)
            comparison_json = storage.join(self.cfg.output, "comparison.json")
            comparison_md = storage.join(self.cfg.output, "comparison.md")
            storage.write_text(comparison_json, json.dumps(table, indent=1, default=str))
            storage.write_text(comparison_md, compare.markdown(table))
        runs = [self.results[r.name] for r in self.cfg.runs]
        first = next((r["metrics"] for r in runs if r["metrics"]), None)
        summary = {
            "output": self.cfg.output,
            "metrics": first,
            "runs": runs,
            "failed_runs": [r["run"] for r in runs if r["error"]],
            "comparison": comparison_md,
            "comparison_json": comparison_json,
            "seconds": round(seconds, 2),
            "scratch_removed": self.scratch_removed.as_dict(),
        }
        storage.write_text(storage.join(self.cfg.output, "pipeline.json"),
                           json.dumps(summary, indent=1, default=str))
        return summary
