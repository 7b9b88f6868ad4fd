"""The demo path end to end: a trained T5X checkpoint -> FT shards -> tritonserver -> ROUGE.

The demo model reproduces the ten sample summaries, so a correct pipeline scores ROUGE-L near
1.0 from the *served* model, and a misplaced tensor collapses it. The model is built once
(.demo-cache/, shared with `make demo`) and used at tensor-parallel 1 (direct) and 2 (through
`ray job submit` against a real head, read back from the dashboard's job API).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import yaml

from core import ft_format

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PASS = 0.9  # the bar for the demo's ROUGE-L


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)  # each pipeline here starts (or is given) its own Ray
    env["PYTHONPATH"] = str(REPO)
    return env


def _pipeline(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.pipeline", *args, "--json"],
                          cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return proc, summary


def _rouge_l(summary: dict) -> float:
    return summary["metrics"]["rougeL"]["mid"]


@pytest.fixture(scope="module")
def demo_tp1(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc, summary = _pipeline("--demo", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, summary, proc.stderr


def test_demo_scores_from_the_served_model(demo_tp1):
    out, summary, log = demo_tp1
    assert _rouge_l(summary) >= PASS, summary["metrics"]
    m = summary["metrics"]
    assert m["examples"] == 10 and m["failed"] == 0
    for key in ("rouge1", "rouge2", "rougeLsum"):
        assert 0.0 <= m[key]["low"] <= m[key]["mid"] <= m[key]["high"] <= 1.0
    run = summary["runs"][0]
    assert run["stages"] == {"convert": "done", "serve": "done", "evaluate": "done"}
    preds = [json.loads(ln) for ln in (out / run["run"] / "predictions.jsonl").open()]
    assert len(preds) == 10
    assert sum(p["prediction"] == p["reference"] for p in preds) >= 8
    weights = out / "model_repository" / run["run"] / "1" / "1-gpu"
    assert (weights / "manifest.json").is_file() and (weights / "config.ini").is_file()
    assert "gated-silu" in (weights / "config.ini").read_text()
    assert (out / "comparison.md").read_text().count(run["run"]) == 1
    assert json.loads((out / "pipeline.json").read_text())["metrics"] == m
    # the log says where everything went
    assert f"outputs go to {out}" in log and f"outputs in {out / run['run']}" in log


def _swap_mlp_outputs(repo: Path, name: str) -> None:
    """Exchange two layers' MLP output matrices: same shape, so FT would load them silently."""
    weights = repo / name / "1" / "1-gpu"
    a = weights / "encoder.block.0.layer.1.DenseReluDense.wo.weight.0.bin"
    b = weights / "encoder.block.1.layer.1.DenseReluDense.wo.weight.0.bin"
    tmp = weights / "swap.tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_batch_rerun_skips_what_verifies_and_swapped_weights_fail(demo_tp1, tmp_path):
    """The demo's own config run again as a batch of three:

    - the demo run itself: every stage verifies, so all are skipped;
    - the same model with beam search: served and evaluated, still above the bar;
    - a copy of the converted model with two weight files swapped (``convert: null``, served
      from that repository): the score collapses below the bar, and with ``--min-rouge-l``
      the job fails, naming that run, after writing every output.
    One table compares the three.
    """
    from demo.build import build
    from pipeline.demo import demo_config

    out, first, _ = demo_tp1
    name = first["runs"][0]["run"]
    swapped_repo = tmp_path / "swapped"
    shutil.copytree(out / "model_repository", swapped_repo)
    _swap_mlp_outputs(swapped_repo, name)
    config = demo_config(build(), str(out), 1)
    config["runs"] += [
        {"name": "beam2", "evaluate": {"beam_width": 2}},
        {"name": "swapped", "convert": None,
         "serve": {"model_repository": str(swapped_repo), "model_name": name}},
    ]
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, summary = _pipeline("--config", str(path), "--min-rouge-l", str(PASS))
    assert proc.returncode != 0 and summary, proc.stderr[-2000:]
    reason = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert f"ROUGE-L below {PASS}" in reason and "swapped" in reason, reason
    assert "beam2" not in reason, reason
    demo_run, beam, swapped = summary["runs"]
    assert demo_run["stages"] == {"convert": "skipped", "serve": "skipped",
                                  "evaluate": "skipped"}
    assert demo_run["metrics"]["rougeL"] == first["metrics"]["rougeL"]
    assert beam["stages"] == {"convert": "shared", "serve": "done", "evaluate": "done"}
    assert beam["metrics"]["rougeL"]["mid"] >= PASS
    assert swapped["stages"] == {"convert": "none", "serve": "done", "evaluate": "done"}
    bad = swapped["metrics"]["rougeL"]["mid"]
    assert bad < 0.7 < first["metrics"]["rougeL"]["mid"], bad
    table = json.loads((out / "comparison.json").read_text())
    assert [r["run"] for r in table["runs"]] == [name, "beam2", "swapped"]
    assert "evaluate.beam_width" in table["differing_settings"]
    assert "| beam2 |" in (out / "comparison.md").read_text()
    assert (out / "swapped" / "predictions.jsonl").is_file()


