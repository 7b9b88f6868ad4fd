"""A pipeline run first removes what killed pipelines staged beside its summaries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from core import scratch
from pipeline.config import parse
from pipeline.run import Pipeline

REPO = Path(__file__).resolve().parents[2]

_WRITER = """
import sys
from core import storage
with storage.staged_file(sys.argv[1]) as tmp:
    open(tmp, "w").write(sys.argv[2])
    print(tmp, flush=True)
    sys.stdin.readline()  # a summary half written: held until told or killed
"""


def _writer(target: Path, text: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), text], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, Path(proc.stdout.readline().strip())


def test_pipeline_clears_dead_pipelines_scratch_and_keeps_a_live_ones(tmp_path, caplog):
    out = tmp_path / "out"
    dead, dead_tmp = _writer(out / "pipeline.json", "dead")
    live, live_tmp = _writer(out / "pipeline_state.json", "{}")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    cfg = parse({"output": str(out),
                 "convert": {"src": "ckpt", "dst": "repo", "model_name": "m"},
                 "serve": {"backend": "local"}, "evaluate": {"dataset": "data.jsonl"}})
    try:
        removed = Pipeline(cfg, address=None).clear_scratch()
        logged = [r.getMessage() for r in caplog.records if r.name == "pipeline.run"]
        assert removed.files == 2  # the half-written summary and its writer's lease
        assert removed.bytes > len("dead")
        assert not dead_tmp.exists() and live_tmp.read_text() == "{}"
        assert logged and "2 scratch file(s)" in logged[0]
    finally:
        live.communicate("\n", timeout=30)
    assert sorted(p.name for p in out.iterdir()) == ["pipeline_state.json"]
    assert [p for p in out.iterdir() if scratch.is_scratch(p)] == []
