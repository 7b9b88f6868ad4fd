"""The pipeline's stages as library calls in its own process, on its own Ray.

convert = :func:`conversion.run.convert`, serve = :func:`serving.api.open_servers`, evaluate =
:func:`evaluation.runner.evaluate`. Each takes its stage's options model, built from a run's
section of the config (whose keys are the stage's flags, interfaces.md). A stage that raises
becomes a :class:`StageError` whose message is one line, ``<stage> failed: <reason>``. Their
Ray tasks, actors and metrics run on the pipeline's cluster, so they show on its dashboard.

Also here: whether a stage's outputs already exist and verify, so a rerun can skip it
(core.manifest holds the checks).
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from core import ft_format, storage
from core.errors import UserError, first_line
from core.manifest import parse_manifest, verify_repository
from core.options import StageOptions
from pipeline import config


class StageError(RuntimeError):
    """A stage failed; the message is its one-line reason, ``<stage> failed: ...``."""


@contextlib.contextmanager
def reported(stage: str) -> Iterator[None]:
    """Turn any exception raised inside into one StageError line naming ``stage``.

    What is not a user-facing error (bad input, I/O) also gets its traceback on stderr, as a
    crashed job's would have been.
    """
    try:
        yield
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any stage failure becomes that stage's line
        if not isinstance(exc, (UserError, OSError, ValueError)):
            traceback.print_exc(file=sys.stderr)
        raise StageError(f"{stage} failed: {first_line(exc)}") from exc


def options_for(stage: str, settings: dict[str, Any]) -> StageOptions:
    """The stage's options model from a config section; None values mean the default."""
    return config.options_for(stage, {k: v for k, v in settings.items() if v is not None})


def convert(settings: dict[str, Any]) -> dict[str, Any]:
    """Run the conversion (``ray_jobs.convert``'s work); returns its JSON summary.

    Ray must already be initialised. Raises StageError (``convert failed: ...``).
    """
    with reported("convert"):
        from conversion.run import convert as run_convert

        opts = options_for("convert", settings)
        if opts.overwrite and opts.resume:
            raise UserError("--resume and --overwrite exclude each other")
        return run_convert(opts)


def open_servers(settings: dict[str, Any]) -> Any:
    """The serve stage's servers, not started yet (``serving.api.Servers``).

    Raises StageError (``serve failed: ...``) when the settings or the repository are wrong.
    """
    with reported("serve"):
        from serving.api import open_servers as open_serving

        return open_serving(options_for("serve", settings))


# The evaluate result's paths; the rest of it is metrics.json's content.
_EVAL_PATHS = ("output", "predictions", "report")


def evaluate(settings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Run one evaluation (``ray_jobs.evaluate``'s work); returns its metrics.

    Ray must already be initialised. Raises StageError (``evaluate failed: ...``).
    """
    with reported("evaluate"):
        from evaluation.runner import evaluate as run_evaluate

        result = run_evaluate(options_for("evaluate", settings), log=log)
    return {k: v for k, v in result.items() if k not in _EVAL_PATHS}


# --- outputs that verify -------------------------------------------------------------------


def weights_dir(convert: dict[str, Any]) -> str:
    """The weights folder a convert section writes: DST/<model>/1/<T>-gpu."""
    t = int(convert.get("tensor_parallel") or 1)
    return storage.join(convert["dst"], convert.get("model_name") or "t5", "1",
                        ft_format.weights_dir_name(t))


def verify_conversion(convert: dict[str, Any]) -> str | None:
    """None when a convert section's model is complete and intact and was converted from the
    source's present content (not only its path), else what is wrong."""
    problem = verify_repository(
        convert["dst"], convert.get("model_name") or "t5",
        tensor_parallel=int(convert.get("tensor_parallel") or 1),
        weight_dtype=convert.get("weight_dtype") or "fp32",
        need_vocab=bool(convert.get("vocab")))
    if problem is not None:
        return problem
    from conversion.source_id import same_source
    from conversion.t5x import CheckpointError

    try:
        header, _ = parse_manifest(storage.read_text(storage.join(weights_dir(convert),
                                                                  ft_format.MANIFEST)))
        return same_source(header, convert["src"])
    except (OSError, ValueError, CheckpointError) as exc:  # the convert stage will say it
        return first_line(exc)


def read_metrics(output: str) -> dict[str, Any] | None:
    """An evaluation's metrics.json, or None when it is not there."""
    try:
        return json.loads(storage.read_text(storage.join(output, "metrics.json")))
    except (FileNotFoundError, ValueError):
        return None
