"""Evaluation outputs on gs:// are staged in the node's scratch folder: a killed evaluation's
staging folder is removed by the next one, a live one's is not (core/scratch.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from core import scratch
from evaluation.outputs import PREDICTIONS, OutputDir, prediction_line

REPO = Path(__file__).resolve().parents[2]

_EVALUATION = """
import sys
from evaluation.outputs import OutputDir
out = OutputDir(sys.argv[1], resume=False, sync_seconds=3600)
out.append_prediction({"id": sys.argv[2], "prediction": "p", "reference": "r"})
print(out.local, flush=True)
sys.stdin.readline()  # stay alive, mid-evaluation, until told or killed
out.cleanup()
"""


def _evaluation(output: str, ex_id: str, node: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(REPO), scratch.SCRATCH_DIR_ENV: str(node)}
    proc = subprocess.Popen([sys.executable, "-c", _EVALUATION, output, ex_id], cwd=REPO,
                            env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, Path(proc.stdout.readline().strip())


def test_evaluation_removes_a_killed_runs_staging_and_keeps_a_live_ones(
        gcs, gcs_prefix, monkeypatch, tmp_path):
    node = tmp_path / "node-scratch"
    monkeypatch.setenv(scratch.SCRATCH_DIR_ENV, str(node))
    output = f"gs://{gcs.bucket}/{gcs_prefix}"
    dead, dead_dir = _evaluation(f"{output}/dead", "d", node)
    live, live_dir = _evaluation(f"{output}/live", "l", node)
    assert dead_dir.parent == node and (dead_dir / PREDICTIONS).exists()
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    try:
        out = OutputDir(f"{output}/dead", resume=False)
        line = prediction_line({"id": "d", "prediction": "p", "reference": "r"})
        # predictions.jsonl (one line), errors.jsonl (empty) and the dead run's lease
        assert out.scratch_removed.files == 3
        assert out.scratch_removed.bytes > len(line)
        assert not dead_dir.exists()
        assert (live_dir / PREDICTIONS).read_text() == prediction_line(
            {"id": "l", "prediction": "p", "reference": "r"})
        out.append_prediction({"id": "d", "prediction": "p", "reference": "r"})
        out.finalize({"d": 0}, {"d": line}, [])
        out.cleanup()
        assert gcs.blobs(f"{gcs_prefix}/dead")[PREDICTIONS].download_as_text() == line
    finally:
        live.communicate("\n", timeout=30)
    assert list(node.iterdir()) == []  # both finished runs took their staging with them
