"""Every command's two ways to fail, through its real entry point (a subprocess).

A refusal (core.errors.UserError, whichever stage raises it) is one stderr line, no traceback,
exit 2; any other exception is a bug: its traceback, then ``error: <Type>: <message>``, exit 1.
Each refusal here is real bad input; each bug is a KeyError raised from the library function
the command calls (patched in before the command runs), since the code has no known bug to
trigger on purpose.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUG = "injected bug"


def _run(module: str, args: list[str], patch: str = "") -> subprocess.CompletedProcess:
    code = (f"import runpy, sys\n{patch}\nsys.argv = [{module!r}, *{args!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def _bug_in(module: str, name: str) -> str:
    """Replace MODULE.NAME by a function that raises a KeyError: a bug in that function."""
    return (f"import {module}\n"
            f"def _broken(*a, **k):\n    raise KeyError({BUG!r})\n"
            f"{module}.{name} = _broken")


def _commands(tmp: Path) -> list[tuple[str, list[str], str, str, str]]:
    """(module, refused args, the refusal's line, bug args, the module.function to break)."""
    (tmp / "empty").mkdir()
    cluster_yaml = tmp / "cluster.yaml"
    cluster_yaml.write_text("name: t5ft\n")
    return [
        ("ray_jobs.convert", ["--src", str(tmp), "--dst", str(tmp / "out"), "--resume",
                              "--overwrite"],
         "error: --resume and --overwrite exclude each other",
         ["--src", str(tmp), "--dst", str(tmp / "out")], "conversion.run.convert"),
        ("ray_jobs.serve", ["--model-repository", str(tmp), "--model-name", "t5",
                            "--replicas", "0"],
         "error: --replicas must be >= 1, got 0",
         ["--model-repository", str(tmp), "--model-name", "t5"], "serving.api.open_servers"),
        ("ray_jobs.evaluate", ["--model-name", "t5", "--output", str(tmp / "ev")],
         "error: --url HOST:PORT is required with --backend triton (or give --backend "
         "in-process --model-repository DST)",
         ["--model-name", "t5", "--output", str(tmp / "ev")], "evaluation.runner.evaluate"),
        ("ray_jobs.pipeline", ["--config", str(tmp / "missing.yaml")],
         f"error: pipeline config {tmp / 'missing.yaml'} does not exist",
         ["--config", str(tmp / "missing.yaml")], "pipeline.config.load"),
        ("cluster", ["render", "--config", str(tmp / "missing.yaml")],
         f"error: cluster config {tmp / 'missing.yaml'} does not exist",
         ["render", "--config", str(cluster_yaml)], "cluster.config.load_config"),
        ("serving.tritonserver", ["--model-repository", str(tmp / "empty")],
         f"error: {tmp / 'empty'} holds 0 models (none); name one with --model-name",
         ["--model-repository", str(tmp / "empty"), "--model-name", "t5"],
         "serving.tritonserver.TritonServer"),
    ]


@pytest.mark.parametrize("index", range(6), ids=["convert", "serve", "evaluate", "pipeline",
                                                 "cluster", "tritonserver"])
def test_a_refusal_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, index):
    module, refused, line, buggy, target = _commands(tmp_path)[index]
    proc = _run(module, refused)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines == [line]
    assert proc.stdout == ""
    bug = _run(module, buggy, _bug_in(*target.rsplit(".", 1)))
    assert bug.returncode == 1, bug.stderr[-2000:]
    assert "Traceback (most recent call last)" in bug.stderr
    assert bug.stderr.strip().splitlines()[-1] == f"error: KeyError: '{BUG}'"
