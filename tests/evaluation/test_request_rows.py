"""How many examples ``ray_jobs.evaluate`` puts in one request when ``--batch-size`` is not
given (issue 22's cost): a batch-invariant jax model runs every program at a fixed batch, its
``max_batch_size`` on a GPU, so a smaller request costs a whole program (3.2x slower with
requests of 8 on an H100, docs/benchmarks.md); requests then fill it. The config.pbtxt files
are written by the converter's own writer (core.repository.model_config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import repository
from evaluation.runner import DEFAULT_REQUEST_ROWS, EvalSettings, request_rows, served_model


def _repo(tmp_path: Path, engine: str, invariant: bool = True) -> Path:
    folder = tmp_path / engine / str(invariant) / "t5"
    folder.mkdir(parents=True)
    config = repository.model_config("t5", engine, 1, data_type="bf16",
                                     batch_invariant=invariant)
    (folder / "config.pbtxt").write_text(repository.to_pbtxt(config))
    return folder.parent


@pytest.mark.parametrize(("engine", "invariant", "given", "want"), [
    ("jax", True, None, 128),  # the model's max_batch_size: one GPU program
    ("jax", True, 5, 5),  # --batch-size wins
    ("jax", False, None, DEFAULT_REQUEST_ROWS),  # batching freely: today's requests
    ("fastertransformer", True, None, DEFAULT_REQUEST_ROWS),  # FT has no such mode
])
def test_requests_fill_the_served_models_fixed_batch(tmp_path, engine, invariant, given, want):
    repo = _repo(tmp_path, engine, invariant)
    s = EvalSettings(backend="in-process", model_repository=str(repo), model_name="t5",
                     output=str(tmp_path / "out"), dataset="unused", batch_size=given)
    assert request_rows(s, served_model(s, [])) == want


def test_no_readable_config_keeps_eight(tmp_path):
    s = EvalSettings(backend="in-process", model_repository=str(tmp_path), model_name="t5",
                     output=str(tmp_path / "out"), dataset="unused")
    assert request_rows(s, served_model(s, [])) == DEFAULT_REQUEST_ROWS == 8