def test_failed_stage_is_one_line_naming_run_and_stage(tmp_path):
    # A source that exists but holds no checkpoint: the config check (which refuses a missing
    # path before Ray starts) passes it, and the convert stage itself fails.
    (tmp_path / "no-such-checkpoint").mkdir()
    config = {"output": str(tmp_path / "out"),
              "convert": {"src": str(tmp_path / "no-such-checkpoint"),
                          "dst": str(tmp_path / "repo"), "model_name": "m"},
              "evaluate": {"dataset": str(REPO / "demo" / "data" / "xsum_sample.jsonl")}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, summary = _pipeline("--config", str(path))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 1 run(s) failed; m: convert failed:"), last
    assert "no-such-checkpoint" in last
    assert summary["failed_runs"] == ["m"] and summary["metrics"] is None


def test_damaged_conversion_is_redone_not_skipped(demo_tp1, tmp_path):
    """A weight file that no longer matches its manifest fails verification."""
    from conversion.options import ConvertOptions
    from pipeline.stages import verify_conversion

    out, summary, _ = demo_tp1
    name = summary["runs"][0]["run"]
    dst = tmp_path / "repo"
    shutil.copytree(out / "model_repository", dst)
    # verify_conversion checks the source's present content too: give it the one converted.
    weights = dst / name / "1" / "1-gpu"
    source = json.loads((weights / "manifest.json").read_text())["model"]["source"]
    convert = ConvertOptions(src=source, dst=str(dst), model_name=name, tensor_parallel=1,
                             weight_dtype="fp32", vocab="x")
    assert verify_conversion(convert) is None
    victim = dst / name / "1" / "1-gpu" / "decoder.block.1.layer.2.DenseReluDense.wo.weight.0.bin"
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert "crc32c differs" in verify_conversion(convert)
    victim.unlink()
    assert "bytes on disk" in verify_conversion(convert)


# --- ray job submit against a real head ------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _head_env() -> dict[str, str]:
    # This test's own head, without Ray's token auth, so the job API answers plain HTTP.
    return {**_env(), "RAY_AUTH_MODE": "disabled"}


@pytest.fixture()
def ray_head(tmp_path):
    """`ray start --head --block` on free ports, owned by this test and stopped by its pid
    (never `ray stop`, which would stop every Ray on the machine)."""
    gcs, dash, client, agent, agent_grpc, rtenv, metrics = _free_ports(7)
    temp = Path(f"/tmp/rp{os.getpid()}")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rtenv}",
           f"--metrics-export-port={metrics}", "--num-cpus=4", f"--temp-dir={temp}",
           "--include-dashboard=true", "--disable-usage-stats"]
    log = open(tmp_path / "ray-head.log", "w")
    proc = subprocess.Popen(cmd, env=_head_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/jobs/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "ray head did not start: " + (tmp_path / "ray-head.log").read_text()[-2000:]
                    ) from None
                time.sleep(1)
        yield types.SimpleNamespace(url=url, metrics_port=metrics)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_demo_at_tensor_parallel_2(ray_head, demo_tp1, tmp_path):
    """The pipeline as a Ray job: submitted with the working dir, followed through the
    dashboard's job API, its stages running on that cluster; TP=2 shares the cached model."""
    out = tmp_path / "out"
    runtime_env = {"env_vars": {"T5FT_DEMO_CACHE": str(REPO / ".demo-cache")}}
    submit = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.url,
         "--working-dir", ".", "--no-wait", "--runtime-env-json", json.dumps(runtime_env),
         "--", sys.executable, "-m", "ray_jobs.pipeline", "--demo", "--tensor-parallel", "2",
         "--output", str(out), "--json"],
        cwd=REPO, env=_head_env(), capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr[-2000:]
    deadline = time.monotonic() + 420
    job = None
    while time.monotonic() < deadline:
        jobs = json.loads(urllib.request.urlopen(f"{ray_head.url}/api/jobs/", timeout=10).read())
        ours = [j for j in jobs if "ray_jobs.pipeline" in (j.get("entrypoint") or "")]
        if ours and ours[0]["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            job = ours[0]
            break
        time.sleep(2)
    assert job is not None, "the pipeline job did not finish in time"
    logs = json.loads(urllib.request.urlopen(
        f"{ray_head.url}/api/jobs/{job['submission_id']}/logs", timeout=10).read())["logs"]
    assert job["status"] == "SUCCEEDED", (job.get("message"), logs[-3000:])
    summary = json.loads([ln for ln in logs.splitlines() if ln.startswith("{")][-1])
    assert summary["metrics"]["rougeL"]["mid"] >= PASS
    assert f"outputs go to {out}" in logs
    name = summary["runs"][0]["run"]
    weights = out / "model_repository" / name / "1" / "2-gpu"
    cfg, _ = ft_format.parse_config_ini((weights / "config.ini").read_text())
    # every rank-1 file FT opens exists: the served model really was split in two
    assert all((weights / f.name).is_file() for f in ft_format.all_files(cfg, 2) if f.rank == 1)
    assert json.loads((out / "pipeline.json").read_text())["metrics"] == summary["metrics"]
    # the pipeline's and its stages' metrics reached the cluster's Prometheus export
    wanted = ("t5ft_pipeline_progress", "t5ft_pipeline_stage", "t5ft_convert_bytes_done",
              "t5ft_convert_tasks_done", "t5ft_eval_examples_done", "t5ft_eval_requests_sent",
              "t5ft_eval_request_latency_ms")
    exported = ""
    for _ in range(30):
        exported = urllib.request.urlopen(
            f"http://127.0.0.1:{ray_head.metrics_port}/metrics", timeout=10).read().decode()
        if all(name in exported for name in wanted):
            break
        time.sleep(1)
    assert [name for name in wanted if name not in exported] == []


def test_in_process_run_starts_no_server(demo_tp1, tmp_path):
    """A run whose evaluation uses the engine in-process skips serve: no tritonserver starts,
    and it scores as the served demo run does from the same converted repository."""
    from demo.build import build
    from pipeline.demo import demo_config

    out, first, _ = demo_tp1
    config = demo_config(build(), str(out), 1)
    config["runs"] = [{"name": "inproc", "evaluate": {"backend": "in-process"}}]
    path = tmp_path / "inproc.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, summary = _pipeline("--config", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = summary["runs"][0]
    assert run["stages"] == {"convert": "skipped", "serve": "skipped", "evaluate": "done"}
    assert _rouge_l(summary) == _rouge_l(first)
    assert "serve skipped: evaluate runs the engine in-process" in proc.stderr
    assert "serving " not in proc.stderr and "tritonserver" not in proc.stderr
    preds = [json.loads(ln) for ln in (out / "inproc" / "predictions.jsonl").open()]
    served = [json.loads(ln) for ln in (out / first["runs"][0]["run"] / "predictions.jsonl").open()]
    assert sorted((p["id"], p["prediction"]) for p in preds) == \
        sorted((p["id"], p["prediction"]) for p in served)
