"""The embedded default pipeline: the demo model through the same path as ``--config``.

The model is built (or loaded from cache) by :mod:`demo.build`: UL2's architecture at toy
size, a vocabulary trained on the bundled XSum sample, trained to reproduce those ten
summaries, saved as a real T5X checkpoint. This config converts it (engine ``jax``: the
Python-backend engine Triton runs on CPU), serves it with one local tritonserver and
evaluates it on the same ten rows. A correct pipeline scores ROUGE-L near 1.0; a misplaced or
mis-split tensor collapses the score.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from demo.build import SAMPLE, DemoModel, from_json

MODEL_NAME = "ul2-demo"


def demo_config(model: DemoModel, output: str, tensor_parallel: int = 1) -> dict[str, Any]:
    """A pipeline config (as PIPELINE.yaml would hold it) for the demo model."""
    s = model.settings
    out = Path(output).absolute()
    name = f"{MODEL_NAME}-tp{tensor_parallel}"
    return {
        "output": str(out),
        "runs": [{"name": name}],
        "convert": {
            "src": str(model.checkpoint_dir),
            "dst": str(out / "model_repository"),
            "model_name": name,
            "tensor_parallel": tensor_parallel,
            "weight_dtype": "fp32",
            "inference_dtype": "fp32",
            "engine": "jax",
            "vocab": str(model.vocab),
            "verify": True,
            "no_progress": True,
        },
        "serve": {"backend": "local", "replicas": 1, "ready_timeout": 300},
        "evaluate": {
            "dataset": str(SAMPLE),
            "input_template": s.input_template,
            "max_input_len": s.max_input_len,
            "max_output_len": s.max_output_len,
            "beam_width": 1,
            "top_k": 1,
            "num_actors": 2,
            "batch_size": 5,
            "no_progress": True,
        },
    }


def build_model() -> DemoModel:
    """Build or load the demo model in a child process (``python -m demo.build``).

    Training runs JAX; doing it in a child keeps JAX's threads and memory out of the pipeline
    driver, which goes on to run the stages and their Ray work. The child's log goes to our
    stderr; its last stdout line is the model's paths as JSON. Raises RuntimeError when it
    fails.
    """
    proc = subprocess.run([sys.executable, "-m", "demo.build"], stdout=subprocess.PIPE,
                          stderr=None, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"building the demo model failed (exit code {proc.returncode}); "
                           "see the log above")
    return from_json(json.loads(lines[-1]))
