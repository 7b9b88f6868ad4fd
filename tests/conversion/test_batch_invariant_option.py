"""The ``batch_invariant`` config.pbtxt parameter (issue 22): written by ``ray_jobs.convert``
(``--no-batch-invariant`` turns it off) and read back the way the Triton model and evaluation
read it."""

from __future__ import annotations

import pytest

from core import repository
from ray_jobs.convert import build_parser


def _params(config) -> dict[str, str]:
    text = repository.to_pbtxt(config)  # through the text Triton reads
    return {k: v.string_value for k, v in repository.parse_pbtxt(text).parameters.items()}


def test_convert_flag_writes_the_parameter_and_reads_back() -> None:
    parser = build_parser()
    on = parser.parse_args(["--src", "s", "--dst", "d", "--engine", "jax"])
    off = parser.parse_args(["--src", "s", "--dst", "d", "--engine", "jax",
                             "--no-batch-invariant"])
    assert (on.batch_invariant, off.batch_invariant) == (True, False)
    assert "--no-batch-invariant" in parser.format_help()
    for flag, text in ((True, "true"), (False, "false")):
        config = repository.model_config("t5", "jax", 1, batch_invariant=flag)
        assert _params(config)[repository.BATCH_INVARIANT] == text
        assert repository.batch_invariant(repository.parse_pbtxt(
            repository.to_pbtxt(config))) is flag
    # FasterTransformer has no such mode; a jax config without the parameter (written before
    # it existed) is served batch-invariant, as the engine's default.
    assert repository.batch_invariant(repository.model_config("t5", "fastertransformer", 1)) \
        is None
    old = repository.model_config("t5", "jax", 1)
    del old.parameters[repository.BATCH_INVARIANT]
    assert repository.batch_invariant(old) is True


def test_a_bad_value_is_named() -> None:
    assert repository.batch_invariant_value(" False ") is False
    with pytest.raises(ValueError, match="batch_invariant is 'yes'"):
        repository.batch_invariant_value("yes")
