"""serving.tritonserver without Ray: ``python -m serving.tritonserver`` serves a converted
repository, answers tritonclient like the in-process engine, and stops cleanly on SIGTERM.

The child runs with ``ray`` blocked (``sys.modules["ray"] = None`` makes any ``import ray``
fail), so the launcher is proved not to need it, as on a GPU machine without Ray.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.engine import SamplingParams
from tests.serving.conftest import (
    MODEL,
    ServeProcess,
    _env,
    ft_inputs,
    port_open,
    read_ready_line,
    sample_rows,
)

pytestmark = pytest.mark.slow

# The command, with Ray made unimportable in the child.
_NO_RAY = ("import runpy, sys; sys.modules['ray'] = None; "
           "runpy.run_module('serving.tritonserver', run_name='__main__', alter_sys=True)")


def _launcher(*args: str) -> list[str]:
    return [sys.executable, "-c", _NO_RAY, *args]


def test_plain_launcher_serves_without_ray(serving_model_repo, engine, repo_root):
    # No --model-name: the repository's only model is served.
    proc = subprocess.Popen(_launcher("--model-repository", str(serving_model_repo)),
                            cwd=repo_root, env=_env(repo_root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    served = ServeProcess(proc, read_ready_line(proc, 240))
    try:
        assert served.ready["model"] == MODEL and served.ready["pid"] > 0
        rows = sample_rows(3, seed=4)
        client = grpcclient.InferenceServerClient(served.grpc)
        res = client.infer(MODEL, ft_inputs(rows, 6, beam_width=1, runtime_top_k=1))
        client.close()
        expected = engine.generate(rows, [SamplingParams(max_output_len=6)] * len(rows))
        for r, exp in enumerate(expected):
            n = int(exp.sequence_length[0])
            assert int(res.as_numpy("sequence_length")[r, 0]) == n
            np.testing.assert_array_equal(res.as_numpy("output_ids")[r, 0, :n],
                                          exp.output_ids[0, :n])
    finally:
        rc, err = served.terminate()
    assert rc == 0, f"serving.tritonserver exited {rc} on SIGTERM: {err[-2000:]}"
    assert "stopping tritonserver" in err
    assert not [url for url in served.endpoints[0].values() if port_open(url)]


def test_plain_launcher_names_a_missing_model_in_one_line(tmp_path, repo_root):
    (tmp_path / "a" / "1").mkdir(parents=True)
    proc = subprocess.run(_launcher("--model-repository", str(tmp_path)), cwd=repo_root,
                          env=_env(repo_root), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds 0 models (none); name one with --model-name"]
    proc = subprocess.run(_launcher("--model-repository", str(tmp_path), "--model-name", "a"),
                          cwd=repo_root, env=_env(repo_root), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model repository {tmp_path} has no a/config.pbtxt"]
