"""Evaluations that lose an actor process or a Triton server mid-run, reading and writing gs://.

Dataset and vocabulary are read from the emulator and the outputs written to it. A clean run is
the reference; each faulty run must end with byte-identical predictions.jsonl and errors.jsonl,
the same ROUGE, every example exactly once and no failure. Greedy decoding of a random tiny
model gives deterministic (garbage) summaries, scored against the article so ROUGE is non-zero.

Faults are real: the Ray Data actor's worker process gets SIGKILL (Ray restarts the actor and
re-runs its unfinished request), and a tritonserver gets SIGKILL through
``LocalServers.kill`` (its watcher restarts it; meanwhile the clients route to the other one).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from core import storage
from core.t5config import T5Config

MODEL = "t5"
COPIES = 4  # the 10 bundled XSum rows, 4 times over: 40 examples, 20 requests of 2
SETTINGS = {"max_output_len": 24, "batch_size": 2, "summary_field": "document",
            "num_actors": 2, "requests_per_actor": 1, "progress": False}


@pytest.fixture(scope="module")
def eval_inputs(gcs, ray_local, xsum_sample, tmp_path_factory) -> dict[str, str]:
    """gs:// dataset and vocabulary, and a local model repository (jax engine) converted from a
    random tiny T5X checkpoint by conversion.run on the session's Ray."""
    import sentencepiece as spm

    from conversion.run import ConvertOptions, convert
    from demo.t5x_writer import random_t5x_params, write_t5x_checkpoint
    from demo.vocab import train_sentencepiece

    rows = [json.loads(line) for line in xsum_sample.read_text().splitlines() if line.strip()]
    work = tmp_path_factory.mktemp("gcs_eval")
    vocab = train_sentencepiece([r["document"] for r in rows] + [r["summary"] for r in rows],
                                work / "spiece.model", 200)
    data = "".join(json.dumps({**r, "id": f"ex-{k}-{i}"}) + "\n"
                   for k in range(COPIES) for i, r in enumerate(rows))
    base = f"gs://{gcs.bucket}/eval"
    storage.write_text(f"{base}/data/xsum.jsonl", data)
    storage.write_bytes(f"{base}/vocab/spiece.model", vocab.read_bytes())

    size = spm.SentencePieceProcessor(model_file=str(vocab)).get_piece_size()
    cfg = T5Config(d_model=32, num_heads=4, d_kv=8, d_ff=64, vocab_size=size,
                   num_encoder_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu")
    ckpt = write_t5x_checkpoint(work / "ckpt", random_t5x_params(cfg, seed=5), step=1)
    repo = work / "repo"
    convert(ConvertOptions(src=str(ckpt), dst=str(repo), model_name=MODEL, engine="jax",
                           inference_dtype="fp32", activation="gated-gelu", progress=False))
    return {"dataset": f"{base}/data/xsum.jsonl", "vocab": f"{base}/vocab/spiece.model",
            "repo": str(repo), "base": base}


@pytest.fixture(scope="module")
def servers(eval_inputs):
    from serving.local import LocalServers

    with LocalServers(eval_inputs["repo"], MODEL, replicas=2, num_cpus=0.5) as s:
        yield s


def run_eval(servers, eval_inputs, name: str) -> dict:
    from evaluation.runner import EvalSettings, evaluate

    settings = EvalSettings(url=",".join(e["grpc"] for e in servers.endpoints),
                            model_name=MODEL, output=f"{eval_inputs['base']}/{name}",
                            dataset=eval_inputs["dataset"], vocab=eval_inputs["vocab"],
                            **SETTINGS)
    return evaluate(settings)


def served_requests(servers) -> int:
    """Requests the servers have answered so far (Triton's per-model statistics)."""
    import tritonclient.http as httpclient

    total = 0
    for endpoint in servers.endpoints:
        client = httpclient.InferenceServerClient(endpoint["http"])
        try:
            stats = client.get_inference_statistics(MODEL)["model_stats"]
            total += sum(int(s["inference_stats"]["success"]["count"]) for s in stats)
        except Exception:  # noqa: BLE001 - a server being restarted answers nothing
            pass
        finally:
            client.close()
    return total


def outputs(eval_inputs, name: str) -> dict[str, bytes]:
    out = f"{eval_inputs['base']}/{name}"
    return {f: storage.read_bytes(f"{out}/{f}")
            for f in ("predictions.jsonl", "errors.jsonl", "metrics.json")}


@pytest.fixture(scope="module")
def reference(servers, eval_inputs) -> dict[str, bytes]:
    result = run_eval(servers, eval_inputs, "clean")
    assert result["examples"] == 10 * COPIES and result["failed"] == 0
    return outputs(eval_inputs, "clean")


def assert_same_outputs(got: dict[str, bytes], ref: dict[str, bytes]) -> None:
    assert got["predictions.jsonl"] == ref["predictions.jsonl"]
    assert got["errors.jsonl"] == ref["errors.jsonl"] == b""
    ids = [json.loads(line)["id"] for line in got["predictions.jsonl"].splitlines()]
    assert len(ids) == len(set(ids)) == 10 * COPIES  # none lost, none twice
    m, r = json.loads(got["metrics.json"]), json.loads(ref["metrics.json"])
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "examples", "failed"):
        assert m[key] == r[key], key


