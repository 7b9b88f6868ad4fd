"""A model repository written by ``ray_jobs.convert --engine jax`` stands alone.

Copied anywhere, it is served by ``python -m serving.tritonserver`` started from an unrelated
empty folder with no PYTHONPATH: its ``1/model.py`` imports the engine from this project's
installed package (the venv's ``pip install -e .``), never from a checkout path or the cwd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.engine import SamplingParams
from tests.serving.conftest import MODEL, ServeProcess, ft_inputs, read_ready_line, sample_rows

pytestmark = pytest.mark.slow


def _bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _process_tree(pid: int) -> list[int]:
    """pid and every descendant (the Python backend stubs are tritonserver's children)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def test_copied_repository_serves_from_an_unrelated_folder(serving_model_repo, engine,
                                                           repo_root, tmp_path):
    copy = tmp_path / "elsewhere" / "repo"
    shutil.copytree(serving_model_repo, copy)
    # Nothing in the repository names the checkout.
    for path in copy.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".pbtxt", ".json", ".ini"):
            assert str(repo_root) not in path.read_text(errors="replace"), path
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    env = _bare_env()

    # `serving` is importable with no PYTHONPATH, isolated (-E), from the unrelated folder:
    # it comes from the install, not from sys.path's '' (the cwd).
    probe = subprocess.run(
        [sys.executable, "-E", "-c", "import serving, sys; print(sys.path[0] == '' and "
         "not __import__('os').listdir('.'))"],
        cwd=unrelated, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True"

    proc = subprocess.Popen([sys.executable, "-m", "serving.tritonserver",
                             "--model-repository", str(copy)],
                            cwd=unrelated, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    served = ServeProcess(proc, read_ready_line(proc, 240))
    try:
        assert served.ready["model"] == MODEL
        # The server and its Python stubs run outside the checkout, without it on PYTHONPATH.
        tree = _process_tree(served.ready["pid"])
        assert len(tree) >= 2, "no Python backend stub under tritonserver"
        for pid in tree:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            assert not cwd.is_relative_to(repo_root), (pid, cwd)
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for entry in environ:
                if entry.startswith(b"PYTHONPATH="):
                    # (the venv's site-packages may lie inside the checkout: that is fine)
                    folders = entry.decode()[len("PYTHONPATH="):].split(os.pathsep)
                    assert not [f for f in folders if (Path(f) / "serving").is_dir()], entry

        row = sample_rows(1, seed=7)
        expected = engine.generate(row, [SamplingParams(max_output_len=6)])[0]
        client = grpcclient.InferenceServerClient(served.grpc)
        try:
            res = client.infer(MODEL, ft_inputs(row, 6, beam_width=1, runtime_top_k=1))
        finally:
            client.close()
        n = int(expected.sequence_length[0])
        assert int(res.as_numpy("sequence_length")[0, 0]) == n
        np.testing.assert_array_equal(res.as_numpy("output_ids")[0, 0, :n],
                                      expected.output_ids[0, :n])
    finally:
        rc, err = served.terminate()
    assert rc == 0, f"serving.tritonserver exited {rc} on SIGTERM: {err[-2000:]}"
