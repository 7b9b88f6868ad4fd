"""ray_jobs.serve --model-repository gs://...: the local backend downloads the model folder
through core.storage (here from a real fake-gcs-server) and serves the copy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from core import gcs_env
from tests.gcs_emulator import emulator
from tests.serving.conftest import (
    MODEL,
    ServeProcess,
    _env,
    ft_inputs,
    read_ready_line,
    sample_rows,
)

pytestmark = pytest.mark.slow
BUCKET = "t5ft-serving"


@pytest.fixture(scope="module")
def gcs_repo(serving_model_repo):
    """The converted repository uploaded to an emulated bucket; yields (url, env)."""
    with emulator(BUCKET) as (_, env):
        bucket = gcs_env.storage_client().bucket(BUCKET)
        for path in sorted(serving_model_repo.rglob("*")):
            if path.is_file():
                rel = path.relative_to(serving_model_repo).as_posix()
                bucket.blob(f"repo/{rel}").upload_from_filename(str(path))
        yield f"gs://{BUCKET}/repo", env


def test_serves_a_gs_repository(gcs_repo, repo_root, ray_address, engine):
    url, env = gcs_repo
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.serve", "--model-repository", url, "--model-name",
         MODEL, "--address", ray_address, "--num-cpus", "0", "--json"],
        cwd=repo_root, env={**_env(repo_root), **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    serve = ServeProcess(proc, read_ready_line(proc, 240))
    try:
        c = grpcclient.InferenceServerClient(serve.grpc)
        rows = sample_rows(1, seed=9)
        res = c.infer(MODEL, ft_inputs(rows, 8))
        c.close()
        from serving.engine import SamplingParams

        (exp,) = engine.generate(rows, [SamplingParams(max_output_len=8)])
        n = int(exp.sequence_length[0])
        assert int(res.as_numpy("sequence_length")[0, 0]) == n
        np.testing.assert_array_equal(res.as_numpy("output_ids")[0, 0, :n], exp.output_ids[0, :n])
    finally:
        rc, err = serve.terminate()
    assert rc == 0, err[-2000:]


def test_missing_gs_model_is_one_line_error(gcs_repo, repo_root):
    url, env = gcs_repo
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.serve", "--model-repository", url, "--model-name",
         "absent"], cwd=repo_root, env={**_env(repo_root), **env}, capture_output=True,
        text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "absent" in lines[0] and "config.pbtxt" in lines[0]
