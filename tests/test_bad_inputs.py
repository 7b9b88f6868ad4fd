"""Bad inputs tried one by one, as a new user makes them (issue 25).

Each refusal: exit 2, one ``error:`` line on stderr that names the problem, no traceback, and
every file that was on disk before (the checkpoint, a converted repository, an earlier
evaluation's outputs) byte for byte as it was. Most are refused before Ray starts, so they run
in this process (``ray_jobs._cli.run_main``, stderr captured at the file descriptor); what
must be seen exactly as a user meets it (the five worst of the issue, anything about
``--address``) runs as a subprocess. The demo's trained checkpoint is copied to a scratch
folder first: the cache is never changed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ray_jobs import _cli

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "demo" / "data" / "xsum_sample.jsonl"
# A port nothing listens on (below 1024, never handed out as an ephemeral port).
CLOSED = "127.0.0.1:1"
# A model name that climbs two folders above --dst (built: written out, tests/test_standalone.py
# would read it as a path out of the repository).
CLIMB = "/".join(["..", "..", "x"])


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ROOT -> its sha256 (the fixtures are small)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(code: int, stderr: str, needle: str) -> str:
    """Exit 2, exactly one ``error:`` line naming NEEDLE, no traceback; returns the line."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    assert needle in errors[0], errors[0]
    assert len(errors[0]) < 400, errors[0]  # one readable line, not a dumped spec
    return errors[0]


def run_here(capfd, module: str, args: list[str]) -> tuple[int, str]:
    """``python -m ray_jobs.MODULE ARGS`` in this process: (exit code, stderr)."""
    main = importlib.import_module(f"ray_jobs.{module}").main
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _cli.run_main(main, args)
    return int(exit_.value.code or 0), capfd.readouterr().err