def _run_with_fault(servers, eval_inputs, name: str, fault) -> tuple[dict, object]:
    """Run an evaluation; once a few requests are answered (and while it runs) call fault()."""
    baseline = served_requests(servers)
    result: dict = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.update(run_eval(servers, eval_inputs, name))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    worker = threading.Thread(target=target)
    worker.start()
    deadline = time.monotonic() + 120
    while worker.is_alive() and time.monotonic() < deadline:
        if served_requests(servers) - baseline >= 3:
            break
        time.sleep(0.05)
    assert worker.is_alive(), "the evaluation ended before the fault could be injected"
    injected = fault()
    answered = served_requests(servers) - baseline
    worker.join(timeout=300)
    assert not worker.is_alive(), "the evaluation did not finish after the fault"
    if errors:
        raise errors[0]
    assert answered < 10 * COPIES // SETTINGS["batch_size"], "fault injected after the last request"
    return result, injected


def _predictor_actors() -> list[dict]:
    import ray

    job = ray.get_runtime_context().get_job_id()
    return [a for a in ray._private.state.actors().values()
            if "MapWorker" in a["ActorClassName"] and a["JobID"] == job
            and a["State"] == "ALIVE"]


def test_actor_process_killed_mid_run(servers, eval_inputs, reference):
    def kill_one_actor() -> str:
        actors = _predictor_actors()
        assert actors, "no Predictor actor alive"
        os.kill(actors[0]["Pid"], signal.SIGKILL)
        return actors[0]["ActorID"]

    result, actor_id = _run_with_fault(servers, eval_inputs, "actor-killed", kill_one_actor)
    assert result["failed"] == 0 and result["examples"] == 10 * COPIES
    import ray

    assert ray._private.state.actors(actor_id)["NumRestarts"] >= 1  # Ray brought it back
    assert_same_outputs(outputs(eval_inputs, "actor-killed"), reference)


def test_triton_server_killed_mid_run(servers, eval_inputs, reference):
    before = servers.status()[0]["pid"]
    result, killed = _run_with_fault(servers, eval_inputs, "server-killed",
                                     lambda: servers.kill(0))
    assert killed == before
    assert result["failed"] == 0 and result["examples"] == 10 * COPIES
    assert_same_outputs(outputs(eval_inputs, "server-killed"), reference)
    servers.wait_ready(timeout=120)  # the watcher restarted it on the same ports
    assert servers.status()[0]["pid"] != before
