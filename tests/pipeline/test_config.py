"""PIPELINE.yaml parsing, the shipped examples, the comparison table and the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import compare
from pipeline.config import ConfigError, load, parse, to_argv
from ray_jobs import convert, evaluate

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "output": "out/x",
    "convert": {"src": "ckpt", "dst": "repo", "model_name": "m", "tensor_parallel": 2},
    "serve": {"backend": "local"},
    "evaluate": {"dataset": "data.jsonl", "max_examples": 5},
}


def test_stage_settings_flow_into_the_next_stage():
    cfg = parse(BASE)
    (run,) = cfg.runs
    assert run.name == "m"
    assert run.serve["model_repository"] == "repo" and run.serve["model_name"] == "m"
    assert run.evaluate["model_name"] == "m" and run.evaluate["model_repository"] == "repo"
    # the argv each job gets parses with that job's own parser
    args = convert.build_parser().parse_args(to_argv("convert", run.convert))
    assert (args.src, args.dst, args.tensor_parallel) == ("ckpt", "repo", 2)
    ev = evaluate.build_parser().parse_args(
        to_argv("evaluate", {**run.evaluate, "url": "h:1", "output": "o"}))
    assert ev.max_examples == 5 and ev.model_repository == "repo"


def test_evaluate_always_knows_the_served_repository():
    """With its own vocabulary, evaluate still gets the repository (its config.ini vocab_size
    is checked against the vocabulary)."""
    (run,) = parse({**BASE, "evaluate": {"vocab": "gs://b/spiece.model"}}).runs
    ev = evaluate.build_parser().parse_args(
        to_argv("evaluate", {**run.evaluate, "url": "h:1", "output": "o"}))
    assert (ev.vocab, ev.model_repository) == ("gs://b/spiece.model", "repo")


def test_boolean_flags_are_given_only_when_true():
    assert to_argv("convert", {"verify": True, "no_progress": False}) == ["--verify"]


def test_runs_override_key_by_key_and_share_nothing_by_accident():
    obj = {**BASE, "runs": [
        {"name": "a"},
        {"name": "b", "evaluate": {"beam_width": 4}},
        {"name": "c", "convert": {"src": "ckpt2", "model_name": "m2"}},
    ]}
    a, b, c = parse(obj).runs
    assert b.evaluate["beam_width"] == 4 and b.evaluate["max_examples"] == 5
    assert "beam_width" not in a.evaluate
    assert a.serve_key() == b.serve_key() != c.serve_key()
    assert c.convert["tensor_parallel"] == 2 and c.serve["model_name"] == "m2"


def test_a_run_can_serve_an_existing_repository():
    obj = {**BASE, "runs": [{"name": "new"}, {"name": "old", "convert": None,
                                              "serve": {"model_repository": "r0",
                                                        "model_name": "old"}}]}
    new, old = parse(obj).runs
    assert new.convert is not None and old.convert is None
    assert old.evaluate["model_repository"] == "r0" and old.evaluate["model_name"] == "old"
    with pytest.raises(ConfigError, match="serve.model_repository is required"):
        parse({**BASE, "runs": [{"name": "x", "convert": None}]})


@pytest.mark.parametrize("change, message", [
    ({"convert": {**BASE["convert"], "tensor_paralel": 2}}, "convert.tensor_paralel: not a flag"),
    ({"evaluate": {"url": "h:1"}}, "evaluate.url: set by the pipeline"),
    ({"evaluate": {"max_examples": "many"}}, "max_examples: 'many' is not a number"),
    ({"convert": {**BASE["convert"], "engine": "tpu"}}, "convert.engine: 'tpu' is not one of"),
    ({"convert": {"dst": "repo"}}, "convert.src is required"),
    ({"convert": None, "serve": {}}, "serve.model_repository is required"),
    ({"output": None}, "no output folder"),
    ({"extra": 1}, "unknown top-level key"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "used twice"),
    ({"runs": [{"name": "x/y"}]}, "use letters"),
    ({"runs": [{"name": "a"}, {"name": "b", "convert": {"src": "other"}}]},
     "convert different settings into the same"),
])
def test_bad_configs_name_what_is_wrong(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse({**BASE, **change})


@pytest.mark.parametrize("name", ["pipeline-local.yaml", "pipeline-ul2-gke.yaml",
                                  "pipeline-compare.yaml"])
def test_shipped_examples_are_valid(name):
    cfg = load(REPO / "examples" / name)
    assert cfg.runs
    for run in cfg.runs:
        for stage in ("convert", "serve", "evaluate"):
            settings = getattr(run, stage)
            if settings is not None:
                to_argv(stage, settings)


def test_gke_example_is_ul2_on_gcs_with_the_jax_engine():
    # The GKE serving image runs the JAX engine (issue 14); FT needs an image users build.
    (run,) = load(REPO / "examples" / "pipeline-ul2-gke.yaml").runs
    assert run.convert["src"].startswith("gs://") and run.convert["dst"].startswith("gs://")
    assert run.convert["engine"] == "jax" and run.convert["tensor_parallel"] > 1
    assert run.serve["backend"] == "kubernetes"


def test_comparison_table_shows_bounds_and_what_differs():
    def metrics(score: float, eps: float) -> dict:
        r = {"low": score - 0.01, "mid": score, "high": score + 0.01}
        return {"rouge1": r, "rouge2": r, "rougeL": r, "rougeLsum": r, "examples": 10,
                "failed": 0, "examples_per_second": eps, "latency_ms": {"p50": 12.0}}

    runs = parse({**BASE, "runs": [{"name": "greedy"},
                                   {"name": "beam", "evaluate": {"beam_width": 4}}]}).runs
    rows = [{"run": r.name, "output": f"out/{r.name}", "metrics": metrics(0.3 + i / 10, 2.0),
             "settings": {"convert": r.convert, "serve": r.serve, "evaluate": r.evaluate}}
            for i, r in enumerate(runs)]
    table = compare.table(rows)
    assert table["differing_settings"] == ["evaluate.beam_width"]
    assert [r["settings"]["evaluate.beam_width"] for r in table["runs"]] == [None, 4]
    md = compare.markdown(table)
    assert "| beam | 4 | 0.4000 [0.3900, 0.4100]" in md
    json.dumps(table)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "ray_jobs.pipeline", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "serve": {"replica": 2}}))
    proc = _cli("--config", str(bad))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "serve.replica: not a flag of ray_jobs.serve" in lines[0]
    missing = _cli("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_the_pipeline_holds_the_stages_options_with_their_defaults():
    from conversion.options import ConvertOptions
    from evaluation.options import EvalOptions
    from serving.options import ServeOptions

    no_name = {**BASE, "convert": {"src": "ckpt", "dst": "repo"}}
    (run,) = parse(no_name).runs
    assert isinstance(run.convert_options, ConvertOptions)
    assert isinstance(run.serve_options, ServeOptions)
    assert isinstance(run.evaluate_options, EvalOptions)
    # The defaults are ConvertOptions' own, not re-derived: the model name, T, the dtype.
    default = ConvertOptions(src="ckpt", dst="repo")
    assert run.convert_options == default
    assert run.serve_options.model_name == default.model_name == run.name
    assert run.evaluate_options.output == "out/x/" + run.name
    assert run.evaluate_options.model_repository == "repo"


def test_serve_checks_hold_on_the_pipeline_path(tmp_path):
    # ServeOptions' own checks, the ones ray_jobs.serve gets: refused when the config is read.
    for serve, message in (({"replicas": 0}, "--replicas must be >= 1, got 0"),
                           ({"grpc_port": 70000}, "--grpc-port 70000 is not a usable port"),
                           ({"ready_timeout": 0}, "--ready-timeout must be > 0, got 0.0")):
        with pytest.raises(ConfigError, match=f"^run m: serve: {message}$"):
            parse({**BASE, "serve": serve})
    # The same for evaluate's own checks (EvalOptions).
    with pytest.raises(ConfigError, match="^run m: evaluate: --beam-width must be >= 1, got 0$"):
        parse({**BASE, "evaluate": {**BASE["evaluate"], "beam_width": 0}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "serve": {"replicas": 0}}))
    proc = _cli("--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: run m: serve: --replicas must be >= 1, got 0"]