def run_cli(module: str, args: list[str], env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` as a user runs it."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local) -> dict[str, Path]:
    """Scratch copies of the demo checkpoint (and broken variants), a repository converted
    from it, an earlier evaluation's outputs, and bad files of every kind."""
    from conversion.run import ConvertOptions, convert
    from core import repository
    from demo.build import build
    from evaluation.outputs import METRICS, REPORT, OutputDir

    demo = build()
    root = tmp_path_factory.mktemp("bad-inputs")
    d = root / "D"
    shutil.copytree(demo.checkpoint_dir, d)
    vocab = root / "spiece.model"
    shutil.copy(demo.vocab, vocab)
    ckpt = d / demo.checkpoint.name
    # Broken copies: a chunk gone, a parameter folder gone, a .zarray gone, a bad msgpack.
    broken = {"chunk": "target.encoder.layers_1.mlp.wo.kernel/0.0",
              "param": "target.decoder.layers_0.mlp.wo.kernel",
              "zarray": "target.encoder.layers_0.attention.query.kernel/.zarray",
              "msgpack": "checkpoint"}
    for name, rel in broken.items():
        copy = root / f"D-{name}"
        shutil.copytree(d, copy)
        victim = copy / demo.checkpoint.name / rel
        if name == "msgpack":
            victim.write_bytes(b"not msgpack at all")
        elif victim.is_dir():
            shutil.rmtree(victim)
        else:
            victim.unlink()
    repo = root / "repo"
    convert(ConvertOptions(src=str(d), dst=str(repo), engine="jax", vocab=str(vocab),
                           progress=False))
    # A second model beside it: --model-name "" --overwrite once deleted it.
    shutil.copytree(repo / "t5", repo / "other")
    # The FasterTransformer repository of the same weights, as convert writes it by default.
    ft = root / "ft"
    shutil.copytree(repo / "t5", ft / "t5")
    (ft / "t5" / "config.pbtxt").write_text(repository.to_pbtxt(
        repository.model_config("t5", "fastertransformer", 1, 1, "fp32")))
    (root / "garbage" / "t5").mkdir(parents=True)
    (root / "garbage" / "t5" / "config.pbtxt").write_text("garbage {{\n")
    # An earlier evaluation's outputs, written by the evaluation's own writer.
    out = OutputDir(str(root / "E"), resume=False)
    for i in range(3):
        out.append_prediction({"id": str(i), "prediction": f"p{i}", "reference": f"r{i}"})
    out.finalize({str(i): i for i in range(3)},
                 {str(i): json.dumps({"id": str(i)}) + "\n" for i in range(3)}, [])
    out.write_file(METRICS, '{"examples": 3}\n')
    out.write_file(REPORT, "<html>3 examples</html>\n")
    out.cleanup()
    (root / "afile").write_text("a file\n")
    (root / "emptydir").mkdir()
    (root / "empty.jsonl").write_bytes(b"")
    (root / "latin1.jsonl").write_bytes('{"document": "caf\xe9", "summary": "s"}\n'
                                        .encode("latin-1"))
    (root / "list.jsonl").write_text("[1, 2]\n")
    (root / "text.jsonl").write_text("not json\n")
    (root / "kubeconfig.yaml").write_text("clusters: [\n")
    (root / "notkube.yaml").write_text("hello\n")
    (root / "fraction.yaml").write_text(
        f"output: {root}/p\nconvert:\n  src: {d}\n  dst: {root}/p/repo\n  engine: jax\n"
        f"serve:\n  replicas: 1.5\nevaluate:\n  dataset: {DATASET}\n")
    (root / "unknown.yaml").write_text(
        f"output: {root}/p\nconvert:\n  src: {d}\n  dst: {root}/p/repo\n  tensor_paralel: 2\n")
    (root / "broken.yaml").write_text("convert: [\n")
    return {"root": root, "D": d, "ckpt": ckpt, "V": vocab, "R": repo, "FT": ft, "E": root / "E",
            **{f"D-{n}": root / f"D-{n}" for n in broken}}


def fill(args: list[str], world: dict[str, Path]) -> list[str]:
    return [a.format(**{k.replace("-", "_"): v for k, v in world.items()},
                     DS=DATASET) for a in args]


# (command, arguments, what the one line must say). {root}, {D} (the demo checkpoint's
# model folder), {ckpt} (its checkpoint_300), {V} (vocabulary), {R} (a converted repository
# holding t5 and other), {FT}, {E} (an earlier evaluation's outputs), {D_<broken>}, {DS}.
CONVERT = [
    (["--src", "{root}/nowhere", "--dst", "{root}/o"], "does not exist"),
    (["--src", "gs://", "--dst", "{root}/o"], "names no bucket"),
    (["--src", "{root}/afile", "--dst", "{root}/o"], "is not a T5X checkpoint"),
    (["--src", "{D}/config.gin", "--dst", "{root}/o"], "is not a T5X checkpoint"),
    (["--src", "{root}/emptydir", "--dst", "{root}/o"], "is not a T5X checkpoint"),
    (["--src", "{D_msgpack}", "--dst", "{root}/o"], "is not a T5X msgpack checkpoint"),
    (["--src", "{D_chunk}", "--dst", "{root}/o"], "is missing 1 of"),
    (["--src", "{D_param}", "--dst", "{root}/o"], "'decoder.layers_0.mlp.wo.kernel' has no"),
    (["--src", "{D_zarray}", "--dst", "{root}/o"], "has no .zarray"),
    (["--src", "{D}", "--dst", "{R}", "--model-name", "", "--overwrite"],
     "model name '' is not one folder name"),
    (["--src", "{D}", "--dst", "{R}", "--model-name", "..", "--overwrite"],
     "model name '..' is not one folder name"),
    (["--src", "{D}", "--dst", "{R}", "--model-name", CLIMB],
     f"model name '{CLIMB}' is not one folder name"),
    (["--src", "{D}", "--dst", "{R}", "--model-name", "a/b"], "is not one folder name"),
    (["--src", "{D}", "--dst", "{R}", "--model-name", ".", "--overwrite"],
     "is not one folder name"),
    (["--src", "{D}", "--dst", "{D}", "--model-name", "checkpoint_300", "--overwrite"],
     "overlaps the checkpoint"),
    (["--src", "{ckpt}", "--dst", "{ckpt}", "--model-name", "t5", "--overwrite"],
     "overlaps the checkpoint"),
    (["--src", "{D}", "--dst", "{root}/o", "--tensor-parallel", "3"], "does not divide"),
    (["--src", "{D}", "--dst", "{root}/o", "--tensor-parallel", "0"], "must be >= 1"),
    (["--src", "{D}", "--dst", "{root}/o", "--pipeline-parallel", "3"],
     "pipeline-parallel size 3 does not divide the 2 encoder layers"),
    (["--src", "{D}", "--dst", "{root}/o", "--pipeline-parallel", "0"], "must be >= 1"),
    (["--src", "{D}", "--dst", "{root}/o", "--vocab", "{D}/config.gin"],
     "is not a SentencePiece model"),
    (["--src", "{D}", "--dst", "{root}/o", "--vocab", "{root}/nowhere.model"],
     "does not exist"),
    (["--src", "{D}", "--dst", "{root}/o", "--gin", "{root}/nowhere.gin"], "does not exist"),
    (["--src", "{D}", "--dst", "{R}", "--resume", "--overwrite"], "exclude each other"),
    (["--src", "{D}", "--dst", "{root}/o", "--weight-dtype", "fp8"], "invalid choice"),
    (["--src", "{D}", "--dst", "{root}/o", "--tensor-parallel", "two"], "invalid int value"),
    (["--dst", "{root}/o"], "the following arguments are required: --src"),
    (["--src", "{D}", "--dst", "{root}/afile"], "is a file, not a folder"),
    (["--src", "{D}", "--dst", "{root}/o", "--task-cpus", "-1"], "--task-cpus must be >= 0"),
    (["--src", "{D}", "--dst", "{R}", "--weight-dtype", "fp16"],
     "already holds a different model (weight_dtype 'fp32', not 'fp16')"),
    (["--src", "{D}", "--dst", "{R}", "--engine", "fastertransformer", "--tensor-parallel",
      "2"], "already holds a different model (tensor_parallel 1, not 2)"),
    (["--src", "{D}", "--dst", "{root}/o", "--task-cpus", "64"],
     "--task-cpus 64 --task-gpus 0 fit no node"),
]
SERVE = [
    (["--model-repository", "{R}", "--model-name", "t5", "--host", "999.1.1.1"],
     "--host '999.1.1.1' is not an IP address"),
    (["--model-repository", "{FT}", "--model-name", "t5"], "convert with --engine jax"),
    (["--model-repository", "{root}/garbage", "--model-name", "t5"],
     "is not a Triton model config"),
    (["--model-repository", "{root}/nowhere", "--model-name", "t5"], "config.pbtxt not found"),
    (["--model-repository", "{R}", "--model-name", "nope"], "nope/config.pbtxt not found"),
    (["--model-repository", "{R}", "--model-name", "t5", "--replicas", "0"],
     "--replicas must be >= 1"),
    (["--model-repository", "{R}", "--model-name", "t5", "--grpc-port", "70000"],
     "is not a usable port"),
]
_EVAL = ["--model-name", "t5", "--vocab", "{V}", "--output", "{root}/eo", "--url", CLOSED]
EVALUATE = [
    ([*_EVAL, "--dataset", "{DS}", "--url", "abc"], "'abc' is not HOST:PORT"),
    ([*_EVAL, "--dataset", "{root}/empty.jsonl"], "the file is empty"),
    ([*_EVAL, "--dataset", "{root}/latin1.jsonl"], "line 1: not UTF-8 text"),
    ([*_EVAL, "--dataset", "{root}/list.jsonl"], "line 1: a JSON list, not an object"),
    ([*_EVAL, "--dataset", "{root}/text.jsonl"], "line 1: not JSON"),
    ([*_EVAL, "--dataset", "{root}/nowhere.jsonl"], "no such file"),
    ([*_EVAL, "--dataset", "{root}/afile"], "expected 'xsum' or a file ending in"),
    ([*_EVAL, "--dataset", "{DS}", "--document-field", "text"], "no field 'text'"),
    ([*_EVAL, "--dataset", "{DS}", "--max-examples", "0"], "--max-examples must be >= 1"),
    ([*_EVAL, "--dataset", "{DS}", "--batch-size", "0"], "--batch-size must be >= 1"),
    ([*_EVAL, "--dataset", "{DS}", "--num-actors", "0"], "--num-actors must be >= 1"),
    ([*_EVAL, "--dataset", "{DS}", "--max-input-len", "0"], "--max-input-len must be >= 1"),
    ([*_EVAL, "--dataset", "{DS}", "--input-template", "no document"],
     "does not contain {document}"),
    ([*_EVAL, "--dataset", "{DS}", "--backend", "in-process"], "needs --model-repository"),
    ([*_EVAL, "--dataset", "{DS}", "--vocab", "{D}/config.gin"], "config.gin"),
    ([*_EVAL, "--dataset", "{DS}"], "nothing listens at --url 127.0.0.1:1"),
]
PIPELINE = [
    (["--config", "examples/pipeline-local.yaml"],
     "convert.src checkpoints/t5x does not exist"),
    (["--config", "{root}/nowhere.yaml"], "does not exist"),
    (["--config", "{root}/fraction.yaml"], "serve.replicas: 1.5 is not a whole number"),
    (["--config", "{root}/unknown.yaml"], "tensor_paralel"),
    (["--config", "{root}/broken.yaml"], "broken.yaml"),
]
CASES = ([("convert", *c) for c in CONVERT] + [("serve", *c) for c in SERVE]
         + [("evaluate", *c) for c in EVALUATE] + [("pipeline", *c) for c in PIPELINE])


def _case_id(case: tuple) -> str:
    command, args, _ = case
    return f"{command}:{' '.join(a.replace('{', '').replace('}', '') for a in args)}"[:90]


def test_there_are_at_least_fifty():
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_refused_in_one_line_with_nothing_lost(case, world, capfd, monkeypatch):
    command, args, needle = case
    monkeypatch.chdir(REPO)  # the pipeline's example paths are relative to the checkout
    before = snapshot(world["root"])
    code, err = run_here(capfd, command, fill(args, world))
    assert_refused(code, err, needle)
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("args, needle", [
    (["--kubeconfig", "{root}/kubeconfig.yaml"], "kubeconfig.yaml is not YAML"),
    (["--kubeconfig", "{root}/notkube.yaml"], "notkube.yaml is not a kubeconfig"),
])
def test_cluster_kubeconfig_named(args, needle, world):
    before = snapshot(world["root"])
    proc = run_cli("cluster", ["up", "--config", "examples/cluster-gke.yaml",
                               *fill(args, world)], timeout=60)
    assert_refused(proc.returncode, proc.stderr, needle)
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("args, env, needle", [
    (["--address", CLOSED], {}, "the Ray head at 127.0.0.1:1 is unreachable"),
    (["--address", "ray://127.0.0.1:1"], {}, "is unreachable"),
    (["--address", "http://127.0.0.1:8265"], {}, "is a URL"),
    (["--address", "127.0.0.1:port"], {}, "is not a number"),
    ([], {"RAY_ADDRESS": CLOSED}, "is unreachable"),
    (["--src", "gs://bucket/ckpt"], {"STORAGE_EMULATOR_HOST": f"http://{CLOSED}"},
     "STORAGE_EMULATOR_HOST http://127.0.0.1:1 is unreachable"),
], ids=["closed", "ray-client", "dashboard-url", "no-port", "RAY_ADDRESS", "gcs-endpoint"])
def test_unreachable_endpoints_fail_in_seconds(args, env, needle, world):
    # Worst 4 (first half): `--address 127.0.0.1:1` hung for minutes with no output.
    base = ["--src", str(world["D"]), "--dst", str(world["root"] / "o")]
    start = time.monotonic()
    proc = run_cli("ray_jobs.convert", [*base, *args], env=env, timeout=120)
    assert_refused(proc.returncode, proc.stderr, needle)
    assert time.monotonic() - start < 30
    assert not (world["root"] / "o").exists()


def test_worst_resume_redoes_a_replaced_checkpoint(world, tmp_path, capfd):
    """Worst 1: the checkpoint replaced at the same path (same shapes, other weights):
    `convert --resume` kept all 48 stale files with exit 0. (The library call that
    ``python -m ray_jobs.convert --resume`` makes, on the session's Ray: the command's own
    main would shut that Ray down after its summary.)"""
    from conversion.run import ConvertOptions, convert
    from demo.build import build, model_config
    from demo.t5x_writer import random_t5x_params, write_t5x_checkpoint
    from pipeline.stages import verify_conversion

    d = tmp_path / "D"
    shutil.copytree(world["D"], d)
    dst = tmp_path / "repo"
    opts = ConvertOptions(src=str(d), dst=str(dst), progress=False)
    convert(opts)
    assert verify_conversion(opts) is None  # the pipeline would skip it: right
    params = random_t5x_params(model_config(build().settings), seed=123)
    write_t5x_checkpoint(d, params, step=300)  # replaces checkpoint_300 in place
    # The pipeline (which skipped a conversion whose output verified) converts it again.
    assert "the source changed since it was converted" in verify_conversion(opts)
    capfd.readouterr()
    summary = convert(ConvertOptions(**{**opts.__dict__, "resume": True}))
    assert summary["skipped_files"] == 0
    assert len(summary["redone_source_changed"]) == summary["tasks"]
    assert "the source changed since it was written" in capfd.readouterr().err
    norm = dst / "t5" / "1" / "1-gpu" / "encoder.final_layer_norm.weight.bin"
    got = np.fromfile(norm, dtype=np.float32)
    np.testing.assert_array_equal(got, params["encoder.encoder_norm.scale"].astype(np.float32))


def test_worst_missing_chunk_is_an_error_naming_array_and_chunk(world, tmp_path):
    """Worst 3: `rm $D/checkpoint_300/target.encoder.layers_1.mlp.wo.kernel/0.0` converted the
    missing chunk as zeros with exit 0."""
    proc = run_cli("ray_jobs.convert", ["--src", str(world["D-chunk"]), "--dst",
                                        str(tmp_path / "out")])
    line = assert_refused(proc.returncode, proc.stderr,
                          "array 'encoder.layers_1.mlp.wo.kernel' is missing 1 of")
    assert "target.encoder.layers_1.mlp.wo.kernel/0.0" in line and "fill_value null" in line
    assert not (tmp_path / "out").exists()


def test_worst_overwrite_never_leaves_the_model_folder(world, tmp_path):
    """Worst 2, as written: `--model-name ""` / `..` / CLIMB with --overwrite, and --dst
    the checkpoint's parent with --model-name checkpoint_300."""
    before = snapshot(world["root"])
    for args in (["--dst", str(world["R"]), "--model-name", "", "--overwrite"],
                 ["--dst", str(world["R"]), "--model-name", "..", "--overwrite"],
                 ["--dst", str(world["R"]), "--model-name", CLIMB, "--overwrite"],
                 ["--dst", str(world["D"]), "--model-name", "checkpoint_300", "--overwrite"]):
        proc = run_cli("ray_jobs.convert", ["--src", str(world["D"]), *args])
        assert_refused(proc.returncode, proc.stderr, "")
    assert snapshot(world["root"]) == before


def test_worst_task_that_can_never_be_scheduled(world):
    """Worst 4 (second half): `--task-cpus 64` on a 2-core machine waited forever."""
    proc = run_cli("ray_jobs.convert", ["--src", str(world["D"]), "--dst",
                                        str(world["root"] / "o"), "--task-cpus", "64"])
    assert_refused(proc.returncode, proc.stderr, "fit no node of the Ray cluster")
    assert not (world["root"] / "o").exists()


def test_worst_evaluate_against_a_server_that_is_down_keeps_outputs(world):
    """Worst 5: without --resume, predictions.jsonl was emptied before the server was
    reached, and metrics.json / report.html described the examples that were gone."""
    before = snapshot(world["E"])
    start = time.monotonic()
    proc = run_cli("ray_jobs.evaluate", fill([*_EVAL[:-2], "--url", CLOSED, "--dataset",
                                              "{DS}", "--output", "{E}"], world))
    assert_refused(proc.returncode, proc.stderr, "nothing listens at --url")
    assert time.monotonic() - start < 60
    assert snapshot(world["E"]) == before


def test_resume_with_other_settings_is_refused_naming_both(world, tmp_path, capfd):
    out = tmp_path / "eval"
    args = fill([*_EVAL[:-2], "--url", CLOSED, "--dataset", "{DS}", "--resume"], world)
    args[args.index("--output") + 1] = str(out)
    code, err = run_here(capfd, "evaluate", [*args, "--max-input-len", "128"])
    assert_refused(code, err, "nothing listens")  # it records its settings first
    recorded = snapshot(out)
    code, err = run_here(capfd, "evaluate", [*args, "--max-input-len", "256"])
    assert_refused(code, err, "--max-input-len 256 differs from 128")
    assert snapshot(out) == recorded


def _fail_midway(src: Path) -> None:
    """Corrupt one chunk: the conversion fails inside a Ray task, after it began writing."""
    chunk = next(src.glob("checkpoint_*/target.decoder.layers_1.mlp.wo.kernel/0.0"))
    chunk.write_bytes(b"not gzip")


def test_failed_overwrite_keeps_the_repository_it_found(world, tmp_path, capfd):
    src = tmp_path / "D"
    shutil.copytree(world["D"], src)
    _fail_midway(src)
    repo = tmp_path / "repo"
    shutil.copytree(world["R"], repo)
    before = snapshot(repo)
    code, err = run_here(capfd, "convert", ["--src", str(src), "--dst", str(repo),
                                            "--overwrite", "--no-progress"])
    assert_refused(code, err, "invalid GZIP header")
    assert snapshot(repo) == before
    assert sorted(p.name for p in repo.iterdir()) == ["other", "t5"]  # nothing left aside


def test_failed_rerun_without_resume_keeps_config_pbtxt(world, tmp_path, capfd):
    src = tmp_path / "D"
    shutil.copytree(world["D"], src)
    repo = tmp_path / "repo"
    args = ["--src", str(src), "--dst", str(repo), "--no-progress"]
    from conversion.run import ConvertOptions, convert

    convert(ConvertOptions(src=str(src), dst=str(repo), progress=False))
    before = snapshot(repo)
    _fail_midway(src)
    code, err = run_here(capfd, "convert", args)
    assert_refused(code, err, "invalid GZIP header")
    assert snapshot(repo) == before


def test_resume_into_a_repository_that_was_served(world, tmp_path):
    """Triton's Python backend leaves 1/__pycache__ beside model.py; --resume into that
    repository was refused as holding foreign files."""
    import compileall

    from conversion.run import ConvertOptions, convert

    repo = tmp_path / "repo"
    shutil.copytree(world["R"], repo)
    assert compileall.compile_file(str(repo / "t5" / "1" / "model.py"), quiet=1)
    assert any((repo / "t5" / "1" / "__pycache__").iterdir())
    summary = convert(ConvertOptions(src=str(world["D"]), dst=str(repo), engine="jax",
                                     vocab=str(world["V"]), resume=True, progress=False))
    assert summary["skipped_files"] == summary["files"]


def test_warns_when_max_input_len_exceeds_the_trained_length(world, capfd):
    """The demo was trained on 128 input tokens (its config.gin's TASK_FEATURE_LENGTHS);
    the default --max-input-len 512 scored it 0.874 against 1.0, without a word."""
    args = fill([*_EVAL, "--dataset", "{DS}", "--model-repository", "{R}"], world)
    code, err = run_here(capfd, "evaluate", args)
    assert_refused(code, err, "nothing listens")
    assert "warning: --max-input-len 512 exceeds the 128 input tokens" in err
    code, err = run_here(capfd, "evaluate", [*args, "--max-input-len", "128"])
    assert "warning" not in err
